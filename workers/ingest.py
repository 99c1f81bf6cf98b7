"""The ingest process: network reads (or replays of recorded bytes) and SSE framing, nothing more.

Streams arrive as StreamOpen records on the submission ring. An HTTP stream runs as one asyncio
task that reads its body (`pipeline.http.HttpStreamHandler`); replays (`Replay` sources) have no
task each: one scheduler coroutine takes one read of every unpaced replay per pass (what a socket
loop over that many connections does), and one timer-driven coroutine takes the paced replays'
reads as they fall due. Either way the framing is parsed here and the parser's events, batched
per read with the read time, go to the ring of the worker that owns the stream. Records are
collected per ring and written with one publication per loop tick, or as soon as `_FLUSH_ITEMS`
have collected (`_flush`); a record larger than one ring entry goes as continuation parts
(`protocol.split_payload`), so no write ever blocks the loop.

Backpressure: one BackpressureController per event ring turns the worker's reported queue delay
into the ring's soft limit; while a ring is above it, the tasks of that worker's streams stop
reading (and the schedulers skip its replays), so TCP pushes back on the servers. At most one
read per stream waits in `pending` while its ring is full: nothing buffers without bound.

Replay after a worker crash: each stream keeps the ring items sent to its worker (bounded by
`replay_log_bytes` per stream and `replay_log_total` for all streams of this ingest) until the
worker says the stream is done; when the caller reports a replacement worker, those logs are
written to it again (DESIGN.md section 5). A stream whose log went over either bound keeps none,
and a crash of its worker fails it with a retryable `worker_crashed`. Replays log no event
batches: their recording gives them again (`_replay_items`), with the read times they were sent
with, so a replay's log is its open and end records and 8 bytes per batch.

Rate limits: each of the pool's I ingest processes enforces rpm/I and tpm/I (pipeline.http's
RateLimiter); workers report each finished stream's output tokens (`OP_TOKENS_USED`).
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import logging
import os
import signal
import time
from array import array
from typing import Any

import msgspec

from pipeline.backpressure import BackpressureController
from pipeline.core import StreamingPipeline
from pipeline.errors import StreamError, TooLargeError
from pipeline.recording import RecordingCache
from pipeline.sse import SseParser
from shm.records import (
    KIND_CONTROL,
    KIND_OPEN,
    OP_CANCEL,
    OP_SHUTDOWN,
    OP_STOP,
    RecordCodec,
    Source,
    StreamEnd,
    StreamOpen,
)
from shm.multiwait import closed_and_drained, park_producer, space_fd, unpark_producer
from shm.ring import Ring, RingClosedError, RingHandle

from .linger import DEFAULT_TICK_S, LoopLinger
from .protocol import (
    JOIN_OVERHEAD,
    KIND_PART,
    KIND_SSE,
    KIND_SSE_LIST,
    OP_QUEUE_DELAY,
    OP_TOKENS_USED,
    OP_WORKER_RESTARTED,
    PartAssembler,
    SseBatch,
    join_batches,
    options_decoder,
    owner_sentinel,
    ring_items,
    tune_gc,
)

log = logging.getLogger("streamring.ingest")

# While a ring is full the ingest waits on its space doorbell; it also retries at this interval,
# which covers a wake-up lost to the consumer's unfenced release (shm/ring.py, "Parking").
_BLOCKED_RETRY_S = 0.001
# The ring loops re-check for shutdown at least this often; and how long a shutdown waits for the
# tasks it cancelled.
_LOOP_WAKE_S = 0.25
_STOP_WAIT_S = 1.0
# A ring's pending records are written as soon as this many have collected, not only once per
# loop tick: a tick that reads a thousand streams would otherwise hand the worker nothing until
# its end, and the worker would idle while the ingest works (and the other way round).
_FLUSH_ITEMS = 64
# The replay scheduler yields to the event loop after this many reads (submissions, controls and
# socket streams get their turn), and at the end of every pass over its streams.
_REPLAY_YIELD_READS = 256
# Event batches joined into one ring entry stay under this many bytes, so a worker starts on the
# first of them while the ingest writes the next (and a soft limit keeps its granularity).
_JOIN_MAX_BYTES = 32 * 1024


class _ReplayLog:
    """The ring items sent for one stream, kept to send again to a replacement worker: the
    payloads themselves (the same bytes objects that went into the ring, so logging copies
    nothing) and their kinds in a byte array (no tuple per item for the collector to track)."""

    __slots__ = ("payloads", "kinds")

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.kinds = array("B")

    def add(self, kind: int, payload: bytes | memoryview) -> None:
        self.payloads.append(payload if type(payload) is bytes else bytes(payload))
        self.kinds.append(kind)

    def items(self) -> list[tuple[int, bytes]]:
        """The items in the order they were added."""
        return list(zip(self.kinds, self.payloads))


class _IngestStream:
    __slots__ = ("stream_id", "worker", "task", "log", "log_bytes", "seq", "stopped", "ended", "secrets")

    def __init__(self, stream_id: int, worker: int) -> None:
        self.stream_id = stream_id
        self.worker = worker
        self.task: asyncio.Task | None = None
        self.log: _ReplayLog | None = _ReplayLog()
        self.log_bytes = 0
        self.seq = 0
        self.stopped = False  # the worker said it is done: end quietly
        self.ended = False  # StreamEnd sent
        self.secrets: tuple[str, ...] = ()  # credentials of its request, scrubbed from messages


_NO_SOURCE = Source()


def _replay_read_size(read_size: int) -> int | str:
    return {0: "event", -1: "recorded"}.get(read_size, read_size)


def _iter_fast(recording: Any, read_size: int | str):
    """Unpaced replay reads. Where every line ends in LF (nearly every recording), one read per
    event is cut at the next blank line (bytes.find) rather than by pipeline.recording's regex
    scan (any cut parses the same; only the read pattern matters here)."""
    data = recording.data
    if read_size == "recorded":
        from pipeline.recording import iter_replay_chunks

        yield from iter_replay_chunks(recording, read_size)
        return
    if read_size == "event" and b"\r" not in data:
        # One slice per read, found as it is taken: splitting the whole recording up front
        # would hold a second copy of it for the stream's life (1,000 streams: 1,000 copies).
        find = data.find
        start, n = 0, len(data)
        while start < n:
            end = find(b"\n\n", start)
            end = n if end < 0 else end + 2
            yield data[start:end]
            start = end
        return
    if read_size == "event":
        from pipeline.recording import split_events

        start = 0
        for end in split_events(data):
            yield data[start:end]
            start = end
        return
    for i in range(0, len(data), read_size):
        yield data[i : i + read_size]


def _paced_reads(recording: Any, read_size: int | str, pace: float, t0: float):
    """`(due, chunk)` per read of a paced replay: each read is due (loop time) when the recorded
    read holding its last byte was, divided by `pace` (as pipeline.recording.aiter_replay)."""
    from pipeline.recording import iter_replay_chunks

    reads = recording.reads
    scale = 1e-9 / pace
    if read_size == "recorded" and reads:
        # The reads are the recorded ones: no search for the read holding each chunk's end.
        data = recording.data
        start = 0
        for end, t_ns in reads:
            if end > start:
                yield t0 + t_ns * scale, data[start:end]
                start = end
        return
    offsets = [o for o, _ in reads]
    last = len(offsets) - 1
    end = 0
    for chunk in iter_replay_chunks(recording, read_size):
        end += len(chunk)
        if offsets:
            yield t0 + reads[min(bisect.bisect_left(offsets, end), last)][1] * scale, chunk
        else:
            yield t0, chunk


def _set_done(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class _ReplayJob:
    """A replay driven by one of the ingest's replay schedulers instead of a task of its own.
    Quacks like the stream's task where the ingest cancels or inspects it (`cancel`, `done`)."""

    __slots__ = ("st", "reads", "parser", "pending", "finished", "_on_cancel", "reread", "read_ns")

    def __init__(self, st: _IngestStream, reads: Any, parser: SseParser, on_cancel: Any, reread: Any) -> None:
        self.st = st
        self.reads = reads  # an iterator of the stream's reads
        self.parser = parser
        self.pending = 0  # bytes read since the last batch
        self.finished = False
        self._on_cancel = on_cancel
        # A replay's event batches are not kept for a crashed worker (see Ingest._replay_items):
        # `reread()` gives the same reads again, and read_ns holds each batch's read time.
        self.reread = reread
        self.read_ns = array("q")

    def done(self) -> bool:
        return self.finished

    def cancel(self) -> bool:
        """End now: the stream ends "cancelled" unless its worker already stopped it."""
        if self.finished:
            return False
        self.finished = True
        self.reads = self.parser = None
        self._on_cancel(self.st)
        return True


def _secrets_of(src: Source) -> tuple[str, ...]:
    """The credential values of a request (secret headers, secret query parameters)."""
    from urllib.parse import parse_qsl, urlsplit

    from pipeline.sources import is_secret_header

    found = [v for k, v in src.headers if is_secret_header(k) and v]
    for name, value in parse_qsl(urlsplit(src.url).query):
        if is_secret_header(name) and value:
            found.append(value)
    # Also the bare key of "Bearer <key>" style values, should a message quote only the key.
    found += [v.split(None, 1)[1] for v in found if " " in v.strip()]
    return tuple(sorted(set(found), key=len, reverse=True))


def _scrub(text: str | None, secrets: tuple[str, ...]) -> str | None:
    if text is None:
        return None
    for s in secrets:
        if s in text:
            text = text.replace(s, "[REDACTED]")
    return text


class Ingest:
    """One ingest process's state and loops."""

    def __init__(
        self,
        index: int,
        pipeline: StreamingPipeline,
        sub_ring: Ring,
        event_rings: list[Ring],
        control_rings: list[Ring],
        replay_log_bytes: int,
        parent_sentinel: int | None,
        ingest_count: int = 1,
        linger_s: float = DEFAULT_TICK_S,
        replay_log_total: int = 256 << 20,
    ) -> None:
        self.index = index
        self.pipeline = pipeline
        self.sub_ring = sub_ring
        self.event_rings = event_rings
        self.control_rings = control_rings
        self.replay_log_bytes = replay_log_bytes
        self.replay_log_total = replay_log_total
        self.log_total = 0  # bytes held in the replay logs of all streams
        # Replays of one file share one Recording while any of them runs.
        self._recordings = RecordingCache()
        self.parent_sentinel = parent_sentinel
        self.ingest_count = ingest_count
        self.linger_s = linger_s
        self.linger: LoopLinger | None = None  # made in run(), on the loop
        k = len(event_rings)
        # Per worker: ring entries ready to write, and the open run of event batches that will
        # become the next KIND_SSE_LIST entry (see _send_items).
        self.pending: list[list[tuple[int, bytes]]] = [[] for _ in range(k)]
        self.runs: list[list[bytes]] = [[] for _ in range(k)]
        self.run_bytes = [0] * k
        self.max_entry = [r.max_entry_payload for r in event_rings]
        self.join_limit = [min(m, _JOIN_MAX_BYTES) - JOIN_OVERHEAD for m in self.max_entry]
        self.blocked = [False] * k
        self.parked = [False] * k  # waiting on the ring's space doorbell
        self.gates: list[asyncio.Event] = []
        self.streams: dict[int, _IngestStream] = {}
        self.codec = RecordCodec()
        self._encode_record = self.codec.encode_bytes
        self._encode = msgspec.msgpack.Encoder().encode
        self.controllers = [
            BackpressureController(min_buffer=min(64 * 1024, r.capacity // 4), max_buffer=r.capacity)
            for r in event_rings
        ]
        self._flush_scheduled = False
        self._jobs: list[_ReplayJob] = []  # unpaced replays (see _run_replays)
        self._scheduler: asyncio.Task | None = None
        # Paced replays (see _run_paced): due millisecond -> reads, a heap of those milliseconds,
        # and reads held back by a full ring.
        self._paced: dict[int, list[tuple[_ReplayJob, bytes]]] = {}
        self._paced_keys: list[int] = []
        self._paced_gated: list[tuple[_ReplayJob, bytes]] = []
        self._paced_task: asyncio.Task | None = None
        self._paced_sleep: asyncio.Future | None = None
        self._paced_wake_at = 0.0
        self._shutdown: asyncio.Event | None = None
        self._failed: list[BaseException] = []
        self._http: Any = None
        self._http_options: Any = None
        self._limiter: Any = None
        self.stalls = 0

    # --- sending ---------------------------------------------------------------------------

    def _send_items(self, st: _IngestStream, kind: int, payload: bytes) -> None:
        w = st.worker
        n = len(payload)
        limit = self.join_limit[w]
        if kind == KIND_SSE and n <= limit:
            # Event batches gather into the worker's open run, joined into one KIND_SSE_LIST
            # entry when the run closes (one ring entry, one decode call in the worker).
            if self.run_bytes[w] + n > limit:
                self._close_run(w)
            self.runs[w].append(payload)
            self.run_bytes[w] += n
            items = None
        else:
            self._close_run(w)  # keeps this stream's order: what came before goes first
            if n <= self.max_entry[w]:
                items = None
                self.pending[w].append((kind, payload))
            else:
                items = ring_items(kind, payload, self.max_entry[w])
                self.pending[w].extend(items)
        lg = st.log
        if lg is not None and not (kind == KIND_SSE and type(st.task) is _ReplayJob):
            st.log_bytes += n
            self.log_total += n
            if st.log_bytes > self.replay_log_bytes or self.log_total > self.replay_log_total:
                self._drop_log(st)  # too big to replay: a crash of its worker fails this stream
            elif items is None:
                lg.add(kind, payload)
            else:
                for part_kind, part in items:
                    lg.add(part_kind, part)
        if len(self.runs[w]) + len(self.pending[w]) >= _FLUSH_ITEMS:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _drop_log(self, st: _IngestStream) -> None:
        if st.log is not None:
            self.log_total -= st.log_bytes
            st.log = None

    def _close_run(self, w: int) -> None:
        """Turn worker w's open run of event batches into one pending ring entry."""
        run = self.runs[w]
        if run:
            self.pending[w].append((KIND_SSE_LIST, join_batches(run)) if len(run) > 1 else (KIND_SSE, run[0]))
            self.runs[w] = []
            self.run_bytes[w] = 0

    def _send(self, st: _IngestStream, record: Any) -> None:
        kind, payload = self._encode_record(record)
        self._send_items(st, kind, payload)

    def _flush(self) -> None:
        self._flush_scheduled = False
        retry = False
        for w, items in enumerate(self.pending):
            if self.runs[w]:
                self._close_run(w)
            if not items:
                continue
            ring = self.event_rings[w]
            # Every item fits one entry (larger payloads were split), so this never blocks.
            self._write_pending(ring, items, w)
            while items and not self.parked[w]:
                if park_producer(ring):
                    # Woken by the worker's release (its doorbell), not by polling.
                    self.parked[w] = True
                    self.loop.add_reader(space_fd(ring), self._on_space, w)
                    break
                # Room appeared since the write failed: use it now, not after a timer.
                unpark_producer(ring)
                self._write_pending(ring, items, w)
            if items:
                retry = True
                if not self.blocked[w]:
                    self.blocked[w] = True
                    self.stalls += 1
                    self.gates[w].clear()
            elif self.blocked[w]:
                self.blocked[w] = False
                self.gates[w].set()
                if self._paced_gated:
                    self._wake_paced()
        if retry and not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_later(_BLOCKED_RETRY_S, self._flush)

    def _flush_now(self) -> None:
        """Hand what is batched to the workers now (before the loop lingers)."""
        if self._flush_scheduled:
            self._flush()

    def _write_pending(self, ring: Ring, items: list[tuple[int, bytes]], w: int) -> None:
        """Write what fits of worker w's pending entries (removing it), its open run closed first."""
        self._close_run(w)
        n = ring.try_write_batch(items)
        if n == len(items):
            items.clear()
        elif n:
            del items[:n]

    def _on_space(self, w: int) -> None:
        ring = self.event_rings[w]
        self.loop.remove_reader(space_fd(ring))
        unpark_producer(ring)
        self.parked[w] = False
        self._flush()

    # --- streams ---------------------------------------------------------------------------

    def _open(self, rec: StreamOpen) -> None:
        opts = options_decoder.decode(rec.options)
        # Own copy: the task outlives this ring entry, whose space is handed back next.
        rec.options = msgspec.Raw(bytes(rec.options))
        st = _IngestStream(rec.stream_id, opts.worker)
        self.streams[rec.stream_id] = st
        # The worker learns of the stream (dialect, options) first; it needs no source (and
        # must never see the request's credentials).
        self._send(st, StreamOpen(rec.stream_id, rec.source_index, rec.dialect, _NO_SOURCE, rec.custom_id, rec.options))
        src = rec.source
        if src.replay_path is not None or src.replay_bytes is not None:
            self._add_replay_job(st, src)
            return
        st.task = task = self.loop.create_task(self._run_stream(st, rec))
        # A task cancelled before its first step never runs its body (and its except clause):
        # make sure the worker still hears that the stream ended.
        task.add_done_callback(lambda _t, st=st: self._end(st, StreamEnd(
            st.stream_id, st.seq, "cancelled", None, "cancelled", "cancelled by the caller")))

    async def _run_stream(self, st: _IngestStream, rec: StreamOpen) -> None:
        src = rec.source
        try:
            st.secrets = _secrets_of(src)
            tail = await self._read_http(st, src, rec)
            self._end(st, StreamEnd(st.stream_id, st.seq, "eof-tail" if tail else "eof"))
        except asyncio.CancelledError:
            self._end_cancelled(st)
        except Exception as exc:  # anything unexpected ends this stream only
            self._end_failed(st, exc)

    def _end_cancelled(self, st: _IngestStream) -> None:
        if not st.stopped:
            self._end(st, StreamEnd(st.stream_id, st.seq, "cancelled", None, "cancelled", "cancelled by the caller"))

    def _end_failed(self, st: _IngestStream, exc: Exception) -> None:
        if isinstance(exc, StreamError):
            self._end(st, StreamEnd(st.stream_id, st.seq, "error", exc.http_status, exc.kind,
                                    _scrub(exc.message, st.secrets)))
            return
        message = _scrub(f"{type(exc).__name__}: {exc}", st.secrets)
        log.error("stream %d failed in the ingest: %s", st.stream_id, message)
        self._end(st, StreamEnd(st.stream_id, st.seq, "error", None, "malformed", message))

    def _end(self, st: _IngestStream, record: StreamEnd) -> None:
        if st.ended or st.stopped:
            return
        st.ended = True
        self._send(st, record)

    def _batch(self, st: _IngestStream, events: list, read_ns: int, nbytes: int) -> None:
        payload = self._encode(SseBatch(st.stream_id, st.seq, read_ns, events, nbytes))
        st.seq += 1
        self._send_items(st, KIND_SSE, payload)

    # --- unpaced replays: one scheduler, no task per stream ----------------------------------
    #
    # A task per replayed stream costs a task switch per read (or per few reads), more than the
    # read itself when each read is one event. One coroutine instead takes one read of each
    # active stream per pass, the interleaving a socket loop gives, and skips the streams of a
    # worker whose ring is above its soft limit.

    def _add_replay_job(self, st: _IngestStream, src) -> None:
        from pipeline.recording import Recording

        try:
            recording = self._recordings.load(src.replay_path) if src.replay_path is not None else Recording(src.replay_bytes)
        except Exception as exc:
            self._end_failed(st, exc)
            return
        parser = SseParser(max_event_bytes=self.pipeline.max_event_bytes)
        read_size = _replay_read_size(src.read_size)
        if src.pace > 0:
            reads = _paced_reads(recording, read_size, src.pace, self.loop.time())
            reread = lambda: (chunk for _, chunk in _paced_reads(recording, read_size, 1.0, 0.0))  # noqa: E731
            st.task = job = _ReplayJob(st, reads, parser, self._end_cancelled, reread)
            self._paced_push(job)
            return
        st.task = job = _ReplayJob(st, _iter_fast(recording, read_size), parser, self._end_cancelled,
                                   lambda: _iter_fast(recording, read_size))
        self._jobs.append(job)
        if self._scheduler is None or self._scheduler.done():
            self._scheduler = self.loop.create_task(self._run_replays())
            self._scheduler.add_done_callback(self._on_loop_done)

    def _replay_step(self, job: _ReplayJob, chunk: bytes | None) -> bool:
        """One read of a replay job (None: its end); False once the job is over."""
        st = job.st
        try:
            if chunk is None:
                job.finished = True
                job.parser.close()
                self._end(st, StreamEnd(st.stream_id, st.seq, "eof-tail" if job.parser.discarded_tail else "eof"))
                job.reads = job.parser = None
                return False
            read_ns = time.monotonic_ns()
            job.pending += len(chunk)
            try:
                events = job.parser.feed(chunk)
            except TooLargeError as exc:
                if isinstance(exc.received, list) and exc.received:
                    self._batch(st, exc.received, read_ns, job.pending)
                    job.read_ns.append(read_ns)
                raise
            if events:
                self._batch(st, events, read_ns, job.pending)
                job.read_ns.append(read_ns)
                job.pending = 0
            return True
        except Exception as exc:  # ends this stream only
            job.finished = True
            job.reads = job.parser = None
            self._end_failed(st, exc)
            return False

    async def _run_replays(self) -> None:
        jobs = self._jobs
        gates = self.gates
        reads = 0
        while jobs:
            moved = False
            alive = []
            keep = alive.append
            # New jobs appended while this pass runs (an await below lets submissions in) are
            # taken at the next pass: swap the list first.
            self._jobs = jobs_next = []
            for job in jobs:
                if job.finished:
                    continue
                st = job.st
                if not gates[st.worker].is_set():
                    keep(job)
                    continue
                moved = True
                if not self._replay_step(job, next(job.reads, None)):
                    continue
                keep(job)
                reads += 1
                if reads >= _REPLAY_YIELD_READS:
                    reads = 0
                    await asyncio.sleep(0)
            alive += jobs_next
            self._jobs = jobs = alive
            if not moved and jobs:
                # Every remaining stream waits for its worker's ring: sleep until a gate opens.
                await self._any_gate()
            else:
                reads = 0
                await asyncio.sleep(0)

    # Paced replays: one timer for all of them. Each job's next read waits in the slot of the
    # millisecond it falls due in (the event loop's timers have that resolution anyway); the
    # scheduler takes every read of every slot that is due, then sleeps until the next slot.

    def _paced_push(self, job: _ReplayJob) -> None:
        nxt = next(job.reads, None)
        if nxt is None:
            self._replay_step(job, None)
            return
        key = self._paced_slot(nxt[0], job, nxt[1])
        if self._paced_task is None or self._paced_task.done():
            self._paced_task = self.loop.create_task(self._run_paced())
            self._paced_task.add_done_callback(self._on_loop_done)
        elif key < self._paced_wake_at:
            self._wake_paced()

    def _paced_slot(self, due: float, job: _ReplayJob, chunk: bytes) -> int:
        key = -int(-due * 1000.0 // 1.0)  # the millisecond it is due in, rounded up: never early
        slot = self._paced.get(key)
        if slot is None:
            self._paced[key] = [(job, chunk)]
            heapq.heappush(self._paced_keys, key)
        else:
            slot.append((job, chunk))
        return key

    def _wake_paced(self) -> None:
        fut = self._paced_sleep
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _run_paced(self) -> None:
        slots = self._paced
        keys = self._paced_keys
        gated = self._paced_gated
        gates = self.gates
        loop = self.loop
        pop = heapq.heappop
        put = self._paced_slot
        step = self._replay_step
        while keys or gated:
            if gated:
                # Reads held back while their worker's ring was full go first once it has room.
                retry, gated[:] = gated[:], []
            else:
                retry = ()
            now_ms = loop.time() * 1000.0
            while retry or (keys and keys[0] <= now_ms):
                if retry:
                    batch, retry = retry, ()
                else:
                    batch = slots.pop(pop(keys))
                for item in batch:
                    job, chunk = item
                    if job.finished:
                        continue
                    if not gates[job.st.worker].is_set():
                        gated.append(item)
                        continue
                    if not step(job, chunk):
                        continue
                    nxt = next(job.reads, None)
                    if nxt is None:
                        step(job, None)
                    else:
                        put(nxt[0], job, nxt[1])  # a read already due lands in a due slot: taken now
            if not keys and not gated:
                break
            wake_at = keys[0] if keys else now_ms + 3_600_000.0
            fut = self._paced_sleep = loop.create_future()
            self._paced_wake_at = wake_at
            # (Held-back reads alone: the far timer; a gate opening or a new stream wakes us.)
            timer = loop.call_at(wake_at / 1000.0, _set_done, fut)
            try:
                await fut
            finally:
                timer.cancel()
                self._paced_sleep = None
                self._paced_wake_at = 0.0

    async def _any_gate(self) -> None:
        waits = [asyncio.ensure_future(g.wait()) for g in self.gates]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def _http_setup(self) -> None:
        import aiohttp

        from pipeline.chunked import sse_connector
        from pipeline.http import HttpOptions, RateLimiter

        self._http_options = opts = HttpOptions.from_dict(self.pipeline.http_options)
        # The caller bounds concurrency; the connector must not add a second, smaller limit.
        self._http = aiohttp.ClientSession(connector=sse_connector(limit=0, force_close=False))
        if opts.rpm or opts.tpm:
            # Each of the I ingest processes sends its share: together they keep the limit.
            i = self.ingest_count
            self._limiter = RateLimiter(opts.rpm / i if opts.rpm else None, opts.tpm / i if opts.tpm else None,
                                        burst=opts.rate_burst)

    async def _read_http(self, st: _IngestStream, src, rec: StreamOpen) -> bool:
        from pipeline.http import HttpStreamHandler
        from pipeline.sources import Request

        if self._http is None:
            self._http_setup()
        request = Request(src.url, src.method, dict(src.headers), src.body, rec.dialect, rec.custom_id)
        handler = HttpStreamHandler(
            self._http, request, self._http_options,
            max_event_bytes=self.pipeline.max_event_bytes, limiter=self._limiter,
        )
        w = st.worker
        gate = self.gates[w]
        blocked = self.blocked  # blocked[w] is True exactly while gate is clear (see _flush)
        encode = self._encode
        send = self._send_items
        note = self.linger.note
        sid = st.stream_id

        def sink(events: list, read_ns: int, nbytes: int) -> bool:
            # Runs inside data_received (no task wake-up per read); False stops reading this
            # stream's socket while its worker's ring is over the soft limit. _batch() inlined:
            # this is the per-read path of every HTTP stream.
            send(st, KIND_SSE, encode(SseBatch(sid, st.seq, read_ns, events, nbytes)))
            st.seq += 1
            note()
            return not blocked[w]

        async with handler:
            await handler.pump(sink, gate.wait)
        return handler.discarded_tail

    def _stop(self, sid: int) -> None:
        """The worker is done with this stream (finished, or ended early by a transformer)."""
        st = self.streams.pop(sid, None)
        if st is None:
            return
        self._drop_log(st)
        if st.task is not None and not st.task.done():
            st.stopped = True
            st.task.cancel()  # closes the connection at once

    def _cancel(self, sid: int) -> None:
        st = self.streams.get(sid)
        if st is not None and st.task is not None and not st.task.done():
            st.task.cancel()

    def _replay_items(self, st: _IngestStream) -> list[tuple[int, bytes]]:
        """What a replayed stream sent its worker so far, for a replacement worker: its logged
        records (the open, and the end once sent) around its event batches, made again from the
        recording: the same reads through a new parser give the same events, and the batches
        get the read times they were first sent with (so the new worker's outputs and metrics
        are the ones the caller already has in part)."""
        job: _ReplayJob = st.task  # type: ignore[assignment]
        logged = st.log.items()  # type: ignore[union-attr]
        batches: list[tuple[int, bytes]] = []
        sent = len(job.read_ns)
        parser = SseParser(max_event_bytes=self.pipeline.max_event_bytes)
        pending = 0
        max_entry = self.max_entry[st.worker]
        reads = job.reread()
        while len(batches) < sent:
            chunk = next(reads, None)  # the first pass made `sent` batches from these same reads
            if chunk is None:
                raise RuntimeError(f"its reads gave {len(batches)} batches, not {sent}")
            pending += len(chunk)
            try:
                events = parser.feed(chunk)
            except TooLargeError as exc:
                events = exc.received if isinstance(exc.received, list) else []
            if events:
                seq = len(batches)
                payload = self._encode(SseBatch(st.stream_id, seq, job.read_ns[seq], events, pending))
                batches.append((KIND_SSE, payload))
                pending = 0
        # Its log holds the open (small: it never needs parts) and, once sent, the end.
        items = logged[:1]
        for kind, payload in batches:
            items.extend([(kind, payload)] if len(payload) <= max_entry else ring_items(kind, payload, max_entry))
        return items + logged[1:]

    def _worker_restarted(self, w: int) -> None:
        """Re-send the open streams of a replaced worker from their logs."""
        items: list[tuple[int, bytes]] = []
        for sid in sorted(self.streams):
            st = self.streams[sid]
            if st.worker != w:
                continue
            again = None
            if st.log is not None:
                if type(st.task) is not _ReplayJob:
                    again = st.log.items()
                else:
                    try:
                        again = self._replay_items(st)
                    except Exception as exc:  # (a recording that no longer gives the same reads)
                        log.error("stream %d could not be replayed to a new worker: %s", sid, exc)
            if again is not None:
                items.extend(again)
            else:
                kind, payload = self._encode_record(StreamEnd(
                    sid, 0, "error", None, "worker_crashed",
                    "its worker crashed and the stream could not be replayed (too long, or its recording failed)"))
                items.append((kind, payload))
                st.stopped = True
                if st.task is not None and not st.task.done():
                    st.task.cancel()
                del self.streams[sid]
        # What was still pending is in the logs (or belongs to a stream failed just above).
        self.pending[w] = items
        self.runs[w] = []
        self.run_bytes[w] = 0
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    # --- loops -----------------------------------------------------------------------------

    async def _read_submissions(self) -> None:
        ring = self.sub_ring
        decode = self.codec.decode
        parts = PartAssembler()
        while not self._shutdown.is_set():
            entries = ring.read_available()
            if not entries:
                ring.release()
                try:
                    await self._await_ring(ring)
                except RingClosedError:
                    self._shutdown.set()
                    return
                continue
            for kind, view in entries:
                if kind == KIND_PART:
                    whole = parts.feed(view)
                    view.release()
                    if whole is None:
                        continue
                    kind, view = whole
                else:
                    parts.interrupt()
                rec = decode(kind, view)
                if kind == KIND_OPEN:
                    self._open(rec)
                elif kind == KIND_CONTROL:
                    if rec.op == OP_CANCEL:
                        self._cancel(rec.stream_id)
                    elif rec.op == OP_WORKER_RESTARTED:
                        self._worker_restarted(rec.stream_id)
                    elif rec.op == OP_SHUTDOWN:
                        self._shutdown.set()
                del rec
                if type(view) is memoryview:
                    view.release()
            del entries
            view = None
            ring.release()

    async def _await_ring(self, ring: Ring) -> None:
        """Until `ring` may have entries: the next tick while the loop lingers (it is awake then
        anyway: no doorbell from the other side, no wake-up of our own), else its doorbell.
        RingClosedError when its producer closed it and everything was read."""
        linger = self.linger
        if linger is not None and linger.active:
            if closed_and_drained(ring):
                raise RingClosedError("the producer closed the ring")
            await linger.next_tick()
        else:
            await ring.wait_readable_async(_LOOP_WAKE_S)

    async def _read_controls(self, w: int) -> None:
        ring = self.control_rings[w]
        decode = self.codec.decode
        controller = self.controllers[w]
        event_ring = self.event_rings[w]
        while not self._shutdown.is_set():
            entries = ring.read_available()
            if not entries:
                ring.release()
                await self._await_ring(ring)
                continue
            for kind, view in entries:
                rec = decode(kind, view)
                view.release()
                op = rec.op
                if op == OP_STOP:
                    self._stop(rec.stream_id)
                elif op == OP_QUEUE_DELAY:
                    limit = controller.observe(rec.stream_id / 1e6, reader_waited=self.blocked[w])
                    event_ring.set_soft_limit(min(limit, event_ring.capacity))
                elif op == OP_TOKENS_USED:
                    if self._limiter is not None:
                        self._limiter.record_tokens(rec.stream_id)
            del entries
            ring.release()

    def _on_loop_done(self, task: asyncio.Task) -> None:
        # A ring loop or replay scheduler must never fail: if one does, this process is broken,
        # and exiting (the caller sees it at once) beats hanging.
        if not task.cancelled() and task.exception() is not None:
            self._failed.append(task.exception())
            self._shutdown.set()

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.linger = LoopLinger(self.loop, self.linger_s, self._flush_now)
        self._shutdown = asyncio.Event()
        self.gates = [asyncio.Event() for _ in self.event_rings]
        for g in self.gates:
            g.set()
        if self.parent_sentinel is not None:
            self.loop.add_reader(self.parent_sentinel, self._shutdown.set)
        loops = [self.loop.create_task(self._read_submissions())]
        loops += [self.loop.create_task(self._read_controls(w)) for w in range(len(self.control_rings))]
        failed = self._failed
        for t in loops:
            t.add_done_callback(self._on_loop_done)
        try:
            await self._shutdown.wait()
        finally:
            if self.parent_sentinel is not None:
                self.loop.remove_reader(self.parent_sentinel)
            tasks = [st.task for st in self.streams.values() if st.task is not None and not st.task.done()]
            for st in self.streams.values():
                st.stopped = True
            for t in tasks + loops:
                t.cancel()
            # Replay jobs end at cancel(); only real tasks (and the scheduler) are waited for.
            tasks = [t for t in tasks if isinstance(t, asyncio.Future)]
            for t in (self._scheduler, self._paced_task):
                if t is not None:
                    t.cancel()
                    tasks.append(t)
            # Not gather(): on Python 3.11 a cancel that lands as an inner wait_for completes is
            # lost (gh-86296), and such a task would hold the shutdown for ever. The ring loops
            # also stop on their own (they check _shutdown at least every _LOOP_WAKE_S).
            await asyncio.wait(tasks + loops, timeout=_STOP_WAIT_S)
            if self._http is not None:
                await self._http.close()
        if failed:
            raise failed[0]


def ingest_main(
    index: int,
    pipeline: StreamingPipeline,
    sub_handle: RingHandle,
    event_handles: list[RingHandle],
    control_handles: list[RingHandle],
    replay_log_bytes: int,
    ingest_count: int,
    owner_pid: int,
    linger_s: float = DEFAULT_TICK_S,
    replay_log_total: int = 256 << 20,
) -> None:
    """Process entry point of ingest `index` (of `ingest_count`) of the pool owned by `owner_pid`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the caller decides when we stop
    parent_sentinel = owner_sentinel(owner_pid)
    sub_ring = Ring.attach(sub_handle)
    event_rings = [Ring.attach(h) for h in event_handles]
    control_rings = [Ring.attach(h) for h in control_handles]
    try:
        ingest = Ingest(index, pipeline, sub_ring, event_rings, control_rings, replay_log_bytes,
                        parent_sentinel, ingest_count, linger_s, replay_log_total)
        tune_gc()
        try:
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:  # uvloop is optional off Linux; the pool only runs on Linux anyway
            loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(ingest.run())
        finally:
            # Not asyncio.run(): its final cancel-and-gather could wait for ever on a task that
            # lost its cancellation (see Ingest.run); what is left after one more bounded
            # wait is dropped with the process.
            left = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in left:
                t.cancel()
            if left:
                loop.run_until_complete(asyncio.wait(left, timeout=_STOP_WAIT_S))
            loop.close()
    finally:
        for ring in event_rings:
            ring.close_producer()
        for ring in [sub_ring] + event_rings + control_rings:
            ring.close()
        os.close(parent_sentinel)
