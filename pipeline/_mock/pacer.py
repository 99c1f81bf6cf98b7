"""The mock's shared pacer: one timer per server sends every paced stream's due frames, instead
of one sleeping coroutine per stream (a future, a timer and a task wake per event).

A `Body` is what a response sends, flat: each event's bytes, its tokens (for pacing), and choice
0's text and tokens (for the log); a handful of lists per stream instead of an object per event,
so a thousand open streams give the garbage collector little to walk.

Each `PacedStream` is a small state machine over its body's events: `advance()` writes every
frame that is due (grouped `batch` per write, as the per-stream loop does), stamps the stream's
log, and stops at the next frame whose paced time is still ahead. The `Pacer` keeps the waiting
streams in per-millisecond buckets behind one `loop.call_at`, and completes each stream's future
when it has written its last frame, when its connection is gone, or when the transport asks the
writer to wait (the handler then drains and hands the stream back): memory stays bounded.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import math
import random
import time
from typing import Any, Callable, Iterable, Protocol

__all__ = ["CLOSED", "DONE", "DRAIN", "Body", "PacedStream", "Pacer"]

# What a stream's future resolves to.
DONE = "done"  # every frame written
CLOSED = "closed"  # the connection went away (nothing more was written)
DRAIN = "drain"  # the transport paused writing: drain, then `Pacer.run` the stream again
_WAIT = "wait"  # (internal) the next frame is due later

# How far behind its schedule a stream may fall before it stops catching up (the per-stream loop's
# rule: a stream that lost more than this restarts its schedule instead of bursting).
_MAX_LAG_S = 0.05


class _FlowControl(Protocol):
    writing_paused: bool


class _Event(Protocol):
    text0: str
    ntok0: int
    ntok: int


class Body:
    """A response body, one entry per event: `frames` (its bytes), `ntok` (every token it
    carries, for pacing), `ntok0` and `text0` (choice 0's tokens and text, for the log)."""

    __slots__ = ("frames", "ntok", "ntok0", "text0")

    def __init__(self, frames: list[bytes], ntok: list[int], ntok0: list[int], text0: list[str]) -> None:
        self.frames = frames
        self.ntok = ntok
        self.ntok0 = ntok0
        self.text0 = text0

    @classmethod
    def of(cls, frames: list[bytes], events: Iterable[_Event]) -> "Body":
        """The body of these frames and the events they frame."""
        evs = list(events)
        return cls(frames, [e.ntok for e in evs], [e.ntok0 for e in evs], [e.text0 for e in evs])

    def __len__(self) -> int:
        return len(self.frames)

    def tail(self, start: int) -> "Body":
        """The events from `start` on (a resume)."""
        return Body(self.frames[start:], self.ntok[start:], self.ntok0[start:], self.text0[start:])

    def digest(self, end: int) -> str:
        """sha256 (hex) of choice 0's text in the first `end` events."""
        return hashlib.sha256("".join(self.text0[:end]).encode("utf-8")).hexdigest()


class PacedStream:
    """One response body in flight: its frames, pacing, where it is, and the log it keeps current
    (`event_times_ns`, `events_sent`, `bytes_sent`, `text_tokens`; `digest()` at the end)."""

    __slots__ = (
        "_write", "_flow", "_chunked", "_frames", "_ntok", "_ntok0", "_body", "_log", "_times", "_loop",
        "_tps", "_jitter", "_rng", "_batch", "i", "_start", "armed", "next_t", "key", "future",
    )

    def __init__(
        self,
        *,
        write: Callable[[bytes], None],
        flow: _FlowControl,
        chunked: bool,
        body: Body,
        log: Any,
        loop: asyncio.AbstractEventLoop,
        tps: float | None,
        jitter: float,
        rng: random.Random,
        batch: int,
    ) -> None:
        self._write = write  # synchronous; raises ConnectionError once the peer is gone
        self._flow = flow  # `.writing_paused`: the transport's buffer is over its high-water mark
        self._chunked = chunked  # frame each write as one HTTP/1.1 chunk
        self._body = body
        self._frames = body.frames
        self._ntok = body.ntok
        self._ntok0 = body.ntok0
        self._log = log
        self._times: list[int] = log.event_times_ns
        self._loop = loop
        self._tps = tps or None
        self._jitter = jitter
        self._rng = rng
        self._batch = max(1, batch)
        self.i = 0  # next frame to queue
        self._start = 0  # first frame queued but not yet written
        self.armed = False  # frame i's gap is already on next_t (we wait, or woke, for it)
        self.next_t = loop.time()  # loop clock: when the last paced frame was due
        self.key: int | None = None  # the pacer bucket (ms) holding this stream, if any
        self.future: asyncio.Future[str] | None = None

    def advance(self) -> str:
        """Write what is due now; DONE, CLOSED, DRAIN, or (internal) wait until `next_t`."""
        ntoks, tps, batch = self._ntok, self._tps, self._batch
        n = len(ntoks)
        i = self.i
        while i < n:
            if tps is not None and ntoks[i]:
                if self.armed:
                    self.armed = False  # woken for this frame: it goes now
                else:
                    gap = ntoks[i] / tps
                    if self._jitter:
                        gap *= 1.0 + self._jitter * (2.0 * self._rng.random() - 1.0)
                    self.next_t += gap
                    now = self._loop.time()
                    delay = self.next_t - now
                    if delay > 0:
                        self.armed = True
                        self.i = i
                        # What is queued goes before the wait (only with batch > 1).
                        return (self._start < i and self._flush(i)) or _WAIT
                    if delay < -_MAX_LAG_S:
                        self.next_t = now  # do not burst to catch up
            i += 1
            if i - self._start >= batch:
                self.i = i
                state = self._flush(i)
                if state is not None:
                    return state
        self.i = i
        return (self._start < i and self._flush(i)) or DONE

    def _flush(self, end: int) -> str | None:
        """Write the queued frames [start, end) as one write; CLOSED or DRAIN if that ends the
        turn, else None."""
        start = self._start
        frames = self._frames
        data = frames[start] if end - start == 1 else b"".join(frames[start:end])
        try:
            if self._chunked:
                self._write(b"%x\r\n%b\r\n" % (len(data), data))
            else:
                self._write(data)
        except ConnectionError:
            return CLOSED
        now = time.monotonic_ns()
        self._start = end
        log = self._log
        if end - start == 1:
            self._times.append(now)
            log.text_tokens += self._ntok0[start]
        else:
            self._times.extend([now] * (end - start))
            log.text_tokens += sum(self._ntok0[start:end])
        log.events_sent += end - start
        log.bytes_sent += len(data)
        if self._flow.writing_paused:
            return DRAIN
        return None

    def digest(self) -> str:
        """sha256 (hex) of choice 0's text in the events written so far."""
        return self._body.digest(self._start)


class Pacer:
    """Sends the due frames of every paced stream of one server from one timer on `loop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buckets: dict[int, dict[PacedStream, None]] = {}  # due ms -> streams (insertion order)
        self._keys: list[int] = []  # heap of bucket keys (may hold keys of emptied buckets)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_key: int | None = None
        self._held = 0

    def __len__(self) -> int:
        """How many streams wait in the pacer."""
        return self._held

    def run(self, stream: PacedStream) -> "asyncio.Future[str]":
        """Write what `stream` has due now and pace the rest; the future says how it ended (DONE,
        CLOSED, DRAIN). Call again after a DRAIN to go on where it stopped."""
        fut: asyncio.Future[str] = self._loop.create_future()
        stream.future = fut
        if stream.armed:
            self._queue(stream)  # back from a drain while waiting for a frame's time: wait on
        else:
            self._step(stream)
        return fut

    def discard(self, stream: PacedStream) -> None:
        """Forget `stream` (its handler was cancelled): no reference to it stays."""
        key, stream.key = stream.key, None
        stream.future = None
        if key is None:
            return
        bucket = self._buckets.get(key)
        if bucket is not None and stream in bucket:
            del bucket[stream]
            self._held -= 1
            if not bucket:
                del self._buckets[key]
        if not self._buckets:
            self._idle()

    def close(self) -> None:
        """Stop the timer and end every waiting stream's future as CLOSED."""
        buckets, self._buckets = self._buckets, {}
        self._idle()
        self._held = 0
        for bucket in buckets.values():
            for stream in bucket:
                stream.key = None
                fut, stream.future = stream.future, None
                if fut is not None and not fut.done():
                    fut.set_result(CLOSED)

    # --- internals ---------------------------------------------------------------------------

    def _idle(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_key = None
        self._keys.clear()

    def _step(self, stream: PacedStream) -> None:
        try:
            state = stream.advance()
        except BaseException as exc:  # a bug must reach the handler, not die in a loop callback
            fut, stream.future = stream.future, None
            if fut is not None and not fut.done():
                fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        if state is _WAIT:
            self._queue(stream)
            return
        fut, stream.future = stream.future, None
        if fut is not None and not fut.done():
            fut.set_result(state)

    def _queue(self, stream: PacedStream) -> None:
        # Never before its time on the ms grid (the loop's timers fire on it anyway).
        key = math.ceil(stream.next_t * 1000.0)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = {}
            heapq.heappush(self._keys, key)
            if self._timer_key is None or key < self._timer_key:
                self._arm(key)
        bucket[stream] = None
        stream.key = key
        self._held += 1

    def _arm(self, key: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_key = key
        self._timer = self._loop.call_at(key / 1000.0, self._fire)

    def _fire(self) -> None:
        self._timer = self._timer_key = None
        # The loop's clock may be whole milliseconds (uvloop) and a timer fires on that grid:
        # what is due within one tick of now goes now, so every firing makes progress.
        limit = self._loop.time() * 1000.0 + 1.0
        keys, buckets = self._keys, self._buckets
        while keys and keys[0] <= limit:
            bucket = buckets.pop(heapq.heappop(keys), None)
            if not bucket:
                continue  # emptied by discard()
            self._held -= len(bucket)
            for stream in bucket:
                stream.key = None
                self._step(stream)  # may queue it again, in a later bucket or (if due) this round
        while keys and keys[0] not in buckets:
            heapq.heappop(keys)
        if keys:
            if keys[0] != self._timer_key:
                self._arm(keys[0])
        elif self._timer is not None:  # armed by a stream queued and then sent in this round
            self._idle()
