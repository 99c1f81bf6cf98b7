"""Benchmark: the multiprocess pool end to end, against the in-process pipeline and a
single-process httpx-sse + msgspec loop over the same bytes, in the same run.

Replayed OpenAI Chat streams (bench/_data.py, one token per event, default settings: metrics on,
TokenAccumulator, `run()` returning results) totalling ~1M tokens:

  (a) 20 streams read in 16 KiB reads;  (b) 1,000 concurrent streams, one event per read;

for K = 1 and 2 workers (I = 1). Then read-to-caller latency (p50/p99: the caller's receive time
minus the read time of the newest event behind each token batch) with `astream` over 1,000
streams paced at 100 tokens/s each (100K tokens/s in all), and the shared memory per worker.

    python -m bench.e2e [--quick] [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgspec

from bench._data import make_stream, split_events, split_reads
from bench.sse import load_httpx_sse

_EVENT_BYTES = 225  # about one openai chunk of bench/_data.py


def _write_streams(folder: Path, name: str, n_files: int, tokens_per_stream: int) -> list[tuple[str, int]]:
    """(path, tokens) of n_files recordings of about tokens_per_stream content events each."""
    out = []
    for i in range(n_files):
        data = make_stream("openai", tokens_per_stream * _EVENT_BYTES, seed=1000 + i)
        path = folder / f"{name}-{i}.sse"
        path.write_bytes(data)
        out.append((str(path), data.count(b'"content":') - 1))  # the role chunk carries no token
    return out


def _paced(folder: Path, n_files: int, tokens: int, tps: float) -> list[str]:
    """Recordings with a .timing sidecar: one event per read, 1/tps apart."""
    from pipeline.recording import Recording

    paths = []
    for i in range(n_files):
        data = make_stream("openai", tokens * _EVENT_BYTES, seed=2000 + i)
        ends, off = [], 0
        for j, ev in enumerate(split_events(data)):
            off += len(ev)
            ends.append((off, int(j * 1e9 / tps)))
        path = folder / f"paced-{i}.sse"
        Recording.save(path, data, ends)
        paths.append(str(path))
    return paths


# --- peers ---------------------------------------------------------------------------------------


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta
    index: int = 0
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice]


def run_httpx_sse(streams: list[list[bytes]]) -> int:
    """httpx-sse's decoders plus a typed msgspec decode of each delta, accumulating the text."""
    SSELineDecoder, SSEDecoder = load_httpx_sse()
    decode = msgspec.json.Decoder(_Chunk).decode
    tokens = 0
    for reads in streams:
        text_decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        lines, decoder = SSELineDecoder(), SSEDecoder()
        parts: list[str] = []
        for read in reads:
            for line in lines.decode(text_decoder.decode(read)):
                sse = decoder.decode(line.rstrip("\n"))
                if sse is None or sse.data == "[DONE]":
                    continue
                for ch in decode(sse.data).choices:
                    if ch.delta.content:
                        parts.append(ch.delta.content)
                        tokens += 1
        "".join(parts)
    return tokens


def run_collect(streams: list[list[bytes]]) -> int:
    """The in-process pipeline, one stream after another."""
    from pipeline import PipelineBuilder

    pipe = PipelineBuilder().provider("openai-chat").build()
    return sum(len(pipe.collect(reads).text) > 0 for reads in streams)


# --- the pool ------------------------------------------------------------------------------------


def run_pool(pool: Any, paths: list[str], n: int, read_size: Any) -> int:
    from pipeline.sources import Replay

    sources = (Replay(paths[i % len(paths)], read_size=read_size) for i in range(n))
    done = 0
    for r in pool.run(sources, concurrency=1000):
        if r.error is not None:
            raise RuntimeError(f"stream failed: {r.error}")
        done += 1
    return done


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _shm_per_worker(pool: Any) -> int:
    total = sum(r.capacity + 4096 for r in pool._rings)
    return total // pool.workers


def measure_latency(pool: Any, paths: list[str], n: int) -> dict[str, float]:
    from pipeline.sources import Replay

    pool.latencies_ns.clear()

    async def go() -> int:
        got = 0
        async for _idx, batch in pool.astream((Replay(paths[i % len(paths)], read_size="recorded", pace=1.0) for i in range(n)),
                                              concurrency=n):
            got += len(batch)
        return got

    t = time.perf_counter()
    tokens = asyncio.run(go())
    dt = time.perf_counter() - t
    lat = sorted(pool.latencies_ns)
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] / 1e6  # noqa: E731
    return {"tokens_per_s": tokens / dt, "p50_ms": q(0.50), "p99_ms": q(0.99), "batches": len(lat)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100K tokens, one run, shorter latency test")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    from pipeline import PipelineBuilder

    total = 100_000 if args.quick else 1_000_000
    runs = 1 if args.quick else args.runs
    report: dict[str, Any] = {"total_tokens": total, "runs": runs, "scenarios": {}}
    with tempfile.TemporaryDirectory(prefix="streamring-e2e-") as tmp:
        folder = Path(tmp)
        scen = {
            "a_20x16KiB": (20, _write_streams(folder, "a", 20, total // 20), 16384),
            "b_1000xevent": (1000, _write_streams(folder, "b", 50, total // 1000), "event"),
        }
        pipe = PipelineBuilder().provider("openai-chat").build()
        for name, (n, files, read_size) in scen.items():
            paths = [p for p, _ in files]
            tokens = sum(files[i % len(files)][1] for i in range(n))
            streams = []
            for i in range(n):
                data = Path(paths[i % len(paths)]).read_bytes()
                streams.append(split_reads(data, read_size) if isinstance(read_size, int) else split_events(data))
            row: dict[str, Any] = {"streams": n, "tokens": tokens}
            row["collect"] = statistics.median(tokens / _timed(lambda: run_collect(streams)) for _ in range(runs))
            row["httpx_sse_msgspec"] = statistics.median(tokens / _timed(lambda: run_httpx_sse(streams)) for _ in range(runs))
            del streams
            for k in (1, 2):
                with pipe.pool(workers=k, ingest=1, concurrency=1000) as pool:
                    run_pool(pool, paths[:2], 2, read_size)  # warm: imports, first connections
                    row[f"pool_K{k}"] = statistics.median(tokens / _timed(lambda: run_pool(pool, paths, n, read_size))
                                                          for _ in range(runs))
                    row["shm_bytes_per_worker_K%d" % k] = _shm_per_worker(pool)
            row["pool_K1_vs_httpx_sse"] = row["pool_K1"] / row["httpx_sse_msgspec"]
            row["pool_K1_vs_collect"] = row["pool_K1"] / row["collect"]
            report["scenarios"][name] = row
            print(f"{name}: {n} streams, {tokens} tokens (median tokens/s of {runs})")
            for key in ("collect", "httpx_sse_msgspec", "pool_K1", "pool_K2"):
                print(f"  {key:20s} {row[key] / 1e6:7.3f} M tok/s")
            print(f"  pool K=1 / httpx-sse loop: {row['pool_K1_vs_httpx_sse']:.2f}x; / collect: {row['pool_K1_vs_collect']:.2f}x")
        n_lat, secs = (200, 2) if args.quick else (1000, 5)
        paced = _paced(folder, 20, 100 * secs, 100.0)
        with pipe.pool(workers=1, ingest=1, concurrency=n_lat, track_latency=True) as pool:
            lat = measure_latency(pool, paced, n_lat)
            lat["shm_bytes_per_worker"] = _shm_per_worker(pool)
        report["latency"] = lat
        print(f"latency, astream, {n_lat} streams x 100 tok/s, K=1: {lat['tokens_per_s'] / 1e3:.0f}K tok/s delivered, "
              f"read-to-caller p50 {lat['p50_ms']:.3f} ms, p99 {lat['p99_ms']:.3f} ms ({lat['batches']} batches)")
        print(f"shared memory per worker (K=1, I=1, default ring capacity): {lat['shm_bytes_per_worker'] / 2**20:.2f} MiB")
    return report


if __name__ == "__main__":
    print(json.dumps(main(), indent=1, default=float))
