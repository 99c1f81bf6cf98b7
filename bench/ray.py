"""Benchmark: the pool through Ray (one actor running a local pool) against the local pool itself,
same machine, same pool shape (workers, ingest), same replayed openai-chat streams.

What the Ray path adds, and what this measures: each source crosses to the actor (msgpack of the
Replay, its recorded bytes included), each result or token batch crosses back (msgpack, batched
per `exchange()` call: one RPC per batch, never per token), the actor's driver thread shares a
GIL with Ray's own threads, and the actor itself takes seconds to start (reported apart from the
throughput). Tokens are counted from the input (content chunks), not by the code under test.
Medians of several interleaved runs; `run()` (results) and `astream()` (token batches) both.
Run: `python -m bench.ray [--quick] [--address ADDRESS]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _tokens_of(body: bytes) -> int:
    # One content token per chunk after the role chunk (bench._data's openai shape).
    return body.count(b'"content":') - 1


def _time_run(pool: Any, sources: list, concurrency: int) -> float:
    t0 = time.perf_counter()
    n = sum(1 for r in pool.run(sources, concurrency=concurrency) if r.error is None)
    elapsed = time.perf_counter() - t0
    if n != len(sources):
        raise RuntimeError(f"{len(sources) - n} streams failed")
    return elapsed


def _time_astream(pool: Any, sources: list, concurrency: int) -> float:
    async def go() -> int:
        ends = 0
        async for _, tokens in pool.astream(sources, concurrency=concurrency):
            ends += type(tokens[-1]).__name__ == "Done"
        return ends

    t0 = time.perf_counter()
    ends = asyncio.run(go())
    elapsed = time.perf_counter() - t0
    if ends != len(sources):
        raise RuntimeError(f"{len(sources) - ends} streams did not end with Done")
    return elapsed


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print and return medians (tokens/s) and the Ray/local ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer streams and runs (a smoke run)")
    parser.add_argument("--streams", type=int, default=None, help="streams per run")
    parser.add_argument("--bytes", type=int, default=8192, help="bytes per stream")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--ingest", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--address", default=None, help="an existing Ray cluster (default: start a local one)")
    args = parser.parse_args(argv)
    streams = args.streams or (200 if args.quick else 2000)
    runs = args.runs or (2 if args.quick else 5)

    import ray

    from pipeline import PipelineBuilder
    from pipeline.sources import Replay

    from ._data import make_stream

    bodies = [make_stream("openai", args.bytes, seed=i) for i in range(64)]
    sources = [Replay(bodies[i % len(bodies)]) for i in range(streams)]
    tokens = sum(_tokens_of(bodies[i % len(bodies)]) for i in range(streams))
    pipe = PipelineBuilder().provider("openai-chat").build()

    t0 = time.perf_counter()
    if args.address:
        ray.init(address=args.address, logging_level="ERROR")
    else:
        ray.init(num_cpus=os.cpu_count() or 2, object_store_memory=80 * 1024 * 1024, include_dashboard=False,
                 logging_level="ERROR", log_to_driver=False)
    ray_init_s = time.perf_counter() - t0
    shape = dict(workers=args.workers, ingest=args.ingest, concurrency=args.concurrency)
    samples: dict[str, list[float]] = {"local run": [], "ray run": [], "local astream": [], "ray astream": []}
    try:
        t0 = time.perf_counter()
        local = pipe.pool(**shape)
        local.start()
        local_start_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        remote = pipe.pool(backend="ray", actors_per_node=1, **shape)
        remote.start()
        ray_start_s = time.perf_counter() - t0
        try:
            # Warm both (first streams pay for lazy imports in the workers), then interleave.
            _time_run(local, sources[:50], args.concurrency)
            _time_run(remote, sources[:50], args.concurrency)
            for _ in range(runs):
                for name, pool in (("local", local), ("ray", remote)):
                    samples[f"{name} run"].append(tokens / _time_run(pool, sources, args.concurrency))
                    samples[f"{name} astream"].append(tokens / _time_astream(pool, sources, args.concurrency))
        finally:
            remote.close()
            local.close()
    finally:
        ray.shutdown()

    med = {k: statistics.median(v) for k, v in samples.items()}
    out: dict[str, Any] = {
        "streams": streams,
        "tokens_per_run": tokens,
        "runs": runs,
        "tokens_per_s": med,
        "ratio_run": med["ray run"] / med["local run"],
        "ratio_astream": med["ray astream"] / med["local astream"],
        "start_s": {"ray.init": ray_init_s, "local pool": local_start_s, "ray pool (actor + its pool)": ray_start_s},
    }
    print(f"{streams} replayed openai-chat streams of ~{args.bytes} B ({tokens} tokens) per run; "
          f"pool: {args.workers} worker(s), {args.ingest} ingest, concurrency {args.concurrency}; "
          f"median of {runs} runs")
    for mode in ("run", "astream"):
        lo, ry = med[f"local {mode}"], med[f"ray {mode}"]
        print(f"  {mode:8s} local {lo:12,.0f} tok/s   ray {ry:12,.0f} tok/s   ray/local {ry / lo:.2f}")
    print(f"  start-up: ray.init {ray_init_s:.2f} s, local pool {local_start_s:.2f} s, "
          f"ray pool {ray_start_s:.2f} s (actor process + its pool)")
    return out


if __name__ == "__main__":
    main()
