"""Liveness of resumes and stalls over loopback: dropped streams resume with Last-Event-ID and
exact text, in this process (`stream_request`) and through the pool; a silent stream ends with
`idle_timeout` near its configured value and leaves no socket open. Bounds are generous: these
tests pin outcomes, not speed (timings are in bench/resume.py)."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
from pathlib import Path

import aiohttp
import psutil
import pytest

from pipeline import PipelineBuilder
from pipeline.sources import Request
from pipeline.testing import MockProviderProcess, MockProviderServer, expected_stream
from pipeline.tokens import Delta, Error

pytestmark = pytest.mark.timeout(90)

DROPS = 20
TOKENS = 60
IDLE = 0.5
MESSAGES = [{"role": "user", "content": "Tell me a story"}]


@pytest.fixture
def no_own_shm_leak():
    """Fails the test when this process leaves segments in /dev/shm. Only our own: segment names
    carry the creating pid, and other test runs on the machine create and remove theirs meanwhile."""
    prefix = f"streamring-{os.getpid()}-"

    def ours() -> set[str]:
        return {p.name for p in Path("/dev/shm").glob(prefix + "*")}

    before = ours()
    yield
    leaked = ours() - before
    assert not leaked, f"leaked shared-memory segments: {sorted(leaked)}"


def mock_request(base_url: str, seed: int, key: str, fault: str, tokens: int = TOKENS) -> Request:
    return Request.openai_chat(model="mock-model", messages=MESSAGES, base_url=base_url, api_key="k-1234",
                               mock={"tokens": tokens, "seed": seed, "key": key, "fault": fault})


def expected(request: Request):
    """The seeded plan's text for a clean stream of this request (fault removed: the drop fault
    does not change what a client must end up with)."""
    body = json.loads(request.body)
    mock = dict(body["mock"])
    mock.pop("fault")
    return expected_stream("openai-chat", dict(body, mock=mock))


def sockets_to(pids: list[int], port: int) -> list:
    out = []
    for pid in pids:
        out += [c for c in psutil.Process(pid).net_connections(kind="tcp") if c.raddr and c.raddr.port == port]
    return out


async def wait_no_sockets(pids: list[int], port: int, within: float = 3.0) -> list:
    """The sockets still held to `port` once a just-closed transport had `within` s to go."""
    deadline = time.monotonic() + within
    while (left := sockets_to(pids, port)) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return left


def check_drop_logs(logs, n: int) -> None:
    """Each dropped stream shows on the mock as one cut connection and one resume after an id,
    and together they sent every text token exactly once."""
    cut = [lg for lg in logs if lg.status == "disconnected"]
    resumed = [lg for lg in logs if lg.resumed_from is not None]
    assert len(cut) == n and len(resumed) == n
    by_rid = {lg.request_id: lg for lg in cut}
    for lg in resumed:
        assert lg.status == "complete" and lg.resume_after is not None
        parent = by_rid[lg.resumed_from]
        assert parent.key == lg.key
        want = expected_stream("openai-chat", {"mock": {"tokens": TOKENS, "seed": parent.seed}}).text_tokens
        assert parent.text_tokens + lg.text_tokens == want  # nothing sent twice, nothing skipped


# --- drops ---------------------------------------------------------------------------------------


async def test_twenty_drops_resume_with_exact_text_in_process():
    pipe = PipelineBuilder().provider("openai-chat").http(total_timeout=30).build()
    async with MockProviderServer(seed=11) as mock, aiohttp.ClientSession() as session:
        requests = [mock_request(mock.base_url("openai-chat"), i, f"drop-{i}", "drop") for i in range(DROPS)]
        streams = [pipe.stream_request(r, session=session) for r in requests]
        results = await asyncio.wait_for(asyncio.gather(*(s.collect() for s in streams)), 30)
        logs = mock.streams
    for req, stream, result in zip(requests, streams, results):
        assert result.error is None, result.error
        assert result.text == expected(req).text
        assert result.finish_reason == "stop"
        assert stream.reconnects == 1
    check_drop_logs(logs, DROPS)


def test_twenty_drops_resume_with_exact_text_through_the_pool(no_own_shm_leak):
    pipe = PipelineBuilder().provider("openai-chat").http(total_timeout=30).build()
    with MockProviderProcess(seed=12) as mock:
        requests = [mock_request(mock.base_url("openai-chat"), i, f"pdrop-{i}", "drop") for i in range(DROPS)]
        with pipe.pool(workers=1, ingest=1, concurrency=DROPS) as pool:
            results = list(pool.run(requests))
        logs = mock.streams()
    assert sorted(r.source_index for r in results) == list(range(DROPS))
    for r in results:
        assert r.error is None, r.error
        assert r.text == expected(requests[r.source_index]).text
        assert r.finish_reason == "stop"
    check_drop_logs(logs, DROPS)


# --- stalls ----------------------------------------------------------------------------------------


async def test_stall_ends_with_idle_timeout_near_its_value_and_releases_the_socket():
    pipe = PipelineBuilder().provider("openai-chat").http(idle_timeout=IDLE, retries=0).build()
    me = psutil.Process().pid
    async with MockProviderServer(seed=13) as mock, aiohttp.ClientSession() as session:
        # The mock goes silent for 20x the timeout before the middle content event.
        # A clean stream first: a cold mock's first answer (loading its tokenizer) can take longer
        # than the idle timeout under test.
        warm_pipe = PipelineBuilder().provider("openai-chat").build()
        warm = await warm_pipe.stream_request(mock_request(mock.base_url("openai-chat"), 1, "warm", "keepalive"), session=session).collect()
        assert warm.error is None, warm.error
        request = mock_request(mock.base_url("openai-chat"), 3, "stall", f"stall:{IDLE * 20}")
        stream = pipe.stream_request(request, session=session)
        last_text = error_at = None
        kinds = []
        async for tok in stream:
            if type(tok) is Delta:
                last_text = time.monotonic()
            elif type(tok) is Error:
                error_at = time.monotonic()
                kinds.append(tok.kind)
        left = await wait_no_sockets([me], mock.port)
    assert kinds == ["idle_timeout"]
    assert last_text is not None and error_at is not None
    # Close to the configured timeout: a timer that re-arms late would show up as ~2x here.
    assert 0.9 * IDLE <= error_at - last_text <= 1.6 * IDLE
    # What came before the silence is kept, and it is the start of the stream's text.
    text = stream.result.text
    assert text and expected(request).text.startswith(text) and text != expected(request).text
    assert left == [], f"sockets still open to the mock: {left}"


def test_stall_through_the_pool_ends_with_idle_timeout_and_the_ingest_releases_the_socket(no_own_shm_leak):
    pipe = PipelineBuilder().provider("openai-chat").http(idle_timeout=IDLE, retries=0).build()
    with MockProviderProcess(seed=14) as mock:
        request = mock_request(mock.base_url("openai-chat"), 4, "pstall", f"stall:{IDLE * 20}")
        seen: dict = {"kinds": [], "text": []}

        async def consume(pool) -> None:
            last = None
            async for _, tokens in pool.astream([request]):
                now = time.monotonic()
                for tok in tokens:
                    if type(tok) is Delta:
                        last = now
                        seen["text"].append(tok.content)
                    elif type(tok) is Error:
                        seen["kinds"].append(tok.kind)
                        seen["gap"] = now - last if last is not None else None
            seen["left"] = await wait_no_sockets(pool.ingest_pids, mock.port)

        # A clean stream first: a cold mock's first answer (loading its tokenizer) can take longer
        # than the idle timeout under test.
        warm = mock_request(mock.base_url("openai-chat"), 1, "pwarm", "keepalive")
        with urllib.request.urlopen(urllib.request.Request(warm.url, data=warm.body, headers=warm.headers), timeout=30) as r:
            assert r.status == 200 and r.read().rstrip().endswith(b"data: [DONE]")
        with pipe.pool(workers=1, ingest=1) as pool:
            asyncio.run(asyncio.wait_for(consume(pool), 30))
    assert seen["kinds"] == ["idle_timeout"]
    assert seen["gap"] is not None and 0.9 * IDLE <= seen["gap"] <= 1.6 * IDLE
    text = "".join(seen["text"])
    assert text and expected(request).text.startswith(text)
    assert seen["left"] == [], f"the ingest still holds sockets to the mock: {seen['left']}"
