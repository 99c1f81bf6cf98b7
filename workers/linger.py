"""Fewer wake-ups: a process that is woken for every read pays the kernel's sleep/wake cycle for
every read, and at a trickle of small reads that cycle, not our Python, is the largest cost.

Measured on the 2-core KVM machine this project is benchmarked on, one sleep-and-wake cycle costs
a process 24-35 us of CPU (`time.sleep(0.001)` in a loop: ~30 us of CPU per iteration), several
times what a one-event read costs us to parse. So while HTTP reads keep coming, the ingest's event
loop takes them in ticks: after a pass that found reads it hands its batches to the workers and
sleeps out the rest of the tick (not at all when the pass itself took the whole tick), and its
next poll takes every socket that became readable meanwhile, with one wake-up. Two ticks with
nothing (the reads of a tick often land just after it) end the ticking: the loop then blocks
until the next read wakes it, so an idle pool costs nothing. The workers follow: the ingest's
flushes wake them at most once per tick, and they do not linger themselves (BusyWindow).

The price is latency: a read waits at most one tick (plus the kernel's timer slack, ~50 us) in
the ingest. `DEFAULT_TICK_S` keeps that well inside the live benchmark's 5 ms budget;
`pool(..., linger_ms=0)` turns lingering off for the lowest latency at any CPU cost.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Callable

__all__ = ["DEFAULT_TICK_S", "QUIET_PASSES", "BusyWindow", "LoopLinger"]

DEFAULT_TICK_S = 0.001
# Ticks without a read after which a process stops lingering and blocks (or parks): the reads of
# a tick often land just after it, so one empty pass is not yet quiet.
QUIET_PASSES = 2

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


class BusyWindow:
    """When a worker's rings run empty: after a busy pass (more than `busy_bytes` taken: reads
    pour in) it looks again, yielding the core, for up to a tick before parking, since the next
    batch is microseconds away and a park costs a doorbell and a wake-up; after a light pass it
    parks at once. A worker does not sleep-linger: the ingest already hands it reads at most once
    per tick, and a nap only added latency (measured: p50 +0.6 ms at 30k tok/s, no CPU saved)."""

    __slots__ = ("_tick", "_busy", "_until")

    def __init__(self, tick_s: float = DEFAULT_TICK_S, busy_bytes: int = 1 << 15) -> None:
        self._tick = tick_s
        self._busy = busy_bytes
        self._until = float("-inf")

    def worked(self, nbytes: int) -> None:
        """The last pass took `nbytes`."""
        if nbytes > self._busy:
            self._until = _perf() + self._tick

    def again(self) -> bool:
        """After an empty pass: True to look again (the core was yielded first), False to park."""
        if _perf() < self._until:
            _yield()
            return True
        return False
