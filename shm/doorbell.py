"""Wake-ups between processes: an eventfd doorbell, and noticing that the peer died.

A ring's side that finds nothing to do parks on a doorbell (an eventfd); the other side writes it
only when the parked side's waiting flag is set (see shm/ring.py), so a busy ring makes no system
calls. The fd is non-blocking, so asyncio can watch it with `loop.add_reader` and a drain never
blocks. Children receive the fd by inheritance (`RingHandle` pickles it as
`multiprocessing.reduction.DupFd`).

Liveness: a blocking wait also watches the peer, either a sentinel fd that becomes readable when
the peer exits (`multiprocessing.Process.sentinel`, or `pid_sentinel(pid)`, a pidfd) or a
`peer_alive()` callable polled every `poll_interval` seconds, and raises `PeerDiedError` instead of
waiting forever.
"""

from __future__ import annotations

import asyncio
import os
import select
import time
from typing import Callable

PeerAlive = Callable[[], bool]


class PeerDiedError(RuntimeError):
    """The process on the other side of a ring exited while this side was waiting for it."""


def pid_sentinel(pid: int) -> int:
    """A pidfd for `pid`: readable once that process exits. The caller closes it."""
    return os.pidfd_open(pid)


class Doorbell:
    """One eventfd used as a doorbell: `ring()` from one process, `wait()` in another."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @classmethod
    def create(cls) -> "Doorbell":
        """A fresh, non-blocking, close-on-exec eventfd."""
        return cls(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))

    def fileno(self) -> int:
        """The eventfd, for `loop.add_reader` or `select`."""
        if self._fd < 0:
            raise ValueError("doorbell is closed")
        return self._fd

    def ring(self) -> None:
        """Wake the waiter (one system call)."""
        os.eventfd_write(self._fd, 1)

    def drain(self) -> bool:
        """Reset the counter; True when it had been rung."""
        try:
            os.eventfd_read(self._fd)
            return True
        except BlockingIOError:
            return False

    def wait(
        self,
        timeout: float | None = None,
        *,
        sentinel: int | None = None,
        peer_alive: PeerAlive | None = None,
        poll_interval: float = 0.1,
    ) -> bool:
        """Sleep until rung (True) or `timeout` seconds pass (False); drains the counter.

        Raises PeerDiedError when `sentinel` becomes readable or `peer_alive()` returns False."""
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        if sentinel is not None:
            poller.register(sentinel, select.POLLIN)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if deadline is None:
                wait = None if peer_alive is None else poll_interval
            else:
                wait = max(0.0, deadline - time.monotonic())
                if peer_alive is not None:
                    wait = min(wait, poll_interval)
            events = poller.poll(None if wait is None else int(wait * 1000 + 0.999))
            for fd, _ in events:
                if fd == sentinel:
                    raise PeerDiedError("the peer process exited")
            if events:
                self.drain()
                return True
            if peer_alive is not None and not peer_alive():
                raise PeerDiedError("the peer process is no longer alive")
            if deadline is not None and time.monotonic() >= deadline:
                return False

    async def wait_async(self, timeout: float | None = None) -> bool:
        """Await the doorbell with `loop.add_reader`: True when rung, False on timeout."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def on_readable() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(self._fd, on_readable)
        try:
            await asyncio.wait_for(fut, timeout)
        except (asyncio.TimeoutError, TimeoutError):
            return False
        finally:
            loop.remove_reader(self._fd)
        self.drain()
        return True

    def close(self) -> None:
        """Close the fd (idempotent)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __repr__(self) -> str:
        return f"Doorbell(fd={self._fd})"
