"""What the pool's processes say to each other beyond the generic shm records: stream options,
output kinds, control operations and the typed output payloads (one msgpack encode each).

The Output envelope's payload is opaque to `shm/`; here it is typed. `TokensOut` and `ResultOut`
encode to exactly the layout of `shm.records.Output` (array_like: stream_id, seq, kind, payload),
so a worker encodes an envelope and its tokens in one pass, and the caller decodes the envelope
with `shm` and the payload (a `msgspec.Raw` view) with the decoders below.
"""

from __future__ import annotations

import msgspec

from pipeline.tokens import StreamResult, StreamToken

# Output kinds.
OUT_TOKENS = 1  # a batch of tokens of one stream (only when the caller wants tokens)
OUT_RESULT = 2  # the stream's StreamResult: always its last output

# Control operations beyond shm's OP_STOP / OP_CANCEL / OP_SHUTDOWN.
OP_WORKER_RESTARTED = 10  # caller -> ingest: worker `value` was replaced; re-send its open streams
OP_QUEUE_DELAY = 11  # worker -> ingest: recent queue delay of its event ring, in microseconds

# The seq of a RESULT that ends a stream the worker never saw open (its log overflowed): the
# caller accepts a stream's first result whatever its seq.
FINAL_SEQ = (1 << 62)


class StreamOptions(msgspec.Struct, array_like=True, gc=False):
    """Per-stream options carried opaquely in `StreamOpen.options`."""

    worker: int
    want_tokens: bool = False
    start_ns: int = 0
    dialect: str = ""


class TokensOut(msgspec.Struct, array_like=True, gc=False):
    """Output envelope carrying a token batch (same layout as shm.records.Output)."""

    stream_id: int
    seq: int
    kind: int
    payload: list[StreamToken]


class ResultOut(msgspec.Struct, array_like=True, gc=False):
    """Output envelope carrying a StreamResult (same layout as shm.records.Output)."""

    stream_id: int
    seq: int
    kind: int
    payload: StreamResult


options_encoder = msgspec.msgpack.Encoder()
options_decoder = msgspec.msgpack.Decoder(StreamOptions)
tokens_payload_decoder = msgspec.msgpack.Decoder(list[StreamToken])
result_payload_decoder = msgspec.msgpack.Decoder(StreamResult)
