"""Waiting on several rings at once (a consumer that reads many rings, e.g. a worker with I
ingest rings, or the caller with K output rings), plus process sentinels.

The same discipline as `Ring.wait_readable`: set every ring's consumer-waiting flag, fence,
re-check every tail, and only then sleep in poll() on all the doorbells, so no wake-up is lost
and an idle consumer uses no CPU.
"""

from __future__ import annotations

import select
import time
from collections.abc import Sequence

from .ring import _I_CWAIT, _I_TAIL, _IDLE_RECHECK_S, _RECHECK_S, Ring, _fence

_RECHECK_MS = max(1, int(_RECHECK_S * 1000))
_IDLE_RECHECK_MS = int(_IDLE_RECHECK_S * 1000)


def any_readable(rings: Sequence[Ring]) -> bool:
    """True when some ring has published entries this consumer has not read."""
    for ring in rings:
        if ring._hq[_I_TAIL] != ring._cpos:
            return True
    return False


def wait_any(rings: Sequence[Ring], timeout: float | None, sentinels: Sequence[int] = ()) -> list[int]:
    """Sleep until a ring becomes readable or a sentinel fd becomes readable, or `timeout`
    seconds pass. Returns the sentinels that fired (empty when a ring woke us or on timeout).

    A parked wait re-checks the tails after 1 ms even if no doorbell rang: a producer's unfenced
    publish can miss our waiting flag (shm/ring.py, "Parking"); such wake-ups are counted in the
    rings' `late_wakeups`."""
    if any_readable(rings):
        return []
    poller = select.poll()
    bells = {}
    for ring in rings:
        fd = ring._data_fd
        bells[fd] = ring._data_bell
        poller.register(fd, select.POLLIN)
    for fd in sentinels:
        poller.register(fd, select.POLLIN)
    for ring in rings:
        ring._hq[_I_CWAIT] = 1
    _fence()
    try:
        if any_readable(rings):
            return []
        deadline = None if timeout is None else time.monotonic() + timeout
        first = True
        while True:
            wait_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
            # Re-check after 1 ms (the publish/flag race), then every second (belt and braces),
            # as Ring._park does.
            slice_ms = _RECHECK_MS if first else _IDLE_RECHECK_MS
            wait_ms = slice_ms if wait_ms is None else min(wait_ms, slice_ms)
            events = poller.poll(wait_ms)
            fired = [fd for fd, _ in events if fd not in bells]
            for fd, _ in events:
                bell = bells.get(fd)
                if bell is not None:
                    bell.drain()
            if fired:
                return fired
            if events:
                return []
            if any_readable(rings):
                if first:
                    _count_late(rings)
                return []
            first = False
            if deadline is not None and time.monotonic() >= deadline:
                return []
    finally:
        for ring in rings:
            ring._hq[_I_CWAIT] = 0


def _count_late(rings: Sequence[Ring]) -> None:
    # Data is there and no doorbell rang (one rung just after our timer is not a miss).
    for ring in rings:
        if ring._hq[_I_TAIL] != ring._cpos and not ring._data_bell.drain():
            ring.late_wakeups += 1


def closed_and_drained(ring: Ring) -> bool:
    """True when the producer closed the ring and this consumer has read everything."""
    from .ring import _I_PCLOSED

    return bool(ring._hq[_I_PCLOSED]) and ring._hq[_I_TAIL] == ring._cpos


async def wait_any_async(rings: Sequence[Ring], timeout: float | None = None, sentinels: Sequence[int] = ()) -> list[int]:
    """`wait_any` for asyncio: `loop.add_reader` on every doorbell and sentinel."""
    import asyncio

    if any_readable(rings):
        return []
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    fired: list[int] = []

    def on_bell() -> None:
        if not fut.done():
            fut.set_result(None)

    def on_sentinel(fd: int) -> None:
        fired.append(fd)
        if not fut.done():
            fut.set_result(None)

    fds = []
    for ring in rings:
        loop.add_reader(ring._data_fd, on_bell)
        fds.append(ring._data_fd)
    for fd in sentinels:
        loop.add_reader(fd, on_sentinel, fd)
        fds.append(fd)
    for ring in rings:
        ring._hq[_I_CWAIT] = 1
    _fence()
    timer = None
    try:
        if any_readable(rings):
            return []
        deadline = None if timeout is None else loop.time() + timeout

        def on_timer(first: bool) -> None:
            nonlocal timer
            if fut.done():
                return
            if any_readable(rings):
                if first:
                    _count_late(rings)
                fut.set_result(None)
            elif deadline is None or loop.time() < deadline:
                # Past the 1 ms re-check (see wait_any): re-check every second until the deadline.
                at = loop.time() + _IDLE_RECHECK_S
                timer = loop.call_at(at if deadline is None else min(at, deadline), on_timer, False)
            else:
                fut.set_result(None)

        first_at = loop.time() + _RECHECK_S
        timer = loop.call_at(first_at if deadline is None else min(first_at, deadline), on_timer, True)
        await fut
        for ring in rings:
            ring._data_bell.drain()
        return fired
    finally:
        if timer is not None:
            timer.cancel()
        for ring in rings:
            ring._hq[_I_CWAIT] = 0
        for fd in fds:
            loop.remove_reader(fd)


# --- a producer waiting for room from an event loop ---------------------------------------------


def park_producer(ring: Ring) -> bool:
    """Ask to be woken (through `ring.space_fd()`'s doorbell, see `space_fd`) when the consumer
    releases room. Sets the producer-waiting flag and fences; returns False when room already
    appeared since the producer last looked (no need to wait). Undo with `unpark_producer`.

    The same Dekker step as `Ring._park`; the consumer's release does not fence, so a waiter
    must also re-check after a short timer (the ring's `_RECHECK_S`)."""
    from .ring import _I_HEAD, _I_PWAIT

    hq = ring._hq
    hq[_I_PWAIT] = 1
    _fence()
    return hq[_I_HEAD] == ring._phead


def unpark_producer(ring: Ring) -> None:
    """Clear the producer-waiting flag and drain the space doorbell."""
    from .ring import _I_PWAIT

    ring._hq[_I_PWAIT] = 0
    ring._space_bell.drain()


def space_fd(ring: Ring) -> int:
    """The fd that becomes readable when a parked producer's consumer releases room."""
    return ring._space_fd
