"""Fewer wake-ups: a process that is woken for every read pays the kernel's sleep/wake cycle for
every read, and at a trickle of small reads that cycle, not our Python, is the largest cost.

Measured on the 2-core KVM machine this project is benchmarked on, one sleep-and-wake cycle costs
a process 24-35 us of CPU (`time.sleep(0.001)` in a loop: ~30 us of CPU per iteration), several
times what a one-event read costs us to parse. So while reads keep coming, the ingest's event loop
and the workers take them in ticks. The ingest, after a pass that found reads, sleeps out the rest
of the tick (not at all when the pass itself took the whole tick); a worker that finds its rings
empty naps (a tick, less when reads pile up during its naps, see Napper). The next pass takes
everything that arrived meanwhile with one wake-up. Two ticks with nothing (the reads of a tick
often land just after it) end the lingering: the process then blocks until the next read wakes
it, so an idle pool costs nothing.

The price is latency: a read waits at most about one tick (plus the kernel's timer slack,
~50 us) in each lingering process. `DEFAULT_TICK_S` keeps that well inside the live benchmark's
5 ms budget; `pool(..., linger_ms=0)` turns lingering off for the lowest latency at any CPU cost.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Callable

__all__ = ["DEFAULT_TICK_S", "QUIET_PASSES", "LoopLinger", "Napper"]

DEFAULT_TICK_S = 0.001
# Ticks without a read after which a process stops lingering and blocks (or parks): the reads of
# a tick often land just after it, so one empty pass is not yet quiet.
QUIET_PASSES = 2

# The shortest nap worth a sleep: below it a sleep's wake-up costs more than the wait saves.
_MIN_NAP_S = 0.00005

_perf = time.perf_counter
_sleep = time.sleep
_yield = getattr(os, "sched_yield", lambda: None)


class LoopLinger:
    """Batches an asyncio loop's wake-ups while reads keep coming.

    `note()` is called for each read (cheap: one add, one check). The first read after a quiet
    spell starts a ticker on the loop; each tick sleeps out the rest of the tick, so the loop's
    next poll returns every socket that became readable meanwhile. `before_sleep` runs first
    (the ingest hands what it batched to the workers then, so they need not wait for our sleep)."""

    __slots__ = ("_loop", "_tick", "_before_sleep", "_reads", "_active", "_last", "_quiet", "_tick_waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop, tick_s: float = DEFAULT_TICK_S,
                 before_sleep: Callable[[], None] | None = None) -> None:
        self._loop = loop
        self._tick = tick_s
        self._before_sleep = before_sleep
        self._reads = 0
        self._active = False
        self._last = 0.0
        self._quiet = 0
        self._tick_waiters: list[asyncio.Future] = []

    @property
    def active(self) -> bool:
        """True while the loop is ticking: from a read until two ticks in a row bring none."""
        return self._active

    def note(self) -> None:
        """One read was taken."""
        self._reads += 1
        if not self._active and self._tick > 0:
            self._active = True
            self._quiet = 0
            self._last = _perf()
            self._loop.call_soon(self._on_tick)

    def next_tick(self) -> asyncio.Future:
        """A future done at the next tick (or when ticking ends): coroutines that poll a ring
        while the loop is ticking look once per tick, costing no wake-up of their own."""
        fut = self._loop.create_future()
        if self._active:
            self._tick_waiters.append(fut)
        else:
            fut.set_result(None)  # no tick is coming: look now (and then wait another way)
        return fut

    def _release_waiters(self) -> None:
        waiters, self._tick_waiters = self._tick_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _on_tick(self) -> None:
        if self._tick_waiters:
            self._release_waiters()
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
    and the caller makes another pass; once nothing has come for two ticks it returns False and
    the caller parks. The nap adapts to the traffic: when the pass after a nap takes more than
    `busy_bytes` (reads pile up while it sleeps, and a producer could meet a full ring) the nap
    halves, down to yielding the core without sleeping; when it takes little, the nap doubles,
    up to the tick."""

    __slots__ = ("_tick", "_busy", "_nap", "_last_work", "_napped")

    def __init__(self, tick_s: float = DEFAULT_TICK_S, busy_bytes: int = 1 << 15) -> None:
        self._tick = tick_s
        self._busy = busy_bytes
        self._nap = tick_s
        self._last_work = float("-inf")  # nothing seen yet: park at once
        self._napped = False

    @property
    def nap_s(self) -> float:
        """The current nap length (0: yield the core, do not sleep)."""
        return self._nap

    def worked(self, nbytes: int = 0) -> None:
        """The last pass found work: `nbytes` of it."""
        self._last_work = _perf()
        if self._napped:
            self._napped = False
            if nbytes > self._busy:
                self._nap = self._nap / 2 if self._nap >= 2 * _MIN_NAP_S else 0.0
            else:
                self._nap = min(max(self._nap * 2, _MIN_NAP_S), self._tick)

    def nap(self) -> bool:
        """After an empty pass: nap and return True (make another pass), or return False when it
        is time to park (lingering off, or nothing for `QUIET_PASSES` ticks)."""
        if self._tick <= 0 or _perf() - self._last_work >= QUIET_PASSES * self._tick:
            return False
        if self._nap > 0:
            _sleep(self._nap)
        else:
            _yield()
        self._napped = True
        return True
