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

from .ring import _I_CWAIT, _I_TAIL, Ring, _fence


def any_readable(rings: Sequence[Ring]) -> bool:
    """True when some ring has published entries this consumer has not read."""
    for ring in rings:
        if ring._hq[_I_TAIL] != ring._cpos:
            return True
    return False


def wait_any(rings: Sequence[Ring], timeout: float | None, sentinels: Sequence[int] = ()) -> list[int]:
    """Sleep until a ring becomes readable or a sentinel fd becomes readable, or `timeout`
    seconds pass. Returns the sentinels that fired (empty when a ring woke us or on timeout)."""
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
        while True:
            wait_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000 + 0.999))
            events = poller.poll(wait_ms)
            fired = [fd for fd, _ in events if fd not in bells]
            for fd, _ in events:
                bell = bells.get(fd)
                if bell is not None:
                    bell.drain()
            if fired:
                return fired
            if events or any_readable(rings):
                return []
            if deadline is not None and time.monotonic() >= deadline:
                return []
    finally:
        for ring in rings:
            ring._hq[_I_CWAIT] = 0


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
    try:
        if any_readable(rings):
            return []
        try:
            await asyncio.wait_for(fut, timeout)
        except (asyncio.TimeoutError, TimeoutError):
            pass
        for ring in rings:
            ring._data_bell.drain()
        return fired
    finally:
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
