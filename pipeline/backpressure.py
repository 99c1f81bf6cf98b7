"""Permits for bytes in flight between a reader and a processor, with a soft limit that adapts.

The reader acquires permits for each read before queueing it; the processor releases them when it
takes the item and reports how long the item waited. The limit moves between `min_buffer` and
`max_buffer`: it shrinks when items wait longer than `target_delay` (a standing queue only adds
latency), and grows when items do not wait but the reader had to (the processor is idle while the
reader is throttled). Like CoDel, the decision uses the smallest delay seen in an interval: a
burst that drains quickly is not a standing queue.

Sans-I/O apart from asyncio waiting: the clock is injected, and `observe()` lets a synchronous
caller (the ingest process driving a ring's soft limit) feed measurements and read `limit`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

from .errors import ConfigurationError, StreamTimeoutError

__all__ = ["BackpressureController", "bounded_read_ahead"]

# Defaults, with reasons:
# 64 KiB: a few socket reads (aiohttp reads up to 64 KiB at once), the least that keeps a reader busy.
DEFAULT_MIN_BUFFER = 64 * 1024
# 4 MiB: the largest single SSE event we expect routinely (tool arguments, inline data) fits whole.
DEFAULT_MAX_BUFFER = 4 * 1024 * 1024
# 5 ms: well under a token's inter-token latency (20-50 ms), so buffering never shows in ITL.
DEFAULT_TARGET_DELAY = 0.005
# 100 ms: CoDel's interval: long enough to see a standing queue, short enough to react in time.
DEFAULT_INTERVAL = 0.1
# Utilization above which the processor counts as busy: more buffer would only add queueing.
_BUSY = 0.9


class BackpressureController:
    """Byte permits between a reader and a processor; `limit` adapts to measured queue delay."""

    def __init__(
        self,
        min_buffer: int = DEFAULT_MIN_BUFFER,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        initial: int | None = None,
        target_delay: float = DEFAULT_TARGET_DELAY,
        clock: Callable[[], float] = time.monotonic,
        *,
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        if min_buffer <= 0 or max_buffer < min_buffer:
            raise ConfigurationError(f"need 0 < min_buffer <= max_buffer, got {min_buffer} and {max_buffer}")
        if target_delay <= 0 or interval <= 0:
            raise ConfigurationError("target_delay and interval must be positive")
        self.min_buffer = int(min_buffer)
        self.max_buffer = int(max_buffer)
        self.target_delay = float(target_delay)
        self.interval = float(interval)
        self._clock = clock
        self.limit = min(self.max_buffer, max(self.min_buffer, int(initial if initial is not None else min_buffer)))
        self.in_flight = 0
        self.wait_time_total = 0.0  # seconds the reader spent blocked in acquire
        self.stalls = 0  # times the reader found the buffer full (blocked, or try_acquire refused)
        self.acquired_total = 0  # bytes ever admitted
        self.released_total = 0  # bytes ever released
        self._waiters: deque[list[Any]] = deque()  # [n, future], FIFO so a large item is not starved
        # Measurements of the current interval.
        self._win_start = clock()
        self._win_min_delay: float | None = None
        self._win_busy = 0.0
        self._win_busy_seen = False
        self._win_reader_waits = 0

    # --- permits ----------------------------------------------------------------------------

    def _fits(self, n: int) -> bool:
        # An item larger than the limit is admitted alone, so it can never deadlock.
        return self.in_flight == 0 or self.in_flight + n <= self.limit

    def try_acquire(self, n: int) -> bool:
        """Take `n` byte permits now if they fit (and nobody is queued before us); else False."""
        if n < 0:
            raise ValueError("cannot acquire a negative number of bytes")
        if not self._waiters and self._fits(n):
            self.in_flight += n
            self.acquired_total += n
            return True
        self.stalls += 1
        self._win_reader_waits += 1
        return False

    async def acquire(self, n: int, timeout: float | None = None) -> None:
        """Wait until `n` byte permits fit under the limit; StreamTimeoutError after `timeout` s."""
        if n < 0:
            raise ValueError("cannot acquire a negative number of bytes")
        if not self._waiters and self._fits(n):
            self.in_flight += n
            self.acquired_total += n
            return
        self.stalls += 1
        self._win_reader_waits += 1
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = [n, fut]
        self._waiters.append(waiter)
        t0 = self._clock()
        try:
            if timeout is None:
                await fut
            else:
                async with asyncio.timeout(timeout):
                    await fut
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                # Granted at the same moment the wait was abandoned: give the permits back.
                self._give_back(n)
            else:
                fut.cancel()
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
                self._wake()  # we may have been the head blocking smaller items behind us
            if isinstance(exc, TimeoutError):
                raise StreamTimeoutError(
                    f"no room for {n} bytes within {timeout} s (limit {self.limit}, in flight {self.in_flight})"
                ) from None
            raise
        finally:
            self.wait_time_total += max(0.0, self._clock() - t0)

    def release(self, n: int, queue_delay: float | None = None, processing: float | None = None) -> None:
        """Return `n` byte permits; `queue_delay` (s) is how long the item waited before the
        processor took it, `processing` (s) how long the processor spent on it."""
        if n < 0 or n > self.in_flight:
            raise ValueError(f"release of {n} bytes with {self.in_flight} in flight")
        self.in_flight -= n
        self.released_total += n
        if queue_delay is not None or processing is not None:
            self._record(queue_delay, processing)
        if self._waiters:
            self._wake()

    def observe(self, queue_delay_s: float | None, processing_s: float | None = None, *, reader_waited: bool = False) -> int:
        """Feed one measurement without permits (a caller that drives a ring's soft limit itself);
        returns the current `limit`."""
        if reader_waited:
            self.stalls += 1
            self._win_reader_waits += 1
        self._record(queue_delay_s, processing_s)
        return self.limit

    # --- adaptation ---------------------------------------------------------------------------

    def _record(self, queue_delay: float | None, processing: float | None) -> None:
        if queue_delay is not None:
            d = self._win_min_delay
            if d is None or queue_delay < d:
                self._win_min_delay = queue_delay
        if processing is not None:
            self._win_busy += processing
            self._win_busy_seen = True
        if self._clock() - self._win_start >= self.interval:
            self.adapt_capacity()

    def adapt_capacity(self) -> int:
        """Close the current interval: shrink on a standing queue, grow when the reader was held
        back while the processor had time to spare. Returns the new `limit`."""
        now = self._clock()
        elapsed = now - self._win_start
        min_delay = self._win_min_delay
        old = self.limit
        if min_delay is not None and min_delay > self.target_delay:
            # Shrink in proportion to the excess delay, at most halving per interval.
            factor = max(0.5, self.target_delay / min_delay)
            self.limit = max(self.min_buffer, int(old * factor))
        elif self._win_reader_waits and (min_delay is not None or self._win_busy_seen):
            idle = not self._win_busy_seen or elapsed <= 0 or self._win_busy / elapsed < _BUSY
            if idle:
                self.limit = min(self.max_buffer, old * 2)
        self._win_start = now
        self._win_min_delay = None
        self._win_busy = 0.0
        self._win_busy_seen = False
        self._win_reader_waits = 0
        if self.limit > old and self._waiters:
            self._wake()
        return self.limit

    # --- internals ----------------------------------------------------------------------------

    def _give_back(self, n: int) -> None:
        self.in_flight -= n
        self.acquired_total -= n
        self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters:
            n, fut = waiters[0]
            if fut.done():
                waiters.popleft()
                continue
            if not self._fits(n):
                break
            waiters.popleft()
            self.in_flight += n
            self.acquired_total += n
            fut.set_result(None)

    @property
    def waiting(self) -> int:
        """Readers currently blocked in `acquire`."""
        return sum(1 for _, f in self._waiters if not f.done())

    def __repr__(self) -> str:
        return (
            f"BackpressureController(limit={self.limit}, in_flight={self.in_flight}, "
            f"stalls={self.stalls}, wait_time_total={self.wait_time_total:.6f})"
        )


_END = object()


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _ReadAhead:
    """The async iterator behind `bounded_read_ahead` (a class, so it is closed deterministically:
    `aclose()`, `async with`, or dropping it all cancel the reader task and close the source)."""

    def __init__(self, source: AsyncIterable[bytes], controller: BackpressureController) -> None:
        self._source = source
        self._controller = controller
        self._queue: asyncio.Queue[Any] = asyncio.Queue()  # bounded by the controller's permits
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._given_at: float | None = None  # when the consumer got the last item
        self._processing: float | None = None

    def __aiter__(self) -> "_ReadAhead":
        return self

    async def __aenter__(self) -> "_ReadAhead":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    async def __anext__(self) -> bytes:
        if self._closed:
            raise StopAsyncIteration
        ctl = self._controller
        clock = ctl._clock
        if self._given_at is not None:
            # The time between handing out an item and being asked for the next is its processing.
            self._processing = clock() - self._given_at
            self._given_at = None
        if self._task is None:
            # The task gets no reference to self, so dropping this iterator can still collect it.
            self._task = asyncio.get_running_loop().create_task(_read_into(self._source, ctl, self._queue))
        item = await self._queue.get()
        if item is _END:
            self._closed = True
            raise StopAsyncIteration
        if isinstance(item, _Failure):
            self._closed = True
            raise item.exc
        chunk, queued_at = item
        now = clock()
        ctl.release(len(chunk), queue_delay=now - queued_at, processing=self._processing)
        self._processing = None
        self._given_at = now
        return chunk

    async def aclose(self) -> None:
        """Stop reading: cancel the reader task, close the source, return the queued permits."""
        self._closed = True
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                # Ours, or the caller's own cancellation arriving now: re-raise only the latter.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        elif task is None:
            aclose = getattr(self._source, "aclose", None)
            if aclose is not None:
                await aclose()
        self._drain()

    def _drain(self) -> None:
        # Items read but never taken still hold permits: return them (without a delay sample).
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if type(item) is tuple:
                self._controller.release(len(item[0]))

    def __del__(self) -> None:
        # Dropped without aclose() (e.g. `break` out of `async for`): stop the reader; its own
        # finally closes the source. Queued permits die with the controller's users.
        task = self._task
        if task is not None and not task.done():
            try:
                task.cancel()
            except RuntimeError:  # the loop is already closed
                pass


async def _read_into(source: AsyncIterable[bytes], ctl: BackpressureController, queue: asyncio.Queue[Any]) -> None:
    """The reader task: acquire, then queue, each chunk; end with _END or the source's failure."""
    clock = ctl._clock
    it = source.__aiter__()  # kept, so the iterator itself (not only the iterable) is closed
    try:
        while True:
            try:
                chunk = await it.__anext__()
            except StopAsyncIteration:
                break
            await ctl.acquire(len(chunk))
            queue.put_nowait((chunk, clock()))
        queue.put_nowait(_END)
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
        queue.put_nowait(_Failure(exc))
    finally:
        # Closing an async generator runs its cleanup (a response released, a socket closed).
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:  # noqa: BLE001 - closing after an error must not mask it
                pass


def bounded_read_ahead(source: AsyncIterable[bytes], controller: BackpressureController) -> AsyncIterator[bytes]:
    """Read `source` ahead in its own task, holding at most the controller's limit in flight.

    Each chunk is acquired before it is queued and released when the consumer takes it (with its
    queue delay and the previous chunk's processing time). Order is kept and nothing is dropped;
    the source's exception is raised to the consumer; `aclose()` (or dropping the iterator)
    cancels the reader task and closes the source.
    """
    return _ReadAhead(source, controller)
