"""Stage-by-stage processing across streams (`process_event_batches`, `WorkerCore.on_records`)
gives each stream exactly what one-read-at-a-time processing gives: the same tokens per read,
the same result, the same metrics. The reference is `StreamSession.process_events` called read
by read, one stream at a time, on the real provider captures and on streams that end early."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import msgspec
import pytest

from pipeline import PipelineBuilder, SseParser
from pipeline.core import process_event_batches
from pipeline.transformers import PASS, StopSequence, StreamTransformer
from shm.records import StreamEnd
from workers.protocol import OUT_RESULT, OUT_TOKENS, SseBatch, StreamOptions, envelope_decoder, options_encoder
from workers.protocol import result_payload_decoder, tokens_payload_decoder
from workers.worker import WorkerCore

from conftest import provider_manifest, read_capture

START_NS = 1_000


def _reads(data: bytes, rng: random.Random) -> list[list]:
    """The events of a body, in reads of 1 to 3 events."""
    events = SseParser().feed(data)
    reads, i = [], 0
    while i < len(events):
        n = rng.randint(1, 3)
        reads.append(events[i : i + n])
        i += n
    return reads


def _chat(words: list[str], finish: bool = True) -> bytes:
    chunks = [{"choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]} for w in words]
    if finish:
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    body = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    return body + (b"data: [DONE]\n\n" if finish else b"")


class _FailOnSecret(StreamTransformer):
    """Raises when a token's text holds 'secret': a transformer failure ends only its stream."""

    def transform(self, token):
        if "secret" in (getattr(token, "content", None) or ""):
            raise ValueError("no secrets")
        return PASS


def _streams() -> list[tuple[str, bytes]]:
    """(dialect, body) of every capture, plus chat streams that end early in several ways."""
    out = []
    manifest = provider_manifest()
    if manifest is not None:
        out += [(entry["dialect"], read_capture(name)) for name, entry in sorted(manifest["files"].items())]
    out += [
        ("openai-chat", _chat(["a ", "b ", "STOP", " never"])),  # the stop sequence ends it early
        ("openai-chat", _chat(["x ", "a secret", " y"])),  # the transformer fails it
        ("openai-chat", b"data: {not json}\n\n" + _chat(["z"])),  # malformed
        ("openai-chat", _chat(["no ", "end"], finish=False)),  # truncated at close
    ]
    return out


def _pipeline():
    return PipelineBuilder().add_transformer(StopSequence(["STOP"])).add_transformer(_FailOnSecret()).build()


def _plain(tok) -> object:
    return msgspec.to_builtins(tok)


def test_process_event_batches_gives_each_stream_what_process_events_gives():
    streams = _streams()
    rng = random.Random(5)
    reads = [_reads(body, rng) for _, body in streams]
    pipe = _pipeline()

    expected = []
    for i, (dialect, _) in enumerate(streams):
        session = pipe.open_stream(i, dialect, START_NS)
        out = [[_plain(t) for t in session.process_events(r, START_NS + 10 * j)] for j, r in enumerate(reads[i])]
        out.append([_plain(t) for t in session.close(START_NS + 10 * len(reads[i]))])
        expected.append((out, msgspec.to_builtins(session.result)))

    # Every stream's j-th read in round j, all streams in one call per round.
    sessions = [pipe.open_stream(i, dialect, START_NS) for i, (dialect, _) in enumerate(streams)]
    got: list[list] = [[] for _ in streams]
    for j in range(max(len(r) for r in reads)):
        live = [i for i in range(len(streams)) if j < len(reads[i])]
        tokens = process_event_batches([(sessions[i], reads[i][j], START_NS + 10 * j, None) for i in live])
        for i, toks in zip(live, tokens):
            got[i].append([_plain(t) for t in toks])
    for i, session in enumerate(sessions):
        got[i].append([_plain(t) for t in session.close(START_NS + 10 * len(reads[i]))])
        assert (got[i], msgspec.to_builtins(session.result)) == expected[i], streams[i][0]
    # The early endings really happened (or this test would not cover them).
    ends = [(s.result.text, s.result.error.kind if s.result.error else None) for s in sessions[-4:]]
    assert ends[0] == ("a b ", None) and sessions[-4].result.finish == "stop"
    assert [kind for _, kind in ends[1:]] == ["filtered", "malformed", "truncated"]


def _open(sid: int, dialect: str) -> SimpleNamespace:
    """The fields of a StreamOpen that WorkerCore.on_open reads."""
    options = msgspec.Raw(options_encoder.encode(StreamOptions(0, True, START_NS, dialect)))
    return SimpleNamespace(stream_id=sid, dialect=dialect, options=options)


def _outputs(core: WorkerCore) -> dict[int, list]:
    """Per stream: its token batches (seq, tokens) and then its result, as plain data."""
    per: dict[int, list] = {}
    for _, payload in core.outputs:
        env = envelope_decoder.decode(payload)
        if env.kind == OUT_TOKENS:
            body = [_plain(t) for t in tokens_payload_decoder.decode(env.payload)]
        else:
            assert env.kind == OUT_RESULT
            body = msgspec.to_builtins(result_payload_decoder.decode(env.payload))
            # The end of a stream is timed by the worker's own clock (on_end): not comparable.
            for key in ("e2e_ms", "tokens_per_s"):
                (body.get("metrics") or {}).pop(key, None)
        per.setdefault(env.stream_id, []).append((env.seq, env.kind, body))
    return per


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_on_records_keeps_every_streams_order_whatever_the_interleaving(seed):
    streams = _streams()[-12:]  # some captures and the early endings
    rng = random.Random(seed)
    records: list[list] = []
    for sid, (_, body) in enumerate(streams):
        recs = [SseBatch(sid, j, START_NS + 10 * j, events, 0) for j, events in enumerate(_reads(body, rng))]
        recs.append(StreamEnd(sid, len(recs), "eof"))
        records.append(recs)

    def core_with_streams() -> WorkerCore:
        core = WorkerCore(_pipeline())
        core.pipeline.registry = None
        for sid, (dialect, _) in enumerate(streams):
            core.on_open(_open(sid, dialect), 0)
        return core

    # Reference: one record at a time, one stream after another.
    ref = core_with_streams()
    for recs in records:
        for rec in recs:
            ref.on_events(rec) if type(rec) is SseBatch else ref.on_end(rec)

    # A random interleaving that keeps each stream's order, in passes of random length; a
    # stream often has several records (batches, its end) in one pass.
    cursors = [0] * len(records)
    order = []
    while any(c < len(r) for c, r in zip(cursors, records)):
        sid = rng.choice([i for i, r in enumerate(records) if cursors[i] < len(r)])
        order.append(records[sid][cursors[sid]])
        cursors[sid] += 1
    core = core_with_streams()
    i = 0
    while i < len(order):
        n = rng.randint(1, 40)
        core.on_records(order[i : i + n])
        i += n
    assert _outputs(core) == _outputs(ref)
    assert not core.streams and not ref.streams  # every stream finished and was dropped
