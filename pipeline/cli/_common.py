"""What every command shares: exit codes, the usage error, stderr/stdout helpers, argument checks.

Data goes to stdout; logs, progress and tables to stderr. Colour only on a terminal and never with
NO_COLOR set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, TextIO

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_STREAMS_FAILED = 3


class UsageError(Exception):
    """A command line that cannot run as given (exit code 2)."""


def color_ok(stream: TextIO) -> bool:
    """Whether `stream` may carry ANSI colour: a terminal, and NO_COLOR unset."""
    # https://no-color.org: any non-empty NO_COLOR disables colour.
    return not os.environ.get("NO_COLOR") and hasattr(stream, "isatty") and stream.isatty()


def paint(text: str, code: str, stream: TextIO) -> str:
    """`text` in SGR colour `code` when `stream` takes colour, else as is."""
    return f"\x1b[{code}m{text}\x1b[0m" if color_ok(stream) else text


def log(msg: str) -> None:
    """One `streamring: ...` line on stderr."""
    print(f"streamring: {msg}", file=sys.stderr, flush=True)


def print_json(value: Any) -> None:
    """`value` as indented JSON on stdout."""
    sys.stdout.write(json.dumps(value, ensure_ascii=False, indent=2) + "\n")
    sys.stdout.flush()


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """A UsageError naming the first of `names` (argparse dests) given as a number below 1."""
    for name in names:
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")


def finish_summary(args: argparse.Namespace, *, started: float, ended: float, counts: Any,
                   metrics: dict[str, dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    """The summary JSON of a command's run (pipeline.results.build_summary), also written to
    `--summary FILE` and printed for `--json` when asked."""
    from .. import __version__
    from ..results import build_summary, write_json

    summary = build_summary(command=args.command, args=vars(args), started=started, ended=ended, counts=counts,
                            registry_summary=metrics, tool_version=__version__, extra=extra)
    if args.summary:
        write_json(args.summary, summary)
    if args.json:
        print_json(summary)
    return summary
