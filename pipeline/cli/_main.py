"""`main`: the `streamring` entry point; dispatches a command and maps its outcome to an exit code.

`mock` and `soak` parse their own arguments, so they are handed the rest of the command line.
"""

from __future__ import annotations

import os
import sys

from ..errors import ConfigurationError
from ._common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError
from ._parser import build_parser

# The soak module's full name (it may be absent from an installation).
_SOAK_MODULE = __name__.rsplit(".", 2)[0] + ".soak"


def cmd_mock(argv: list[str]) -> int:
    """`streamring mock ...`: the mock provider (pipeline._mock.process.main_mock)."""
    from ..testing import main_mock

    return main_mock(argv)


def cmd_soak(argv: list[str]) -> int:
    """`streamring soak ...`: long runs with faults (pipeline.soak.main_soak)."""
    try:
        from ..soak import main_soak  # type: ignore[import-not-found]
    except ModuleNotFoundError as exc:
        if exc.name != _SOAK_MODULE:
            raise
        print("streamring soak: not available in this installation (pipeline/soak.py is missing)", file=sys.stderr)
        return EXIT_FAILED
    return int(main_soak(argv) or 0)


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
