"""The worker process: event records in from its ingest rings, the per-stream pipeline logic
(`StreamSession`, the same class the in-process pipeline uses), token batches and results out.

Replay after a crash (DESIGN.md section 5): a replacement worker starts on the same rings and the
ingest re-sends each open stream's log from its StreamOpen. Records carry per-stream sequence
numbers, so this worker drops what it cannot use (batches of a stream it never saw open, and
batches it already processed) and, processing the same batches in the same order, produces the
same outputs with the same sequence numbers: the caller drops the ones it already delivered.
"""

from __future__ import annotations

import os
import signal
import time

import msgspec

from pipeline.core import StreamingPipeline, StreamSession, process_event_batches
from pipeline.tokens import Error
from shm.multiwait import closed_and_drained, wait_any
from shm.records import (
    KIND_END,
    KIND_OPEN,
    KIND_OUTPUT,
    OP_STOP,
    Control,
    RecordCodec,
)
from shm.ring import Ring, RingClosedError, RingHandle

from .linger import DEFAULT_TICK_S, Napper
from .protocol import (
    FINAL_SEQ,
    KIND_PART,
    KIND_SSE,
    KIND_SSE_LIST,
    OP_QUEUE_DELAY,
    OP_TOKENS_USED,
    OUT_RESULT,
    OUT_TOKENS,
    PartAssembler,
    ResultOut,
    SseBatch,
    TokensOut,
    options_decoder,
    owner_sentinel,
    ring_items,
    sse_batch_decoder,
    sse_list_decoder,
    tune_gc,
)

# How often a worker tells each ingest its queue delay (the ingest's backpressure input).
_DELAY_REPORT_NS = 20_000_000


class _Stream:
    __slots__ = ("session", "ingest", "want_tokens", "next_seq", "out_seq")

    def __init__(self, session: StreamSession, ingest: int, want_tokens: bool) -> None:
        self.session = session
        self.ingest = ingest
        self.want_tokens = want_tokens
        self.next_seq = 0
        self.out_seq = 0


class WorkerCore:
    """Transport-free heart of a worker: records in, output envelopes and controls out."""

    def __init__(self, pipeline: StreamingPipeline, ingest_count: int = 1) -> None:
        self.pipeline = pipeline
        self.streams: dict[int, _Stream] = {}
        self.outputs: list[tuple[int, bytes]] = []  # (entry kind, payload) for the output ring
        self.controls: list[list[Control]] = [[] for _ in range(ingest_count)]
        self._encode = msgspec.msgpack.Encoder().encode
        self.max_delay_ns = 0
        self.pass_ns = 0  # monotonic ns when the current pass over the rings began (set by _loop)
        # Only a tokens-per-minute limit needs each stream's token count back in the ingest.
        self._report_tokens = bool((pipeline.http_options or {}).get("tpm"))

    def on_open(self, rec, ingest: int) -> None:
        sid = rec.stream_id
        if sid in self.streams:
            return  # a replayed open of a stream we already have
        opts = options_decoder.decode(rec.options)
        dialect = opts.dialect or rec.dialect or self.pipeline.dialect
        session = self.pipeline.open_stream(sid, dialect, opts.start_ns or None)
        self.streams[sid] = _Stream(session, ingest, opts.want_tokens)

    def on_records(self, records: list) -> None:
        """A pass's decoded SseBatch and StreamEnd records, in ring order. Event batches are
        processed in rounds that hold at most one batch per stream (`process_event_batches`,
        stage by stage); a stream's next batch or its end waits for the round holding its last
        batch, so each stream sees its records in order."""
        round_: list = []
        in_round: set[int] = set()
        for rec in records:
            sid = rec.stream_id
            if sid in in_round:
                self.on_event_batches(round_)
                round_ = []
                in_round.clear()
            if type(rec) is SseBatch:
                round_.append(rec)
                in_round.add(sid)
            else:
                self.on_end(rec)
        if round_:
            self.on_event_batches(round_)

    def on_events(self, rec) -> None:
        """One SseBatch record."""
        self.on_event_batches([rec])

    def on_event_batches(self, records: list) -> None:
        """SseBatch records of distinct streams."""
        streams = self.streams
        todo = []
        items = []
        max_delay = self.max_delay_ns
        pass_ns = self.pass_ns
        for rec in records:
            st = streams.get(rec.stream_id)
            if st is None or rec.seq != st.next_seq:
                continue  # never opened here (it will be replayed) or already processed
            st.next_seq += 1
            read_ns = rec.read_time_ns
            if pass_ns - read_ns > max_delay:  # queue delay: from the read to the pass that took it
                max_delay = pass_ns - read_ns
            todo.append((st, rec))
            items.append((st.session, rec.events, read_ns, rec.nbytes))
        self.max_delay_ns = max_delay
        outputs = self.outputs
        for (st, rec), tokens in zip(todo, process_event_batches(items)):
            # _emit inlined: this is the per-read path.
            if tokens and st.want_tokens:
                outputs.append((KIND_OUTPUT, self._encode(TokensOut(rec.stream_id, st.out_seq, OUT_TOKENS, tokens, rec.read_time_ns))))
                st.out_seq += 1
            if st.session.finished:
                self._finish(rec.stream_id, st)

    def on_end(self, rec) -> None:
        sid = rec.stream_id
        st = self.streams.get(sid)
        crashed = rec.error_kind == "worker_crashed"
        if st is None:
            if crashed:
                # The ingest could not replay this stream to us: end it for the caller.
                err = Error.of("worker_crashed", rec.error or "worker crashed and the stream's log overflowed")
                session = self.pipeline.open_stream(sid)
                session.fail(err)
                self.outputs.append((KIND_OUTPUT, self._encode(ResultOut(sid, FINAL_SEQ, OUT_RESULT, session.result))))
            return
        if rec.seq != st.next_seq and not crashed:
            return
        st.next_seq += 1
        session = st.session
        if rec.reason == "eof" or rec.reason == "eof-tail":
            tokens = session.close(time.monotonic_ns(), discarded_tail=rec.reason == "eof-tail")
        else:
            err = Error.of(rec.error_kind or "malformed", rec.error or rec.reason, http_status=rec.status)
            tokens = session.fail(err)
            tokens += session.close()
        self._emit(sid, st, tokens, 0)

    def _emit(self, sid: int, st: _Stream, tokens: list, read_ns: int) -> None:
        if tokens and st.want_tokens:
            self.outputs.append((KIND_OUTPUT, self._encode(TokensOut(sid, st.out_seq, OUT_TOKENS, tokens, read_ns))))
            st.out_seq += 1
        if st.session.finished:
            self._finish(sid, st)
        # (A transformer that ends the stream early sets stop_requested and ends the chain, and
        # the session finishes in the same call: the OP_STOP below covers it.)

    def _finish(self, sid: int, st: _Stream) -> None:
        """The stream's result goes out and the ingest hears that the stream is done here."""
        result = st.session.result
        self.outputs.append((KIND_OUTPUT, self._encode(ResultOut(sid, st.out_seq, OUT_RESULT, result))))
        del self.streams[sid]
        # Tells the ingest the stream is done here: it stops reading (a stop sequence fired
        # early) and drops the stream's replay log.
        controls = self.controls[st.ingest]
        controls.append(Control(OP_STOP, sid))
        if self._report_tokens and result.usage is not None and result.usage.output_tokens:
            controls.append(Control(OP_TOKENS_USED, int(result.usage.output_tokens)))


def worker_main(
    index: int,
    pipeline: StreamingPipeline,
    event_handles: list[RingHandle],
    control_handles: list[RingHandle],
    output_handle: RingHandle,
    owner_pid: int,
    linger_s: float = DEFAULT_TICK_S,
) -> None:
    """Process entry point of worker `index` of the pool owned by process `owner_pid`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the caller decides when we stop
    # Each result carries its metrics to the caller, whose registry is the pool's: recording
    # them here too (an HDR record per ITL bucket, per stream) would be work nobody reads.
    pipeline.registry = None
    parent_sentinel = owner_sentinel(owner_pid)
    event_rings = [Ring.attach(h) for h in event_handles]
    control_rings = [Ring.attach(h) for h in control_handles]
    output_ring = Ring.attach(output_handle)
    tune_gc()
    try:
        _loop(pipeline, event_rings, control_rings, output_ring, parent_sentinel, linger_s)
    finally:
        for ring in event_rings + control_rings + [output_ring]:
            ring.close()
        os.close(parent_sentinel)


def _loop(pipeline, event_rings, control_rings, output_ring, parent_sentinel, linger_s: float) -> None:
    core = WorkerCore(pipeline, len(event_rings))
    codec = RecordCodec()
    decode = codec.decode
    encode_bytes = codec.encode_bytes
    decode_batch = sse_batch_decoder.decode
    decode_list = sse_list_decoder.decode
    on_records, on_open = core.on_records, core.on_open
    assemblers = [PartAssembler() for _ in event_rings]
    out_max = output_ring.max_entry_payload
    open_rings = list(range(len(event_rings)))
    last_report = time.monotonic_ns()
    sentinels = [parent_sentinel] if parent_sentinel is not None else []
    # Busy means a nap's worth of reads fills an eighth of the smallest ring: the nap shrinks
    # so that the ingest never waits on a full ring while this worker sleeps.
    napper = Napper(linger_s, busy_bytes=min(r.capacity for r in event_rings) // 8)
    while open_rings:
        got = False
        got_bytes = 0
        for j in open_rings:
            ring = event_rings[j]
            entries = ring.read_available()
            if not entries:
                continue
            got = True
            got_bytes += ring.occupancy  # what this pass took (not yet released), for lingering
            parts = assemblers[j]
            # Decode everything (event data is copied out), hand the space back at once, then
            # process: the ingest refills the ring while this worker works.
            work = []
            add = work.append
            view = payload = None
            for kind, view in entries:
                if kind == KIND_SSE_LIST:
                    work += decode_list(view)
                    continue
                if kind == KIND_SSE:
                    add(decode_batch(view))
                    continue
                if kind == KIND_PART:
                    whole = parts.feed(view)
                    if whole is None:
                        continue
                    kind, payload = whole
                else:
                    parts.interrupt()
                    payload = view
                if kind == KIND_SSE:
                    add(decode_batch(payload))
                elif kind == KIND_SSE_LIST:
                    work += decode_list(payload)
                elif kind == KIND_OPEN:
                    # Opened now, ahead of this round's events: order per stream is kept.
                    rec = decode(kind, payload)
                    on_open(rec, j)
                    rec = None  # its options are a view into the ring
                elif kind == KIND_END:
                    add(decode(kind, payload))
            entries = view = payload = None  # no view into the ring may outlive release()
            ring.release()
            core.pass_ns = time.monotonic_ns()
            on_records(work)
            work = None
        if got:
            napper.worked(got_bytes)
        outputs = core.outputs
        if outputs:
            if any(len(p) > out_max for _, p in outputs):
                outputs = [it for k, p in outputs for it in ring_items(k, p, out_max)]
            _write_all(output_ring, outputs, parent_sentinel)
            core.outputs.clear()
        now = time.monotonic_ns()
        if got and now - last_report > _DELAY_REPORT_NS:
            last_report = now
            delay_us = core.max_delay_ns // 1000
            core.max_delay_ns = 0
            for ctl in core.controls:
                ctl.append(Control(OP_QUEUE_DELAY, delay_us))
        for j, ctl in enumerate(core.controls):
            if ctl:
                _write_all(control_rings[j], [encode_bytes(c) for c in ctl], parent_sentinel)
                ctl.clear()
        if not got:
            waiting = [event_rings[j] for j in open_rings]
            # Linger before parking (workers/linger.py): nap, so a trickle of reads gathers into
            # one pass and one wake-up, and the ingest needs no doorbell meanwhile (our waiting
            # flag is not set). Park once two ticks went by with nothing.
            if napper.nap():
                continue  # a pass over what came meanwhile (an empty one naps again)
            try:
                fired = wait_any(waiting, 1.0, sentinels)
            except RingClosedError:
                fired = []
            if fired:
                return  # the caller died: nothing to deliver to
            open_rings = [j for j in open_rings if not closed_and_drained(event_rings[j])]


def _write_all(ring: Ring, items: list[tuple[int, bytes]], parent_sentinel) -> None:
    """Write every item (each fits one entry), publishing in batches; waits for room, never past
    the caller's death (PeerDiedError then)."""
    start = 0
    n = len(items)
    while start < n:
        start += ring.try_write_batch(items, start)
        if start < n and ring.write(items[start][0], items[start][1], timeout=1.0, peer_sentinel=parent_sentinel):
            start += 1
