"""`streamring replay`, `verify` and `record`: what a recorded `.sse` stream gives, whether it
gives the same however it is split, and saving a live stream's bytes."""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec

from . import _endpoint as endpoint
from ._common import EXIT_FAILED, EXIT_OK, EXIT_STREAMS_FAILED, UsageError, log, paint, print_json

# Recordings this size or smaller are verified at every split offset; larger ones at a sample.
# 16 KiB keeps a full check under a few seconds while covering every typical short stream.
VERIFY_EXHAUSTIVE_BYTES = 16 * 1024
VERIFY_SAMPLED_OFFSETS = 4096

# A first line of each dialect that no other dialect's stream carries (checked against the real
# captures in tests/test_cli.py).
_DIALECT_MARKERS: tuple[tuple[str, re.Pattern[bytes]], ...] = (
    ("anthropic", re.compile(rb'"type"\s*:\s*"message_start"')),
    ("cohere-v2", re.compile(rb'"type"\s*:\s*"message-start"')),
    ("openai-responses", re.compile(rb'"type"\s*:\s*"response\.(created|in_progress|output_text)')),
    ("openai-chat", re.compile(rb'"object"\s*:\s*"chat\.completion\.chunk"')),
    # Chat chunks that some servers (TGI 1.4-2.0) label "text_completion": a `delta` object gives them away.
    ("openai-chat", re.compile(rb'"delta"\s*:\s*\{')),
    ("openai-completions", re.compile(rb'"object"\s*:\s*"text_completion"')),
    ("gemini", re.compile(rb'"candidates"\s*:')),
    ("tgi-generate", re.compile(rb'"token"\s*:\s*\{\s*"id"')),
)


def guess_dialect(data: bytes) -> str | None:
    """The dialect of a recorded stream from its first 64 KiB, or None when no marker matches."""
    head = data[:65536]
    for dialect, pattern in _DIALECT_MARKERS:
        if pattern.search(head):
            return dialect
    return None


def _load_recording(path: str) -> Any:
    from ..recording import Recording

    try:
        return Recording.load(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: {exc}") from None


def _dialect_for(args: argparse.Namespace, data: bytes) -> str:
    if args.provider:
        return args.provider
    dialect = guess_dialect(data)
    if dialect is None:
        raise UsageError(f"cannot tell the dialect of {args.file}; pass --provider")
    return dialect


def token_json(token: Any) -> bytes:
    """One StreamToken as a JSON object: {"type": "Delta", "content": ..., ...}."""
    fields = msgspec.structs.asdict(token)
    data = msgspec.json.encode({"type": type(token).__name__, **fields})
    # As results.json_line: U+2028/U+2029 escaped so every reader sees one line per token.
    return data.replace(b"\xe2\x80\xa8", b"\\u2028").replace(b"\xe2\x80\xa9", b"\\u2029")


def cmd_replay(args: argparse.Namespace) -> int:
    """`streamring replay`: a recording's tokens (JSON lines) and its result (last line)."""
    from ..core import PipelineBuilder
    from ..results import json_line, result_row
    from ..sources import Replay
    from ..tokens import merge

    rec = _load_recording(args.file)
    dialect = _dialect_for(args, rec.data)
    pipe = PipelineBuilder().provider(dialect).build()
    replay = Replay(args.file, read_size=args.read_size, pace=args.pace, provider=dialect)
    out = sys.stdout.buffer

    async def go() -> Any:
        stream = pipe.stream_request(replay)
        batch: list[Any] = []
        async for tok in stream:
            if args.merge:
                batch.append(tok)
            elif not args.no_tokens:
                out.write(token_json(tok) + b"\n")
                out.flush()
        if args.merge and not args.no_tokens:
            for tok in merge(batch):
                out.write(token_json(tok) + b"\n")
        return stream.result

    result = asyncio.run(go())
    row = result_row(result)
    out.write(json_line({"result": row}).encode("utf-8"))
    out.flush()
    return EXIT_OK if result.error is None else EXIT_STREAMS_FAILED


def _run_chunks(pipe: Any, chunks: Iterable[bytes]) -> tuple[list[Any], Any]:
    """Every token and the result of one stream given as reads (in this process)."""
    session = pipe.open_stream()
    tokens: list[Any] = []
    for chunk in chunks:
        tokens += session.process_chunk(chunk, 0)
        if session.finished:
            break
    tokens += session.close(0)
    return tokens, session.result


def _comparable(result: Any) -> Any:
    return msgspec.structs.replace(result, metrics=None, stream_id=0)


def verify_recording(data: bytes, dialect: str, *, random_splits: int = 1000, seed: int = 0,
                     exhaustive_limit: int = VERIFY_EXHAUSTIVE_BYTES, max_mismatches: int = 10) -> dict[str, Any]:
    """Re-read `data` split at every offset (a sample of offsets past `exhaustive_limit` bytes),
    in 1-byte reads and in `random_splits` random splits; every run must give the same merged
    tokens and result (metrics aside) as one whole read. Returns a report with `consistent`."""
    from ..core import PipelineBuilder
    from ..recording import split_events
    from ..tokens import merge

    pipe = PipelineBuilder().provider(dialect).enable_metrics(False).build()
    ref_tokens, ref_result = _run_chunks(pipe, [data])
    ref_merged = merge(ref_tokens)
    ref_cmp = _comparable(ref_result)
    n = len(data)
    rng = random.Random(seed)
    mismatches: list[dict[str, Any]] = []
    runs = {"split_at_offset": 0, "one_byte_reads": 0, "random_splits": 0}
    more = 0  # mismatches beyond the first `max_mismatches`, counted only

    def check(kind: str, label: str, cuts: list[int]) -> None:
        bounds = [0, *cuts, n]
        chunks = [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
        tokens, result = _run_chunks(pipe, chunks)
        runs[kind] += 1
        what = []
        if merge(tokens) != ref_merged:
            what.append("tokens")
        if _comparable(result) != ref_cmp:
            what.append("result")
        if what:
            nonlocal more
            if len(mismatches) < max_mismatches:
                mismatches.append({"run": label, "differs": what})
            else:
                more += 1

    if n > 1:
        if n <= exhaustive_limit:
            offsets: Iterable[int] = range(1, n)
            sampled = False
        else:
            # Every event boundary and its neighbours (where framing bugs live), plus random offsets.
            picks = set()
            for end in split_events(data):
                picks.update(o for o in (end - 2, end - 1, end, end + 1) if 0 < o < n)
            picks.update(rng.randrange(1, n) for _ in range(VERIFY_SAMPLED_OFFSETS))
            offsets = sorted(picks)
            sampled = True
        for off in offsets:
            check("split_at_offset", f"split at {off}", [off])
        check("one_byte_reads", "1-byte reads", list(range(1, n)))
        for r in range(random_splits):
            k = rng.randint(1, min(n - 1, 64))
            cuts = sorted(rng.sample(range(1, n), k))
            check("random_splits", f"random split {r} ({k} cuts)", cuts)
    else:
        sampled = False
    return {
        "bytes": n,
        "dialect": dialect,
        "sampled_offsets": sampled,
        "runs": runs,
        "consistent": not mismatches,
        "mismatches": mismatches,
        "more_mismatches": more,
        "result": {
            "ok": ref_result.error is None,
            "text_chars": len(ref_result.text),
            "finish": ref_result.finish,
            "error": None if ref_result.error is None else ref_result.error.kind,
            "tokens": len(ref_merged),
        },
    }


def cmd_verify(args: argparse.Namespace) -> int:
    """`streamring verify`: the same tokens and result however the recording is split."""
    rec = _load_recording(args.file)
    dialect = _dialect_for(args, rec.data)
    report = verify_recording(rec.data, dialect, random_splits=args.splits, seed=args.seed)
    report = {"file": args.file, **report}
    print_json(report)
    if not args.quiet:
        runs = sum(report["runs"].values())
        if report["consistent"]:
            log(f"{args.file}: consistent over {runs} runs ({dialect}, {report['bytes']} bytes)")
        else:
            log(paint(f"{args.file}: INCONSISTENT in {len(report['mismatches']) + report['more_mismatches']} of {runs} runs",
                        "31", sys.stderr))
    return EXIT_OK if report["consistent"] else EXIT_STREAMS_FAILED


class _RecordFailed(Exception):
    """The request got no stream to record (connect failure or an HTTP error status)."""


def cmd_record(args: argparse.Namespace) -> int:
    """`streamring record`: save a live stream's body bytes (and read timing) to FILE.sse."""
    from ..recording import RecordingWriter

    if (args.prompt is None) == (args.body is None):
        raise UsageError("give --prompt TEXT or --body JSON (one of them)")
    base_url = endpoint.base_url(args)
    body = (endpoint.parse_body(args.body) if args.body is not None
            else endpoint.prompt_body(args.provider, args.prompt, args.max_tokens))
    model = body.get("model") or args.model
    if endpoint.needs_model(args.provider) and not model:
        raise UsageError("--model is required (or a model in --body)")
    req = endpoint.one_request(args.provider, base_url, body, model=model, key=endpoint.api_key(args),
                               extra_headers=endpoint.headers(args))
    out = Path(args.output)
    if out.suffix != ".sse":
        raise UsageError(f"-o {args.output}: a recording's name ends in .sse")

    async def go() -> tuple[int, int, str | None]:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=args.timeout, sock_connect=10.0, sock_read=args.idle_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            try:
                resp = await http.request(req.method, req.url, headers=req.headers, data=req.body or None,
                                          allow_redirects=False)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise _RecordFailed(f"could not connect to {req.url.split('?')[0]}: {type(exc).__name__}: {exc}") from None
            async with resp:
                if not 200 <= resp.status < 300:
                    text = (await resp.content.read(4096)).decode("utf-8", "replace")
                    raise _RecordFailed(f"HTTP {resp.status} from {req.url.split('?')[0]}: {text.strip()}")
                reads = 0
                cut = None
                with RecordingWriter(out) as writer:
                    try:
                        async for chunk in resp.content.iter_any():
                            writer.append(chunk, time.monotonic_ns())
                            reads += 1
                    except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
                        cut = f"{type(exc).__name__}: {exc}"
                    return writer.offset, reads, cut

    try:
        nbytes, reads, cut = asyncio.run(go())
    except _RecordFailed as exc:
        log(str(exc))
        return EXIT_FAILED
    if not args.quiet:
        log(f"recorded {nbytes} bytes in {reads} reads to {out}" + (f" (the connection ended early: {cut})" if cut else ""))
    # What the recording says, read back with the pipeline.
    from ..core import PipelineBuilder
    from ..recording import Recording, iter_replay_chunks
    from ..results import json_line, result_row

    pipe = PipelineBuilder().provider(args.provider).build()
    result = pipe.collect(iter_replay_chunks(Recording.load(out), "recorded"))
    row = result_row(result)
    row["file"] = str(out)
    row["bytes"] = nbytes
    sys.stdout.write(json_line(row))
    sys.stdout.flush()
    return EXIT_OK if result.error is None else EXIT_STREAMS_FAILED
