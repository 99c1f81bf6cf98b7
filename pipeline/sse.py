"""Server-sent events framing: bytes in, `SseEvent`s out (sans-I/O).

`SseParser` implements the WHATWG event-stream rules exactly, on bytes, in time linear in the
input whatever the read sizes. It only frames: JSON and dialects are the adapters' job.

Decisions the spec leaves to us, in one place:

* Lines are split on bytes (CR, LF, CRLF), never on U+2028, U+2029 or NEL. Values are decoded
  with UTF-8 and U+FFFD for malformed bytes. The spec decodes the whole stream first; we decode
  each field value alone (and keep `data` as bytes, decoded by `SseEvent.text`). Both give the
  same text: a malformed or unfinished sequence is ended by the next byte that cannot continue
  it, and CR, LF and ":" are ASCII, which never continue a sequence, so no sequence spans a line
  end or a field-name colon, and the decoder starts every line in its initial state.
* Size limit (`max_event_bytes`): a line "grows beyond" the limit when its bytes, without the line
  end (and without a leading BOM), number more than `max_event_bytes`; this is noticed on the byte
  that makes it so, even before the line ends. An event's data grows beyond it when the data buffer
  of the pending event (values joined with LF, exactly the bytes `SseEvent.data` would hold)
  would exceed `max_event_bytes`; this is noticed at the line end of the `data` line that makes
  it so. Both are byte positions of the stream, so the error comes with the same events before
  it however the stream is split into reads. A single `data: ` line therefore carries at most
  `max_event_bytes - 6` bytes of value.
* `last_event_id` is the last `id` field accepted (the spec's "last event ID buffer"), as the
  contract says and as httpx-sse and the openai SDK report it. `resume_event_id` is the spec's
  "last event ID string", set from the buffer at each blank line: what a reconnection sends as
  `Last-Event-ID`, so an `id:` whose event was cut off is never used to resume.
* `discarded_tail` (set by `close()`) is True when the input ended inside an event: a partial
  line, or field lines (not just comments) after the last blank line.
"""

from __future__ import annotations

import re
from typing import Union

import msgspec

from .errors import TooLargeError

__all__ = ["DEFAULT_MAX_EVENT_BYTES", "SseEvent", "SseParser"]

# 16 MiB: far above ordinary provider events (large tool arguments or inline images run to a few
# MiB), low enough that one runaway stream cannot take a worker's memory. Browsers set no limit;
# h11 refuses an incomplete message head beyond 16 KiB, a limit meant for headers, not bodies.
DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024

_BOM = b"\xef\xbb\xbf"
_COLON = 0x3A
_LONE_CR = re.compile(rb"\r(?!\n)")
# At most this many distinct event names are kept decoded; a hostile stream of unique names
# must not grow the cache without bound.
_NAME_CACHE_SIZE = 512
# Python refuses int() of strings longer than this (sys.get_int_max_str_digits default).
_INT_DIGITS_SAFE = 4000

BytesLike = Union[bytes, bytearray, memoryview]


class SseEvent(msgspec.Struct, gc=False):
    """One dispatched server-sent event: its type, raw data bytes, the last event ID and the
    reconnection time (ms) in force when it was dispatched."""

    event: str = "message"
    data: bytes = b""
    id: str | None = None
    retry: int | None = None

    @property
    def text(self) -> str:
        """`data` decoded as UTF-8, malformed bytes as U+FFFD (what a spec decoder gives)."""
        return self.data.decode("utf-8", "replace")


def _digits_to_int(value: bytes) -> int:
    """Exact base-10 value of an all-ASCII-digits string of any length."""
    value = value.lstrip(b"0") or b"0"
    if len(value) <= _INT_DIGITS_SAFE:
        return int(value)
    result = 0
    for i in range(0, len(value), _INT_DIGITS_SAFE):
        piece = value[i : i + _INT_DIGITS_SAFE]
        result = result * 10 ** len(piece) + int(piece)
    return result


class SseParser:
    """Incremental WHATWG event-stream parser: `feed(bytes)` returns the events each read
    completed, `close()` ends the input. Raises `TooLargeError` beyond `max_event_bytes`."""

    __slots__ = (
        "max_event_bytes",
        "resume_event_id",
        "retry",
        "discarded_tail",
        "_id_buffer",
        "_data",
        "_data_len",
        "_event_type",
        "_fields",
        "_partial",
        "_partial_len",
        "_head",
        "_skip_lf",
        "_failed",
        "_closed",
        "_names",
        "_fast",
    )

    def __init__(
        self,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        *,
        last_event_id: str | None = None,
        retry: int | None = None,
    ) -> None:
        """`last_event_id` and `retry` seed a parser for a reconnection: they are what the previous
        connection left, and the new stream's events carry that ID until the server sends an `id`."""
        if max_event_bytes < 1:
            raise ValueError("max_event_bytes must be at least 1")
        self.max_event_bytes = max_event_bytes
        # The spec's "last event ID string" (None until an `id` field took effect at a blank line).
        self.resume_event_id: str | None = last_event_id
        # The stream's reconnection time in ms, set by a valid `retry` field at once.
        self.retry: int | None = retry
        self.discarded_tail = False
        self._id_buffer: str | None = last_event_id  # the spec's "last event ID buffer"
        self._data: list[bytes] = []  # values of the pending event's data lines
        self._data_len = 0  # len(b"\n".join(self._data))
        self._event_type = b""
        self._fields = False  # a field line was seen since the last blank line
        self._partial: list[bytes] = []  # pieces of the unterminated line, joined once at its end
        self._partial_len = 0
        self._head: bytes | None = b""  # bytes held while a leading BOM is undecided; None after
        self._skip_lf = False  # the last read ended in CR: an LF starting the next one ends no line
        self._failed = False
        self._closed = False
        self._names: dict[bytes, str] = {b"": "message"}
        # True when the parser sits on an event boundary with nothing held (no BOM decision, CR,
        # partial line, pending field, failure or close): then a read of whole LF events can go
        # straight to the block path. Recomputed at the end of every other read.
        self._fast = False

    # -- public API ----------------------------------------------------------------------------

    @property
    def last_event_id(self) -> str | None:
        """The last `id` field accepted (None until one is): the spec's last event ID buffer."""
        return self._id_buffer

    def feed(self, chunk: BytesLike) -> list[SseEvent]:
        """Parse one read; return every event it completed (possibly none)."""
        data = chunk if type(chunk) is bytes else bytes(chunk)
        if not self._fast:
            if self._failed:
                raise TooLargeError(
                    f"SSE stream refused: it already exceeded max_event_bytes={self.max_event_bytes}",
                    received=[],
                )
            if self._closed:
                raise RuntimeError("SseParser.feed() after close()")
            if self._head is not None:
                # One BOM is dropped at the very start of the stream only (the spec's "UTF-8
                # decode"), also when it arrives split over reads.
                data = self._head + data
                if len(data) < 3 and _BOM.startswith(data):
                    self._head = data
                    return []
                self._head = None
                if data[:3] == _BOM:
                    data = data[3:]
            if self._skip_lf and data:  # an empty read leaves a pending CR pending
                self._skip_lf = False
                if data[0] == 0x0A:
                    data = data[1:]
        # (bytes.find is used rather than `in` throughout: it is twice as fast on short bytes.)
        if data.find(b"\r") >= 0:
            # CR, LF and CRLF all end a line: turn every line end into one LF, so the rest of the
            # parser sees LF only. A CR ending the read ends its line now (the event it completes
            # is dispatched without waiting); an LF starting the next read then finishes that CRLF.
            end = b""
            if data[-1] == 0x0D:
                self._skip_lf = True
                self._fast = False
                data = data[:-1]
                end = b"\n"
            if _LONE_CR.search(data) is None:
                # Every CR is the CR of a CRLF (Gemini, sse-starlette): dropping the CRs is much
                # faster than replacing the two-byte CRLF.
                data = data.replace(b"\r", b"")
            else:
                data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if end:
                data += end
        n = len(data)
        if self._fast and data[-2:] == b"\n\n" and n <= self.max_event_bytes:
            # On an event boundary, a read of whole events: often exactly one (servers flush each).
            if data.startswith(b"data: "):
                if data.find(b"\n") == n - 2:
                    return [SseEvent("message", data[6:-2], self.resume_event_id, self.retry)]
            elif data.startswith(b"event: "):
                nl = data.find(b"\n")
                if data.startswith(b"data: ", nl + 1) and data.find(b"\n", nl + 7) == n - 2:
                    name = data[7:nl]
                    return [
                        SseEvent(self._names.get(name) or self._name(name), data[nl + 7 : -2], self.resume_event_id, self.retry)
                    ]
            events: list[SseEvent] = []
            self._blocks(data, events)
            return events
        events = []
        try:
            pos = 0
            if self._partial and not self._fields and data.rfind(b"\n\n") >= 0:
                # The read ends the event whose first line began in an earlier read: glue that line
                # on and take the whole read by blocks. (The line ends in this read, so its bytes
                # are copied once; a line still growing is never copied. Too long a line is caught
                # by the block path, which checks any block longer than the limit line by line.)
                self._partial.append(data)
                data = b"".join(self._partial)
                n = len(data)
                self._partial = []
                self._partial_len = 0
            elif self._partial or self._fields:
                # Finish the event this read continues, line by line, up to its blank line.
                pos = self._lines(data, 0, events, True)
            if pos < n:
                # Every whole event of the read at once: from here up to the last blank line.
                end = data.rfind(b"\n\n", pos) + 2
                if end > 1:
                    self._blocks(data[pos:end] if pos or end < n else data, events)
                    pos = end
                if pos < n:
                    # The start of an event the next read continues (it dispatches nothing).
                    self._lines(data, pos, events, False)
        except TooLargeError as exc:
            exc.received = events
            self._failed = True
            self._fast = False
            raise
        self._fast = self._head is None and not (self._skip_lf or self._partial or self._fields)
        return events

    def close(self) -> list[SseEvent]:
        """End of input: an unterminated event is discarded (see `discarded_tail`); returns []."""
        if not self._closed:
            self._closed = True
            self._fast = False
            self.discarded_tail = bool(self._partial or self._fields or self._head or self._failed)
            self._partial = []
            self._data = []
            self._event_type = b""
        return []

    # -- the fast path: whole events of one read -----------------------------------------------

    def _blocks(self, region: bytes, events: list[SseEvent]) -> None:
        """Parse `region`: LF-only text that starts at an event boundary and ends with a blank
        line. Shapes real providers send are split in bulk; anything else goes line by line."""
        if len(region) <= self.max_event_bytes:  # then no line or data in it can exceed the limit
            if region.startswith(b"data: "):
                # All `data: <v>\n\n` (OpenAI, Gemini): exact when the only LFs are the separators.
                parts = region[6:-2].split(b"\n\ndata: ")
                if region.count(b"\n") == 2 * len(parts):
                    lid = self.resume_event_id
                    retry = self.retry
                    events += [SseEvent("message", p, lid, retry) for p in parts]
                    return
            elif region.startswith(b"event: "):
                # All `event: <name>\ndata: <v>\n\n` (Anthropic, OpenAI Responses): exact when every
                # part holds one `\ndata: ` and the LFs number three per event.
                parts = region[7:-2].split(b"\n\nevent: ")
                if region.count(b"\n") == 3 * len(parts):
                    lid = self.resume_event_id
                    retry = self.retry
                    names = self._names
                    out = []
                    for part in parts:
                        name, sep, value = part.partition(b"\ndata: ")
                        if not sep:
                            break
                        out.append(SseEvent(names.get(name) or self._name(name), value, lid, retry))
                    else:
                        events += out
                        return
        self._mixed(region, events)

    def _mixed(self, region: bytes, events: list[SseEvent]) -> None:
        """Block by block: one-line data events and event+data pairs directly, the rest by lines."""
        big = len(region) > self.max_event_bytes
        names = self._names
        for block in region[:-2].split(b"\n\n"):
            if big and len(block) > self.max_event_bytes:
                self._lines(block + b"\n\n", 0, events, False)
            elif block.startswith(b"data:") and block.find(b"\n") < 0:
                value = block[6:] if block[5:6] == b" " else block[5:]
                events.append(SseEvent("message", value, self.resume_event_id, self.retry))
            elif block.startswith(b"event:"):
                nl = block.find(b"\n")
                if nl > 0 and block.startswith(b"data:", nl + 1) and block.find(b"\n", nl + 1) < 0:
                    name = block[7:nl] if block[6:7] == b" " else block[6:nl]
                    value = block[nl + 7 :] if block[nl + 6 : nl + 7] == b" " else block[nl + 6 :]
                    events.append(
                        SseEvent(names.get(name) or self._name(name), value, self.resume_event_id, self.retry)
                    )
                else:
                    self._lines(block + b"\n\n", 0, events, False)
            else:
                self._lines(block + b"\n\n", 0, events, False)

    def _name(self, raw: bytes) -> str:
        name = raw.decode("utf-8", "replace") or "message"
        if len(self._names) < _NAME_CACHE_SIZE:
            self._names[raw] = name
        return name

    # -- the general path: the spec's algorithm, one line at a time ----------------------------

    def _lines(self, data: bytes, pos: int, events: list[SseEvent], until_blank: bool) -> int:
        """Process the lines of LF-only `data` from `pos`; keep an unterminated last line.
        Returns where it stopped: after the first blank line when `until_blank`, else the end."""
        limit = self.max_event_bytes
        n = len(data)
        while pos < n:
            i = data.find(b"\n", pos)
            if i < 0:
                # Partial line: keep its pieces (never rescanned, joined once when it ends).
                size = self._partial_len + n - pos
                if size > limit:
                    raise self._too_large(f"an SSE line grew beyond max_event_bytes={limit}")
                self._partial.append(data[pos:] if pos else data)
                self._partial_len = size
                return n
            if self._partial:
                if self._partial_len + i - pos > limit:
                    raise self._too_large(f"an SSE line grew beyond max_event_bytes={limit}")
                self._partial.append(data[pos:i])
                line = b"".join(self._partial)
                self._partial = []
                self._partial_len = 0
            else:
                if i - pos > limit:
                    raise self._too_large(f"an SSE line grew beyond max_event_bytes={limit}")
                line = data[pos:i]
            pos = i + 1
            if line:
                if line[0] != _COLON:  # a line starting with ":" is a comment
                    self._field(line)
            else:
                self._dispatch(events)
                if until_blank:
                    return pos
        return pos

    def _field(self, line: bytes) -> None:
        # https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
        self._fields = True
        colon = line.find(b":")
        if colon < 0:
            name, value = line, b""  # a line without a colon is a field with an empty value
        else:
            name = line[:colon]
            value = line[colon + 2 :] if line[colon + 1 : colon + 2] == b" " else line[colon + 1 :]
        # Field names are case-sensitive; unknown names are ignored.
        if name == b"data":
            size = self._data_len + len(value) + 1 if self._data else len(value)
            if size > self.max_event_bytes:
                raise self._too_large(f"an SSE event's data grew beyond max_event_bytes={self.max_event_bytes}")
            self._data.append(value)
            self._data_len = size
        elif name == b"event":
            self._event_type = value
        elif name == b"id":
            if value.find(b"\0") < 0:  # NOTE: an id containing U+0000 is ignored, per spec
                self._id_buffer = value.decode("utf-8", "replace")
        elif name == b"retry":
            if value.isdigit():  # bytes.isdigit() is ASCII digits only, and False for b""
                self.retry = _digits_to_int(value)

    def _dispatch(self, events: list[SseEvent]) -> None:
        # https://html.spec.whatwg.org/multipage/server-sent-events.html#dispatchMessage
        # NOTE: the ID buffer is not reset; it becomes the last event ID string at every blank line.
        self.resume_event_id = self._id_buffer
        if self._data:
            name = self._event_type
            events.append(
                SseEvent(
                    self._names.get(name) or self._name(name),
                    b"\n".join(self._data),
                    self._id_buffer,
                    self.retry,
                )
            )
            self._data = []
            self._data_len = 0
        # No data: nothing is dispatched, but the event type is still reset.
        self._event_type = b""
        self._fields = False

    def _too_large(self, message: str) -> TooLargeError:
        return TooLargeError(message)
