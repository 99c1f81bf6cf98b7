"""HTTP streaming over aiohttp: one request's response body to SseEvent batches, and
`stream_request`, which runs that through a StreamSession for one stream in this process.

`HttpStreamHandler` owns the network policy of one stream: connect and idle and total timeouts,
retries before the first byte (connect errors, 429, 5xx), resuming with `Last-Event-ID` after a
drop, client-side rate limits, typed errors. It reads by chunk (never by line) and hands each
read's events to the caller with the time of the read. It never re-sends a request after a clean
end, nor after any content was delivered unless it is resuming by event id. The idle timeout is
aiohttp's `sock_read` only until the headers; for the body it is one timer per connection, and
buffered chunks are drained in one piece (see "reading a response body cheaply").

Secrets: error messages, reprs and logs carry the URL with secret query values redacted and the
response body with any secret header value scrubbed out; request headers never appear.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import msgspec

from .backpressure import bounded_read_ahead
from .chunked import sse_connector
from .errors import (
    CancelledStreamError,
    ConfigurationError,
    HttpStatusError,
    StreamError,
    StreamTimeoutError,
    TooLargeError,
)
from .sources import REDACTED, Replay, Request, _redact_url, is_secret_header
from .sse import DEFAULT_MAX_EVENT_BYTES, SseEvent, SseParser
from .tokens import Error, StreamResult, StreamToken

__all__ = [
    "HttpOptions",
    "HttpStreamHandler",
    "HttpTokenStream",
    "RateLimiter",
    "parse_retry_after",
    "stream_request",
]

log = logging.getLogger("pipeline.http")

# Statuses worth a retry before the first byte, as the official OpenAI and Anthropic SDKs decide
# (`_should_retry`): request timeout, lock conflict, rate limit, and every server error.
RETRY_STATUSES = frozenset({408, 409, 429})

# A drop is the connection ending mid-body: a payload error (chunked framing cut short), the
# server closing, a reset. The bytes already read stay good; what follows is lost.
_DROP_ERRORS = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, ConnectionError)


class HttpOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Network policy of HTTP streams; built from `PipelineBuilder().http(**options)`."""

    # Time to open a TCP (and TLS) connection. 10 s is far above any healthy handshake, even
    # across continents, and short enough that a dead host fails fast and gets retried.
    connect_timeout: float = 10.0
    # Whole-stream deadline (all attempts, reconnects and reads); None: a stream may run as long
    # as it keeps sending, since long generations legitimately take many minutes.
    total_timeout: float | None = None
    # Longest silence between reads (and before the response headers). Providers send keepalive
    # comments or pings every 15-30 s during long thinking phases; 60 s leaves room for two.
    idle_timeout: float | None = 60.0
    # Retries of the first request for connect errors, 408/409/429 and 5xx before any byte of a
    # stream: 2, as the OpenAI and Anthropic SDKs do by default.
    retries: int = 2
    # Full-jitter exponential backoff (AWS architecture blog "Exponential Backoff And Jitter"):
    # wait uniform(0, min(backoff_max, backoff_base * 2**n)). 0.5 s and 8 s are the SDKs' values.
    backoff_base: float = 0.5
    backoff_max: float = 8.0
    # Honour a server's Retry-After up to this many seconds; a longer one is not waited out here
    # but reported (error.retry_after) so the caller can reschedule instead of holding a slot.
    max_retry_after: float = 60.0
    # Reconnect with Last-Event-ID after a drop when the server sent event ids (WHATWG
    # EventSource behaviour), at most max_reconnects times per stream so a flapping server
    # cannot keep a stream alive for ever.
    resume: bool = True
    max_reconnects: int = 5
    # Client-side limits shared by the streams of one process (or one `stream_request` pipeline):
    # requests per minute and tokens per minute (output tokens, counted as streams complete).
    rpm: float | None = None
    tpm: float | None = None
    # Burst allowance of the limits, in seconds' worth of the rate: providers enforce per-minute
    # limits over shorter windows ("60,000 rpm may be enforced as 1,000 per second"), so a whole
    # minute's budget at once would trip them.
    rate_burst: float = 1.0
    # Bytes of an error response body kept in the error: enough for any provider's JSON error,
    # small enough that an HTML error page from a proxy cannot bloat results.
    max_error_body: int = 4096

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "total_timeout", "idle_timeout", "rpm", "tpm"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigurationError(f"http option {name} must be positive or None, not {v!r}")
        if self.retries < 0 or self.max_reconnects < 0:
            raise ConfigurationError("http options retries and max_reconnects must be >= 0")
        if not (self.backoff_base >= 0 and self.backoff_max >= 0 and self.max_retry_after >= 0 and self.rate_burst > 0):
            raise ConfigurationError("http backoff, retry-after and burst settings must be non-negative")

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> "HttpOptions":
        """Options from `pipeline.http_options`; an unknown or mistyped option is an error now."""
        if not options:
            return cls()
        unknown = set(options) - set(cls.__struct_fields__)
        if unknown:
            raise ConfigurationError(
                f"unknown http option(s) {', '.join(sorted(unknown))}; known: {', '.join(cls.__struct_fields__)}"
            )
        try:
            return msgspec.convert(options, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigurationError(f"bad http option: {exc}") from None


# --- rate limits --------------------------------------------------------------------------------


class RateLimiter:
    """Client-side requests-per-minute and tokens-per-minute limits (GCRA token buckets).

    `acquire()` waits until one more request may be sent; `record_tokens(n)` charges tokens a
    stream used once it completes (output tokens: they are what a stream reports at its end).
    Requests reserve their slot in call order, so waiters go out FIFO at the configured rate. The
    token budget may go into debt (a stream's size is known only at its end); new requests wait
    until the debt is paid back. No lock and no loop is held, so one limiter can serve streams
    of several event loops. Not thread-safe (one per process or loop thread).
    """

    def __init__(self, rpm: float | None = None, tpm: float | None = None, *, burst: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self._clock = clock
        # GCRA: `_tat` is the theoretical arrival time of the next request; a request may go when
        # _tat - now <= tolerance (the burst). Emission interval T = 60 / rpm.
        self._req_interval = 60.0 / rpm if rpm else 0.0
        self._req_tolerance = max(0.0, (max(1.0, rpm * burst / 60.0) - 1.0) * self._req_interval) if rpm else 0.0
        self._req_tat = 0.0
        self._tok_interval = 60.0 / tpm if tpm else 0.0
        self._tok_tolerance = (max(1.0, tpm * burst / 60.0)) * self._tok_interval if tpm else 0.0
        self._tok_tat = 0.0
        self.waited = 0.0  # total seconds callers spent waiting here

    def delay(self) -> float:
        """Seconds the next request would wait now (without reserving)."""
        now = self._clock()
        d = 0.0
        if self.rpm:
            d = max(d, max(self._req_tat, now) - self._req_tolerance - now)
        if self.tpm:
            d = max(d, self._tok_tat - self._tok_tolerance - now)
        return max(0.0, d)

    async def acquire(self) -> float:
        """Wait until a request may be sent; returns the seconds waited."""
        waited = 0.0
        if self.tpm:
            # Token debt first: tokens are charged at stream ends, so re-check after each sleep.
            while True:
                d = self._tok_tat - self._tok_tolerance - self._clock()
                if d <= 0:
                    break
                await asyncio.sleep(d)
                waited += d
        if self.rpm:
            now = self._clock()
            tat = max(self._req_tat, now)
            d = tat - self._req_tolerance - now
            self._req_tat = tat + self._req_interval  # reserve the slot now: FIFO without a lock
            if d > 0:
                try:
                    await asyncio.sleep(d)
                except asyncio.CancelledError:
                    self._req_tat -= self._req_interval  # give the slot back
                    raise
                waited += d
        self.waited += waited
        return waited

    def record_tokens(self, n: int) -> None:
        """Charge `n` tokens a stream used against the tokens-per-minute budget."""
        if not self.tpm or n <= 0:
            return
        now = self._clock()
        self._tok_tat = max(self._tok_tat, now) + n * self._tok_interval


# One limiter per pipeline for `stream_request` (the streams of one "session"); the pool's ingest
# process makes its own and passes it to its handlers.
_PIPELINE_LIMITERS: "weakref.WeakKeyDictionary[Any, RateLimiter]" = weakref.WeakKeyDictionary()


def limiter_for(pipeline: Any, options: HttpOptions) -> RateLimiter | None:
    """The RateLimiter shared by `pipeline`'s streams, or None when no limit is set."""
    if not options.rpm and not options.tpm:
        return None
    lim = _PIPELINE_LIMITERS.get(pipeline)
    if lim is None:
        lim = RateLimiter(options.rpm, options.tpm, burst=options.rate_burst)
        _PIPELINE_LIMITERS[pipeline] = lim
    return lim


# --- helpers ------------------------------------------------------------------------------------


def parse_retry_after(headers: Any, now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms` (OpenAI, Anthropic) or `Retry-After` (seconds or an
    HTTP date, RFC 9110 section 10.2.3); None when absent or unreadable."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            v = float(ms) / 1000.0
            if v >= 0 and v == v and v != float("inf"):
                return v
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    try:
        v = float(value)
        return max(0.0, v) if v == v and v != float("inf") else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # an HTTP date is always GMT
        import datetime as _dt

        when = when.replace(tzinfo=_dt.timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _backoff(options: HttpOptions, n: int) -> float:
    """Full-jitter wait before retry number n (0-based)."""
    cap = min(options.backoff_max, options.backoff_base * (2.0**n))
    return random.uniform(0.0, cap)


def _secrets_of(request: Request) -> list[str]:
    """Secret values of a request (header values and the bare token of `Bearer <token>`), to be
    scrubbed from anything a server echoes back."""
    out: list[str] = []
    for k, v in request.headers.items():
        if is_secret_header(k) and v:
            out.append(v)
            head, _, tail = v.partition(" ")
            if tail and head.lower() in ("bearer", "basic", "token"):
                out.append(tail.strip())
    if "?" in request.url:
        from urllib.parse import parse_qsl, urlsplit

        out += [v for k, v in parse_qsl(urlsplit(request.url).query) if is_secret_header(k) and v]
    # Longest first, so a "Bearer x" is replaced whole before its "x"; very short values would
    # scrub innocent text and cannot be a real key.
    return sorted({s for s in out if len(s) >= 4}, key=len, reverse=True)


def _scrub(text: str, secrets: list[str]) -> str:
    for s in secrets:
        if s in text:
            text = text.replace(s, REDACTED)
    return text


def _describe(exc: BaseException) -> str:
    """A short, secret-free description of a low-level exception (type and OS message only)."""
    msg = str(exc)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _new_parser(max_event_bytes: int, last_event_id: str | None, retry: int | None) -> SseParser:
    """A parser for a new connection of the same stream. The last event ID and the reconnection
    time belong to the EventSource and survive a reconnect: the constructor seeds both the ID to
    resume from and the ID buffer, or the first event of the new connection without an `id:` line
    would reset the ID to resume from."""
    return SseParser(max_event_bytes, last_event_id=last_event_id, retry=retry)


# --- reading a response body cheaply ------------------------------------------------------------
#
# Per read, aiohttp's public path costs more than our parsing: with `sock_read` set, every chunk
# received cancels and re-creates a timer (ResponseHandler._reschedule_timeout), and readany()
# calls the protocol's resume_reading() for every buffered chunk it hands out, which re-enters
# data_received(b"") and the HTTP parser. Both are avoided below, each behind a check that this
# aiohttp has what we rely on, with the public path (readany, sock_read) as the fallback.


class _IdleTimeout(Exception):
    """Set on a response body's reader by _IdleWatch: no byte came for idle_timeout."""


class _IdleWatch:
    """The idle timeout of one response body as one timer that is re-armed only when it comes
    due (about once per idle_timeout), instead of a timer cancelled and re-created per chunk.

    The reader sets `since` (loop time) when it starts waiting for bytes and None when it has
    them, so time spent by the consumer (or held by backpressure) never counts as the server's
    silence. When the timer finds the reader waiting for longer than the timeout, it fails the
    body's reader with _IdleTimeout, which wakes it.
    """

    __slots__ = ("since", "_loop", "_timeout", "_content", "_handle", "_bytes")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, content: aiohttp.StreamReader) -> None:
        self.since: float | None = None
        self._loop = loop
        self._timeout = timeout
        self._content = content
        self._bytes = content.total_bytes
        self._handle: asyncio.TimerHandle | None = loop.call_at(loop.time() + timeout, self._check)

    def wait_from(self, now: float) -> None:
        """The reader starts waiting for bytes now."""
        self.since = now
        self._bytes = self._content.total_bytes

    def _check(self) -> None:
        loop = self._loop
        now = loop.time()
        since = self.since
        if since is None:
            due = now + self._timeout  # the reader is busy with what it has: check again later
        else:
            due = since + self._timeout
            if due <= now and self._content.total_bytes != self._bytes:
                # Bytes came in since the reader began waiting, its wake-up not yet run: not idle.
                due = now + self._timeout
        # 1 ms of slack: the loop's clock is coarse (uvloop's is in ms), never re-arm for less.
        if due > now + 0.001:
            self._handle = loop.call_at(due, self._check)
            return
        self._handle = None
        self._content.set_exception(_IdleTimeout())

    def cancel(self) -> None:
        """Stop the timer (the body ended, dropped or was abandoned)."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.cancel()


def _sock_read_switchable() -> bool:
    """Whether aiohttp's response protocol lets us turn sock_read off once the headers are in."""
    try:
        from aiohttp.client_proto import ResponseHandler
    except ImportError:  # pragma: no cover - aiohttp always has it today
        return False
    return (isinstance(getattr(ResponseHandler, "read_timeout", None), property)
            and callable(getattr(ResponseHandler, "start_timeout", None))
            and hasattr(aiohttp.StreamReader, "total_bytes"))


_SOCK_READ_SWITCHABLE = _sock_read_switchable()


def _stop_sock_read(resp: aiohttp.ClientResponse) -> bool:
    """Turn sock_read off for the rest of this response (its body); False when it cannot be
    (then sock_read stays on and serves as the idle timeout)."""
    if not _SOCK_READ_SWITCHABLE:
        return False
    conn = resp.connection
    proto = conn.protocol if conn is not None else None
    if proto is not None:
        proto.read_timeout = None
        proto.start_timeout()  # re-arms with no timeout: cancels the pending timer
    # No connection: the body is already complete and released, sock_read with it.
    return True


# What _drain and the fast read loop touch inside aiohttp's StreamReader (3.9 to 3.14 at least).
_READER_FIELDS = ("_buffer", "_buffer_offset", "_size", "_cursor", "_http_chunk_splits", "_eof",
                  "_exception", "_protocol", "_waiter")


def _fast_drain_supported() -> bool:
    """Whether aiohttp's StreamReader has the internals _drain and the fast loop rely on."""
    slots = set(getattr(aiohttp.StreamReader, "__slots__", ()))
    try:
        from aiohttp.base_protocol import BaseProtocol
    except ImportError:  # pragma: no cover
        return False
    return (all(f in slots for f in _READER_FIELDS) and callable(getattr(aiohttp.StreamReader, "_wait", None))
            and "_reading_paused" in getattr(BaseProtocol, "__slots__", ()))


_FAST_DRAIN = _fast_drain_supported()


def _drain(content: aiohttp.StreamReader) -> bytes:
    """Everything buffered in `content` as one bytes: what read_nowait() returns, without its
    per-chunk resume_reading() (the reader is empty afterwards, so reading resumes only if the
    protocol was paused for a full buffer)."""
    if content._buffer_offset:
        return content.read_nowait(-1)  # a partial chunk left by someone else's read(n)
    buf = content._buffer
    if len(buf) == 1:
        data = buf.popleft()
    else:
        data = b"".join(buf)
        buf.clear()
    n = len(data)
    content._size -= n
    content._cursor += n
    splits = content._http_chunk_splits
    if splits:
        splits.clear()  # chunk boundaries matter to readchunk() only, which nobody calls here
    proto = content._protocol
    if proto._reading_paused:
        proto.resume_reading()
    return data


_PAUSED = object()  # _Pusher.run(): the sink asked to stop reading for now


def _pushable(content: Any) -> bool:
    """Whether _Pusher can stand in for this body reader's waiter (aiohttp's own StreamReader,
    not a subclass or a double whose feed_data we do not know)."""
    return type(content) is aiohttp.StreamReader


class _Pusher:
    """Stands in for the reading task's waiter future on a response body's StreamReader, so that
    aiohttp's feed_data() (and feed_eof(), set_exception()) call us: each read is parsed and
    handed to the sink right inside data_received, with no task wake-up per read. Uses the
    internals _drain relies on (checked by _fast_drain_supported); the task awaits `run()`."""

    __slots__ = ("_handler", "_content", "_parser", "_watch", "_sink", "_loop", "_fut", "_proto", "_direct_cb")

    def __init__(self, handler: "HttpStreamHandler", content: aiohttp.StreamReader, parser: SseParser,
                 watch: _IdleWatch | None, sink: Callable[[list[SseEvent], int, int], bool],
                 loop: asyncio.AbstractEventLoop) -> None:
        self._handler = handler
        self._content = content
        self._parser = parser
        self._watch = watch
        self._sink = sink
        self._loop = loop
        self._fut: asyncio.Future | None = None
        # A connection decoding its chunked body itself (pipeline/chunked.py) hands us each
        # read's data directly, not through the body's reader.
        proto = content._protocol
        self._proto = proto if getattr(proto, "sr_payload", None) is content else None
        self._direct_cb = self._direct

    async def run(self) -> Any:
        """Push reads until the body ends (None), the sink pauses (_PAUSED) or an error (raised)."""
        fut = self._fut = self._loop.create_future()
        if self._watch is not None:
            self._watch.wait_from(self._loop.time())
        try:
            self.set_result(None)  # what is buffered already; then wait for feed_data()
            proto = self._proto
            if proto is not None and not fut.done() and proto.sr_payload is self._content:
                proto.sr_sink = self._direct_cb
            return await fut
        finally:
            self._fut = None
            self._unhook()
            content = self._content
            if content._waiter is self:
                content._waiter = None
            if self._watch is not None:
                self._watch.since = None  # paused or done: no longer waiting on the server

    def _unhook(self) -> None:
        proto = self._proto
        if proto is not None and proto.sr_sink is self._direct_cb:
            proto.sr_sink = None

    def _direct(self, data: bytes) -> None:
        """One read's body bytes, from a connection that decodes its chunked body itself."""
        fut = self._fut
        if fut is None or fut.done():  # not pushing now: the body's reader keeps them
            self._unhook()
            self._content.feed_data(data)
            return
        handler = self._handler
        try:
            if not handler._deliver(self._parser, data, handler.clock_ns(), self._sink):
                self._unhook()  # from now on the reader buffers (and pauses the socket when full)
                fut.set_result(_PAUSED)
                return
        except Exception as exc:  # never into data_received: the task raises it
            self._unhook()
            fut.set_exception(exc)
            return
        watch = self._watch
        if watch is not None:
            watch.wait_from(self._loop.time())

    def done(self) -> bool:
        """aiohttp's set_result() helper asks first: not done while installed."""
        return self._fut is None

    def set_result(self, _value: object) -> None:
        """Data, the end of the body, or a chunk boundary arrived (or run() starts)."""
        fut = self._fut
        if fut is None or fut.done():
            return
        content = self._content
        try:
            exc = content._exception
            if exc is not None:
                fut.set_exception(exc)
                return
            drained = bool(content._buffer)
            if drained:
                handler = self._handler
                if not handler._deliver(self._parser, _drain(content), handler.clock_ns(), self._sink):
                    fut.set_result(_PAUSED)
                    return
            if content._eof:
                fut.set_result(None)
                return
        except Exception as exc:  # never into aiohttp's data_received: the task raises it
            fut.set_exception(exc)
            return
        content._waiter = self
        # Waiting for bytes from now (a call with nothing buffered, such as the end of an HTTP
        # chunk, changes nothing: the wait began at the last read).
        watch = self._watch
        if drained and watch is not None:
            watch.wait_from(self._loop.time())

    def set_exception(self, exc: BaseException) -> None:
        """The body failed (a drop, or _IdleWatch's timeout)."""
        fut = self._fut
        if fut is not None and not fut.done():
            fut.set_exception(exc)


# --- the handler --------------------------------------------------------------------------------


class HttpStreamHandler:
    """One HTTP stream: `async for events, read_ns in handler.events()` yields the SSE events of
    each read with the monotonic time of that read. Raises typed `StreamError`s.

    After `events()` ends normally, `discarded_tail` tells whether the body ended inside an event
    (for the adapter's completion rule). A drop mid-body with event ids is resumed with
    `Last-Event-ID`; without ids the events simply end (the adapter reports `truncated`).
    `close()` (or leaving `async with`) releases the connection on every path.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        request: Request,
        options: HttpOptions | None = None,
        *,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        clock_ns: Callable[[], int] = time.monotonic_ns,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.session = session
        self.request = request
        self.options = options or HttpOptions()
        self.max_event_bytes = max_event_bytes
        self.clock_ns = clock_ns
        self.limiter = limiter
        self.attempts = 0  # HTTP requests sent (first, retries, reconnects)
        self.reconnects = 0  # resume attempts with Last-Event-ID
        self.bytes_read = 0  # body bytes read, all connections
        self.status: int | None = None  # status of the last response
        self.discarded_tail = False
        self.last_event_id: str | None = None
        self.retry_ms: int | None = None  # the server's `retry:` (ms), kept across connections
        self.delivered = False  # whether any event was handed out (no plain re-send after that)
        self.batch_bytes = 0  # body bytes behind the batch just yielded (reads since the last one)
        self._pending = 0  # body bytes read since the last batch handed out
        self._response: aiohttp.ClientResponse | None = None
        self._watch: _IdleWatch | None = None  # the idle timer of the body being read
        self._closed = False
        self._deadline: float | None = None
        self._secrets = _secrets_of(request)
        self._url = _redact_url(request.url)

    def __repr__(self) -> str:
        return (
            f"HttpStreamHandler(url={self._url!r}, attempts={self.attempts}, "
            f"reconnects={self.reconnects}, bytes_read={self.bytes_read})"
        )

    async def __aenter__(self) -> "HttpStreamHandler":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Release the connection now (mid-stream it is closed, not returned to the pool)."""
        self._closed = True
        self._stop_watch()
        self._drop_response()

    # -- the stream ------------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[tuple[list[SseEvent], int]]:
        """Batches of events, one per read that completed any, with the read's monotonic ns."""
        opts = self.options
        if opts.total_timeout is not None:
            self._deadline = time.monotonic() + opts.total_timeout
        clock = self.clock_ns
        loop = asyncio.get_running_loop()
        idle = opts.idle_timeout
        got: list[list[SseEvent]] = []  # the events of the read just parsed, if it completed any

        def collect(events: list[SseEvent], read_ns: int, nbytes: int) -> bool:
            got.append(events)
            return True

        try:
            resp = await self._open()
            while True:
                parser = _new_parser(self.max_event_bytes, self.last_event_id, self.retry_ms)
                content = resp.content
                # sock_read guarded the wait for the headers; for the body one timer per
                # connection replaces it (see _IdleWatch). Without the means to switch it off,
                # sock_read stays the idle timeout.
                watch = _IdleWatch(loop, idle, content) if idle is not None and _stop_sock_read(resp) else None
                self._watch = watch  # close() stops it too: a consumer may leave without aclose()
                fast = _FAST_DRAIN and type(content) is aiohttp.StreamReader
                dropped: BaseException | None = None
                while True:
                    try:
                        if fast:
                            # readany() without its per-chunk overhead: the same order of checks
                            # (error, then data, then end), everything buffered in one piece.
                            exc = content._exception
                            if exc is not None:
                                raise exc
                            if content._buffer:
                                chunk = _drain(content)
                            elif content._eof:
                                chunk = b""
                            else:
                                if watch is not None:
                                    watch.wait_from(loop.time())
                                await content._wait("readany")
                                if watch is not None:
                                    watch.since = None
                                continue
                        else:
                            chunk = await self._readany(content, watch, loop)
                    except (_IdleTimeout, asyncio.TimeoutError):
                        raise self._timeout_error("between reads") from None
                    except _DROP_ERRORS as exc:
                        dropped = exc
                        break
                    read_ns = clock()
                    if not chunk:
                        break
                    try:
                        self._deliver(parser, chunk, read_ns, collect)
                    except TooLargeError:
                        if got:  # the events completed before the oversize one
                            yield got.pop(), read_ns
                        raise
                    if got:
                        yield got.pop(), read_ns
                resumed = await self._end_of_body(parser, dropped)
                if resumed is None:
                    return
                resp = resumed
        finally:
            # Cancelled, closed by the consumer, failed or done: no connection or timer outlives this.
            self._stop_watch()
            self._drop_response()

    async def _end_of_body(self, parser: SseParser, dropped: BaseException | None) -> aiohttp.ClientResponse | None:
        """After a body ended (cleanly, or `dropped`): the resumed response to read next, or None
        when the stream is over (`discarded_tail` set)."""
        self._stop_watch()
        if dropped is None:
            # Clean end of the body: never re-requested.
            parser.close()
            self.discarded_tail = parser.discarded_tail
            self._release_response()
            return None
        # A drop. The pending partial event of this connection is discarded (the spec's
        # "incomplete event is not dispatched"), whether or not we resume.
        parser.close()
        self._drop_response()
        if self._closed:
            return None
        opts = self.options
        if not (opts.resume and self.last_event_id and self.reconnects < opts.max_reconnects):
            why = "no event id to resume from" if not self.last_event_id else "no reconnects left"
            log.info("stream %s dropped mid-body (%s); %s: ending as truncated",
                     self._url, _describe(dropped), why)
            self.discarded_tail = parser.discarded_tail
            return None
        log.info("stream %s dropped mid-body (%s); resuming after event id %r",
                 self._url, _describe(dropped), self.last_event_id)
        resumed = await self._resume()
        if resumed is None:
            self.discarded_tail = parser.discarded_tail
        return resumed

    async def pump(self, sink: Callable[[list[SseEvent], int, int], bool],
                   paused: Callable[[], Awaitable[Any]]) -> None:
        """The stream's events handed to `sink(events, read_ns, nbytes)` from inside aiohttp's
        data_received, with no task wake-up per read (what `events()` costs); same retries,
        resumes, timeouts and typed errors. `sink` returns False to stop reading (backpressure):
        `pump` then awaits `paused()` and goes on with what the connection buffered meanwhile
        (aiohttp stops reading the socket once its buffer is full, and TCP pushes back)."""
        if not _FAST_DRAIN:
            async for events, read_ns in self.events():
                if not sink(events, read_ns, self.batch_bytes):
                    await paused()
            return
        if self.options.total_timeout is not None:
            self._deadline = time.monotonic() + self.options.total_timeout
        loop = asyncio.get_running_loop()
        idle = self.options.idle_timeout
        try:
            resp = await self._open()
            while True:
                parser = _new_parser(self.max_event_bytes, self.last_event_id, self.retry_ms)
                content = resp.content
                watch = _IdleWatch(loop, idle, content) if idle is not None and _stop_sock_read(resp) else None
                self._watch = watch
                dropped: BaseException | None = None
                if not _pushable(content):
                    dropped = await self._pull_body(content, parser, watch, sink, paused)
                else:
                    pusher = _Pusher(self, content, parser, watch, sink, loop)
                    while True:
                        try:
                            outcome = await pusher.run()
                        except (_IdleTimeout, asyncio.TimeoutError):
                            raise self._timeout_error("between reads") from None
                        except _DROP_ERRORS as exc:
                            dropped = exc
                            break
                        if outcome is not _PAUSED:
                            break
                        await paused()
                resumed = await self._end_of_body(parser, dropped)
                if resumed is None:
                    return
                resp = resumed
        finally:
            self._stop_watch()
            self._drop_response()

    @staticmethod
    async def _readany(content: Any, watch: _IdleWatch | None, loop: asyncio.AbstractEventLoop) -> bytes:
        """`content.readany()` with the idle watch armed while it waits."""
        if watch is not None:
            watch.wait_from(loop.time())
        chunk = await content.readany()
        if watch is not None:
            watch.since = None
        return chunk

    async def _pull_body(self, content: Any, parser: SseParser, watch: _IdleWatch | None,
                         sink: Callable[[list[SseEvent], int, int], bool],
                         paused: Callable[[], Awaitable[Any]]) -> BaseException | None:
        """One body through the public readany(), for a reader _Pusher cannot stand in for."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                chunk = await self._readany(content, watch, loop)
            except (_IdleTimeout, asyncio.TimeoutError):
                raise self._timeout_error("between reads") from None
            except _DROP_ERRORS as exc:
                return exc
            if not chunk:
                return None
            if not self._deliver(parser, chunk, self.clock_ns(), sink):
                await paused()

    def _deliver(self, parser: SseParser, chunk: bytes, read_ns: int,
                 sink: Callable[[list[SseEvent], int, int], bool]) -> bool:
        """Parse one read and hand its events to `sink`; what `sink` says (False: pause).
        A TooLargeError goes up after the events completed before it were handed over."""
        n = len(chunk)
        self.bytes_read += n
        self._pending += n
        try:
            events = parser.feed(chunk)
        except TooLargeError as exc:
            done = exc.received if isinstance(exc.received, list) else []
            self._note(parser)
            if done:
                self.delivered = True
                self.batch_bytes, self._pending = self._pending, 0
                sink(done, read_ns, self.batch_bytes)
            raise
        # An `id:` block without data moves the last event ID too (spec), so note it after every
        # read, not only reads that dispatched events (_note inlined). The ID to resume from is
        # the one of the last dispatched block, never an `id:` whose event may still be cut off.
        self.last_event_id = parser.resume_event_id
        if parser.retry is not None:
            self.retry_ms = parser.retry
        if events:
            self.delivered = True
            self.batch_bytes = nbytes = self._pending
            self._pending = 0
            return sink(events, read_ns, nbytes)
        return True

    def _note(self, parser: SseParser) -> None:
        self.last_event_id = parser.resume_event_id
        if parser.retry is not None:
            self.retry_ms = parser.retry

    # -- opening connections ---------------------------------------------------------------------

    async def _open(self) -> aiohttp.ClientResponse:
        """The first request, retried on connect errors and retryable statuses before any byte."""
        opts = self.options
        n = 0
        while True:
            try:
                return await self._attempt(None)
            except StreamError as exc:
                if not self._retryable(exc) or n >= opts.retries:
                    raise
                wait = self._retry_wait(exc, n)
                if wait is None:
                    raise
                n += 1
                log.info("request to %s failed (%s); retry %d of %d in %.2fs",
                         self._url, exc.message, n, opts.retries, wait)
                await self._sleep(wait, exc)

    async def _resume(self) -> aiohttp.ClientResponse | None:
        """Reconnect with Last-Event-ID: after the server's `retry` when it sent one, otherwise at
        once and then with capped backoff. None when the server answered 204 (stop, per spec)."""
        opts = self.options
        while True:
            n = self.reconnects
            self.reconnects += 1
            if self.retry_ms is not None:
                wait = min(self.retry_ms / 1000.0, opts.max_retry_after)
            else:
                wait = 0.0 if n == 0 else _backoff(opts, n - 1)
            if wait:
                await self._sleep(wait, None)
            try:
                resp = await self._attempt(self.last_event_id)
            except StreamError as exc:
                if self._retryable(exc) and self.reconnects < opts.max_reconnects:
                    log.info("resuming %s failed (%s); trying again", self._url, exc.message)
                    continue
                raise
            if resp.status == 204:
                # WHATWG: "HTTP 204 No Content ... must prevent the user agent from reconnecting".
                self._release_response()
                return None
            return resp

    async def _attempt(self, last_event_id: str | None) -> aiohttp.ClientResponse:
        """One request; a 2xx response (headers read), or a typed StreamError."""
        if self._closed:
            raise CancelledStreamError(f"stream to {self._url} was closed")
        if self.limiter is not None:
            await self.limiter.acquire()
        self._check_deadline()
        req = self.request
        headers = req.headers
        if last_event_id:
            headers = dict(headers)
            headers["Last-Event-ID"] = last_event_id
        self.attempts += 1
        try:
            resp = await self.session.request(
                req.method,
                req.url,
                headers=headers,
                data=req.body or None,
                timeout=self._client_timeout(),
                # Not followed: aiohttp would carry x-api-key style headers to another host, and
                # no provider streams from behind a redirect. A 3xx is reported as an HTTP error.
                allow_redirects=False,
            )
        except asyncio.TimeoutError as exc:
            if isinstance(exc, aiohttp.ConnectionTimeoutError):
                raise StreamError(f"connect to {self._url} timed out after {self.options.connect_timeout}s",
                                  kind="connect") from None
            raise self._timeout_error("waiting for the response headers") from None
        except aiohttp.ClientConnectionError as exc:
            # Refused, reset, DNS, TLS, or the server closed before answering.
            raise StreamError(f"could not connect to {self._url}: {_scrub(_describe(exc), self._secrets)}",
                              kind="connect") from None
        except aiohttp.ClientResponseError as exc:
            # The server answered something that is not HTTP: retrying the same server won't help.
            raise StreamError(f"bad response from {self._url}: {_scrub(_describe(exc), self._secrets)}",
                              kind="malformed") from None
        except aiohttp.ClientError as exc:
            # A bad URL and the like: retrying cannot help.
            raise StreamError(f"request to {self._url} failed: {_scrub(_describe(exc), self._secrets)}",
                              kind="connect", retryable=False) from None
        self._response = resp
        self.status = resp.status
        if not 200 <= resp.status < 300:
            raise await self._status_error(resp)
        if resp.content_type == "application/json":
            # A JSON document where an event stream was asked for: a proxy's or provider's error
            # sent with 200, or a server that ignored the stream flag. Reported with its body.
            raise await self._not_a_stream(resp)
        return resp

    async def _read_bounded(self, resp: aiohttp.ClientResponse) -> str:
        """Up to max_error_body bytes of a body, decoded, with secrets scrubbed out."""
        limit = self.options.max_error_body
        body = b""
        try:
            while len(body) < limit:
                piece = await resp.content.read(limit - len(body))
                if not piece:
                    break
                body += piece
        except (asyncio.TimeoutError, aiohttp.ClientError, ConnectionError):
            pass  # the status alone is enough; the body is a courtesy
        return _scrub(body.decode("utf-8", "replace"), self._secrets)

    async def _not_a_stream(self, resp: aiohttp.ClientResponse) -> StreamError:
        text = await self._read_bounded(resp)
        self._drop_response()
        try:
            doc = msgspec.json.decode(text)
        except msgspec.DecodeError:
            doc = None
        kind = "provider" if isinstance(doc, dict) and "error" in doc else "malformed"
        return StreamError(f"expected an event stream from {self._url}, got application/json: {text}",
                           kind=kind, http_status=resp.status, retryable=False, received=text)

    async def _status_error(self, resp: aiohttp.ClientResponse) -> HttpStatusError:
        """The typed error for a status >= 300 (body read up to max_error_body, then released)."""
        text = await self._read_bounded(resp)
        retry_after = parse_retry_after(resp.headers)
        should_retry = resp.headers.get("x-should-retry")
        self._drop_response()
        status = resp.status
        kind = "rate_limited" if status == 429 else "http"
        retryable = status in RETRY_STATUSES or status >= 500
        if should_retry in ("true", "false"):  # the server's own word wins (OpenAI, Anthropic)
            retryable = should_retry == "true"
        reason = resp.reason or ""
        msg = f"HTTP {status} {reason} from {self._url}".rstrip()
        if text:
            msg += f": {text}"
        return HttpStatusError(msg, kind=kind, http_status=status, retry_after=retry_after,
                               retryable=retryable, received=text)

    def _retryable(self, exc: StreamError) -> bool:
        if isinstance(exc, HttpStatusError):
            return exc.retryable
        return exc.kind == "connect" and exc.retryable

    def _retry_wait(self, exc: StreamError, n: int) -> float | None:
        """Seconds before retry n, or None when the server asks for more than we wait out."""
        opts = self.options
        if exc.retry_after is not None:
            if exc.retry_after > opts.max_retry_after:
                return None
            return exc.retry_after
        return _backoff(opts, n)

    # -- timeouts and cleanup ----------------------------------------------------------------------

    def _client_timeout(self) -> aiohttp.ClientTimeout:
        opts = self.options
        total = None
        if self._deadline is not None:
            total = max(0.001, self._deadline - time.monotonic())
        return aiohttp.ClientTimeout(
            total=total,
            connect=None,  # not pool waits: a busy pool is backpressure, not a dead host
            sock_connect=opts.connect_timeout,
            sock_read=opts.idle_timeout,
        )

    def _check_deadline(self) -> None:
        if self._deadline is not None and time.monotonic() >= self._deadline:
            raise StreamTimeoutError(
                f"stream to {self._url} exceeded total_timeout={self.options.total_timeout}s", kind="timeout"
            )

    def _timeout_error(self, where: str) -> StreamTimeoutError:
        if self._deadline is not None and time.monotonic() >= self._deadline - 0.005:
            return StreamTimeoutError(
                f"stream to {self._url} exceeded total_timeout={self.options.total_timeout}s", kind="timeout"
            )
        return StreamTimeoutError(
            f"no bytes from {self._url} for idle_timeout={self.options.idle_timeout}s {where}",
            kind="idle_timeout",
        )

    async def _sleep(self, seconds: float, cause: StreamError | None) -> None:
        """Sleep before a retry, unless that would pass the total deadline (then raise)."""
        if self._deadline is not None and time.monotonic() + seconds >= self._deadline:
            if cause is not None:
                raise cause
            self._check_deadline()
            seconds = max(0.0, self._deadline - time.monotonic())
        await asyncio.sleep(seconds)

    def _stop_watch(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()

    def _release_response(self) -> None:
        resp, self._response = self._response, None
        if resp is not None:
            resp.release()

    def _drop_response(self) -> None:
        resp, self._response = self._response, None
        if resp is not None:
            resp.close()


# --- one stream in this process -----------------------------------------------------------------


class HttpTokenStream:
    """Async iterator of one HTTP stream's tokens (or a Replay's); `result` once exhausted.

    Also exposes the handler's `attempts`, `reconnects` and `bytes_read` after the run.
    """

    def __init__(self, pipeline: Any, source: Request | Replay, *, session: aiohttp.ClientSession | None = None,
                 limiter: RateLimiter | None = None, stream_id: int = 0) -> None:
        self._pipeline = pipeline
        self._source = source
        self._session = session
        self.options = HttpOptions.from_dict(getattr(pipeline, "http_options", None))
        self._limiter = limiter if limiter is not None else limiter_for(pipeline, self.options)
        self._stream_id = stream_id
        self._gen: AsyncIterator[StreamToken] | None = None
        self.result: StreamResult | None = None
        self.attempts = 0
        self.reconnects = 0
        self.bytes_read = 0

    def __aiter__(self) -> AsyncIterator[StreamToken]:
        if self._gen is None:
            self._gen = self._run()
        return self._gen

    async def aclose(self) -> None:
        """Stop the stream now and release its connection."""
        if self._gen is not None:
            await self._gen.aclose()  # type: ignore[attr-defined]

    async def collect(self) -> StreamResult:
        """Run the stream to its end; its StreamResult."""
        async for _ in self:
            pass
        assert self.result is not None
        return self.result

    async def _run(self) -> AsyncIterator[StreamToken]:
        source = self._source
        if isinstance(source, Replay):
            async for tok in self._run_replay(source):
                yield tok
            return
        pipeline = self._pipeline
        clock = pipeline.clock_ns
        session = pipeline.open_stream(self._stream_id, dialect=source.dialect, start_ns=clock())
        own = self._session is None
        http = self._session or aiohttp.ClientSession(connector=sse_connector())
        handler = HttpStreamHandler(http, source, self.options, max_event_bytes=pipeline.max_event_bytes,
                                    clock_ns=clock, limiter=self._limiter)
        reader = bounded_read_ahead(_sized_batches(handler), pipeline.new_backpressure())
        try:
            try:
                async for batch in reader:
                    for tok in session.process_events(batch.events, batch.read_ns, batch.nbytes):
                        yield tok
                    if session.finished or session.stop_requested:
                        break
            except StreamError as exc:
                await reader.aclose()
                await handler.close()
                for tok in session.fail(_error_token(exc)):
                    yield tok
            # Stopped early or ended: free the connection before finishing the stream's result.
            await reader.aclose()
            await handler.close()
            if not session.finished:
                for tok in session.close(clock(), discarded_tail=handler.discarded_tail):
                    yield tok
        finally:
            await reader.aclose()
            await handler.close()
            if own:
                await http.close()
            self.attempts, self.reconnects, self.bytes_read = handler.attempts, handler.reconnects, handler.bytes_read
        self._finish(session.result)

    async def _run_replay(self, replay: Replay) -> AsyncIterator[StreamToken]:
        pipeline = self._pipeline
        clock = pipeline.clock_ns
        session = pipeline.open_stream(self._stream_id, dialect=replay.provider, start_ns=clock())
        chunks = replay.achunks()
        try:
            async for chunk in chunks:
                self.bytes_read += len(chunk)
                for tok in session.process_chunk(chunk, clock()):
                    yield tok
                if session.finished or session.stop_requested:
                    break
            for tok in session.close(clock()):
                yield tok
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        self._finish(session.result)

    def _finish(self, result: StreamResult | None) -> None:
        if result is None:
            return
        if getattr(self._source, "custom_id", None) is not None:
            result.custom_id = self._source.custom_id
        if self._limiter is not None and result.usage is not None and result.usage.output_tokens:
            self._limiter.record_tokens(result.usage.output_tokens)
        self.result = result


def _error_token(exc: StreamError) -> Error:
    """The Error token for a raised StreamError; an error response keeps the provider's body as
    `detail` (parsed JSON when it is JSON)."""
    err = Error.from_exception(exc)
    if isinstance(exc.received, str) and exc.received:
        try:
            err.detail = msgspec.json.decode(exc.received)
        except msgspec.DecodeError:
            err.detail = exc.received
    return err


class _Batch:
    """One read's events as an item of the read-ahead queue, sized by the bytes behind it (what
    the BackpressureController counts)."""

    __slots__ = ("events", "read_ns", "nbytes")

    def __init__(self, events: list[SseEvent], read_ns: int, nbytes: int) -> None:
        self.events = events
        self.read_ns = read_ns
        self.nbytes = nbytes

    def __len__(self) -> int:
        return self.nbytes


async def _sized_batches(handler: HttpStreamHandler) -> AsyncIterator[_Batch]:
    events_iter = handler.events()
    try:
        async for events, read_ns in events_iter:
            yield _Batch(events, read_ns, handler.batch_bytes)
    finally:
        await events_iter.aclose()  # type: ignore[attr-defined]


def stream_request(pipeline: Any, request: Request | Replay, *, session: aiohttp.ClientSession | None = None,
                   limiter: RateLimiter | None = None, stream_id: int = 0) -> HttpTokenStream:
    """Async iterator of StreamTokens for one HTTP stream (or Replay) in this process; its
    `.result` is set once exhausted. Pass `session=` to reuse an aiohttp ClientSession."""
    if not isinstance(request, (Request, Replay)):
        raise TypeError(f"stream_request takes a Request or a Replay, not {type(request).__name__}")
    return HttpTokenStream(pipeline, request, session=session, limiter=limiter, stream_id=stream_id)
