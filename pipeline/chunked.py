"""HTTP/1.1 chunked transfer decoding for SSE response bodies, done by us instead of aiohttp.

Why: a streaming response is thousands of small chunks, one per event. For each one, aiohttp's
response protocol runs its `data_received`, its HTTP parser, and three calls back into Python
(`begin_http_chunk_receiving`, `feed_data`, `end_http_chunk_receiving`) before the bytes reach a
reader: about a fifth of an ingest process's Python time at 1,000 paced streams (py-spy --gil,
bench/live.py). `tools/instructions.py --what http` counts the whole read path: 28.5k
instructions per one-event read that way, 23.4k this way.

`SseResponseHandler` is aiohttp's own response protocol with one change. When a response's
header block arrives, it feeds aiohttp the header block alone. If the response is a plain
chunked 200 (no content coding, not the answer to a HEAD), it then decodes the chunked body
itself with `ChunkedDecoder` and hands each read's data straight to a direct consumer (the
pool's `_Pusher`), or to aiohttp's body reader when none is installed. At the end of the body
it feeds aiohttp a bare last chunk (`0\\r\\n\\r\\n`), so aiohttp completes the response as usual and
the connection goes back to its pool. Every other response (an error status, gzip, a
content-length body) is left to aiohttp whole, so errors, timeouts, drops and connection reuse
keep aiohttp's own behaviour.

`sse_connector()` builds an aiohttp connector whose connections use it. It relies on aiohttp
internals, each checked, with plain aiohttp as the fallback: the connector's protocol factory
`_factory` (sse_connector), the protocol's methods (`raw_chunked_supported()`) and its state
`_payload`, `_parser`, `_skip_payload`, `_upgraded`, `_read_timeout` (each new connection).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import aiohttp

__all__ = ["ChunkedDecoder", "ChunkedFormatError", "SseResponseHandler", "raw_chunked_supported", "sse_connector"]

# Longest chunk-size line (size, extensions) or trailer line we accept; llhttp's limits are of
# the same order. A peer sending more is broken or hostile.
MAX_LINE = 4096
# Longest header block we hold back from aiohttp while looking for its end; past it, aiohttp gets
# everything and applies its own limits.
MAX_HEAD = 64 * 1024

_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkedFormatError(ValueError):
    """The body's chunked framing is broken (a bad size line, a missing CRLF, an overlong line)."""


class ChunkedDecoder:
    """Incremental decoder of a chunked message body (RFC 9112 section 7.1).

    `feed(data)` returns the body bytes this read completed or continued (b"" when the read held
    only framing). Once the last chunk and its trailer section are in, `done` is True and `tail`
    holds whatever came after them. Raises ChunkedFormatError on broken framing."""

    __slots__ = ("done", "tail", "_state", "_need", "_buf")

    def __init__(self) -> None:
        self.done = False
        self.tail = b""
        self._state = _SIZE
        self._need = 0  # bytes of the current chunk's data still to come
        self._buf = b""  # an unfinished size or trailer line

    def feed(self, data: bytes) -> bytes:
        # Fastest path: the read is exactly one whole chunk (a size line of bare hex digits, the
        # data, CRLF), the usual read of an SSE stream with one event per chunk.
        if self._state == _SIZE and not self._buf:
            k = data.find(b"\r\n")
            if 0 < k <= 16:
                line = data[:k]
                # isalnum() rules out what int() would take besides hex digits (signs, spaces,
                # underscores) but a "0x" prefix; int() itself refuses any other letter.
                if line.isalnum() and line[1:2] not in _X:
                    try:
                        size = int(line, 16)
                    except ValueError:
                        size = 0
                    stop = k + 2 + size
                    if size and len(data) == stop + 2 and data.endswith(b"\r\n"):
                        return data[k + 2 : stop]
        return self._feed(data)

    def _feed(self, data: bytes) -> bytes:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        state = self._state
        # Fast path: a read holding whole chunks, from a size line on (the usual SSE read: one
        # chunk per event).
        pos = 0
        end = len(data)
        out: list[bytes] = []
        while pos < end:
            if state == _SIZE:
                k = data.find(b"\r\n", pos)
                if k < 0:
                    self._hold(data, pos)
                    break
                line = data[pos:k]
                if 0 < len(line) <= 16 and not line.translate(None, _HEX):
                    size = int(line, 16)  # bare hex digits, the usual size line
                else:
                    size = _chunk_size(line)
                pos = k + 2
                if size == 0:
                    state = _TRAILER
                    continue
                stop = pos + size
                if stop + 2 <= end and data[stop : stop + 2] == b"\r\n":
                    out.append(data[pos:stop])  # the whole chunk and its CRLF: stay in _SIZE
                    pos = stop + 2
                    continue
                self._need = size
                state = _DATA
            elif state == _DATA:
                take = end - pos
                need = self._need
                if take >= need:
                    out.append(data[pos : pos + need])
                    pos += need
                    self._need = 0
                    state = _DATA_END
                else:
                    out.append(data[pos:] if pos else data)
                    self._need = need - take
                    pos = end
            elif state == _DATA_END:
                if end - pos < 2:
                    if data[pos:] != b"\r":
                        raise ChunkedFormatError("chunk data not followed by CRLF")
                    self._hold(data, pos)
                    break
                if data[pos : pos + 2] != b"\r\n":
                    raise ChunkedFormatError("chunk data not followed by CRLF")
                pos += 2
                state = _SIZE
            elif state == _TRAILER:
                k = data.find(b"\r\n", pos)
                if k < 0:
                    self._hold(data, pos)
                    break
                if k - pos > MAX_LINE:
                    raise ChunkedFormatError("trailer line too long")
                blank = k == pos
                pos = k + 2
                if blank:  # the empty line that ends the trailer section: the body is complete
                    state = _DONE
                    self.done = True
                    self.tail = data[pos:]
                    break
            else:  # _DONE: nothing more belongs to this body
                break
        self._state = state
        if not out:
            return b""
        return out[0] if len(out) == 1 else b"".join(out)

    def _hold(self, data: bytes, pos: int) -> None:
        rest = data[pos:]
        if len(rest) > MAX_LINE + 2:
            raise ChunkedFormatError("chunk framing line too long")
        self._buf = rest


_HEX = b"0123456789abcdefABCDEF"
_X = (b"x", b"X")


def _chunk_size(line: bytes) -> int:
    """The size of a chunk from its size line (hex digits, then optional `;extensions`)."""
    if len(line) > MAX_LINE:
        raise ChunkedFormatError("chunk size line too long")
    hexpart = line.split(b";", 1)[0].strip(b" \t")
    if not hexpart or len(hexpart) > 16 or hexpart.translate(None, _HEX):
        raise ChunkedFormatError(f"bad chunk size line {line[:40]!r}")
    return int(hexpart, 16)


# --- the response protocol ------------------------------------------------------------------------

_HEAD, _PASS, _RAW = range(3)


def _plain_chunked_200(head: bytes) -> tuple[int, bool]:
    """(status, whether we decode the body) from a response's header block."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(None, 2)
    try:
        status = int(parts[1]) if len(parts) > 1 and parts[0].startswith(b"HTTP/1.") else 0
    except ValueError:
        status = 0
    if status != 200:
        return status, False
    chunked = False
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        name = name.strip().lower()
        if name == b"transfer-encoding":
            if value.strip().lower() != b"chunked" or chunked:
                return status, False  # codings besides chunked, or repeated: aiohttp decides
            chunked = True
        elif name == b"content-encoding":
            if value.strip().lower() not in (b"", b"identity"):
                return status, False
        elif name == b"content-length":
            return status, False  # both framings given: leave the conflict to aiohttp
    return status, chunked


try:
    from aiohttp.client_proto import ResponseHandler as _ResponseHandler
except ImportError:  # pragma: no cover - every aiohttp 3.x has it
    _ResponseHandler = None  # type: ignore[assignment,misc]


def raw_chunked_supported() -> bool:
    """Whether this aiohttp has what SseResponseHandler and sse_connector rely on."""
    if _ResponseHandler is None:
        return False
    needed = ("data_received", "connection_lost", "_reschedule_timeout")
    return all(callable(getattr(_ResponseHandler, n, None)) for n in needed)


# What SseResponseHandler reads of aiohttp's protocol state (each instance is checked: without
# them it leaves every response to aiohttp).
_PROTOCOL_FIELDS = ("_payload", "_parser", "_skip_payload", "_upgraded", "_read_timeout", "_should_close")


if _ResponseHandler is not None:

    class SseResponseHandler(_ResponseHandler):  # type: ignore[misc,valid-type]
        """aiohttp's response protocol, decoding plain chunked 200 bodies itself (module notes)."""

        def __init__(self, loop: Any) -> None:
            super().__init__(loop)
            self._sr_able = all(hasattr(self, f) for f in _PROTOCOL_FIELDS)
            self._sr_mode = _HEAD if self._sr_able else _PASS
            self._sr_head = b""
            self._sr_decoder: ChunkedDecoder | None = None
            # The body's reader while we decode it (the response's `content`), and the direct
            # consumer of the decoded bytes when one is installed (else they go to the reader).
            self.sr_payload: Any = None
            self.sr_sink: Callable[[bytes], None] | None = None

        def data_received(self, data: bytes) -> None:
            mode = self._sr_mode
            if mode == _RAW:  # the per-read path
                if self._read_timeout:
                    self._reschedule_timeout()
                decoder = self._sr_decoder
                try:
                    body = decoder.feed(data)
                except ChunkedFormatError as exc:
                    self._sr_fail(exc)
                    return
                if body:
                    sink = self.sr_sink
                    if sink is not None:
                        sink(body)
                    else:
                        self.sr_payload.feed_data(body)
                if decoder.done:
                    self._sr_finish(decoder.tail)
            elif mode == _PASS:
                super().data_received(data)
            else:
                self._head(data)

        def _head(self, data: bytes) -> None:
            buf = self._sr_head + data if self._sr_head else data
            self._sr_head = b""
            while buf:
                k = buf.find(b"\r\n\r\n")
                if k < 0:
                    if len(buf) > MAX_HEAD or self._parser is None:
                        # Not a head we can find the end of: the connection is aiohttp's for good.
                        self._sr_mode = _PASS
                        super().data_received(buf)
                    else:
                        if self._read_timeout:
                            self._reschedule_timeout()
                        self._sr_head = buf
                    return
                head, buf = buf[: k + 4], buf[k + 4 :]
                status, raw = _plain_chunked_200(head)
                if 100 <= status < 200 and status != 101:
                    super().data_received(head)  # an interim response: the real one follows
                    continue
                if not raw or self._skip_payload or self._parser is None or self._upgraded:
                    self._sr_pass(head + buf)
                    return
                self._sr_mode = _RAW
                super().data_received(head)
                payload = self._payload
                if (payload is None or self._parser is None or type(payload) is not aiohttp.StreamReader
                        or not callable(getattr(payload, "begin_http_chunk_receiving", None))):
                    # aiohttp refused the head (it closes the connection) or made no reader.
                    self._sr_mode = _PASS
                    if buf and self._parser is not None:
                        super().data_received(buf)
                    return
                # As aiohttp's parser does at the first chunk: the reader then takes the bare
                # last chunk we feed aiohttp at the end after data fed by us (without it, aiohttp
                # 3.9+ refuses a chunk start after data).
                payload.begin_http_chunk_receiving()
                self.sr_payload = payload
                self._sr_decoder = ChunkedDecoder()
                if buf:
                    self.data_received(buf)  # the body's first bytes, now in _RAW mode
                return

        def _sr_pass(self, data: bytes) -> None:
            """This response (`data` starts with its whole header block) is aiohttp's; we look
            again at the next one on the connection, once aiohttp has read this one's body."""
            self._sr_mode = _PASS
            super().data_received(data)
            payload = self._payload
            if payload is not None and self._sr_mode == _PASS:
                payload.on_eof(self._sr_next)

        def _sr_next(self) -> None:
            if self._sr_mode == _PASS and self._sr_able:
                self._sr_mode = _HEAD

        def _sr_finish(self, tail: bytes) -> None:
            """The last chunk is in: aiohttp completes the response (and may reuse the connection)."""
            self._sr_mode = _HEAD
            self._sr_decoder = None
            self.sr_payload = None
            self.sr_sink = None
            super().data_received(b"0\r\n\r\n")
            if tail:
                self._head(tail)

        def _sr_fail(self, exc: ChunkedFormatError) -> None:
            """Broken framing: the body fails as aiohttp fails it (a payload error), and the
            connection is closed."""
            payload = self.sr_payload
            self._sr_mode = _PASS
            self._sr_decoder = None
            self.sr_payload = None
            self.sr_sink = None
            self._should_close = True
            if payload is not None:
                payload.set_exception(aiohttp.ClientPayloadError(f"Response payload is not completed: {exc}"))
            if self.transport is not None:
                self.transport.close()

        def connection_lost(self, exc: BaseException | None) -> None:
            # aiohttp's parser still thinks the body is open, so its connection_lost fails the
            # body's reader with the payload error a drop gives: the same as without us.
            self._sr_mode = _PASS
            self._sr_decoder = None
            self.sr_payload = None
            self.sr_sink = None
            super().connection_lost(exc)

else:  # pragma: no cover
    SseResponseHandler = None  # type: ignore[assignment,misc]


def sse_connector(**kwargs: Any) -> aiohttp.TCPConnector:
    """An aiohttp TCPConnector (same arguments) whose connections decode plain chunked bodies
    with SseResponseHandler; a plain one when this aiohttp lacks what that needs."""
    connector = aiohttp.TCPConnector(**kwargs)
    factory = getattr(connector, "_factory", None)
    if (raw_chunked_supported() and isinstance(factory, functools.partial)
            and factory.func is _ResponseHandler and not factory.args):
        connector._factory = functools.partial(SseResponseHandler, **factory.keywords)
    return connector
