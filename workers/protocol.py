"""What the pool's processes say to each other beyond the generic shm records: stream options,
event batches as the ingest frames them, output envelopes, control operations, and continuation
parts for payloads larger than one ring entry.

`shm/` moves opaque payloads by entry kind; the kinds defined here (`KIND_SSE`, `KIND_PART`) sit
beside shm's own (`KIND_OPEN`, `KIND_END`, `KIND_CONTROL`, `KIND_OUTPUT`) in the same rings.

`TokensOut` and `ResultOut` encode to the layout of `OutEnvelope` (array_like: stream_id, seq,
kind, payload, read_ns), so a worker encodes an envelope and its payload in one pass, and the
caller decodes the envelope, then the payload (a `msgspec.Raw` view) with the decoders below.
"""

from __future__ import annotations

import msgspec

from pipeline.sse import SseEvent
from pipeline.tokens import StreamResult, StreamToken

# Entry kinds beyond shm.records' 1..5.
KIND_SSE = 16  # SseBatch: the events of one stream from one read
KIND_PART = 17  # one piece of a payload larger than a ring entry (see split_payload)
KIND_SSE_LIST = 18  # several SseBatch payloads joined into one msgpack array (see join_batches)

# Output kinds.
OUT_TOKENS = 1  # a batch of tokens of one stream (only when the caller wants tokens)
OUT_RESULT = 2  # the stream's StreamResult: always its last output

# Control operations beyond shm's OP_STOP / OP_CANCEL / OP_SHUTDOWN.
OP_WORKER_RESTARTED = 10  # caller -> ingest: worker `value` was replaced; re-send its open streams
OP_QUEUE_DELAY = 11  # worker -> ingest: recent queue delay of its event ring, in microseconds
OP_TOKENS_USED = 12  # worker -> ingest: output tokens a finished stream used (the tpm limit)

# The seq of a RESULT that ends a stream the worker never saw open (its log overflowed): the
# caller accepts a stream's first result whatever its seq.
FINAL_SEQ = (1 << 62)


class StreamOptions(msgspec.Struct, array_like=True, gc=False):
    """Per-stream options carried opaquely in `StreamOpen.options`."""

    worker: int
    want_tokens: bool = False
    start_ns: int = 0
    dialect: str = ""


class SseBatch(msgspec.Struct, array_like=True, gc=False):
    """Ingest to worker: the events of one stream from one read, as the parser made them.

    The parser's own SseEvent objects are encoded as they are and decoded straight back into
    SseEvents (data copied out of the ring: small, and the worker keeps no view past release):
    no per-event record is built on either side."""

    stream_id: int
    seq: int  # per stream, from 0, one per batch
    read_time_ns: int  # time.monotonic_ns() when the bytes were read
    events: list[SseEvent]
    nbytes: int = 0  # body bytes read since the previous batch (framing included), for metrics


class OutEnvelope(msgspec.Struct, array_like=True, gc=False):
    """Worker to caller: what the caller decodes first (the payload stays a view)."""

    stream_id: int
    seq: int  # per stream, from 0: the caller drops what it already delivered
    kind: int
    payload: msgspec.Raw
    read_ns: int = 0  # read time of the newest event behind a token batch (latency probes)


class TokensOut(msgspec.Struct, array_like=True, gc=False):
    """Output envelope carrying a token batch (the layout of OutEnvelope)."""

    stream_id: int
    seq: int
    kind: int
    payload: list[StreamToken]
    read_ns: int = 0


class ResultOut(msgspec.Struct, array_like=True, gc=False):
    """Output envelope carrying a StreamResult (the layout of OutEnvelope)."""

    stream_id: int
    seq: int
    kind: int
    payload: StreamResult


options_encoder = msgspec.msgpack.Encoder()
options_decoder = msgspec.msgpack.Decoder(StreamOptions)
sse_batch_decoder = msgspec.msgpack.Decoder(SseBatch)
sse_list_decoder = msgspec.msgpack.Decoder(list[SseBatch])
envelope_decoder = msgspec.msgpack.Decoder(OutEnvelope)
tokens_payload_decoder = msgspec.msgpack.Decoder(list[StreamToken])
result_payload_decoder = msgspec.msgpack.Decoder(StreamResult)


def join_batches(payloads: list[bytes]) -> bytes:
    """One KIND_SSE_LIST payload from encoded SseBatches: a msgpack array is its header then its
    elements' encodings back to back, so batches encoded once (and kept in the replay log as
    they are) travel many to a ring entry, and the worker decodes them in one call."""
    n = len(payloads)
    if n < 16:
        head = bytes((0x90 | n,))
    elif n < 0x10000:
        head = b"\xdc" + n.to_bytes(2, "big")
    else:
        head = b"\xdd" + n.to_bytes(4, "big")
    return head + b"".join(payloads)


# The msgpack array header join_batches adds, at most.
JOIN_OVERHEAD = 5


# --- continuation parts ------------------------------------------------------------------------
#
# A payload larger than a ring entry crosses as KIND_PART entries: a 2-byte prefix (flags, the
# payload's own kind) then a slice. The producer writes a payload's parts back to back (nothing
# else in between on that ring), so the consumer needs one assembler per ring. Each part is an
# ordinary entry, so writing parts never blocks and obeys the ring's soft limit like any other
# entry; a payload larger than the whole ring streams through it part by part.
#
# Why not the ring's own chunking: `Ring.try_write`/`try_write_batch` send a chunked payload all
# or nothing, so one larger than the ring needs the blocking `Ring.write()` (which would stall the
# ingest's event loop), and under a soft limit below the payload's size they drop all chunks but
# the first while reporting success (see the report accompanying this module's change).

_PART_FIRST = 1
_PART_LAST = 2


def split_payload(kind: int, payload: bytes | bytearray | memoryview, max_entry: int) -> list[tuple[int, bytes]]:
    """Ring items `(KIND_PART, piece)` carrying `payload` of entry kind `kind` in order."""
    view = memoryview(payload)
    n = len(view)
    step = max_entry - 2
    out = []
    for start in range(0, n, step):
        end = min(start + step, n)
        flags = (_PART_FIRST if start == 0 else 0) | (_PART_LAST if end >= n else 0)
        out.append((KIND_PART, bytes((flags, kind)) + view[start:end]))
    return out


def ring_items(kind: int, payload: bytes, max_entry: int) -> list[tuple[int, bytes]]:
    """`[(kind, payload)]`, or its parts when it exceeds one entry."""
    if len(payload) <= max_entry:
        return [(kind, payload)]
    return split_payload(kind, payload, max_entry)


class PartAssembler:
    """Joins KIND_PART entries of one ring back into payloads (consumer side, one per ring).

    A part sequence cut short (its producer re-sent from a log after a crash, or the consumer
    started in the middle) is dropped and counted in `dropped`."""

    __slots__ = ("_buf", "_kind", "dropped")

    def __init__(self) -> None:
        self._buf: bytearray | None = None
        self._kind = 0
        self.dropped = 0

    def feed(self, view: memoryview) -> tuple[int, bytearray] | None:
        """Take one part; the whole `(kind, payload)` once its last part arrived."""
        flags = view[0]
        if flags & _PART_FIRST:
            if self._buf is not None:
                self.dropped += 1
            self._buf = bytearray(view[2:])
            self._kind = view[1]
        elif self._buf is None:
            self.dropped += 1  # the start went to a consumer before us
            return None
        else:
            self._buf += view[2:]
        if flags & _PART_LAST:
            buf, self._buf = self._buf, None
            return self._kind, buf
        return None

    def interrupt(self) -> None:
        """A whole entry arrived: any open sequence was cut short."""
        if self._buf is not None:
            self._buf = None
            self.dropped += 1


# --- owner liveness ------------------------------------------------------------------------------


def owner_sentinel(owner_pid: int) -> int:
    """A pidfd of the pool's owner (the caller's process): readable once it exits.

    Not `multiprocessing.parent_process().sentinel`: under forkserver the parent is the fork
    server, which every pool child keeps alive (each holds its "alive" pipe), so that sentinel
    never fires when the owner is killed. Raises SystemExit when the owner is already gone."""
    import os

    try:
        fd = os.pidfd_open(owner_pid)
    except ProcessLookupError:
        raise SystemExit(0) from None
    return fd


# --- garbage collection in pool children --------------------------------------------------------

# Records crossing the rings, SSE events and tokens are gc=False Structs, so what a pool child
# allocates per read is mostly untracked; what is tracked (lists, sessions' dicts) is freed by
# reference counting. The cyclic collector's passes over the thousands of live sessions' containers
# (and, for a full pass, every module object imported at start-up) only add pauses to the
# latency tail, so pool children collect rarely and never re-scan the start-up heap.
_GC_THRESHOLDS = (50_000, 50, 100)


def tune_gc() -> None:
    """For a pool child once it has started: move the start-up heap out of the collector's reach
    (`gc.freeze`) and collect young objects every 50,000 allocations instead of 700."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)
