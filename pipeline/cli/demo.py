"""`streamring demo`: the mock provider and the pool end to end, every outcome checked against the mock."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from ._common import EXIT_OK, EXIT_STREAMS_FAILED, check_positive, color_ok, finish_summary, log
from ._progress import Progress
from ._runner import default_workers, resolve_in_process, run_streams

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
    from ..testing import FAULTS, parse_fault

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
    from ..sources import Request
    from ..testing import expected_stream

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
    from ..core import PipelineBuilder
    from ..results import OutcomeCounter, RowWriter, result_row, summary_table
    from ..testing import MockProviderProcess

    check_positive(args, "streams", "workers", "concurrency")
    in_process = resolve_in_process(args.in_process)
    workers = args.workers or default_workers()
    out = Path(args.out)
    # The demo never waits long: a stall would be a bug, and 500s are retried with short backoff.
    pipe = PipelineBuilder().http(idle_timeout=10.0, total_timeout=30.0, backoff_base=0.05, backoff_max=0.2).build()
    counter = OutcomeCounter()
    unexpected: list[dict[str, Any]] = []
    started = time.time()
    with MockProviderProcess(seed=args.seed) as mock:
        if not args.quiet:
            mode = "in this process" if in_process else f"a pool of {workers} worker(s) and 1 ingest process"
            log(f"mock provider on 127.0.0.1:{mock.port}; {args.streams} streams, {args.concurrency} at a time, {mode}")
        sources, cases = _demo_cases(mock, args.streams, args.tps)
        progress = Progress.on_stderr(len(sources), args.quiet, counter)
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
            metrics = run_streams(pipe, sources, workers=workers, ingest=1, concurrency=args.concurrency,
                                  in_process=in_process, progress=progress, on_result=on_result)
        finally:
            progress.close()
            writer.close()
    ended = time.time()
    expected_failures = sum(1 for c in cases if c.expect_kind is not None)
    summary = finish_summary(args, started=started, ended=ended, counts=counter, metrics=metrics, extra={
        "mode": "in-process" if in_process else "pool",
        "workers": None if in_process else workers,
        "results_file": str(out),
        "demo": {
            "expected_failures": expected_failures,
            "as_expected": counter.streams - len(unexpected),
            "unexpected": unexpected,
        },
    })
    if not args.json:
        print(summary_table(summary, color=color_ok(sys.stdout)))
        verdict = (f"all {counter.streams} outcomes as expected ({expected_failures} injected faults failed as the mock promised)"
                   if not unexpected else f"{len(unexpected)} unexpected outcome(s)")
        print(f"\n{verdict}; rows in {out}")
        for u in unexpected[:10]:
            print(f"  {u['custom_id']} {u['dialect']} fault={u['fault']}: {u['problem']}")
        sys.stdout.flush()
    return EXIT_OK if not unexpected and counter.streams == len(sources) else EXIT_STREAMS_FAILED
