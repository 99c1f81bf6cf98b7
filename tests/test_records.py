"""Ring records (shm/records.py): layouts, kinds, zero-copy decoding from the ring, no pickles."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from shm.records import (
    KIND_CONTROL,
    KIND_END,
    KIND_EVENTS,
    KIND_OPEN,
    KIND_OUTPUT,
    OP_CANCEL,
    Control,
    Event,
    EventBatch,
    Output,
    RecordCodec,
    Source,
    StreamEnd,
    StreamOpen,
    release_views,
)
from shm.ring import Ring

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def ring():
    prod = Ring.create(1 << 16, guardian=False)
    cons = Ring.attach(prod.handle())
    yield prod, cons
    cons.close()
    prod.close()


def test_each_record_type_has_its_own_entry_kind():
    codec = RecordCodec()
    samples = {
        KIND_OPEN: StreamOpen(1, 0, "openai-chat", Source(url="http://127.0.0.1:1/v1")),
        KIND_EVENTS: EventBatch(1, 0, 5, []),
        KIND_END: StreamEnd(1, 1, "eof"),
        KIND_CONTROL: Control(OP_CANCEL, 1),
        KIND_OUTPUT: Output(1, 0, 2, msgspec.Raw(msgspec.msgpack.encode(["tok"]))),
    }
    for kind, record in samples.items():
        got_kind, _ = codec.encode(record)
        assert got_kind == kind
    assert len(set(samples)) == 5


def test_records_are_compact_arrays_without_field_names():
    # array_like: a Control is the 2-element msgpack array [op, stream_id], nothing more.
    _, payload = RecordCodec().encode(Control(2, 7))
    assert bytes(payload) == b"\x92\x02\x07"


def test_stream_open_round_trips_with_request_and_replay_fields():
    codec = RecordCodec()
    src = Source(
        url="http://127.0.0.1:8080/v1/chat/completions",
        method="POST",
        headers=[("content-type", "application/json"), ("x-trace", "a b")],
        body=b'{"stream":true}',
        replay_path="/tmp/capture.sse",
        replay_bytes=b"data: 1\n\n",
        read_size=1024,
        pace=0.01,
    )
    rec = StreamOpen(42, 3, "anthropic", src, custom_id="job-9", options=msgspec.Raw(msgspec.msgpack.encode({"k": 1})))
    kind, payload = codec.encode(rec)
    got = codec.decode(kind, bytes(payload))
    assert (got.stream_id, got.source_index, got.dialect, got.custom_id) == (42, 3, "anthropic", "job-9")
    assert got.source == src
    assert msgspec.msgpack.decode(got.options) == {"k": 1}


def test_event_batch_decoded_from_the_ring_holds_views_into_shared_memory(ring):
    prod, cons = ring
    codec = RecordCodec()
    data = b'{"choices":[{"delta":{"content":"Hi"}}]}'
    batch = EventBatch(5, 9, 123456789, [Event("message", None, data), Event("ping", "7", b"")])
    assert codec.write(prod, batch)
    [(kind, view)] = cons.read_available()
    assert kind == KIND_EVENTS
    got = codec.decode(kind, view)
    assert (got.stream_id, got.seq, got.read_time_ns) == (5, 9, 123456789)
    assert [(e.type, e.id, bytes(e.data)) for e in got.events] == [("message", None, data), ("ping", "7", b"")]
    ev = got.events[0].data
    assert isinstance(ev, memoryview)
    # Zero copy: the view's underlying object is the segment's mapping, not a private bytes copy.
    assert ev.obj is cons._seg._mmap
    # and the JSON decoder takes the view as it is.
    assert msgspec.json.decode(ev) == {"choices": [{"delta": {"content": "Hi"}}]}
    release_views(got)
    with pytest.raises(ValueError):
        bytes(ev)  # released before the space is handed back
    del view
    cons.release()


def test_bytes_fields_are_copied_out_of_the_ring(ring):
    # The documented msgspec behaviour: `bytes` copies (only `memoryview` fields are views).
    prod, cons = ring
    codec = RecordCodec()
    codec.write(prod, StreamOpen(1, 0, "tgi", Source(body=b"body bytes")))
    [(kind, view)] = cons.read_available()
    got = codec.decode(kind, view)
    assert type(got.source.body) is bytes and got.source.body == b"body bytes"
    del view
    cons.release()


def test_output_payload_is_opaque_msgpack_the_caller_decodes(ring):
    prod, cons = ring
    codec = RecordCodec()
    inner = {"tokens": ["Hel", "lo"], "n": 2}
    codec.write(prod, Output(3, 4, 1, msgspec.Raw(msgspec.msgpack.encode(inner))))
    [(kind, view)] = cons.read_available()
    got = codec.decode(kind, view)
    assert (got.stream_id, got.seq, got.kind) == (3, 4, 1)
    assert msgspec.msgpack.decode(got.payload) == inner
    del got, view
    cons.release()


def test_encode_reuses_one_buffer():
    codec = RecordCodec()
    _, a = codec.encode(Control(1, 1))
    _, b = codec.encode(StreamEnd(1, 2, "error", 503, "http", "upstream down"))
    assert a is b
    assert codec.decode(KIND_END, bytes(b)) == StreamEnd(1, 2, "error", 503, "http", "upstream down")


def test_encode_bytes_feeds_a_batch_write(ring):
    prod, cons = ring
    codec = RecordCodec()
    records = [Control(1, i) for i in range(10)] + [StreamEnd(i, 0, "eof") for i in range(5)]
    assert prod.write_batch([codec.encode_bytes(r) for r in records]) == 15
    got = [codec.decode(k, v) for k, v in cons.read_available()]
    assert got == records
    del got
    cons.release()


def test_a_pickle_does_not_decode_as_a_record():
    codec = RecordCodec()
    with pytest.raises(msgspec.DecodeError):
        codec.decode(KIND_CONTROL, pickle.dumps(Control(1, 2)))


def test_wrong_shape_fails_validation_and_unknown_kind_is_refused():
    codec = RecordCodec()
    with pytest.raises(msgspec.ValidationError):
        codec.decode(KIND_CONTROL, msgspec.msgpack.encode(["stop", 1]))
    with pytest.raises(ValueError):
        codec.decode(99, b"\x90")


def test_shm_never_imports_pipeline():
    code = "import sys, shm; bad = [m for m in sys.modules if m.split('.')[0] in ('pipeline', 'workers')]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
