"""Fewer wake-ups: a process that is woken for every read pays the kernel's sleep/wake cycle for
every read, and that cycle, not our Python, is the largest cost of a trickle of small reads.

Measured on the 2-core KVM machine this project is benchmarked on, one sleep-and-wake cycle costs
a process 24-35 us of CPU (`time.sleep(0.001)` in a loop: ~30 us of CPU per iteration), several
times what a one-event read costs us to parse. So while reads keep coming, the ingest's event loop
and the workers take them in ticks: after a pass that found work, they sleep out the rest of the
tick (never longer, and not at all when the pass itself took the whole tick), and the next pass
takes everything that arrived meanwhile with one wake-up. A whole tick with nothing (two passes
in a row: the reads of a pass often land just after it) ends the ticking: the process then blocks
until the next read wakes it, so an idle pool costs nothing.

The price is latency: a read waits at most one tick (plus the kernel's timer slack, ~50 us) in
each lingering process. `DEFAULT_TICK_S` keeps that well inside the live benchmark's 5 ms
budget; `pool(..., linger_ms=0)` turns lingering off for the lowest latency at any CPU cost.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

__all__ = ["DEFAULT_TICK_S", "QUIET_PASSES", "LoopLinger", "Napper"]

DEFAULT_TICK_S = 0.001
# Empty passes in a row after which a process stops lingering and blocks (or parks).
QUIET_PASSES = 2

_perf = time.perf_counter
_sleep = time.sleep


class LoopLinger:
    """Batches an asyncio loop's wake-ups while reads keep coming.

    `note()` is called for each read (cheap: one add, one check). The first read after a quiet
    spell starts a ticker on the loop; each tick sleeps out the rest of the tick, so the loop's
    next poll returns every socket that became readable meanwhile. `before_sleep` runs first
    (the ingest hands what it batched to the workers then, so they need not wait for our sleep)."""

    __slots__ = ("_loop", "_tick", "_before_sleep", "_reads", "_active", "_last", "_quiet")

    def __init__(self, loop: asyncio.AbstractEventLoop, tick_s: float = DEFAULT_TICK_S,
                 before_sleep: Callable[[], None] | None = None) -> None:
        self._loop = loop
        self._tick = tick_s
        self._before_sleep = before_sleep
        self._reads = 0
        self._active = False
        self._last = 0.0
        self._quiet = 0

    @property
    def active(self) -> bool:
        """True while the loop is ticking (reads came in the last tick)."""
        return self._active

    def note(self) -> None:
        """One read was taken."""
        self._reads += 1
        if not self._active and self._tick > 0:
            self._active = True
            self._quiet = 0
            self._last = _perf()
            self._loop.call_soon(self._on_tick)

    def _on_tick(self) -> None:
        if self._reads:
            self._reads = 0
            self._quiet = 0
            if self._before_sleep is not None:
                self._before_sleep()
        else:
            self._quiet += 1
            if self._quiet >= QUIET_PASSES:
                self._active = False  # a quiet tick: block in poll until the next read
                return
        rest = self._tick - (_perf() - self._last)
        if rest > 0:
            _sleep(rest)
        self._last = _perf()
        self._loop.call_soon(self._on_tick)


class Napper:
    """The same for a blocking consumer loop (a worker): when a pass finds nothing, `nap()` sleeps
    out the rest of the tick and the caller makes another pass; once `QUIET_PASSES` naps in a row
    found nothing (`worked()` resets the count) it returns False and the caller parks."""

    __slots__ = ("_tick", "_last", "_quiet")

    def __init__(self, tick_s: float = DEFAULT_TICK_S) -> None:
        self._tick = tick_s
        self._last = _perf()
        self._quiet = QUIET_PASSES  # nothing seen yet: park at once

    def worked(self) -> None:
        """The last pass found work: linger after the next empty one."""
        self._quiet = 0

    def nap(self) -> bool:
        """After an empty pass: sleep out the rest of the tick and return True (make another
        pass), or return False when it is time to park (lingering off, or a quiet tick)."""
        if self._tick <= 0 or self._quiet >= QUIET_PASSES:
            return False
        self._quiet += 1
        rest = self._tick - (_perf() - self._last)
        if rest > 0:
            _sleep(rest)
        self._last = _perf()
        return True
