"""The command table: every command's flags, help and handler (argparse)."""

from __future__ import annotations

import argparse

from .. import __version__
from ..providers import DIALECTS
from .demo import cmd_demo
from .recordings import cmd_record, cmd_replay, cmd_verify
from .run import cmd_run


def _read_size(text: str) -> int | str:
    """--read-size: a positive byte count, 'event' or 'recorded'."""
    if text in ("event", "recorded"):
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a positive number of bytes, 'event' or 'recorded'") from None
    if n < 1:
        raise argparse.ArgumentTypeError("a positive number of bytes, 'event' or 'recorded'")
    return n


def _positive_float(text: str) -> float:
    """A number > 0 (timeouts, rates, pacing)."""
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
