"""The `streamring` command line (also `python -m pipeline`).

Commands: `demo` (the mock provider and the pool, end to end), `run` (a JSONL file of requests, or
one prompt, against a real or local endpoint), `replay` and `verify` (a recorded `.sse` file),
`record` (a live stream's bytes), `mock` (the mock provider) and `soak` (long fault runs).

Exit codes: 0 every stream succeeded (the demo: every outcome was the expected one); 1 the run
itself failed; 2 usage error; 3 the run finished but some streams failed (each is in the results).
Data goes to stdout; progress, tables and logs to stderr. Progress is shown only when stderr is a
terminal and `--quiet` is not given; colour only on a terminal and never with NO_COLOR set.

One module per job: `_parser` (the command table), `_main` (dispatch and exit codes), `_common`
(exit codes, output helpers), `_progress`, `_runner` (pool or in-process), `_endpoint` (a request
from the endpoint flags), and a module per command: `run`, `demo`, `recordings` (replay, verify,
record).
"""

# Every public name of the single-module cli.py stays importable from here (F401: re-exports).
from ._common import EXIT_FAILED, EXIT_OK, EXIT_STREAMS_FAILED, EXIT_USAGE, UsageError  # noqa: F401
from ._main import cmd_mock, cmd_soak, main  # noqa: F401
from ._parser import build_parser  # noqa: F401
from ._progress import Progress  # noqa: F401
from .demo import DEMO_FAULTS, cmd_demo  # noqa: F401
from .recordings import (VERIFY_EXHAUSTIVE_BYTES, VERIFY_SAMPLED_OFFSETS, cmd_record, cmd_replay,  # noqa: F401
                         cmd_verify, guess_dialect, token_json, verify_recording)
from .run import cmd_run  # noqa: F401

__all__ = ["main", "guess_dialect", "verify_recording"]
