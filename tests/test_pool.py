"""The multiprocess pool (workers/): results identical to the in-process pipeline for every real
capture, many concurrent streams, HTTP streams with each mock fault, the run/astream/submit
semantics, and no leaked children, descriptors or segments.

One pool per module (forkserver start is ~0.3 s); leak checks compare against a baseline taken
after the multiprocessing helpers (forkserver, resource tracker, segment guardian) exist.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import time

import psutil
import pytest

from pipeline import PipelineBuilder
from pipeline.sources import Replay, Request
from pipeline.testing import FAULTS, MockProviderProcess, expected_stream, stream_seed
from pipeline.tokens import Delta, Done, Error
from shm.segment import guardian_pid
from tests.conftest import capture_cases, provider_manifest, read_capture, running, shm_entries

MOCK_SEED = 11


# --- leak helpers --------------------------------------------------------------------------------


def _helper_pids() -> set[int]:
    """Long-lived helpers that outlive a pool by design (DESIGN.md section 6)."""
    pids = set()
    from multiprocessing import forkserver, resource_tracker

    for pid in (getattr(forkserver._forkserver, "_forkserver_pid", None),
                getattr(resource_tracker._resource_tracker, "_pid", None), guardian_pid()):
        if pid:
            pids.add(pid)
    return pids


# Children that other module fixtures keep alive on purpose (the mock, another open pool).
_OTHERS: set[int] = set()


def _children() -> set[int]:
    me = psutil.Process()
    kids = set()
    for p in me.children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                kids.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return kids - _helper_pids() - _OTHERS


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Baseline:
    def __init__(self) -> None:
        self.children = _children()
        self.fds = _fds()
        self.shm = shm_entries()

    def check(self, pool_pids: set[int]) -> None:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and (_children() - self.children):
            time.sleep(0.02)
        assert not (_children() - self.children), "pool children left running"
        assert not any(running(p) for p in pool_pids)
        assert _fds() <= self.fds, f"leaked descriptors: {_fds()} > {self.fds}"
        assert not (shm_entries() - self.shm), "leaked shared-memory segments"


def _pipe(dialect: str = "openai-chat", **http):
    b = PipelineBuilder().provider(dialect)
    if http:
        b = b.http(**http)
    return b.build()


@pytest.fixture(scope="module")
def warm():
    """Start the helpers once so the leak baseline includes them."""
    with _pipe().pool(workers=1, ingest=1) as pool:
        list(pool.run([Replay(b'data: {"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":"stop"}]}\n\n')]))


@pytest.fixture(scope="module")
def pool(warm):
    """K=2, I=1: the pool most tests share; leak-checked when the module ends."""
    p = _pipe().pool(workers=2, ingest=1, concurrency=1000)
    base = Baseline()
    with p:
        pids = set(p.worker_pids + p.ingest_pids)
        _OTHERS.update(pids)
        yield p
        pids = set(p.worker_pids + p.ingest_pids)
    _OTHERS.difference_update(pids)
    base.check(pids)


# --- every real capture: identical to the in-process pipeline ------------------------------------


def _comparable(r):
    return dict(
        text=r.text, choices=[(c.index, c.text, c.finish_reason) for c in r.choices], refusal=r.refusal,
        reasoning=r.reasoning, tool_calls=[(t.id, t.name, t.arguments, t.raw_arguments) for t in r.tool_calls],
        server_tools=r.server_tools, usage=r.usage, finish=r.finish, finish_reason=r.finish_reason,
        error=None if r.error is None else r.error.kind,
    )


def _in_process(name: str, dialect: str, read_size: int):
    data = read_capture(name)
    pipe = PipelineBuilder().provider(dialect).build()
    return pipe.collect([data[i : i + read_size] for i in range(0, len(data), read_size)])


@pytest.fixture(scope="module")
def capture_results(pool):
    """Every capture through the pool at once, in two read sizes (1 KiB, and 7 bytes so events
    straddle reads), keyed by (name, read_size)."""
    manifest = provider_manifest()
    if manifest is None:
        pytest.skip("real provider captures absent")
    sources, keys = [], []
    for name, info in sorted(manifest["files"].items()):
        for rs in (1024, 7):
            sources.append(Replay(read_capture(name), read_size=rs, provider=info["dialect"], custom_id=f"{rs}:{name}"))
            keys.append((name, rs))
    results = list(pool.run(sources))
    assert len(results) == len(sources)
    out = {}
    for r in results:
        assert keys[r.source_index] == (r.custom_id.split(":", 1)[1], int(r.custom_id.split(":", 1)[0]))
        out[keys[r.source_index]] = r
    return manifest, out


@pytest.mark.parametrize("name", capture_cases())
def test_capture_through_pool_equals_in_process(capture_results, name):
    manifest, results = capture_results
    info = manifest["files"][name]
    for rs in (1024, 7):
        got = results[(name, rs)]
        assert _comparable(got) == _comparable(_in_process(name, info["dialect"], rs))
        # And against the manifest, read independently of both.
        expect = info["expect"]
        assert got.text == expect["text"]
        assert (got.error is None) == (info["outcome"] == "complete")
        assert len(got.tool_calls) == expect["n_tool_calls"]
        if info["outcome"] == "complete":
            assert got.finish_reason == expect["finish_reason"]


# --- many streams --------------------------------------------------------------------------------


def _chat_stream(i: int, n_tokens: int) -> tuple[bytes, str]:
    words = [f"w{i}.{t} " for t in range(n_tokens)]
    body = b"".join(
        b'data: {"choices":[{"index":0,"delta":{"content":"%s"},"finish_reason":null}]}\n\n' % w.encode() for w in words
    )
    body += b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    return body, "".join(words)


def test_a_thousand_concurrent_replayed_streams(pool):
    streams = [_chat_stream(i, 20) for i in range(1000)]
    sources = (Replay(body, read_size="event") for body, _ in streams)  # a lazy generator
    results = list(pool.run(sources, concurrency=1000))
    assert sorted(r.source_index for r in results) == list(range(1000))
    for r in results:
        assert r.error is None and r.text == streams[r.source_index][1]


def test_many_replays_of_a_few_files_by_path(pool, tmp_path):
    # Concurrent replays of one file share its bytes in the ingest (RecordingCache); a file
    # rewritten between runs is read again.
    files = []
    for i in range(3):
        body, text = _chat_stream(100 + i, 30)
        path = tmp_path / f"s{i}.sse"
        path.write_bytes(body)
        files.append((path, text))
    sources = [Replay(str(files[i % 3][0]), read_size="event") for i in range(150)]
    results = list(pool.run(sources, concurrency=150))
    assert sorted(r.source_index for r in results) == list(range(150))
    for r in results:
        assert r.error is None and r.text == files[r.source_index % 3][1]

    body, text = _chat_stream(200, 45)
    files[0][0].write_bytes(body)
    results = list(pool.run([Replay(str(files[0][0]), read_size="event")] * 4))
    assert [r.text for r in results] == [text] * 4


def test_four_mib_event_crosses_the_ring_among_small_streams(pool):
    big_text = "x" * (4 * 1024 * 1024)
    big = (b'data: {"choices":[{"index":0,"delta":{"content":"' + big_text.encode() + b'"},"finish_reason":null}]}\n\n'
           b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')
    small = [_chat_stream(i, 5) for i in range(200)]
    sources = [Replay(b, read_size=256) for b, _ in small[:100]] + [Replay(big, read_size=65536)] + [Replay(b, read_size=256) for b, _ in small[100:]]
    results = {r.source_index: r for r in pool.run(sources)}
    assert len(results) == 201
    assert results[100].error is None and results[100].text == big_text
    for i, (_, text) in enumerate(small):
        assert results[i if i < 100 else i + 1].text == text


def test_large_replay_source_crosses_the_submission_ring(pool):
    # A StreamOpen far larger than a ring entry (it carries the replay's bytes).
    body, text = _chat_stream(7, 60_000)
    assert len(body) > 4 * pool._sub[0].capacity
    (r,) = pool.run([Replay(body, read_size=65536)])
    assert r.error is None and r.text == text


def test_lazy_sources_respect_the_concurrency_limit(pool):
    pulled = 0

    def sources():
        nonlocal pulled
        for i in range(300):
            pulled += 1
            yield Replay(_chat_stream(i, 3)[0])

    done = 0
    for _ in pool.run(sources(), concurrency=8):
        done += 1
        # Streams opened and not yet delivered (this one included) never exceed the limit.
        assert pulled - (done - 1) <= 8 + 1
    assert done == 300


def test_run_reads_the_generator_lazily(pool):
    pulled = 0

    def sources():
        nonlocal pulled
        for i in range(10_000):
            pulled += 1
            yield Replay(_chat_stream(i, 2)[0])

    it = pool.run(sources(), concurrency=4)
    first = next(it)
    assert first.error is None
    assert pulled <= 4 + 1  # at most the limit (and the one that refilled it) read so far
    it.close()


# --- run / astream / submit / cancel -------------------------------------------------------------


def test_result_carries_ids(pool):
    srcs = [Replay(_chat_stream(i, 2)[0], custom_id=f"c{i}") for i in range(5)]
    results = list(pool.run(srcs))
    assert sorted((r.source_index, r.custom_id) for r in results) == [(i, f"c{i}") for i in range(5)]
    assert len({r.stream_id for r in results}) == 5


async def test_astream_gives_every_token_once_and_ends_each_stream(pool):
    streams = [_chat_stream(i, 30) for i in range(50)]
    texts = {i: [] for i in range(50)}
    ends = {}
    async for idx, batch in pool.astream(Replay(b, read_size=100) for b, _ in streams):
        assert idx not in ends, "tokens after the stream's terminal token"
        for tok in batch:
            if type(tok) is Delta:
                texts[idx].append(tok.content)
        if type(batch[-1]) in (Done, Error):
            ends[idx] = batch[-1]
        assert all(type(t) not in (Done, Error) for t in batch[:-1])
    assert set(ends) == set(range(50))
    assert all(type(e) is Done for e in ends.values())
    for i, (_, text) in enumerate(streams):
        assert "".join(texts[i]) == text


def test_submit_iterates_tokens_sync(pool):
    body, text = _chat_stream(3, 40)
    h = pool.submit(Replay(body, read_size=50))
    toks = list(h)
    assert "".join(t.content for t in toks if type(t) is Delta) == text
    assert type(toks[-1]) is Done
    assert h.result().text == text


async def test_submit_iterates_tokens_async(pool):
    body, text = _chat_stream(4, 40)
    h = pool.submit(Replay(body, read_size=50))
    toks = [t async for t in h]
    assert "".join(t.content for t in toks if type(t) is Delta) == text
    assert (await h.aresult()).text == text


def _slow_request(mock, key: str, tokens: int = 2000, tps: int = 50) -> Request:
    body = dict(_BODY, max_tokens=tokens)
    return Request.openai_chat(base_url=mock.base_url("openai-chat"),
                               headers={"x-mock-stream-key": key, "x-mock-tps": str(tps)}, **body)


def _wait_closed(mock, key: str, timeout: float = 3.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = mock.stream_log(key)
        if log is None:
            return "never sent"  # cancelled before its request went out: fine too
        if log.status != "open" or time.monotonic() > deadline:
            if log.status == "open" and log.headers_ns is None:
                # Closed while the mock was still writing its headers: its log cannot say so.
                return "never sent"
            return log.status
        time.sleep(0.05)


_CLOSED = ("client_closed", "cancelled", "disconnected", "never sent")


def test_cancel_a_submitted_stream_closes_its_connection(mock, http_pool):
    key = f"cancel-{os.getpid()}"
    h = http_pool.submit(_slow_request(mock, key))
    it = iter(h)
    first = next(it)
    assert type(first) is Delta
    t0 = time.monotonic()
    h.cancel()
    rest = list(it)
    assert type(rest[-1]) is Error and rest[-1].kind == "cancelled"
    result = h.result()
    assert result.error.kind == "cancelled"
    assert time.monotonic() - t0 < 2
    expected = expected_stream("openai-chat", dict(_BODY, max_tokens=2000), seed=stream_seed(MOCK_SEED, key)).text
    assert expected.startswith(result.text) and len(result.text) < len(expected)
    assert _wait_closed(mock, key) in _CLOSED[:3]


def test_cancel_right_after_submit(pool):
    # Cancelled before the ingest's task for it ever ran: it still ends, once, with its outcome.
    h = pool.submit(Replay(_chat_stream(5, 50)[0], read_size="event"))
    h.cancel()
    toks = list(h)
    assert type(toks[-1]) in (Done, Error)
    assert (h.result().error is None) == (type(toks[-1]) is Done)


def test_breaking_out_of_run_cancels_the_rest(mock, http_pool):
    keys = [f"brk-{i}-{os.getpid()}" for i in range(3)]
    sources = [Request.openai_chat(base_url=mock.base_url("openai-chat"), headers={"x-mock-stream-key": "q" + keys[0]}, **_BODY)]
    sources += [_slow_request(mock, k) for k in keys]
    for r in http_pool.run(sources):
        assert r.error is None  # the quick one
        break
    for k in keys:
        assert _wait_closed(mock, k) in _CLOSED
    assert all(st.abandoned for st in http_pool._streams.values())


async def test_breaking_out_of_astream_cancels_the_rest(mock, http_pool):
    keys = [f"abrk-{i}-{os.getpid()}" for i in range(3)]
    agen = http_pool.astream([_slow_request(mock, k) for k in keys])
    async for _idx, _batch in agen:
        break
    await agen.aclose()
    for k in keys:
        assert await asyncio.to_thread(_wait_closed, mock, k) in _CLOSED


def test_metrics_are_merged_across_workers(pool):
    before = pool.metrics()
    n_before = getattr(before, "streams", None)
    list(pool.run(Replay(_chat_stream(i, 10)[0]) for i in range(20)))
    after = pool.metrics()
    assert after is not None
    if n_before is not None:
        assert after.streams - n_before == 20


def test_pids_are_live_children(pool):
    assert len(pool.worker_pids) == 2 and len(pool.ingest_pids) == 1
    kids = {p.pid for p in psutil.Process().children(recursive=True)}
    assert set(pool.worker_pids + pool.ingest_pids) <= kids


# --- HTTP streams from the mock provider, one per fault ------------------------------------------

_BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40}
_FAULT_ARGS = {"stall": "stall:3", "slow_headers": "slow_headers:0.3", "429": "429:0"}
# What each fault must end as through the pool (FAULTS documents these outcomes; the pipeline
# runs with idle_timeout=1 s and no retries).
_OUTCOME = {
    "disconnect": "truncated", "truncate": "truncated", "stall": "idle_timeout", "429": "rate_limited",
    "500": "http", "503": "http", "malformed": "malformed", "error": "provider",
}


@pytest.fixture(scope="module")
def mock():
    with MockProviderProcess(seed=MOCK_SEED) as m:
        _OTHERS.add(m.pid)
        yield m


@pytest.fixture(scope="module")
def http_pool(warm):
    p = _pipe(idle_timeout=1.0, retries=0).pool(workers=2, ingest=2)
    base = Baseline()
    with p:
        pids = set(p.worker_pids + p.ingest_pids)
        _OTHERS.update(pids)
        yield p
        pids = set(p.worker_pids + p.ingest_pids)
    _OTHERS.difference_update(pids)
    base.check(pids)


def test_http_streams_with_every_mock_fault(mock, http_pool):
    faults = [None] + sorted(FAULTS)
    sources = []
    for f in faults:
        headers = {"x-mock-stream-key": f"fault-{f}-{os.getpid()}"}
        if f:
            headers["x-mock-fault"] = _FAULT_ARGS.get(f, f)
        sources.append(Request.openai_chat(base_url=mock.base_url("openai-chat"), api_key="sk-test", headers=headers,
                                           custom_id=str(f), **_BODY))
    results = {r.custom_id: r for r in http_pool.run(sources)}
    assert len(results) == len(faults)
    for f, src in zip(faults, sources):
        r = results[str(f)]
        key = src.headers["x-mock-stream-key"]
        fault_hdr = {"x-mock-fault": src.headers["x-mock-fault"]} if f else {}
        exp = expected_stream("openai-chat", _BODY, seed=stream_seed(MOCK_SEED, key), headers=fault_hdr)
        if f in _OUTCOME:
            assert r.error is not None and r.error.kind == _OUTCOME[f], (f, r.error)
            assert exp.text.startswith(r.text), f  # what was received is kept, nothing invented
        else:
            assert r.error is None, (f, r.error)
            assert r.text == exp.text, f
            assert r.finish_reason == exp.finish_reason
        if f in ("500", "503"):
            assert r.error.http_status == int(f)
        if f == "oversized":
            assert len(r.text) > 4 * 1024 * 1024
    # Every request was sent once (drop resumes once, by design: a second request with Last-Event-ID).
    logs = {}
    for log in mock.streams():
        if log.key and log.key.endswith(f"-{os.getpid()}"):
            logs[log.key] = logs.get(log.key, 0) + 1
    for f, src in zip(faults, sources):
        assert logs[src.headers["x-mock-stream-key"]] == (2 if f == "drop" else 1), f


def test_http_stream_tokens_through_astream(mock, http_pool):
    keys = [f"as-{i}-{os.getpid()}" for i in range(20)]
    sources = [Request.openai_chat(base_url=mock.base_url("openai-chat"), headers={"x-mock-stream-key": k}, **_BODY) for k in keys]

    async def go():
        texts = {i: "" for i in range(len(keys))}
        async for idx, batch in http_pool.astream(sources):
            texts[idx] += "".join(t.content for t in batch if type(t) is Delta)
        return texts

    texts = asyncio.run(go())
    for i, k in enumerate(keys):
        assert texts[i] == expected_stream("openai-chat", _BODY, seed=stream_seed(MOCK_SEED, k)).text
