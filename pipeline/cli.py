"""The `streamring` command line (also `python -m pipeline`).

Commands: `demo` (the mock provider and the pool, end to end), `run` (a JSONL file of requests, or
one prompt, against a real or local endpoint), `replay` and `verify` (a recorded `.sse` file),
`record` (a live stream's bytes), `mock` (the mock provider) and `soak` (long fault runs).

Exit codes: 0 every stream succeeded (the demo: every outcome was the expected one); 1 the run
itself failed; 2 usage error; 3 the run finished but some streams failed (each is in the results).
Data goes to stdout; progress, tables and logs to stderr. Progress is shown only when stderr is a
terminal and `--quiet` is not given; colour only on a terminal and never with NO_COLOR set.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

import msgspec

from . import __version__
from .errors import ConfigurationError
from .providers import DIALECTS

__all__ = ["main", "guess_dialect", "verify_recording"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_STREAMS_FAILED = 3

# Where each vendor's official SDK points by default (the CLI's default --base-url).
_DEFAULT_BASE_URLS = {
    "openai-chat": "https://api.openai.com/v1",
    "openai-responses": "https://api.openai.com/v1",
    "openai-completions": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com",
    "cohere-v2": "https://api.cohere.com",
}
# Recordings this size or smaller are verified at every split offset; larger ones at a sample.
# 16 KiB keeps a full check under a few seconds while covering every typical short stream.
VERIFY_EXHAUSTIVE_BYTES = 16 * 1024
VERIFY_SAMPLED_OFFSETS = 4096
# Progress refresh interval: fast enough to look live, slow enough to cost nothing.
_PROGRESS_INTERVAL_S = 0.1


class UsageError(Exception):
    """A command line that cannot run as given (exit code 2)."""


# --- output helpers -----------------------------------------------------------------------------


def _color_ok(stream: TextIO) -> bool:
    # https://no-color.org: any non-empty NO_COLOR disables colour.
    return not os.environ.get("NO_COLOR") and hasattr(stream, "isatty") and stream.isatty()


def _paint(text: str, code: str, stream: TextIO) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if _color_ok(stream) else text


def _log(msg: str) -> None:
    print(f"streamring: {msg}", file=sys.stderr, flush=True)


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, ensure_ascii=False, indent=2) + "\n")
    sys.stdout.flush()


class Progress:
    """One live status line on stderr (streams done, active, tokens/s, errors), redrawn with `\\r`
    at most every 0.1 s; silent when disabled (stderr not a terminal, or --quiet)."""

    def __init__(self, total: int | None, enabled: bool, stream: TextIO | None = None) -> None:
        self.total = total
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.started = 0
        self.done = 0
        self.tokens = 0
        self.errors: dict[str, int] = {}
        self._t0 = time.monotonic()
        self._last = 0.0
        self._width = 0

    def on_start(self) -> None:
        """A stream was submitted."""
        self.started += 1
        self._render()

    def on_result(self, result: Any) -> None:
        """A stream finished."""
        self.done += 1
        n = result.usage.output_tokens if result.usage is not None else None
        if n is None and result.metrics is not None:
            n = getattr(result.metrics, "tokens", None)
        self.tokens += int(n or 0)
        if result.error is not None:
            self.errors[result.error.kind] = self.errors.get(result.error.kind, 0) + 1
        self._render()

    def _render(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < _PROGRESS_INTERVAL_S:
            return
        self._last = now
        dt = max(now - self._t0, 1e-9)
        total = f"/{self.total}" if self.total is not None else ""
        nerr = sum(self.errors.values())
        err = f"errors {nerr}"
        if nerr:
            err = _paint(err + " (" + ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) + ")", "31", self.stream)
        line = (f"streams {self.done}{total}  active {self.started - self.done}  "
                f"tokens {self.tokens:,}  tokens/s {self.tokens / dt:,.0f}  {err}")
        pad = max(0, self._width - len(line))
        self._width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line."""
        if self.enabled:
            self._render(force=True)
            self.stream.write("\n")
            self.stream.flush()


# --- running streams ----------------------------------------------------------------------------


def _default_workers() -> int:
    return max(1, (os.cpu_count() or 2) - 1)


def _pool_supported() -> str | None:
    """None when the pool can run here, else why not."""
    from shm.ring import check_platform

    try:
        check_platform()
    except Exception as exc:  # UnsupportedPlatformError
        return str(exc)
    return None


def _run_streams(
    pipe: Any,
    sources: list[Any],
    *,
    workers: int | None,
    ingest: int,
    concurrency: int | None,
    in_process: bool,
    progress: Progress,
    on_result: Callable[[Any], None],
    ray_address: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Run `sources` through the pool (or in this process), calling `on_result` per finished
    stream (its `source_index` is the position in `sources`); returns the merged metrics summary."""

    if not sources:  # nothing to do (a --resume with every request done): start nothing
        return {}

    def counted() -> Iterator[Any]:
        for src in sources:
            progress.on_start()
            yield src

    if not in_process:
        opts: dict[str, Any] = {"workers": workers or _default_workers(), "ingest": ingest}
        if concurrency:
            opts["concurrency"] = concurrency
        if ray_address:
            # One local pool per node; --workers is then per node (default: node CPUs - ingest).
            opts.update(backend="ray", address=ray_address, workers=workers)
        with pipe.pool(**opts) as pool:
            for result in pool.run(counted()):
                progress.on_result(result)
                on_result(result)
            return pool.metrics().summary()
    # The pool's default (workers/pool.py DEFAULT_CONCURRENCY), so both modes behave alike.
    asyncio.run(_run_in_process(pipe, counted(), concurrency or 256, progress, on_result))
    return pipe.registry.summary() if pipe.registry is not None else {}


async def _run_in_process(pipe: Any, sources: Iterator[Any], concurrency: int, progress: Progress,
                          on_result: Callable[[Any], None]) -> None:
    """The in-process pipeline: `concurrency` streams at a time on one event loop."""
    import aiohttp

    async with aiohttp.ClientSession() as http:

        async def one(i: int, src: Any) -> None:
            stream = pipe.stream_request(src, session=http, stream_id=i)
            result = await stream.collect()
            result.source_index = i
            progress.on_result(result)
            on_result(result)

        pending: set[asyncio.Task] = set()
        try:
            for i, src in enumerate(sources):
                if len(pending) >= concurrency:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for t in done:
                        t.result()
                pending.add(asyncio.ensure_future(one(i, src)))
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    t.result()
        finally:
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)


def _http_options(args: argparse.Namespace) -> dict[str, Any]:
    from .http import HttpOptions

    opts: dict[str, Any] = {}
    for name, key in (("idle_timeout", "idle_timeout"), ("timeout", "total_timeout"), ("retries", "retries"),
                      ("rpm", "rpm"), ("tpm", "tpm")):
        v = getattr(args, name, None)
        if v is not None:
            opts[key] = v
    HttpOptions.from_dict(opts)  # a bad value is a usage error now, not in a child process
    return opts


def _api_key(args: argparse.Namespace) -> str | None:
    """The key named by --api-key-env (None: the dialect's usual variable, read by Request)."""
    name = getattr(args, "api_key_env", None)
    if not name:
        return None
    value = os.environ.get(name)
    if not value:
        raise UsageError(f"--api-key-env {name}: that environment variable is not set")
    return value


def _base_url(args: argparse.Namespace) -> str:
    if args.base_url:
        return args.base_url
    url = _DEFAULT_BASE_URLS.get(args.provider)
    if url is None:
        raise UsageError(f"--base-url is required for provider {args.provider}")
    return url


def _prompt_body(dialect: str, prompt: str, max_tokens: int | None) -> dict[str, Any]:
    """A minimal request body of `dialect` asking `prompt` (what `--prompt` sends)."""
    if dialect in ("openai-chat", "cohere-v2"):
        body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]}
        if max_tokens:
            body["max_tokens"] = max_tokens
    elif dialect == "openai-responses":
        body = {"input": prompt}
        if max_tokens:
            body["max_output_tokens"] = max_tokens
    elif dialect == "openai-completions":
        body = {"prompt": prompt}
        if max_tokens:
            body["max_tokens"] = max_tokens
    elif dialect == "anthropic":
        # The Messages API requires max_tokens; 1024 is what the SDK examples use.
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens or 1024}
    elif dialect == "gemini":
        body = {"contents": [{"role": "user", "parts": [{"text": prompt}]}]}
        if max_tokens:
            body["generationConfig"] = {"maxOutputTokens": max_tokens}
    elif dialect == "tgi-generate":
        body = {"inputs": prompt}
        if max_tokens:
            body["parameters"] = {"max_new_tokens": max_tokens}
    else:
        body = {"prompt": prompt}
    return body


def _parse_body(text: str) -> dict[str, Any]:
    """--body: inline JSON, or @FILE."""
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"--body {text}: {exc.strerror or exc}") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise UsageError("--body must be a JSON object")
    return body


def _load_requests(path: str, dialect: str, base_url: str, model: str | None, api_key: str | None,
                   headers: dict[str, str] | None) -> list[tuple[int, Any]]:
    """(source_index, Request) per non-blank line of a JSONL file; a bad line is a usage error
    naming it. `source_index` counts requests from 0 in file order."""
    from .sources import Request

    out: list[tuple[int, Any]] = []
    seen: dict[str, int] = {}
    try:
        f = open(path, encoding="utf-8") if path != "-" else sys.stdin
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                body = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{where}: not valid JSON: {exc}") from None
            if not isinstance(body, dict):
                raise UsageError(f"{where}: a request line must be a JSON object")
            cid = body.pop("custom_id", None)
            if cid is not None:
                cid = str(cid)
                if cid in seen:
                    raise UsageError(f"{where}: custom_id {cid!r} already used on line {seen[cid]}")
                seen[cid] = lineno
            # --model fills the model only where the line names none.
            line_model = body.get("model") or model
            try:
                req = Request.from_body(dialect, base_url, body, model=line_model, api_key=api_key,
                                        custom_id=cid, headers=headers)
            except (ConfigurationError, ValueError, TypeError) as exc:
                raise UsageError(f"{where}: {exc}") from None
            out.append((len(out), req))
    return out


def _headers(args: argparse.Namespace) -> dict[str, str] | None:
    items = getattr(args, "header", None) or []
    if not items:
        return None
    out = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"--header {item!r}: expected 'Name: value'")
        out[name.strip()] = value.strip()
    return out


# --- run ----------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """`streamring run`: requests from a JSONL file (or one --prompt) through the pool."""
    from .core import PipelineBuilder
    from .results import (OutcomeCounter, RowWriter, build_summary, format_for, json_line, read_rows, result_row,
                          resume_plan, summary_table, write_json)
    from .sources import Request

    if (args.requests is None) == (args.prompt is None):
        raise UsageError("give a REQUESTS.jsonl file or --prompt TEXT (one of them)")
    if args.resume and not args.output:
        raise UsageError("--resume needs -o FILE (the results of the earlier run)")
    for name in ("concurrency", "workers", "ingest", "max_requests"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if args.output and format_for(args.output, "") == "":
        raise UsageError(f"-o {args.output}: the file name must end in .jsonl, .csv or .json")
    base_url = _base_url(args)
    api_key = _api_key(args)
    headers = _headers(args)
    http_opts = _http_options(args)
    if args.prompt is not None:
        if args.provider not in ("tgi-generate", "sse-generic") and not args.model:
            raise UsageError("--prompt needs --model")
        try:
            req = Request.from_body(args.provider, base_url, _prompt_body(args.provider, args.prompt, args.max_tokens),
                                    model=args.model, api_key=api_key, headers=headers)
        except (ConfigurationError, ValueError) as exc:
            raise UsageError(str(exc)) from None
        requests = [(0, req)]
    else:
        requests = _load_requests(args.requests, args.provider, base_url, args.model, api_key, headers)

    kept: list[dict[str, Any]] = []
    skipped = 0
    if args.resume:
        try:
            previous = read_rows(args.output)
        except (ValueError, OSError) as exc:
            raise UsageError(f"--resume: cannot read {args.output}: {exc}") from None
        keys = [req.custom_id if req.custom_id is not None else f"#{idx}" for idx, req in requests]
        run_now, kept, skipped = resume_plan(previous, keys, args.max_requests)
        requests = [requests[i] for i in run_now]
        if not args.quiet:
            _log(f"--resume: {skipped} request(s) already succeeded in {args.output}; running {len(requests)}")
    elif args.max_requests is not None:
        requests = requests[: args.max_requests]

    try:
        pipe = PipelineBuilder().provider(args.provider).http(**http_opts).build()
    except ConfigurationError as exc:
        raise UsageError(str(exc)) from None
    in_process = args.in_process
    if not in_process:
        why = _pool_supported()
        if why is not None:
            _log(f"the pool cannot run here ({why}); running in this process")
            in_process = True

    indices = [idx for idx, _ in requests]
    sources = [req for _, req in requests]
    counter = OutcomeCounter()
    rows_to_stdout = not args.output and not args.json
    writer = RowWriter(args.output, initial=kept) if args.output else None
    progress = Progress(len(sources), enabled=not args.quiet and sys.stderr.isatty())

    def on_result(result: Any) -> None:
        row = result_row(result, source_index=indices[result.source_index])
        counter.add(row)
        if writer is not None:
            writer.write(row)
        if rows_to_stdout:
            sys.stdout.write(json_line(row))
            sys.stdout.flush()

    started = time.time()
    try:
        metrics = _run_streams(pipe, sources, workers=args.workers, ingest=args.ingest or 1,
                               concurrency=args.concurrency, in_process=in_process, progress=progress,
                               ray_address=args.ray,
                               on_result=on_result)
    finally:
        progress.close()
        if writer is not None:
            writer.close()
    ended = time.time()
    summary = build_summary(
        command="run",
        args=vars(args),
        started=started,
        ended=ended,
        counts=counter,
        registry_summary=metrics,
        tool_version=__version__,
        extra={"skipped": skipped, "mode": "in-process" if in_process else "pool"},
    )
    if args.summary:
        write_json(args.summary, summary)
    if args.json:
        _print_json(summary)
    if not args.quiet:
        print(summary_table(summary, color=_color_ok(sys.stderr)), file=sys.stderr, flush=True)
    return EXIT_OK if counter.failed == 0 else EXIT_STREAMS_FAILED


# --- demo ---------------------------------------------------------------------------------------

# The mock's dialects, and which of them carry client tool calls and reasoning.
_MOCK_DIALECTS = ("openai-chat", "openai-responses", "anthropic", "gemini", "tgi-generate", "openai-completions")
_TOOL_DIALECTS = frozenset({"openai-chat", "openai-responses", "anthropic", "gemini"})
_REASONING_DIALECTS = frozenset({"openai-responses", "anthropic", "gemini"})
# Faults injected into the demo (one stream each): failures with a known error kind, and
# disturbances the pipeline must ride out (keep-alive comments, CRLF, 1-byte writes, a dropped
# connection resumed with Last-Event-ID).
DEMO_FAULTS = ("500", "malformed", "disconnect", "error", "truncate", "keepalive", "crlf", "bytewise", "drop")


def _fault_outcome(name: str) -> str | None:
    """The error kind the mock's fault table promises for a fault, or None for a clean result."""
    from .testing import FAULTS, parse_fault

    outcome = FAULTS[parse_fault(name).name][2]
    m = re.match(r"Error\(kind='(\w+)'", outcome)
    return m.group(1) if m else None


def _demo_body(dialect: str, i: int, tokens: int, tools: bool, reasoning: bool) -> dict[str, Any]:
    """A dialect-native request body (what that API's own client sends) for demo stream i."""
    prompt = f"Demo stream {i}: tell me about rivers, 数据流 and 🚀."
    tool = {"name": "get_weather", "description": "Weather for a city", "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}
    if dialect == "openai-chat":
        body: dict[str, Any] = {"model": "mock-chat", "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens}
        if tools:
            body["tools"] = [{"type": "function", "function": tool}]
    elif dialect == "openai-responses":
        body = {"model": "mock-responses", "input": prompt, "max_output_tokens": tokens}
        if tools:
            body["tools"] = [{"type": "function", **tool}]
        if reasoning:
            body["reasoning"] = {"effort": "low", "summary": "auto"}
    elif dialect == "anthropic":
        body = {"model": "mock-claude", "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens}
        if tools:
            body["tools"] = [{"name": tool["name"], "description": tool["description"], "input_schema": tool["parameters"]}]
        if reasoning:
            body["thinking"] = {"type": "enabled", "budget_tokens": 1024}
    elif dialect == "gemini":
        gen: dict[str, Any] = {"maxOutputTokens": tokens}
        if reasoning:
            gen["thinkingConfig"] = {"includeThoughts": True}
        body = {"model": "mock-gemini", "contents": [{"role": "user", "parts": [{"text": prompt}]}], "generationConfig": gen}
        if tools:
            body["tools"] = [{"functionDeclarations": [tool]}]
    elif dialect == "tgi-generate":
        body = {"inputs": prompt, "parameters": {"max_new_tokens": tokens}}
    else:
        body = {"model": "mock-instruct", "prompt": prompt, "max_tokens": tokens}
    return body


class _DemoCase(msgspec.Struct):
    dialect: str
    fault: str | None
    expect_kind: str | None  # None: a clean result
    text_sha256: str
    reasoning: str | None
    tool_calls: list[tuple[str, Any]]
    request: dict[str, Any]  # the body sent (its `mock.seed` and max tokens fix the content)


def _demo_cases(mock: Any, n: int, tps: float | None) -> tuple[list[Any], list[_DemoCase]]:
    from .sources import Request
    from .testing import expected_stream

    fault_at = {}
    if n >= len(DEMO_FAULTS):
        step = n // len(DEMO_FAULTS)
        # Spread over the run and over the dialects (stream i speaks dialect i % 6).
        nd = len(_MOCK_DIALECTS)
        fault_at = {(step * k) // nd * nd + k % nd: f for k, f in enumerate(DEMO_FAULTS)}
    sources, cases = [], []
    for i in range(n):
        dialect = _MOCK_DIALECTS[i % len(_MOCK_DIALECTS)]
        tokens = 16 + (i * 37) % 112
        tools = dialect in _TOOL_DIALECTS and i % 5 == 1
        reasoning = dialect in _REASONING_DIALECTS and i % 7 == 2
        body = _demo_body(dialect, i, tokens, tools, reasoning)
        mock_opts: dict[str, Any] = {"seed": 10_000 + i, "tokens_per_event": 1 + i % 3}
        if tps:
            mock_opts["tps"] = tps
            mock_opts["jitter"] = 0.3
        if dialect == "openai-chat" and i % 7 == 2:
            mock_opts["reasoning"] = 24  # reasoning_content deltas, as DeepSeek-style servers send
        body["mock"] = mock_opts
        fault = fault_at.get(i)
        headers = {"x-mock-fault": fault} if fault else None
        req = Request.from_body(dialect, mock.base_url(dialect), body, custom_id=f"demo-{i:04d}", headers=headers)
        sent = json.loads(req.body)
        if dialect == "gemini":
            sent.setdefault("model", body["model"])
        exp = expected_stream(dialect, sent, headers=headers)
        cases.append(_DemoCase(
            dialect=dialect,
            fault=fault,
            expect_kind=_fault_outcome(fault) if fault else None,
            text_sha256=exp.text_sha256,
            reasoning=exp.reasoning,
            tool_calls=[(t.name, t.arguments) for t in exp.tool_calls],
            request=sent,
        ))
        sources.append(req)
    return sources, cases


def _demo_check(result: Any, case: _DemoCase) -> str | None:
    """None when the stream's outcome is the expected one, else what differs."""
    err = result.error
    if case.expect_kind is not None:
        if err is None:
            return f"expected error {case.expect_kind}, got success"
        if err.kind != case.expect_kind:
            return f"expected error {case.expect_kind}, got {err.kind}: {err.message}"
        return None
    if err is not None:
        return f"expected success, got error {err.kind}: {err.message}"
    if hashlib.sha256(result.text.encode("utf-8")).hexdigest() != case.text_sha256:
        return "text differs from what the mock sent"
    if case.reasoning is not None and result.reasoning != case.reasoning:
        return "reasoning differs from what the mock sent"
    got = [(t.name, t.arguments) for t in result.tool_calls]
    if got != case.tool_calls:
        return f"tool calls differ: expected {case.tool_calls!r}, got {got!r}"
    return None


def cmd_demo(args: argparse.Namespace) -> int:
    """`streamring demo`: the mock provider in its own process, the pool, a few hundred streams
    across every dialect (tool calls, reasoning, injected faults), checked against the mock."""
    from .core import PipelineBuilder
    from .results import OutcomeCounter, RowWriter, build_summary, result_row, summary_table, write_json
    from .testing import MockProviderProcess

    if args.streams < 1:
        raise UsageError("--streams must be >= 1")
    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be >= 1")
    if args.concurrency < 1:
        raise UsageError("--concurrency must be >= 1")
    in_process = args.in_process
    if not in_process:
        why = _pool_supported()
        if why is not None:
            _log(f"the pool cannot run here ({why}); running in this process")
            in_process = True
    workers = args.workers or _default_workers()
    out = Path(args.out)
    # The demo never waits long: a stall would be a bug, and 500s are retried with short backoff.
    pipe = PipelineBuilder().http(idle_timeout=10.0, total_timeout=30.0, backoff_base=0.05, backoff_max=0.2).build()
    counter = OutcomeCounter()
    unexpected: list[dict[str, Any]] = []
    started = time.time()
    with MockProviderProcess(seed=args.seed) as mock:
        if not args.quiet:
            mode = "in this process" if in_process else f"a pool of {workers} worker(s) and 1 ingest process"
            _log(f"mock provider on 127.0.0.1:{mock.port}; {args.streams} streams, {args.concurrency} at a time, {mode}")
        sources, cases = _demo_cases(mock, args.streams, args.tps)
        progress = Progress(len(sources), enabled=not args.quiet and sys.stderr.isatty())
        writer = RowWriter(out, extra_columns=("dialect", "fault", "expected", "as_expected", "problem", "request"))

        def on_result(result: Any) -> None:
            case = cases[result.source_index]
            problem = _demo_check(result, case)
            row = result_row(result, extra={
                "dialect": case.dialect,
                "fault": case.fault,
                "expected": "ok" if case.expect_kind is None else f"error:{case.expect_kind}",
                "as_expected": problem is None,
                "problem": problem,
                "request": case.request,
            })
            counter.add(row)
            writer.write(row)
            if problem is not None:
                unexpected.append({"custom_id": result.custom_id, "dialect": case.dialect, "fault": case.fault, "problem": problem})

        try:
            metrics = _run_streams(pipe, sources, workers=workers, ingest=1, concurrency=args.concurrency,
                                   in_process=in_process, progress=progress, on_result=on_result)
        finally:
            progress.close()
            writer.close()
    ended = time.time()
    expected_failures = sum(1 for c in cases if c.expect_kind is not None)
    summary = build_summary(
        command="demo",
        args=vars(args),
        started=started,
        ended=ended,
        counts=counter,
        registry_summary=metrics,
        tool_version=__version__,
        extra={
            "mode": "in-process" if in_process else "pool",
            "workers": None if in_process else workers,
            "results_file": str(out),
            "demo": {
                "expected_failures": expected_failures,
                "as_expected": counter.streams - len(unexpected),
                "unexpected": unexpected,
            },
        },
    )
    if args.summary:
        write_json(args.summary, summary)
    if args.json:
        _print_json(summary)
    else:
        print(summary_table(summary, color=_color_ok(sys.stdout)))
        verdict = (f"all {counter.streams} outcomes as expected ({expected_failures} injected faults failed as the mock promised)"
                   if not unexpected else f"{len(unexpected)} unexpected outcome(s)")
        print(f"\n{verdict}; rows in {out}")
        for u in unexpected[:10]:
            print(f"  {u['custom_id']} {u['dialect']} fault={u['fault']}: {u['problem']}")
        sys.stdout.flush()
    return EXIT_OK if not unexpected and counter.streams == len(sources) else EXIT_STREAMS_FAILED


# --- recordings: replay, verify, record -----------------------------------------------------------

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
    from .recording import Recording

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


def _read_size(text: str) -> int | str:
    if text in ("event", "recorded"):
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a positive number of bytes, 'event' or 'recorded'") from None
    if n < 1:
        raise argparse.ArgumentTypeError("a positive number of bytes, 'event' or 'recorded'")
    return n


def token_json(token: Any) -> bytes:
    """One StreamToken as a JSON object: {"type": "Delta", "content": ..., ...}."""
    fields = msgspec.structs.asdict(token)
    data = msgspec.json.encode({"type": type(token).__name__, **fields})
    # As results.json_line: U+2028/U+2029 escaped so every reader sees one line per token.
    return data.replace(b"\xe2\x80\xa8", b"\\u2028").replace(b"\xe2\x80\xa9", b"\\u2029")


def cmd_replay(args: argparse.Namespace) -> int:
    """`streamring replay`: a recording's tokens (JSON lines) and its result (last line)."""
    from .core import PipelineBuilder
    from .results import json_line, result_row
    from .sources import Replay
    from .tokens import merge

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
    from .core import PipelineBuilder
    from .recording import split_events
    from .tokens import merge

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
    _print_json(report)
    if not args.quiet:
        runs = sum(report["runs"].values())
        if report["consistent"]:
            _log(f"{args.file}: consistent over {runs} runs ({dialect}, {report['bytes']} bytes)")
        else:
            _log(_paint(f"{args.file}: INCONSISTENT in {len(report['mismatches']) + report['more_mismatches']} of {runs} runs",
                        "31", sys.stderr))
    return EXIT_OK if report["consistent"] else EXIT_STREAMS_FAILED


def cmd_record(args: argparse.Namespace) -> int:
    """`streamring record`: save a live stream's body bytes (and read timing) to FILE.sse."""
    from .recording import RecordingWriter
    from .sources import Request

    if (args.prompt is None) == (args.body is None):
        raise UsageError("give --prompt TEXT or --body JSON (one of them)")
    base_url = _base_url(args)
    body = _parse_body(args.body) if args.body is not None else _prompt_body(args.provider, args.prompt, args.max_tokens)
    model = body.get("model") or args.model
    if args.provider not in ("tgi-generate", "sse-generic") and not model:
        raise UsageError("--model is required (or a model in --body)")
    try:
        req = Request.from_body(args.provider, base_url, body, model=model, api_key=_api_key(args), headers=_headers(args))
    except (ConfigurationError, ValueError) as exc:
        raise UsageError(str(exc)) from None
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
        _log(str(exc))
        return EXIT_FAILED
    if not args.quiet:
        _log(f"recorded {nbytes} bytes in {reads} reads to {out}" + (f" (the connection ended early: {cut})" if cut else ""))
    # What the recording says, read back with the pipeline.
    from .core import PipelineBuilder
    from .recording import Recording, iter_replay_chunks
    from .results import json_line, result_row

    pipe = PipelineBuilder().provider(args.provider).build()
    result = pipe.collect(iter_replay_chunks(Recording.load(out), "recorded"))
    row = result_row(result)
    row["file"] = str(out)
    row["bytes"] = nbytes
    sys.stdout.write(json_line(row))
    sys.stdout.flush()
    return EXIT_OK if result.error is None else EXIT_STREAMS_FAILED


class _RecordFailed(Exception):
    pass


# --- delegated commands -------------------------------------------------------------------------


def cmd_mock(argv: list[str]) -> int:
    """`streamring mock ...`: the mock provider (pipeline._mock.process.main_mock)."""
    from .testing import main_mock

    return main_mock(argv)


def cmd_soak(argv: list[str]) -> int:
    """`streamring soak ...`: long runs with faults (pipeline.soak.main_soak)."""
    try:
        from .soak import main_soak  # type: ignore[import-not-found]
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.soak":
            raise
        print("streamring soak: not available in this installation (pipeline/soak.py is missing)", file=sys.stderr)
        return EXIT_FAILED
    return int(main_soak(argv) or 0)


# --- the parser ---------------------------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return v


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, table or log lines on stderr")


def _add_endpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("--provider", choices=DIALECTS, required=True, metavar="DIALECT",
                   help=f"wire dialect: {', '.join(DIALECTS)}")
    p.add_argument("--base-url", metavar="URL",
                   help="API base URL as the official SDKs take it (OpenAI-style dialects include /v1); "
                        "default: the vendor's public API")
    p.add_argument("--model", metavar="NAME", help="model name (fills lines that name none)")
    p.add_argument("--api-key-env", metavar="NAME",
                   help="environment variable holding the API key (default: the dialect's usual one, e.g. "
                        "OPENAI_API_KEY, ANTHROPIC_API_KEY, GEMINI_API_KEY or GOOGLE_API_KEY; none set: no auth header)")
    p.add_argument("--header", action="append", metavar="'NAME: VALUE'", help="extra request header (repeatable)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="max tokens of a --prompt request")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every command (mock and soak only list themselves: they parse
    their own arguments)."""
    parser = argparse.ArgumentParser(
        prog="streamring",
        description="Consume LLM token streams (SSE) at high throughput.",
        epilog="Exit codes: 0 all streams succeeded, 1 the run failed, 2 usage error, 3 some streams failed.",
    )
    parser.add_argument("--version", action="version", version=f"streamring {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run a few hundred streams against the mock provider through the pool",
                          description="Start the mock provider in its own process and the pool, run streams of every "
                                      "dialect (tool calls, reasoning, injected faults), check each outcome against "
                                      "what the mock sent, print a summary and write the per-stream rows.")
    demo.add_argument("--streams", type=int, default=300, metavar="N", help="streams to run (default 300)")
    demo.add_argument("--workers", type=int, metavar="K", help="worker processes (default: CPUs - 1, at least 1)")
    demo.add_argument("--concurrency", type=int, default=100, metavar="N", help="streams in flight at once (default 100)")
    demo.add_argument("--tps", type=_positive_float, default=300.0, metavar="R",
                      help="mock pacing, tokens/s per stream (default 300)")
    demo.add_argument("--seed", type=int, default=0, help="mock server seed (default 0)")
    demo.add_argument("--out", default="streamring-demo-results.jsonl", metavar="FILE",
                      help="per-stream rows (.jsonl, .csv or .json; default streamring-demo-results.jsonl)")
    demo.add_argument("--summary", metavar="FILE", help="also write the summary JSON here")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON on stdout instead of the table")
    demo.add_argument("--in-process", action="store_true", help="run the streams in this process instead of the pool")
    _add_common(demo)
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser("run", help="run the requests of a JSONL file (or one --prompt) through the pool",
                         description="Each line of REQUESTS.jsonl is a request body in the dialect's own shape "
                                     "(messages, max_tokens, tools, ...) plus an optional custom_id.")
    run.add_argument("requests", nargs="?", metavar="REQUESTS.jsonl", help="request bodies, one JSON object a line ('-': stdin)")
    run.add_argument("--prompt", metavar="TEXT", help="send one request with this user prompt instead")
    _add_endpoint(run)
    run.add_argument("--concurrency", type=int, metavar="N", help="streams in flight at once (default 256)")
    run.add_argument("--workers", type=int, metavar="K", help="worker processes (default: CPUs - 1, at least 1)")
    run.add_argument("--ingest", type=int, default=1, metavar="I", help="ingest (network) processes (default 1)")
    run.add_argument("--max-requests", type=int, metavar="N", help="run at most N requests (after --resume skips)")
    run.add_argument("--timeout", type=_positive_float, metavar="S", help="whole-stream deadline in seconds")
    run.add_argument("--idle-timeout", type=_positive_float, metavar="S", help="longest silence between reads (default 60)")
    run.add_argument("--retries", type=int, metavar="N", help="retries of a request that failed before any byte (default 2)")
    run.add_argument("--rpm", type=_positive_float, metavar="N", help="client-side limit, requests per minute")
    run.add_argument("--tpm", type=_positive_float, metavar="N", help="client-side limit, output tokens per minute")
    run.add_argument("-o", "--output", metavar="FILE", help="per-request rows: .jsonl, .csv or .json (one array); "
                                                            "default: JSON lines on stdout")
    run.add_argument("--summary", metavar="FILE", help="write the summary JSON here")
    run.add_argument("--resume", action="store_true",
                     help="skip requests whose custom_id (else line) already has a successful row in -o FILE")
    run.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    run.add_argument("--in-process", action="store_true", help="run in this process (asyncio) instead of the pool")
    run.add_argument("--ray", metavar="ADDRESS",
                     help="run one pool per node of this Ray cluster (e.g. auto, ray://head:10001; "
                          "needs streamring[ray]); --concurrency and --workers are then per node")
    _add_common(run)
    run.set_defaults(func=cmd_run)

    replay = sub.add_parser("replay", help="the tokens and result of a recorded stream",
                            description="Print each token of FILE.sse as a JSON line, then {\"result\": ...}.")
    replay.add_argument("file", metavar="FILE.sse")
    replay.add_argument("--provider", choices=DIALECTS, metavar="DIALECT", help="dialect (default: guessed from the bytes)")
    replay.add_argument("--read-size", type=_read_size, default="recorded", metavar="N|event|recorded",
                        help="bytes per read (default: the recorded reads, else one event per read)")
    replay.add_argument("--pace", type=float, metavar="X", help="replay at X times the recorded speed (default: at once)")
    replay.add_argument("--merge", action="store_true", help="merge adjacent tokens (pipeline.tokens.merge)")
    replay.add_argument("--no-tokens", action="store_true", help="print only the result")
    _add_common(replay)
    replay.set_defaults(func=cmd_replay)

    verify = sub.add_parser("verify", help="check a recording gives the same tokens however it is split",
                            description="Re-read FILE.sse split at every offset (a sample past 16 KiB), in 1-byte "
                                        "reads and in random splits; exit 0 only when every run gives the same merged "
                                        "tokens and result.")
    verify.add_argument("file", metavar="FILE.sse")
    verify.add_argument("--provider", choices=DIALECTS, metavar="DIALECT", help="dialect (default: guessed)")
    verify.add_argument("--splits", type=int, default=1000, metavar="N", help="random splits (default 1000)")
    verify.add_argument("--seed", type=int, default=0, help="seed of the random splits (default 0)")
    _add_common(verify)
    verify.set_defaults(func=cmd_verify)

    record = sub.add_parser("record", help="save a live stream's bytes and read timing to FILE.sse",
                            description="Send one streaming request and save the response body exactly as read, "
                                        "with a .timing sidecar; then print the stream's result.")
    _add_endpoint(record)
    record.add_argument("--prompt", metavar="TEXT", help="user prompt")
    record.add_argument("--body", metavar="JSON|@FILE", help="the whole request body (dialect's shape)")
    record.add_argument("-o", "--output", required=True, metavar="FILE.sse")
    record.add_argument("--timeout", type=_positive_float, metavar="S", help="whole-stream deadline in seconds")
    record.add_argument("--idle-timeout", type=_positive_float, default=60.0, metavar="S",
                        help="longest silence between reads (default 60)")
    _add_common(record)
    record.set_defaults(func=cmd_record)

    sub.add_parser("mock", help="run the mock LLM provider on loopback (streamring mock --help)", add_help=False)
    sub.add_parser("soak", help="long runs against the mock with faults (streamring soak --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `streamring` console script; returns the exit code."""
    if argv is None:
        argv = sys.argv[1:]
    # mock and soak parse their own arguments.
    if argv and argv[0] == "mock":
        return cmd_mock(argv[1:])
    if argv and argv[0] == "soak":
        return cmd_soak(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2)
        return int(exc.code or 0)
    try:
        return args.func(args)
    except (UsageError, ConfigurationError) as exc:
        print(f"streamring {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\nstreamring {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout closed early (`| head`): not an error of ours; silence the flush at exit.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_OK
    except Exception as exc:
        print(f"streamring {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        if os.environ.get("STREAMRING_DEBUG"):
            raise
        return EXIT_FAILED
