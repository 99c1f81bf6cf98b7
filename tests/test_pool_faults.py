"""Faults of the multiprocess pool (DESIGN.md section 5), one test each: a worker killed mid-run,
the ingest killed, Ctrl-C in the caller, the owner killed, bad streams among good ones, and an API
key that must never show up anywhere.

Expected texts come from the mock's own plan (`expected_stream`), request counts from its stream
logs; processes that must die are run in subprocesses where the test needs their stderr or has
to signal them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline import PipelineBuilder
from pipeline.sources import Replay, Request
from pipeline.testing import MockProviderProcess, expected_stream, stream_seed
from pipeline.tokens import Delta, Done, Error
from tests.conftest import running, shm_entries
from workers.pool import PoolBrokenError

REPO = Path(__file__).resolve().parents[1]
MOCK_SEED = 23
_BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def mock():
    with MockProviderProcess(seed=MOCK_SEED) as m:
        yield m


def _request(mock, key: str, tokens: int = 40, tps: float | None = None, fault: str | None = None,
             api_key: str | None = None) -> Request:
    headers = {"x-mock-stream-key": key}
    if tps:
        headers["x-mock-tps"] = str(tps)
    if fault:
        headers["x-mock-fault"] = fault
    return Request.openai_chat(base_url=mock.base_url("openai-chat"), headers=headers, api_key=api_key,
                               custom_id=key, max_tokens=tokens, **_BODY)


def _expected(key: str, tokens: int, fault: str | None = None):
    headers = {"x-mock-fault": fault} if fault else {}
    return expected_stream("openai-chat", dict(_BODY, max_tokens=tokens), seed=stream_seed(MOCK_SEED, key), headers=headers)


def _gone(pids, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(running(p) for p in pids):
            return True
        time.sleep(0.02)
    return False


def _children_of_pools(pids) -> set[int]:
    return {p for p in pids if psutil.pid_exists(p)}


# --- a worker killed with SIGKILL mid-run --------------------------------------------------------


def test_worker_killed_mid_run_is_replaced_and_nothing_is_lost_or_repeated(mock, no_shm_leak):
    tag = f"wk-{os.getpid()}-{time.monotonic_ns()}"
    n, tokens = 24, 120
    keys = [f"{tag}-{i}" for i in range(n)]
    sources = [_request(mock, k, tokens=tokens, tps=300) for k in keys]  # ~0.4 s each: in flight when killed
    pipe = PipelineBuilder().provider("openai-chat").build()
    texts = {i: [] for i in range(n)}
    ends: dict[int, object] = {}

    async def go(pool):
        killed = None
        async for idx, batch in pool.astream(sources):
            assert idx not in ends
            texts[idx] += [t.content for t in batch if type(t) is Delta]
            if type(batch[-1]) in (Done, Error):
                ends[idx] = batch[-1]
            if killed is None and sum(map(len, texts.values())) > n * 10:
                killed = pool.worker_pids[0]
                os.kill(killed, signal.SIGKILL)
        return killed

    with pipe.pool(workers=2, ingest=1) as pool:
        first_pids = list(pool.worker_pids)
        killed = asyncio.run(go(pool))
        assert killed == first_pids[0]
        assert pool.respawns == 1
        assert pool.worker_pids[0] != killed and pool.worker_pids[1] == first_pids[1]
        all_pids = set(pool.worker_pids + pool.ingest_pids + first_pids)
    assert _gone(all_pids, 3)
    assert set(ends) == set(range(n))
    for i, k in enumerate(keys):
        assert type(ends[i]) is Done, ends[i]
        assert "".join(texts[i]) == _expected(k, tokens).text  # every token exactly once, in order
    counts = {}
    for log in mock.streams():
        if log.key in keys:
            counts[log.key] = counts.get(log.key, 0) + 1
            assert log.status == "complete"
    assert counts == {k: 1 for k in keys}  # no request sent twice


def test_worker_killed_mid_replay_gets_the_replays_again_from_their_recordings(tmp_path, no_shm_leak):
    # Replays keep no copy of their event batches: a replacement worker gets them parsed again
    # from the recording (paced, per event and in 100-byte reads), with their first read times.
    from pipeline.recording import Recording

    words = [f"w{j} " for j in range(150)]
    chunks = [{"choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]} for w in words]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    events = [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]
    body = b"".join(events)
    ends, off = [], 0
    for j, ev in enumerate(events):
        off += len(ev)
        ends.append((off, j * 6_000_000))  # one event every 6 ms: ~0.9 s a stream
    path = tmp_path / "paced.sse"
    Recording.save(path, body, ends)
    sources = [Replay(str(path), read_size=rs, pace=1.0) for rs in ("event", 100, "recorded") for _ in range(4)]
    pipe = PipelineBuilder().provider("openai-chat").build()
    texts: dict[int, list[str]] = {i: [] for i in range(len(sources))}
    ends_seen: dict[int, object] = {}

    async def go(pool):
        killed = None
        async for idx, batch in pool.astream(sources):
            texts[idx] += [t.content for t in batch if type(t) is Delta]
            if type(batch[-1]) in (Done, Error):
                ends_seen[idx] = batch[-1]
            if killed is None and sum(map(len, texts.values())) > len(sources) * 40:
                killed = pool.worker_pids[0]
                os.kill(killed, signal.SIGKILL)
        return killed

    with pipe.pool(workers=2, ingest=1) as pool:
        assert asyncio.run(go(pool)) is not None
        assert pool.respawns == 1
    assert set(ends_seen) == set(range(len(sources)))
    for i in range(len(sources)):
        assert type(ends_seen[i]) is Done, ends_seen[i]
        assert "".join(texts[i]) == "".join(words)  # every token exactly once, in order


@pytest.mark.parametrize("bound", [{"replay_log_bytes": 1024}, {"replay_log_total": 2048}], ids=["per-stream", "total"])
def test_worker_killed_with_streams_too_long_to_replay_fails_them_retryably(mock, no_shm_leak, bound):
    # Logs of 1 KiB per stream, or of 2 KiB for all streams of the ingest together (each
    # stream alone far below the per-stream bound): the killed worker's streams cannot be replayed.
    tag = f"wl-{os.getpid()}-{time.monotonic_ns()}"
    keys = [f"{tag}-{i}" for i in range(4)]
    pipe = PipelineBuilder().provider("openai-chat").build()
    with pipe.pool(workers=1, ingest=1, **bound) as pool:
        handles = [pool.submit(_request(mock, k, tokens=400, tps=200)) for k in keys]
        it = iter(handles[0])
        for _ in range(40):
            next(it)
        os.kill(pool.worker_pids[0], signal.SIGKILL)
        results = [h.result() for h in handles]
    for r in results:
        assert r.error is not None and r.error.kind == "worker_crashed" and r.error.retryable


def test_replay_log_budget_is_given_back_when_streams_end(mock, no_shm_leak):
    # 200 KiB holds one 400-token stream's log (~200 B a token) but not those of the six streams
    # before it: the crashed stream is replayed only if ended streams gave their share back.
    tag = f"wb-{os.getpid()}-{time.monotonic_ns()}"
    before = [f"{tag}-{i}" for i in range(6)]
    key = f"{tag}-last"
    pipe = PipelineBuilder().provider("openai-chat").build()
    with pipe.pool(workers=1, ingest=1, replay_log_total=200 * 1024) as pool:
        for r in pool.run([_request(mock, k, tokens=400) for k in before]):
            assert r.error is None and r.text == _expected(r.custom_id, 400).text
        handle = pool.submit(_request(mock, key, tokens=400, tps=300))
        it = iter(handle)
        got = [next(it) for _ in range(40)]
        os.kill(pool.worker_pids[0], signal.SIGKILL)
        got += list(it)
        result = handle.result()
    assert result.error is None, result.error
    text = "".join(t.content for t in got if type(t) is Delta)
    assert text == result.text == _expected(key, 400).text


# --- the ingest process killed -------------------------------------------------------------------


def test_ingest_killed_raises_pool_broken_within_a_second(mock, no_shm_leak):
    tag = f"ik-{os.getpid()}-{time.monotonic_ns()}"
    pipe = PipelineBuilder().provider("openai-chat").build()
    with pipe.pool(workers=1, ingest=1) as pool:
        pids = set(pool.worker_pids + pool.ingest_pids)
        it = pool.run([_request(mock, f"{tag}-{i}", tokens=500, tps=100) for i in range(5)])
        os.kill(pool.ingest_pids[0], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(PoolBrokenError) as info:
            for _ in it:
                pass
        assert time.monotonic() - t0 < 1.0
        assert "ingest" in str(info.value)
    assert _gone(pids, 3)


# --- Ctrl-C in the caller, and the owner killed --------------------------------------------------

_CHILD = r"""
import json, sys, time
from pipeline import PipelineBuilder
from pipeline.sources import Replay
if __name__ == "__main__":
    body = b"".join(b'data: {"choices":[{"index":0,"delta":{"content":"t%d "},"finish_reason":null}]}\n\n' % i for i in range(50))
    pipe = PipelineBuilder().provider("openai-chat").build()
    with pipe.pool(workers=2, ingest=1) as pool:
        names = [r.name for r in pool._rings]
        print(json.dumps({"pids": pool.worker_pids + pool.ingest_pids, "segments": names}), flush=True)
        def forever():
            while True:
                yield Replay(body, read_size="event")
        for _ in pool.run(forever(), concurrency=50):
            pass
"""


def _start_owner(tmp_path: Path) -> tuple[subprocess.Popen, dict]:
    script = tmp_path / "owner.py"
    script.write_text(_CHILD)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    info = json.loads(line)
    time.sleep(0.3)  # let it run
    return proc, info


def test_ctrl_c_stops_every_child_and_unlinks_every_segment(tmp_path):
    before = shm_entries()
    proc, info = _start_owner(tmp_path)
    assert all(os.path.exists(f"/dev/shm/{n}") for n in info["segments"])
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    assert _gone(info["pids"], 2.0), "a child outlived Ctrl-C by more than two seconds"
    proc.wait(5)
    assert time.monotonic() - t0 < 5
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in info["segments"])
    assert not (shm_entries() - before)


def test_owner_killed_leaves_nothing_the_next_start_does_not_clean(tmp_path):
    before = shm_entries()
    proc, info = _start_owner(tmp_path)
    proc.kill()
    proc.wait(5)
    # Its children notice their parent's sentinel and exit.
    assert _gone(info["pids"], 3.0)
    # The segment guardian unlinks them; if it was killed too, the next start does.
    pipe = PipelineBuilder().provider("openai-chat").build()
    with pipe.pool(workers=1, ingest=1) as pool:
        (r,) = pool.run([Replay(b'data: {"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":"stop"}]}\n\n')])
        assert r.text == "x"
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in info["segments"])
    assert not (shm_entries() - before)


def test_owner_and_its_guardian_killed_are_cleaned_by_the_next_start(tmp_path):
    proc, info = _start_owner(tmp_path)
    guardians = [c.pid for c in psutil.Process(proc.pid).children() if "-S" in c.cmdline()]
    for pid in guardians + [proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.wait(5)
    assert _gone(info["pids"], 3.0)
    pipe = PipelineBuilder().provider("openai-chat").build()
    with pipe.pool(workers=1, ingest=1):
        pass
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in info["segments"])


# --- bad streams among good ones -----------------------------------------------------------------


def _chat(words: list[str], finish: bool = True) -> bytes:
    body = b"".join(
        b'data: {"choices":[{"index":0,"delta":{"content":%s},"finish_reason":null}]}\n\n' % json.dumps(w).encode()
        for w in words)
    if finish:
        body += b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    return body


def test_bad_streams_end_with_their_own_outcome_and_the_rest_complete(mock, no_shm_leak):
    tag = f"bad-{os.getpid()}-{time.monotonic_ns()}"
    big = "y" * (4 * 1024 * 1024)
    good = [[f"g{i}.{j} " for j in range(30)] for i in range(100)]
    bad = {
        # bad JSON in one event
        "bad_json": (Replay(_chat(["a"], finish=False) + b'data: {"choices":[{"index":0,"delta":{"content":"b\n\n' + _chat(["c"])), "malformed"),
        # framing that never dispatches a finish: unknown fields, then an unterminated event
        "bad_framing": (Replay(_chat(["a"], finish=False) + b'nonsense line\nretry: x\n\ndata: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'), "truncated"),
        # an event over the pipeline's limit (2 MiB here)
        "oversize": (Replay(_chat(["z" * (3 * 1024 * 1024)]), read_size=65536), "too_large"),
        "http_500": (_request(mock, f"{tag}-500", fault="500"), "http"),
        "stall": (_request(mock, f"{tag}-stall", fault="stall:3"), "idle_timeout"),
    }
    pipe = PipelineBuilder().provider("openai-chat").max_event_bytes(2 * 1024 * 1024).http(idle_timeout=0.8, retries=0).build()
    # The 4 MiB event must be within the limit here: a second pipeline with the default limit.
    sources = [Replay(_chat(w), read_size=512) for w in good[:50]]
    names = list(bad)
    sources += [src for src, _ in bad.values()]
    sources += [Replay(_chat(w), read_size=512) for w in good[50:]]
    with pipe.pool(workers=2, ingest=1) as pool:
        results = {r.source_index: r for r in pool.run(sources)}
    assert len(results) == len(sources)
    for i, name in enumerate(names):
        r = results[50 + i]
        assert r.error is not None and r.error.kind == bad[name][1], (name, r.error)
    for i, words in enumerate(good):
        r = results[i if i < 50 else i + len(names)]
        assert r.error is None and r.text == "".join(words)
    # The 4 MiB event crossing the rings in continuation entries, among small streams, with
    # the default 16 MiB limit.
    pipe2 = PipelineBuilder().provider("openai-chat").build()
    with pipe2.pool(workers=1, ingest=1) as pool:
        srcs = [Replay(_chat(w), read_size=64) for w in good[:40]] + [Replay(_chat([big]), read_size=1 << 20)]
        results = {r.source_index: r for r in pool.run(srcs)}
    assert results[40].error is None and results[40].text == big
    assert all(results[i].text == "".join(good[i]) for i in range(40))


# --- API keys never appear -----------------------------------------------------------------------

_CANARY_SCRIPT = r"""
import json, logging, sys
from pipeline import PipelineBuilder
from pipeline.sources import Request
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
if __name__ == "__main__":
    base, key, canary = sys.argv[1], sys.argv[2], sys.argv[3]
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    srcs = []
    for fault in [None, "500", "429:0", "malformed", "disconnect", "error", "stall:2"]:
        h = {"x-mock-stream-key": f"{key}-{fault}"}
        if fault:
            h["x-mock-fault"] = fault
        srcs.append(Request.openai_chat(base_url=base + "/v1", api_key=canary, headers=h, **body))
    # Nothing listens on port 9: a connect error whose message would carry the URL.
    srcs.append(Request.openai_chat(base_url="http://127.0.0.1:9/v1", api_key=canary, **body))
    srcs.append(Request.gemini(model="g", messages=[{"role": "user", "content": "hi"}],
                               base_url="http://127.0.0.1:9", api_key=canary))
    srcs.append(Request.gemini(model="g", messages=[{"role": "user", "content": "hi"}], base_url=base,
                               api_key=canary, headers={"x-mock-fault": "500", "x-mock-stream-key": key + "-g"}))
    pipe = PipelineBuilder().provider("openai-chat").http(idle_timeout=0.5, retries=0, connect_timeout=1).build()
    with pipe.pool(workers=1, ingest=1) as pool:
        for r in pool.run(srcs):
            print(repr(r))
            print(json.dumps({"error": None if r.error is None else [r.error.kind, r.error.message, repr(r.error.detail)]}))
        print(repr(srcs[0]), srcs[0])
        print(pool.metrics())
"""


def test_api_key_never_appears_in_logs_errors_or_results(mock, tmp_path):
    canary = "sk-CANARY-" + os.urandom(8).hex()
    script = tmp_path / "canary.py"
    script.write_text(_CANARY_SCRIPT)
    base = f"http://127.0.0.1:{mock.port}"
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONASYNCIODEBUG="1")
    proc = subprocess.run([sys.executable, str(script), base, f"canary-{os.getpid()}", canary], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert sum(line.startswith('{"error"') for line in proc.stdout.splitlines()) == 10  # every stream reported
    assert "connect" in proc.stdout  # the connect errors were reached
    assert canary not in out
    assert canary[3:] not in out


# --- a worker that ends a stream early ------------------------------------------------------------


def test_a_stop_sequence_in_a_worker_closes_that_streams_connection_at_once(mock, no_shm_leak):
    from pipeline import StopSequence

    tag = f"stop-{os.getpid()}"
    tokens, tps = 600, 100  # ~6 s of paced text if nobody stopped it
    expected = _expected(f"{tag}-long", tokens).text
    stop = expected[40:52]  # a stop string that appears early in the text (from the mock's plan)
    before = expected[: expected.index(stop)]
    pipe = PipelineBuilder().provider("openai-chat").add_transformer(StopSequence([stop])).build()
    t0 = time.monotonic()
    with pipe.pool(workers=1) as pool:
        results = list(pool.run([_request(mock, f"{tag}-long", tokens=tokens, tps=tps),
                                 _request(mock, f"{tag}-other", tokens=30)]))
        elapsed = time.monotonic() - t0
        # With the pool still up (its shutdown would close every connection anyway): the ingest
        # closed that stream's connection, so the mock saw the client go long before its end.
        deadline = time.monotonic() + 2.0
        log = mock.stream_log(f"{tag}-long")
        while log.status == "open" and time.monotonic() < deadline:
            time.sleep(0.05)
            log = mock.stream_log(f"{tag}-long")
        assert log.status == "client_closed"
        assert log.events_sent < tokens // 2
    by_key = {r.custom_id: r for r in results}
    stopped, other = by_key[f"{tag}-long"], by_key[f"{tag}-other"]
    assert stopped.error is None and stopped.text == before and stopped.finish_reason == "stop"
    assert other.error is None and other.text == _expected(f"{tag}-other", 30).text
    assert elapsed < 4.0  # not the ~6 s the paced stream would take to the end
