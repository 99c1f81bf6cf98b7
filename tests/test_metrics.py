"""StreamMetrics and MetricsRegistry, fed synthetic read times whose metrics are computed by hand."""

from __future__ import annotations

import msgspec
import pytest
from hdrh.histogram import HdrHistogram

from pipeline.metrics import MetricsRegistry, MetricsSnapshot, StreamMetrics, StreamMetricsSnapshot
from pipeline.tokens import Delta, Done, Error, Reasoning, Refusal, Text, ToolCall, Usage

MS = 1_000_000  # ns


def no_clock() -> int:
    raise AssertionError("the clock must not be read when times are given")


# A stream, by hand (times from request start, ms):
#   0    start
#   100  read 1: role-only Delta("")              -> no token
#   200  read 2: Reasoning("thinking")            -> 1 token; first token (TTFT 200)
#   300  read 3: Delta("Hel", token_ids=[1,2,3,4]) -> 4 tokens; first content (TTFT content 300)
#   400  read 4: Delta("lo") + Delta(" there")    -> 2 tokens
#   1700 read 5: keep-alive bytes, no tokens       -> gap 1300 ms: a stall (threshold 1 s)
#   1800 read 6: Delta("!") + Usage + Done        -> 1 token
#   1800 finish
# tokens = 1 + 4 + 2 + 1 = 8
# ITL samples: read 3: 100/4 = 25 ms x4; read 4: 100/2 = 50 ms x2; read 6: 1400/1 = 1400 ms x1
#   count 7, sum 100+100+1400 = 1600 ms, mean 1600/7 ms
#   sorted: 25,25,25,25,50,50,1400 -> p50 (4th of 7) = 25, p90 (round(6.3)=6th) = 50, p99 (7th) = 1400
# chunk sizes: 40, 60, 80, 100, 1, 20 -> 301 bytes, 6 chunks


def run_stream(m: StreamMetrics) -> None:
    m.start(0)
    m.on_chunk(40, 100 * MS)
    m.on_tokens([Delta("")], 100 * MS)
    m.on_chunk(60, 200 * MS)
    m.on_tokens([Reasoning("thinking")], 200 * MS)
    m.on_chunk(80, 300 * MS)
    m.on_tokens([Delta("Hel", token_ids=[1, 2, 3, 4])], 300 * MS)
    m.on_chunk(100, 400 * MS)
    m.on_tokens([Delta("lo"), Delta(" there")], 400 * MS)
    m.on_chunk(1, 1700 * MS)
    m.on_chunk(20, 1800 * MS)
    m.on_tokens([Delta("!"), Usage(1, 8), Done("stop")], 1800 * MS)
    m.finish(1800 * MS)


def test_stream_metrics_by_hand():
    m = StreamMetrics(clock_ns=no_clock)
    run_stream(m)
    s = m.snapshot()
    assert s.tokens == 8
    assert s.chunks == 6
    assert s.bytes == 301
    assert s.ttft_ms == 200.0
    assert s.ttft_content_ms == 300.0
    assert s.ttfb_ms == 100.0
    assert s.e2e_ms == 1800.0
    assert s.tokens_per_s == pytest.approx(8 / 1.8)
    assert s.avg_chunk_bytes == pytest.approx(301 / 6)
    assert s.avg_tokens_per_chunk == pytest.approx(8 / 6)
    assert s.itl_mean_ms == pytest.approx(1600 / 7)
    assert s.decode_tokens_per_s == pytest.approx(7 / 1.6)
    # Percentiles to HDR precision (3 significant figures: within 0.1%).
    assert s.itl_p50_ms == pytest.approx(25.0, rel=1e-3)
    assert s.itl_p90_ms == pytest.approx(50.0, rel=1e-3)
    assert s.itl_p99_ms == pytest.approx(1400.0, rel=1e-3)
    assert s.itl_min_ms == 25.0
    assert s.itl_max_ms == 1400.0
    assert s.stalls == 1
    assert s.stall_ms == 1300.0
    assert s.max_gap_ms == 1300.0
    assert s.errors == 0 and s.error_kind is None
    assert sum(s.itl_histogram.values()) == 7


def test_first_token_of_any_output_kind_counts_for_ttft():
    for tok in (Text("t"), Refusal("no"), ToolCall(0, "call_1", "f", ""), Reasoning("r")):
        m = StreamMetrics(clock_ns=no_clock)
        m.start(1_000 * MS)
        m.on_chunk(10, 1_050 * MS)
        m.on_tokens([tok], 1_050 * MS)
        s = m.snapshot()
        assert s.ttft_ms == 50.0, tok
        assert s.ttft_content_ms == (50.0 if type(tok) is Text else None), tok


def test_empty_and_non_output_tokens_do_not_count():
    m = StreamMetrics(clock_ns=no_clock)
    m.start(0)
    m.on_tokens([Delta(""), Reasoning(""), ToolCall(0), Usage(3, 0), Done("stop")], 5 * MS)
    s = m.snapshot()
    assert s.tokens == 0 and s.ttft_ms is None and s.ttft_content_ms is None


def test_errors_are_counted_with_their_kind():
    m = StreamMetrics(clock_ns=no_clock)
    m.start(0)
    m.on_tokens([Delta("a"), Error.of("truncated", "cut")], 10 * MS)
    m.on_error("provider")
    s = m.snapshot()
    assert s.errors == 2 and s.error_kind == "truncated" and s.tokens == 1


def test_start_and_finish_default_to_the_injected_clock():
    now = iter([5 * MS, 45 * MS])
    m = StreamMetrics(clock_ns=lambda: next(now))
    m.start()
    m.on_tokens([Delta("x")], 25 * MS)  # never reads the clock
    m.finish()
    s = m.snapshot()
    assert s.ttft_ms == 20.0 and s.e2e_ms == 40.0


def test_no_stall_below_threshold_and_custom_threshold():
    m = StreamMetrics(clock_ns=no_clock, stall_threshold_ns=100 * MS)
    m.start(0)
    for t in (0, 90, 180, 400):  # gaps 90, 90, 220
        m.on_chunk(1, t * MS)
    s = m.snapshot()
    assert s.stalls == 1 and s.stall_ms == 220.0 and s.max_gap_ms == 220.0


def test_snapshot_is_json_friendly_and_round_trips():
    m = StreamMetrics(clock_ns=no_clock)
    run_stream(m)
    s = m.snapshot()
    data = msgspec.json.encode(s)
    back = msgspec.json.decode(data, type=StreamMetricsSnapshot)
    assert back == s
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(s), type=StreamMetricsSnapshot) == s


def test_noop_has_the_same_methods_and_records_nothing():
    noop = StreamMetrics.noop()
    noop.start(0)
    noop.on_chunk(10, 1)
    noop.on_tokens([Delta("x")], 2)
    noop.on_error("provider")
    noop.finish(3)
    assert noop.snapshot() is None
    public = {n for n in dir(StreamMetrics) if not n.startswith("_") and callable(getattr(StreamMetrics, n))}
    assert public - {"noop"} <= {n for n in dir(noop) if not n.startswith("_")}


# --- registry -------------------------------------------------------------------------------


def _stream(ttft_ms: int, itl_ms: list[int], e2e_ms: int) -> StreamMetricsSnapshot:
    m = StreamMetrics(clock_ns=no_clock)
    m.start(0)
    t = ttft_ms
    m.on_chunk(10, t * MS)
    m.on_tokens([Delta("a")], t * MS)
    for gap in itl_ms:
        t += gap
        m.on_chunk(10, t * MS)
        m.on_tokens([Delta("b")], t * MS)
    m.finish(e2e_ms * MS)
    return m.snapshot()


def test_registry_summary_by_hand():
    reg = MetricsRegistry()
    # TTFTs 100..1000 ms (10 streams); each has ITLs of 10, 20 and 30 ms; e2e 2000 ms.
    for i in range(1, 11):
        reg.record(_stream(100 * i, [10, 20, 30], 2000))
    summ = reg.summary()
    assert set(summ) >= {"ttft", "ttft_content", "itl", "e2e", "tokens_per_s"}
    ttft = summ["ttft"]
    assert ttft["unit"] == "ms" and ttft["count"] == 10
    assert ttft["mean"] == pytest.approx(550.0)
    assert ttft["min"] == 100.0 and ttft["max"] == 1000.0
    assert ttft["p50"] == pytest.approx(500.0, rel=1e-3)
    assert ttft["p90"] == pytest.approx(900.0, rel=1e-3)
    assert ttft["p99"] == pytest.approx(1000.0, rel=1e-3)
    itl = summ["itl"]
    assert itl["count"] == 30 and itl["mean"] == pytest.approx(20.0)
    assert itl["p50"] == pytest.approx(20.0, rel=1e-3) and itl["p95"] == pytest.approx(30.0, rel=1e-3)
    assert itl["min"] == 10.0 and itl["max"] == 30.0
    tps = summ["tokens_per_s"]
    assert tps["unit"] == "tokens/s" and tps["mean"] == pytest.approx(4 / 2.0)
    snap = reg.snapshot()
    assert snap.counters["streams"] == 10 and snap.counters["tokens"] == 40 and snap.counters["chunks"] == 40


def test_registry_itl_matches_hdr_recording_every_token():
    # Independent oracle: an HdrHistogram fed each token's ITL one by one.
    oracle = HdrHistogram(1, 3_600_000_000_000, 3)
    reg = MetricsRegistry()
    m = StreamMetrics(clock_ns=no_clock)
    m.start(0)
    t = 0
    reads = [(1, 7_777_777), (3, 123_456_789), (2, 1_001), (5, 40_000_000), (1, 999_999_999)]
    m.on_tokens([Delta("x")], t)
    for n, gap in reads:
        t += gap
        m.on_tokens([Delta("y" * n, token_ids=list(range(n)))], t)
        oracle.record_value(gap // n, n)
    m.finish(t)
    reg.record(m.snapshot())
    got = reg.summary()["itl"]
    for p in (50, 90, 95, 99):
        assert got[f"p{p}"] == oracle.get_value_at_percentile(p) / 1e6
    assert got["count"] == oracle.get_total_count()


def test_itl_of_a_long_stream_matches_hdr_across_folds_and_snapshots():
    # More reads than a stream gathers before bucketing them, with a snapshot in the middle:
    # every sample must be counted once, in its HDR bucket.
    import random

    rng = random.Random(3)
    oracle = HdrHistogram(1, 3_600_000_000_000, 3)
    m = StreamMetrics(clock_ns=no_clock)
    m.start(0)
    t = 0
    m.on_tokens([Delta("x")], t)
    for i in range(10_000):
        n, gap = rng.choice([1, 1, 1, 2, 5]), rng.randint(1, 50_000_000)
        t += gap
        m.on_tokens([Delta("y" * n, token_ids=list(range(n)))], t)
        oracle.record_value(gap // n, n)
        if i == 6_000:
            m.snapshot()  # reading the metrics mid-stream changes nothing
    snap = m.snapshot()
    assert sum(snap.itl_histogram.values()) == oracle.get_total_count() == snap.tokens - 1
    for low, count in snap.itl_histogram.items():
        assert oracle.get_count_at_value(low) == count
    for p in (50, 90, 99):
        assert getattr(snap, f"itl_p{p}_ms") == oracle.get_value_at_percentile(p) / 1e6


def test_merge_across_processes_is_exact():
    streams = [_stream(50 + 37 * i, [5 + i, 11, 3 * i + 1], 500 + 10 * i) for i in range(30)]
    whole = MetricsRegistry()
    for s in streams:
        whole.record(s)
    parts = [MetricsRegistry(), MetricsRegistry(), MetricsRegistry()]
    for i, s in enumerate(streams):
        parts[i % 3].record(s)
    merged = MetricsRegistry()
    for p in parts:
        # Crosses a process boundary as msgpack, as the pool sends it.
        wire = msgspec.msgpack.encode(p.snapshot())
        merged.merge(msgspec.msgpack.decode(wire, type=MetricsSnapshot))
    assert merged.summary() == whole.summary()
    assert merged.snapshot().counters == whole.snapshot().counters
    assert merged.snapshot().summary() == whole.summary()


def test_merge_of_an_empty_registry_changes_nothing():
    reg = MetricsRegistry()
    reg.record(_stream(100, [10], 200))
    before = reg.summary()
    reg.merge(MetricsRegistry().snapshot())
    assert reg.summary() == before
    assert reg.summary()["ttft"]["min"] == 100.0


def test_registry_counts_outcomes_from_results():
    from pipeline.tokens import ErrorResult, StreamResult

    reg = MetricsRegistry()
    reg.record(_stream(10, [], 20), StreamResult(finish="stop"))
    reg.record(_stream(10, [], 20), StreamResult(finish="error", error=ErrorResult("truncated")))
    reg.record(None)  # metrics off for that stream
    snap = reg.snapshot()
    assert snap.counters["streams"] == 2 and snap.counters["failed_streams"] == 1
    assert snap.errors_by_kind == {"truncated": 1}
    assert snap.finish == {"stop": 1, "error": 1}


def test_registry_snapshot_is_json_friendly():
    reg = MetricsRegistry()
    reg.record(_stream(100, [10, 20], 300))
    snap = reg.snapshot()
    back = msgspec.json.decode(msgspec.json.encode(snap), type=MetricsSnapshot)
    assert MetricsRegistry.from_snapshot(back).summary() == reg.summary()


def test_empty_registry_summary_has_no_values():
    summ = MetricsRegistry().summary()
    assert summ["ttft"]["count"] == 0 and summ["ttft"]["p50"] is None
