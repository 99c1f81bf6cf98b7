"""The pool on Ray (workers/ray_backend.py): a local Ray instance with 2 CPUs and two actors on
its one node, replayed and mock-provider streams through them, and actors killed mid-run.

Expected texts come from the inputs: replays are built here from known pieces, mock streams from
`expected_stream()` (the mock's plan computed from the request alone). Ray's own processes and
files are not leak-checked; our /dev/shm segments and the pools' processes are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zlib

import msgspec
import psutil
import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report (and no network) from Ray

ray = pytest.importorskip("ray", reason="Ray is not installed (the optional extra: pip install 'streamring[ray]')")

from pipeline import PipelineBuilder  # noqa: E402
from pipeline.recording import Recording  # noqa: E402
from pipeline.sources import Replay, Request  # noqa: E402
from pipeline.testing import MockProviderProcess, expected_stream  # noqa: E402
from pipeline.tokens import Delta, Done, Error  # noqa: E402
from workers.pool import PoolBrokenError  # noqa: E402
from workers.ray_backend import default_shard_key  # noqa: E402

from conftest import REPO  # noqa: E402

PIECES = ["Hello", ", ", "wörld", " — ", "東京", "の", "天気", " 🚀", "👍🏽", " ok", "."]


def chat_body(pieces: list[str]) -> bytes:
    """An openai-chat response body carrying `pieces` as content deltas (written here, by hand)."""
    def chunk(delta: dict, finish: str | None) -> bytes:
        obj = {"id": "c1", "object": "chat.completion.chunk", "model": "m",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

    parts = [chunk({"role": "assistant", "content": ""}, None)]
    parts += [chunk({"content": p}, None) for p in pieces]
    parts += [chunk({}, "stop"), b"data: [DONE]\n\n"]
    return b"".join(parts)


def replay_case(i: int) -> tuple[bytes, str]:
    """The i-th replayed stream and its text (pieces rotated and repeated so each differs)."""
    pieces = [f"#{i}:"] + (PIECES[i % len(PIECES):] + PIECES[: i % len(PIECES)]) * (1 + i % 3)
    return chat_body(pieces), "".join(pieces)


def paced_replay(tmp_dir, i: int, gap_ms: int = 40) -> tuple[Replay, str]:
    """A replay saved with a timing sidecar: one read per event, `gap_ms` apart (real time)."""
    data, text = replay_case(i)
    ends = [k + 2 for k in range(len(data) - 1) if data[k:k + 2] == b"\n\n"]
    reads = [(end, n * gap_ms * 1_000_000) for n, end in enumerate(ends)]
    path = tmp_dir / f"s{i}.sse"
    Recording.save(path, data, reads)
    return Replay(str(path), read_size="recorded", pace=1.0), text


def mock_request(mock: MockProviderProcess, i: int, tokens: int = 24, tps: float | None = None) -> tuple[Request, str]:
    """An HTTP request to the mock (seeded per stream) and the text its plan says it carries."""
    knobs: dict = {"seed": 1000 + i, "tokens": tokens}
    if tps:
        knobs["tps"] = tps
    req = Request.openai_chat(model="mock-model", messages=[{"role": "user", "content": f"q{i}"}],
                              base_url=mock.base_url("openai-chat"), api_key="x", mock=knobs)
    return req, expected_stream("openai-chat", msgspec.json.decode(req.body)).text


def our_segments(pids: set[int]) -> list[str]:
    """Our /dev/shm segments owned by one of `pids` (names: streamring-<pid>-...)."""
    return [n for n in os.listdir("/dev/shm")
            if n.startswith("streamring-") and int(n.split("-")[1]) in pids]


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def not_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def pool_pids(info: list[dict]) -> set[int]:
    return {p for a in info for p in [a["pid"], *a["worker_pids"], *a["ingest_pids"]]}


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, object_store_memory=80 * 1024 * 1024, include_dashboard=False,
             logging_level="ERROR", log_to_driver=False, configure_logging=False)
    owners: set[int] = set()  # the actors' pids, added by the tests
    children: set[int] = set()  # their pools' worker and ingest pids
    yield owners, children
    ray.shutdown()
    # Every pool is gone, whether it was closed or killed with its actor: its processes have
    # exited and its segments are unlinked.
    wait_until(lambda: all(not_running(pid) for pid in children), 15, "the pools' processes to exit")
    wait_until(lambda: not our_segments(owners), 15, f"segments of {sorted(owners)} to be unlinked")


def track(ray_cluster, pool) -> list[dict]:
    """The pool's live actors (node, pids), remembered for the module's leak check."""
    info = pool.actor_info
    owners, children = ray_cluster
    owners.update(a["pid"] for a in info)
    children.update(pool_pids(info))
    return info


@pytest.fixture(scope="module")
def pipe():
    return PipelineBuilder().provider("openai-chat").build()


@pytest.fixture(scope="module")
def mock():
    with MockProviderProcess(seed=3) as m:
        yield m


@pytest.fixture(scope="module")
def pool(ray_cluster, pipe):
    with pipe.pool(backend="ray", workers=1, ingest=1, actors_per_node=2, concurrency=8) as p:
        track(ray_cluster, p)
        yield p


# --- the single-machine pipeline never imports Ray ----------------------------------------------


def test_local_pool_never_imports_ray():
    code = (
        "import sys\n"
        "import pipeline, shm, workers.pool\n"
        "from pipeline import PipelineBuilder\n"
        "from pipeline.sources import Replay\n"
        f"body = {chat_body(['a', 'b'])!r}\n"
        "pipe = PipelineBuilder().provider('openai-chat').build()\n"
        "with pipe.pool(workers=1, ingest=1) as p:\n"
        "    texts = [r.text for r in p.run([Replay(body)])]\n"
        "print(texts, 'ray' in sys.modules)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['ab'] False"


# --- sharding ------------------------------------------------------------------------------------


def test_shard_key_follows_custom_id_whatever_the_position():
    a3, a9 = Replay(b"", custom_id="req-a"), Replay(b"", custom_id="req-a")
    assert default_shard_key(3, a3) == default_shard_key(9, a9) == zlib.crc32(b"req-a")
    assert default_shard_key(7, Replay(b"")) == 7


def test_pool_has_two_actors_on_the_one_node(pool):
    info = pool.actor_info
    assert len(info) == 2 and len({a["node_id"] for a in info}) == 1
    assert len({a["pid"] for a in info}) == 2
    # The node's 2 CPUs shared by 2 actors, less one ingest each, leaves the minimum of 1 worker.
    assert [a["workers"] for a in info] == [1, 1]


# --- run and astream -----------------------------------------------------------------------------


def test_run_gives_each_replay_one_result_with_its_text(pool):
    cases = [replay_case(i) for i in range(30)]
    sources = [Replay(data, custom_id=f"id-{i}") for i, (data, _) in enumerate(cases)]
    results = list(pool.run(sources))
    assert sorted(r.source_index for r in results) == list(range(30))
    for r in results:
        assert r.ok and r.finish == "stop"
        assert r.text == cases[r.source_index][1]
        assert r.custom_id == f"id-{r.source_index}"
    assert len({r.stream_id for r in results}) == 30


def test_run_reads_sources_lazily(pool):
    # A generator longer than what the pool may hold unresolved (2 x 8 per actor): it is read as
    # the run goes, and the run still returns every result.
    # Far more sources than the actors may hold at once, so "not all read yet when the first
    # result is back" does not depend on how fast the first streams happen to finish.
    n = 400
    read = []

    def sources():
        for i in range(n):
            read.append(i)
            yield Replay(replay_case(i)[0])

    it = pool.run(sources())
    first = next(it)
    assert len(read) < n
    rest = list(it)
    assert sorted(r.source_index for r in [first, *rest]) == list(range(n))
    assert all(r.text == replay_case(r.source_index)[1] for r in [first, *rest])


def test_run_carries_mock_provider_streams(pool, mock):
    cases = [mock_request(mock, i, tokens=16 + i) for i in range(10)]
    results = list(pool.run([req for req, _ in cases]))
    assert sorted(r.source_index for r in results) == list(range(10))
    for r in results:
        assert r.ok, r.error
        assert r.text == cases[r.source_index][1]


def test_cli_run_with_ray_address_writes_one_row_per_request(ray_cluster, mock, tmp_path):
    import hashlib
    import json

    from pipeline.cli import main

    requests = tmp_path / "requests.jsonl"
    lines = [{"custom_id": f"r{i}", "messages": [{"role": "user", "content": f"say {i}"}], "max_tokens": 12 + i}
             for i in range(6)]
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "rows.jsonl"
    code = main(["run", str(requests), "--provider", "openai-chat", "--base-url", mock.base_url("openai-chat"),
                 "--model", "m", "--workers", "1", "--ray", "auto", "-o", str(out), "--quiet"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in rows) == [f"r{i}" for i in range(6)]
    sent = {log.text_sha256 for log in mock.streams()}
    for row in rows:
        assert row["error"] is None
        assert hashlib.sha256(row["text"].encode()).hexdigest() in sent


async def test_astream_delivers_every_token_once_and_one_terminal_per_stream(pool, mock):
    replays = [replay_case(i) for i in range(8)]
    https = [mock_request(mock, 50 + i) for i in range(8)]
    sources = [Replay(d) for d, _ in replays] + [req for req, _ in https]
    expected = [t for _, t in replays] + [t for _, t in https]
    texts = [""] * len(sources)
    terminals = [[] for _ in sources]
    async for index, tokens in pool.astream(sources):
        assert tokens
        assert not terminals[index], "tokens after the stream's terminal"
        for tok in tokens:
            if type(tok) is Delta:
                texts[index] += tok.content
        if type(tokens[-1]) in (Done, Error):
            terminals[index].append(tokens[-1])
        assert not any(type(t) in (Done, Error) for t in tokens[:-1])
    assert texts == expected
    assert all(len(t) == 1 and type(t[0]) is Done for t in terminals)


def test_metrics_merge_both_actors(pool):
    before = pool.metrics()
    n = 12
    results = list(pool.run([Replay(replay_case(i)[0]) for i in range(n)]))
    assert len(results) == n
    after = pool.metrics()
    assert after.counters["streams"] - before.counters.get("streams", 0) == n
    assert after.finish.get("stop", 0) - before.finish.get("stop", 0) == n


def test_closing_run_early_cancels_and_the_next_run_is_clean(pool, mock):
    slow = [mock_request(mock, 200 + i, tokens=40, tps=40) for i in range(12)]
    it = pool.run([req for req, _ in slow])
    first = next(it)
    assert first.ok
    it.close()
    cases = [replay_case(i) for i in range(6)]
    results = list(pool.run([Replay(d) for d, _ in cases]))
    assert sorted(r.source_index for r in results) == list(range(6))
    assert all(r.text == cases[r.source_index][1] for r in results)


# --- actors killed mid-run (the shared pool replaces lost actors when the next run starts) -----


def test_killed_actor_streams_rerun_elsewhere_exactly_once(ray_cluster, pool, mock, tmp_path):
    list(pool.run([]))  # starts replacements for actors an earlier test killed
    info = track(ray_cluster, pool)
    assert len(info) == 2
    lost_before = pool.lost_actors
    # Both kinds on both actors (index sharding: even indices go to slot 0, odd to slot 1).
    cases = [paced_replay(tmp_path, i, gap_ms=20) if i % 4 < 2 else mock_request(mock, 300 + i, tokens=24, tps=80)
             for i in range(12)]
    victim_slot = pool.slot_for(0, cases[0][0])
    victim = pool.actors[victim_slot]
    victim_pids = pool_pids([info[victim_slot]])
    got: dict[int, list] = {}
    unresolved_at_kill = None
    for r in pool.run([src for src, _ in cases], concurrency=3):
        got.setdefault(r.source_index, []).append(r)
        if unresolved_at_kill is None:
            unresolved_at_kill = set(range(0, 12, 2)) - set(got)
            ray.kill(victim)
    assert unresolved_at_kill, "the kill was not mid-run"
    assert sorted(got) == list(range(12))
    for i, rs in got.items():
        assert len(rs) == 1, f"source {i} has {len(rs)} results"
        assert rs[0].ok, rs[0].error
        assert rs[0].text == cases[i][1]
    assert pool.lost_actors == lost_before + 1 and len(pool.actors) == 1
    # The killed actor took its pool down: processes gone, segments unlinked.
    wait_until(lambda: all(not_running(pid) for pid in victim_pids), 15, "the killed pool's processes to exit")
    wait_until(lambda: not our_segments({info[victim_slot]["pid"]}), 15, "the killed pool's segments to go")
    # The next run starts a replacement actor in the lost slot, on the same node.
    results = list(pool.run([Replay(replay_case(i)[0]) for i in range(4)]))
    track(ray_cluster, pool)
    assert len(pool.actors) == 2 and pool.lost_actors == lost_before + 1
    assert len({a["node_id"] for a in pool.actor_info}) == 1
    assert sorted(r.text for r in results) == sorted(replay_case(i)[1] for i in range(4))


async def test_killed_actor_in_astream_reruns_what_it_can_and_fails_the_rest(ray_cluster, pool, mock, tmp_path):
    list(pool.run([]))
    info = track(ray_cluster, pool)
    # Slot 0 gets the even indices: 0 (HTTP) and 2 (replay) run first on it, the rest wait.
    cases = [mock_request(mock, 400 + i, tokens=30, tps=30) if i % 4 == 0 else paced_replay(tmp_path, i, gap_ms=40)
             for i in range(12)]
    victim_slot = pool.slot_for(0, cases[0][0])
    victim = pool.actors[victim_slot]
    texts = [""] * len(cases)
    terminals: list[list] = [[] for _ in cases]
    killed = False
    async for index, tokens in pool.astream([src for src, _ in cases], concurrency=2):
        texts[index] += "".join(t.content for t in tokens if type(t) is Delta)
        terminals[index] += [t for t in tokens if type(t) in (Done, Error)]
        if not killed and texts[0] and texts[2]:
            ray.kill(victim)  # stream 0 (HTTP) and stream 2 (replay) are both mid-stream
            killed = True
    assert killed
    assert all(len(t) == 1 for t in terminals), terminals
    # The HTTP stream that had delivered tokens is not re-sent: it ends with a retryable error,
    # and what it delivered is a prefix of its text.
    err = terminals[0][0]
    assert type(err) is Error and err.kind == "worker_crashed" and err.retryable
    assert cases[0][1].startswith(texts[0]) and texts[0] != cases[0][1]
    # Everything else is whole, each token once: the replay re-ran with its delivered tokens
    # skipped, and the streams that had delivered nothing re-ran on the other actor.
    for i in range(1, len(cases)):
        assert type(terminals[i][0]) is Done, (i, terminals[i])
        assert texts[i] == cases[i][1], i
    wait_until(lambda: not our_segments({info[victim_slot]["pid"]}), 15, "the killed pool's segments to go")


def test_every_actor_lost_fails_what_was_assigned_then_raises(ray_cluster, pool, mock):
    list(pool.run([]))
    info = track(ray_cluster, pool)
    # More sources than the pool takes on at once (2 x 2 sent per actor, as many queued): some
    # are never read, and with no actor left they cannot run.
    cases = [mock_request(mock, 500 + i, tokens=30, tps=40) for i in range(30)]
    results = []
    with pytest.raises(PoolBrokenError):
        for r in pool.run([req for req, _ in cases], concurrency=2):
            results.append(r)
            if len(results) == 1:
                for actor in pool.actors:
                    ray.kill(actor)
    indices = [r.source_index for r in results]
    assert len(indices) == len(set(indices)) and 1 < len(indices) < 30
    # Whole results (those that finished before the kill) or retryable failures; some failed.
    for r in results:
        if r.error is None:
            assert r.text == cases[r.source_index][1]
        else:
            assert r.error.kind == "worker_crashed" and r.error.retryable
    assert any(r.error is not None for r in results)
    assert pool.actors == []
    wait_until(lambda: not our_segments({a["pid"] for a in info}), 15, "the killed pools' segments to go")
