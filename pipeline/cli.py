"""The `streamring` command line (also `python -m pipeline`)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from . import __version__


def _sample_openai_stream(i: int, n_tokens: int) -> bytes:
    words = ["stream", "ring", " 流", "式", " 🚀", " tokens", " fast", " ok"]
    parts = []
    for t in range(n_tokens):
        chunk = {"id": f"c{i}", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": words[(i + t) % len(words)]}, "finish_reason": None}]}
        parts.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    parts.append(b'data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n')
    parts.append(b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":%d,"total_tokens":%d}}\n\n' % (n_tokens, n_tokens + 3))
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


def _demo(args: argparse.Namespace) -> int:
    from .core import PipelineBuilder

    pipe = PipelineBuilder().provider("openai-chat").build()
    t0 = time.perf_counter()
    tokens = 0
    failed = 0
    for i in range(args.streams):
        data = _sample_openai_stream(i, 200)
        result = pipe.collect([data[k : k + 4096] for k in range(0, len(data), 4096)])
        failed += result.error is not None
        tokens += result.usage.output_tokens if result.usage and result.usage.output_tokens else 0
    dt = time.perf_counter() - t0
    print(f"streams={args.streams} tokens={tokens} failed={failed} seconds={dt:.3f} tokens/s={tokens / dt:,.0f}")
    return 0 if failed == 0 else 3


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `streamring` console script; returns the exit code."""
    parser = argparse.ArgumentParser(prog="streamring", description="Consume LLM token streams at high throughput.")
    parser.add_argument("--version", action="version", version=f"streamring {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run sample streams through the pipeline and print a summary")
    demo.add_argument("--streams", type=int, default=200)
    demo.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    return 2
