"""Benchmark: SseParser against httpx-sse and the openai SDK's SSE decoder, same input, same run.

Streams of about 20 MB in three wire shapes (bench/_data.py), read in 16 KiB reads, 1 KiB reads and
one event per read. Prints events/s and MB/s (median of several runs) and our ratio to each peer.
A second part compares the in-process pipeline (`collect`, openai-chat adapter and accumulator)
with httpx-sse plus a typed msgspec decode of the same deltas.

    python -m bench.sse [--quick] [--size MB] [--runs N]
"""

from __future__ import annotations

import argparse
import codecs
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgspec

from bench._data import SHAPES, make_stream, split_events, split_reads
from pipeline.sse import SseParser

READ_MODES = ("16KiB", "1KiB", "event")


def load_httpx_sse() -> tuple[type, type]:
    """httpx-sse's SSELineDecoder and SSEDecoder. They need no httpx; the package's __init__ does,
    so when httpx is missing the two modules are loaded without it."""
    try:
        from httpx_sse._decoders import SSEDecoder, SSELineDecoder
    except ImportError:
        import importlib
        import importlib.util
        import types

        spec = importlib.util.find_spec("httpx_sse")
        if spec is None or not spec.submodule_search_locations:
            raise
        for name in [n for n in sys.modules if n == "httpx_sse" or n.startswith("httpx_sse.")]:
            del sys.modules[name]
        package = types.ModuleType("httpx_sse")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["httpx_sse"] = package
        module = importlib.import_module("httpx_sse._decoders")
        SSEDecoder, SSELineDecoder = module.SSEDecoder, module.SSELineDecoder
    return SSELineDecoder, SSEDecoder


# -- the three parsers, each consuming a list of reads and returning the number of events -------


def run_ours(reads: list[bytes]) -> int:
    parser = SseParser()
    n = 0
    for read in reads:
        n += len(parser.feed(read))
    parser.close()
    return n


def make_run_httpx_sse() -> Callable[[list[bytes]], int]:
    """httpx-sse driven as `EventSource.iter_sse` drives it: httpx's incremental UTF-8 text decoding
    of each read (`Response.iter_text`), `SSELineDecoder`, then `SSEDecoder.decode` per line."""
    SSELineDecoder, SSEDecoder = load_httpx_sse()

    def run(reads: list[bytes]) -> int:
        text_decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        lines = SSELineDecoder()
        decoder = SSEDecoder()
        n = 0
        for read in reads:
            text = text_decoder.decode(read)
            if not text:  # httpx's TextChunker drops empty text
                continue
            for line in lines.decode(text):
                line = line.rstrip("\n")
                if decoder.decode(line) is not None:
                    n += 1
        tail = text_decoder.decode(b"", True)
        for line in (lines.decode(tail) if tail else []) + lines.flush():
            if decoder.decode(line.rstrip("\n")) is not None:
                n += 1
        return n

    return run


def make_run_openai() -> Callable[[list[bytes]], int] | None:
    """The openai SDK's decoder as its Stream uses it: `SSEDecoder().iter_bytes(reads)`."""
    try:
        from openai._streaming import SSEDecoder
    except Exception:  # noqa: BLE001 - an optional peer
        return None

    def run(reads: list[bytes]) -> int:
        n = 0
        for _ in SSEDecoder().iter_bytes(iter(reads)):
            n += 1
        return n

    return run


def _run_once(fn: Callable[[list[bytes]], int], reads: list[bytes]) -> tuple[float, int]:
    gc.collect()
    t0 = time.perf_counter()
    n = fn(reads)
    return time.perf_counter() - t0, n


def interleaved(
    impls: dict[str, Callable[[list[bytes]], int]], reads: list[bytes], runs: int
) -> dict[str, tuple[list[float], int]]:
    """Per implementation: its run times and event count. Runs alternate between the
    implementations so a noisy neighbour slows all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in impls}
    counts: dict[str, int] = {}
    for _ in range(runs):
        for name, fn in impls.items():
            t, n = _run_once(fn, reads)
            if counts.setdefault(name, n) != n:
                raise AssertionError(f"{name}: event count changed between runs")
            times[name].append(t)
    return {name: (times[name], counts[name]) for name in impls}


def reads_for(stream: bytes, mode: str) -> list[bytes]:
    if mode == "16KiB":
        return split_reads(stream, 16 * 1024)
    if mode == "1KiB":
        return split_reads(stream, 1024)
    return split_events(stream)


def bench_parsers(size: int, runs: int, out: Callable[[str], None]) -> dict[str, Any]:
    peers: dict[str, Callable[[list[bytes]], int]] = {"httpx-sse": make_run_httpx_sse()}
    openai_run = make_run_openai()
    if openai_run is not None:
        peers["openai-sdk"] = openai_run
    results: dict[str, Any] = {}
    out(f"SSE framing: ~{size / 1e6:.0f} MB per shape, median of {runs} runs")
    out(f"{'shape':<10}{'reads':<7}{'parser':<12}{'events/s':>12}{'MB/s':>9}{'ours/x':>9}")
    for shape in SHAPES:
        stream = make_stream(shape, size, seed=1)
        mb = len(stream) / 1e6
        for mode in READ_MODES:
            reads = reads_for(stream, mode)
            measured = interleaved({"SseParser": run_ours, **peers}, reads, runs)
            ours_times, n_ours = measured.pop("SseParser")
            t_ours = statistics.median(ours_times)
            row: dict[str, Any] = {
                "events": n_ours,
                "bytes": len(stream),
                "reads": len(reads),
                "ours": {"seconds": t_ours, "events_per_s": n_ours / t_ours, "mb_per_s": mb / t_ours},
            }
            out(f"{shape:<10}{mode:<7}{'SseParser':<12}{n_ours / t_ours:>12,.0f}{mb / t_ours:>9.1f}{'':>9}")
            for name, (times, n) in measured.items():
                if n != n_ours:
                    raise AssertionError(f"{name} found {n} events, SseParser {n_ours} ({shape}, {mode})")
                t = statistics.median(times)
                # The median of per-run ratios: each pair of runs saw the same machine load.
                ratio = statistics.median(p / o for p, o in zip(times, ours_times))
                row[name] = {"seconds": t, "events_per_s": n / t, "mb_per_s": mb / t, "ratio": ratio}
                out(f"{'':<10}{'':<7}{name:<12}{n / t:>12,.0f}{mb / t:>9.1f}{ratio:>8.2f}x")
            results[f"{shape}/{mode}"] = row
    return results


# -- part two: the whole in-process pipeline against httpx-sse + a typed decode -----------------


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta
    index: int = 0


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []


def bench_pipeline(size: int, runs: int, out: Callable[[str], None]) -> dict[str, Any] | None:
    try:
        from pipeline import PipelineBuilder
    except Exception as exc:  # noqa: BLE001 - a teammate's module may not exist yet
        out(f"pipeline: skipped: pipeline.core not available ({type(exc).__name__}: {exc})")
        return None
    stream = make_stream("openai", size, seed=2)
    reads = split_reads(stream, 16 * 1024)
    SSELineDecoder, SSEDecoder = load_httpx_sse()
    decode_chunk = msgspec.json.Decoder(_Chunk).decode

    def peer(reads: Iterable[bytes]) -> str:
        text_decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        lines = SSELineDecoder()
        decoder = SSEDecoder()
        parts: list[str] = []
        for read in reads:
            for line in lines.decode(text_decoder.decode(read)):
                sse = decoder.decode(line.rstrip("\n"))
                if sse is not None and sse.data != "[DONE]":
                    for choice in decode_chunk(sse.data).choices:
                        if choice.index == 0 and choice.delta.content:
                            parts.append(choice.delta.content)
        return "".join(parts)

    pipe = PipelineBuilder().provider("openai-chat").build()

    def ours(reads: Iterable[bytes]) -> str:
        return pipe.collect(reads).text

    expected = peer(reads)
    got = ours(reads)
    if got != expected:
        raise AssertionError("the pipeline's text differs from httpx-sse + msgspec")
    pairs = [(_time_once(ours, reads), _time_once(peer, reads)) for _ in range(runs)]
    t_ours = statistics.median(o for o, _ in pairs)
    t_peer = statistics.median(p for _, p in pairs)
    ratio = statistics.median(p / o for o, p in pairs)
    mb = len(stream) / 1e6
    out(f"pipeline (openai-chat, 16 KiB reads, {mb:.1f} MB): collect {mb / t_ours:.1f} MB/s,"
        f" httpx-sse + msgspec {mb / t_peer:.1f} MB/s, ratio {ratio:.2f}x")
    return {"bytes": len(stream), "ours_seconds": t_ours, "peer_seconds": t_peer, "ratio": ratio}


def _time_once(fn: Callable[[Any], Any], arg: Any) -> float:
    gc.collect()
    t0 = time.perf_counter()
    fn(arg)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, return the numbers (for `python -m bench`)."""
    ap = argparse.ArgumentParser(prog="python -m bench.sse", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 MB streams, 3 runs")
    ap.add_argument("--size", type=float, default=None, help="MB per shape (default 20, quick 2)")
    ap.add_argument("--runs", type=int, default=None, help="runs per measurement (default 5, quick 3)")
    args = ap.parse_args(argv)
    size = int((args.size if args.size is not None else (2 if args.quick else 20)) * 1e6)
    runs = args.runs if args.runs is not None else (3 if args.quick else 5)
    out = print
    results: dict[str, Any] = {"size": size, "runs": runs, "parsers": bench_parsers(size, runs, out)}
    results["pipeline"] = bench_pipeline(size, runs, out)
    return results


if __name__ == "__main__":
    main()
