"""The live progress line on stderr: streams done, active, tokens/s and errors of a run."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, TextIO

from ._common import paint

if TYPE_CHECKING:
    from ..results import OutcomeCounter

# Refresh interval: fast enough to look live, slow enough to cost nothing.
_PROGRESS_INTERVAL_S = 0.1


class Progress:
    """One live status line on stderr (streams done, active, tokens/s, errors), redrawn with `\\r`
    at most every 0.1 s; silent when disabled (stderr not a terminal, or --quiet). It shows the
    run's `OutcomeCounter`, so the line and the summary count streams, tokens and errors alike."""

    def __init__(self, total: int | None, enabled: bool, counter: OutcomeCounter, stream: TextIO | None = None) -> None:
        self.total = total
        self.enabled = enabled
        self.counter = counter
        self.stream = stream or sys.stderr
        self.started = 0
        self._t0 = time.monotonic()
        self._last = 0.0
        self._width = 0

    @classmethod
    def on_stderr(cls, total: int | None, quiet: bool, counter: OutcomeCounter) -> "Progress":
        """The line a command shows: on when stderr is a terminal and `--quiet` is not given."""
        return cls(total, enabled=not quiet and sys.stderr.isatty(), counter=counter)

    def on_start(self) -> None:
        """A stream was submitted."""
        self.started += 1
        self._render()

    def refresh(self) -> None:
        """A stream finished (and its row was counted)."""
        self._render()

    def _render(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < _PROGRESS_INTERVAL_S:
            return
        self._last = now
        dt = max(now - self._t0, 1e-9)
        c = self.counter
        total = f"/{self.total}" if self.total is not None else ""
        nerr = c.failed
        err = f"errors {nerr}"
        if nerr:
            err = paint(err + " (" + ", ".join(f"{k} {v}" for k, v in sorted(c.errors_by_kind.items())) + ")", "31", self.stream)
        line = (f"streams {c.streams}{total}  active {self.started - c.streams}  "
                f"tokens {c.tokens:,}  tokens/s {c.tokens / dt:,.0f}  {err}")
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
