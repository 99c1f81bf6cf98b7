"""The ingest process: network reads (or replays of recorded bytes) and SSE framing, nothing more.

Streams arrive as StreamOpen records on the submission ring. Each runs as one asyncio task that
reads its body (`pipeline.http.HttpStreamHandler`, or a `Replay`'s reads), parses the framing and
hands the parser's events, batched per read with the read time, to the ring of the worker that
owns the stream. Records are collected per loop tick and written with one publication per ring
(`_flush`); a record larger than one ring entry goes as continuation parts
(`protocol.split_payload`), so no write ever blocks the loop.

Backpressure: one BackpressureController per event ring turns the worker's reported queue delay
into the ring's soft limit; while a ring is above it, the tasks of that worker's streams stop
reading, so TCP pushes back on the servers. At most one read per stream waits in `pending`
while its ring is full: nothing buffers without bound.

Replay after a worker crash: each stream keeps the ring items sent to its worker (bounded by
`replay_log_bytes`) until the worker says the stream is done; when the caller reports a
replacement worker, those logs are written to it again (DESIGN.md section 5).

Rate limits: each of the pool's I ingest processes enforces rpm/I and tpm/I (pipeline.http's
RateLimiter); workers report each finished stream's output tokens (`OP_TOKENS_USED`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any

import msgspec

from pipeline.backpressure import BackpressureController
from pipeline.core import StreamingPipeline
from pipeline.errors import StreamError, TooLargeError
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
from shm.multiwait import park_producer, space_fd, unpark_producer
from shm.ring import Ring, RingClosedError, RingHandle

from .protocol import (
    KIND_PART,
    KIND_SSE,
    OP_QUEUE_DELAY,
    OP_TOKENS_USED,
    OP_WORKER_RESTARTED,
    PartAssembler,
    SseBatch,
    options_decoder,
    owner_sentinel,
    ring_items,
)

log = logging.getLogger("streamring.ingest")

# While a ring is full the ingest waits on its space doorbell; it also retries at this interval,
# which covers a wake-up lost to the consumer's unfenced release (shm/ring.py, "Parking").
_BLOCKED_RETRY_S = 0.001
# The ring loops re-check for shutdown at least this often; and how long a shutdown waits for the
# tasks it cancelled.
_LOOP_WAKE_S = 0.25
_STOP_WAIT_S = 1.0
# An unpaced replay yields to the loop after this many reads (a socket read would yield after
# every one): streams still interleave, without one loop round trip per read.
_REPLAY_YIELD_EVERY = 16


class _IngestStream:
    __slots__ = ("stream_id", "worker", "task", "log", "log_bytes", "seq", "stopped", "ended", "secrets")

    def __init__(self, stream_id: int, worker: int) -> None:
        self.stream_id = stream_id
        self.worker = worker
        self.task: asyncio.Task | None = None
        self.log: list[tuple[int, bytes]] | None = []
        self.log_bytes = 0
        self.seq = 0
        self.stopped = False  # the worker said it is done: end quietly
        self.ended = False  # StreamEnd sent
        self.secrets: tuple[str, ...] = ()  # credentials of its request, scrubbed from messages


_NO_SOURCE = Source()


def _replay_read_size(read_size: int) -> int | str:
    return {0: "event", -1: "recorded"}.get(read_size, read_size)


async def _aiter_fast(data: bytes, read_size: int | str):
    """Unpaced replay reads. Where every line ends in LF (nearly every recording), one read per
    event is a C-level split on blank lines rather than pipeline.recording's regex scan (any cut
    parses the same; only the read pattern matters here)."""
    if read_size == "event" and b"\r" not in data:
        pieces = data.split(b"\n\n")
        last = pieces.pop()
        for p in pieces:
            yield p + b"\n\n"
        if last:
            yield last
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
    ) -> None:
        self.index = index
        self.pipeline = pipeline
        self.sub_ring = sub_ring
        self.event_rings = event_rings
        self.control_rings = control_rings
        self.replay_log_bytes = replay_log_bytes
        self.parent_sentinel = parent_sentinel
        self.ingest_count = ingest_count
        k = len(event_rings)
        self.pending: list[list[tuple[int, bytes]]] = [[] for _ in range(k)]
        self.max_entry = [r.max_entry_payload for r in event_rings]
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
        self._shutdown: asyncio.Event | None = None
        self._http: Any = None
        self._http_options: Any = None
        self._limiter: Any = None
        self.stalls = 0

    # --- sending ---------------------------------------------------------------------------

    def _send_items(self, st: _IngestStream, kind: int, payload: bytes) -> None:
        w = st.worker
        if len(payload) <= self.max_entry[w]:
            items = None
            item = (kind, payload)
            self.pending[w].append(item)
        else:
            items = ring_items(kind, payload, self.max_entry[w])
            self.pending[w].extend(items)
        lg = st.log
        if lg is not None:
            st.log_bytes += len(payload)
            if st.log_bytes > self.replay_log_bytes:
                st.log = None  # too big to replay: a crash of its worker fails this stream
            elif items is None:
                lg.append(item)
            else:
                lg.extend(items)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _send(self, st: _IngestStream, record: Any) -> None:
        kind, payload = self._encode_record(record)
        self._send_items(st, kind, payload)

    def _flush(self) -> None:
        self._flush_scheduled = False
        retry = False
        for w, items in enumerate(self.pending):
            if not items:
                continue
            ring = self.event_rings[w]
            # Every item fits one entry (larger payloads were split), so this never blocks.
            n = ring.try_write_batch(items)
            if n:
                del items[:n]
            if items:
                retry = True
                if not self.blocked[w]:
                    self.blocked[w] = True
                    self.stalls += 1
                    self.gates[w].clear()
                if not self.parked[w]:
                    if park_producer(ring):
                        # Woken by the worker's release (its doorbell), not by polling.
                        self.parked[w] = True
                        self.loop.add_reader(space_fd(ring), self._on_space, w)
                    else:
                        unpark_producer(ring)
            elif self.blocked[w]:
                self.blocked[w] = False
                self.gates[w].set()
        if retry and not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_later(_BLOCKED_RETRY_S, self._flush)

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
        st.task = task = self.loop.create_task(self._run_stream(st, rec))
        # A task cancelled before its first step never runs its body (and its except clause):
        # make sure the worker still hears that the stream ended.
        task.add_done_callback(lambda _t, st=st: self._end(st, StreamEnd(
            st.stream_id, st.seq, "cancelled", None, "cancelled", "cancelled by the caller")))

    async def _run_stream(self, st: _IngestStream, rec: StreamOpen) -> None:
        src = rec.source
        try:
            if src.replay_path is not None or src.replay_bytes is not None:
                tail = await self._read_replay(st, src)
            else:
                st.secrets = _secrets_of(src)
                tail = await self._read_http(st, src, rec)
            self._end(st, StreamEnd(st.stream_id, st.seq, "eof-tail" if tail else "eof"))
        except asyncio.CancelledError:
            if not st.stopped:
                self._end(st, StreamEnd(st.stream_id, st.seq, "cancelled", None, "cancelled", "cancelled by the caller"))
        except StreamError as exc:
            self._end(st, StreamEnd(st.stream_id, st.seq, "error", exc.http_status, exc.kind,
                                    _scrub(exc.message, st.secrets)))
        except Exception as exc:  # anything unexpected ends this stream only
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

    async def _read_replay(self, st: _IngestStream, src) -> bool:
        from pipeline.recording import Recording, aiter_replay

        recording = Recording.load(src.replay_path) if src.replay_path is not None else Recording(src.replay_bytes)
        parser = SseParser(max_event_bytes=self.pipeline.max_event_bytes)
        feed = parser.feed
        gate = self.gates[st.worker]
        paced = src.pace > 0
        clock = time.monotonic_ns
        reads = 0
        pending = 0  # bytes read since the last batch
        read_size = _replay_read_size(src.read_size)
        if paced or read_size == "recorded":
            chunks = aiter_replay(recording, read_size, src.pace if paced else None)
        else:
            chunks = _aiter_fast(recording.data, read_size)
        async for chunk in chunks:
            if not gate.is_set():
                await gate.wait()
            read_ns = clock()
            pending += len(chunk)
            try:
                events = feed(chunk)
            except TooLargeError as exc:
                if isinstance(exc.received, list) and exc.received:
                    self._batch(st, exc.received, read_ns, pending)
                raise
            if events:
                self._batch(st, events, read_ns, pending)
                pending = 0
            reads += 1
            if not paced and reads % _REPLAY_YIELD_EVERY == 0:
                # Where socket reads would yield to the loop, so do we: streams interleave.
                await asyncio.sleep(0)
        parser.close()
        return parser.discarded_tail

    def _http_setup(self) -> None:
        import aiohttp

        from pipeline.http import HttpOptions, RateLimiter

        self._http_options = opts = HttpOptions.from_dict(self.pipeline.http_options)
        # The caller bounds concurrency; the connector must not add a second, smaller limit.
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=False))
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
        gate = self.gates[st.worker]
        async with handler:
            async for events, read_ns in handler.events():
                self._batch(st, events, read_ns, handler.batch_bytes)
                if not gate.is_set():
                    await gate.wait()
        return handler.discarded_tail

    def _stop(self, sid: int) -> None:
        """The worker is done with this stream (finished, or ended early by a transformer)."""
        st = self.streams.pop(sid, None)
        if st is None:
            return
        st.log = None
        if st.task is not None and not st.task.done():
            st.stopped = True
            st.task.cancel()  # closes the connection at once

    def _cancel(self, sid: int) -> None:
        st = self.streams.get(sid)
        if st is not None and st.task is not None and not st.task.done():
            st.task.cancel()

    def _worker_restarted(self, w: int) -> None:
        """Re-send the open streams of a replaced worker from their logs."""
        items: list[tuple[int, bytes]] = []
        for sid in sorted(self.streams):
            st = self.streams[sid]
            if st.worker != w:
                continue
            if st.log is not None:
                items.extend(st.log)
            else:
                kind, payload = self._encode_record(StreamEnd(
                    sid, 0, "error", None, "worker_crashed",
                    "its worker crashed and the stream was too long to replay"))
                items.append((kind, payload))
                st.stopped = True
                if st.task is not None and not st.task.done():
                    st.task.cancel()
                del self.streams[sid]
        # What was still pending is in the logs (or belongs to a stream failed just above).
        self.pending[w] = items
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
                    await ring.wait_readable_async(_LOOP_WAKE_S)
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

    async def _read_controls(self, w: int) -> None:
        ring = self.control_rings[w]
        decode = self.codec.decode
        controller = self.controllers[w]
        event_ring = self.event_rings[w]
        while not self._shutdown.is_set():
            entries = ring.read_available()
            if not entries:
                ring.release()
                await ring.wait_readable_async(_LOOP_WAKE_S)
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

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._shutdown = asyncio.Event()
        self.gates = [asyncio.Event() for _ in self.event_rings]
        for g in self.gates:
            g.set()
        if self.parent_sentinel is not None:
            self.loop.add_reader(self.parent_sentinel, self._shutdown.set)
        loops = [self.loop.create_task(self._read_submissions())]
        loops += [self.loop.create_task(self._read_controls(w)) for w in range(len(self.control_rings))]
        failed: list[BaseException] = []

        def on_loop_done(task: asyncio.Task) -> None:
            # A ring loop must never end on its own: if one fails, this process is broken, and
            # exiting (the caller sees it at once) beats hanging.
            if not task.cancelled() and task.exception() is not None:
                failed.append(task.exception())
                self._shutdown.set()

        for t in loops:
            t.add_done_callback(on_loop_done)
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
) -> None:
    """Process entry point of ingest `index` (of `ingest_count`) of the pool owned by `owner_pid`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the caller decides when we stop
    parent_sentinel = owner_sentinel(owner_pid)
    sub_ring = Ring.attach(sub_handle)
    event_rings = [Ring.attach(h) for h in event_handles]
    control_rings = [Ring.attach(h) for h in control_handles]
    try:
        ingest = Ingest(index, pipeline, sub_ring, event_rings, control_rings, replay_log_bytes,
                        parent_sentinel, ingest_count)
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
