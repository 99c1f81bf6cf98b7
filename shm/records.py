"""The records that cross the rings: msgspec Structs (array_like, gc=False) and their codec.

Each record type has its own ring entry kind (`KIND_OPEN`, ...), so a consumer dispatches on the
entry header without decoding. Payloads are msgpack; nothing is ever pickled, so a corrupt or
hostile payload can fail to decode but cannot run code.

`shm/` knows nothing of SSE, providers or tokens: event data is bytes, and what a worker sends to
the caller (token batches, results, errors) is an opaque `msgspec.Raw` that `pipeline/` encodes
and decodes.

Zero copy, as msgspec 0.18+ really behaves (checked, and pinned by tests/test_records.py):

- a field typed `memoryview` decodes to a view into the input buffer: decoding an `EventBatch`
  straight from a ring view gives `Event.data` views into shared memory, which
  `msgspec.json.decode` takes without a copy. This is what `Event.data` uses.
- a field typed `bytes` is copied out of the input.
- a field typed `msgspec.Raw` is also a view into the input (it keeps the buffer exported), but it
  holds the *encoded* value, msgpack header included, so it suits nested msgpack (`Output.payload`)
  and not raw event bytes.

Views into the ring are valid only until the consumer's `Ring.release()`; `release_views()` drops
a decoded batch's views first (DESIGN.md section 4: views released before the space is handed back).
Encoding fills one reused bytearray (`Encoder.encode_into`), which the ring then copies in.
"""

from __future__ import annotations

from typing import Union

import msgspec

__all__ = [
    "KIND_OPEN", "KIND_EVENTS", "KIND_END", "KIND_CONTROL", "KIND_OUTPUT", "RECORD_KINDS",
    "OP_STOP", "OP_CANCEL", "OP_SHUTDOWN",
    "Source", "StreamOpen", "Event", "EventBatch", "StreamEnd", "Control", "Output", "Record",
    "RecordCodec", "release_views",
]

# Ring entry kinds, one per record type (0 is left free for raw, non-record payloads).
KIND_OPEN = 1
KIND_EVENTS = 2
KIND_END = 3
KIND_CONTROL = 4
KIND_OUTPUT = 5

# Control operations.
OP_STOP = 1  # stop reading this stream: it is done
OP_CANCEL = 2  # the caller cancelled this stream
OP_SHUTDOWN = 3  # stop everything (stream_id unused)

_NIL = msgspec.Raw(b"\xc0")  # msgpack nil: "no options"


class Source(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """Where a stream's bytes come from: an HTTP request, or a replay of recorded bytes."""

    url: str = ""
    method: str = "POST"
    headers: list[tuple[str, str]] = []
    body: bytes = b""
    replay_path: str | None = None
    replay_bytes: bytes | None = None
    read_size: int = 65536  # bytes per replay read
    pace: float = 0.0  # seconds between replay reads (0: as fast as possible)


class StreamOpen(msgspec.Struct, array_like=True, gc=False):
    """Caller to ingest: open a stream."""

    stream_id: int
    source_index: int  # position of the source in the caller's submission order
    dialect: str
    source: Source
    custom_id: str | None = None
    options: msgspec.Raw = _NIL  # pipeline-defined, opaque here


class Event(msgspec.Struct, array_like=True, gc=False):
    """One SSE event as framed by the ingest. `data` is bytes when built, a memoryview when
    decoded (into the ring: valid until release)."""

    type: str
    id: str | None
    data: memoryview


class EventBatch(msgspec.Struct, array_like=True, gc=False):
    """Ingest to worker: the events of one stream from one network read."""

    stream_id: int
    seq: int  # per stream, from 0, one per batch
    read_time_ns: int  # time.monotonic_ns() when the bytes were read
    events: list[Event]


class StreamEnd(msgspec.Struct, array_like=True, gc=False):
    """Ingest to worker: the stream's body ended (cleanly or not)."""

    stream_id: int
    seq: int
    reason: str  # "eof", "error", "cancelled", ...
    status: int | None = None  # HTTP status when there was one
    error_kind: str | None = None  # one of pipeline.errors.ERROR_KINDS, as a string
    error: str | None = None  # message


class Control(msgspec.Struct, array_like=True, gc=False):
    """Worker to ingest, or caller to anyone: stop or cancel a stream, or shut down."""

    op: int
    stream_id: int = 0


class Output(msgspec.Struct, array_like=True, gc=False):
    """Worker to caller: an envelope around what pipeline/ produced (opaque msgpack)."""

    stream_id: int
    seq: int  # per stream, from 0: the caller drops what it already delivered
    kind: int  # pipeline-defined: tokens, result, error, ...
    payload: msgspec.Raw


Record = Union[StreamOpen, EventBatch, StreamEnd, Control, Output]

RECORD_KINDS: dict[type, int] = {
    StreamOpen: KIND_OPEN,
    EventBatch: KIND_EVENTS,
    StreamEnd: KIND_END,
    Control: KIND_CONTROL,
    Output: KIND_OUTPUT,
}


class RecordCodec:
    """Encode records into one reused buffer; decode them straight from ring views.

    One per process side (it keeps a buffer); not thread-safe."""

    __slots__ = ("_encode_into", "_encode", "_buf", "_decoders")

    def __init__(self, initial: int = 4096) -> None:
        enc = msgspec.msgpack.Encoder()
        self._encode_into = enc.encode_into
        self._encode = enc.encode
        self._buf = bytearray(initial)
        self._decoders = {kind: msgspec.msgpack.Decoder(cls).decode for cls, kind in RECORD_KINDS.items()}

    def encode(self, record: Record) -> tuple[int, bytearray]:
        """(entry kind, payload) with the payload in the codec's buffer: valid until the next
        encode, so write it to the ring before encoding again."""
        buf = self._buf
        self._encode_into(record, buf)  # resizes buf to exactly the message
        return RECORD_KINDS[type(record)], buf

    def encode_bytes(self, record: Record) -> tuple[int, bytes]:
        """(entry kind, payload) as new bytes, for building a batch for `Ring.write_batch`."""
        return RECORD_KINDS[type(record)], self._encode(record)

    def decode(self, kind: int, payload) -> Record:
        """Decode a payload of the given entry kind (a ring view decodes without a copy)."""
        try:
            decode = self._decoders[kind]
        except KeyError:
            raise ValueError(f"no record type for entry kind {kind}") from None
        return decode(payload)

    def write(self, ring, record: Record, timeout: float | None = None) -> bool:
        """Encode and write one record to a ring, waiting for room (`Ring.write`)."""
        kind, buf = self.encode(record)
        return ring.write(kind, buf, timeout)

    def try_write(self, ring, record: Record) -> bool:
        """Encode and write one record if there is room now (`Ring.try_write`)."""
        kind, buf = self.encode(record)
        return ring.try_write(kind, buf)


def release_views(record: Record) -> None:
    """Release the ring views a decoded record holds, before `Ring.release()` recycles the space."""
    if type(record) is EventBatch:
        for ev in record.events:
            data = ev.data
            if type(data) is memoryview:
                data.release()
