"""The ingest process: network reads (or replays of recorded bytes) and SSE framing, nothing more.

Streams arrive as StreamOpen records on the submission ring. Each runs as one asyncio task that
reads its body (`pipeline.http.HttpStreamHandler`, or a `Replay`'s reads), parses the framing and
hands event batches to the ring of the worker that owns the stream. Records are collected per
loop tick and written with one publication per ring (`_flush`).

Backpressure: one BackpressureController per event ring turns the worker's reported queue delay
into the ring's soft limit; while a ring is above it, the tasks of that worker's streams stop
reading, so TCP pushes back on the servers and nothing buffers without bound.

Replay after a worker crash: each stream keeps the records sent to its worker (bounded by
`replay_log_bytes`) until the worker says the stream is done; when the caller reports a
replacement worker, those logs are written to it again (DESIGN.md section 5).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
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
    KIND_END,
    KIND_EVENTS,
    KIND_OPEN,
    OP_CANCEL,
    OP_SHUTDOWN,
    OP_STOP,
    Event,
    EventBatch,
    RecordCodec,
    Source,
    StreamEnd,
    StreamOpen,
)
from shm.ring import Ring, RingClosedError, RingHandle

from .protocol import OP_QUEUE_DELAY, OP_WORKER_RESTARTED, options_decoder

log = logging.getLogger("streamring.ingest")

# While a ring is full, how often the ingest retries writing to it. The consumer frees room in
# batches, so polling at this rate costs little and adds at most this much delay.
_BLOCKED_RETRY_S = 0.0005


class _IngestStream:
    __slots__ = ("stream_id", "worker", "task", "log", "log_bytes", "seq", "stopped", "ended")

    def __init__(self, stream_id: int, worker: int) -> None:
        self.stream_id = stream_id
        self.worker = worker
        self.task: asyncio.Task | None = None
        self.log: list[tuple[int, bytes]] | None = []
        self.log_bytes = 0
        self.seq = 0
        self.stopped = False  # the worker said it is done: end quietly
        self.ended = False  # StreamEnd sent


_NO_SOURCE = Source()


def _replay_read_size(read_size: int) -> int | str:
    return {0: "event", -1: "recorded"}.get(read_size, read_size)


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
    ) -> None:
        self.index = index
        self.pipeline = pipeline
        self.sub_ring = sub_ring
        self.event_rings = event_rings
        self.control_rings = control_rings
        self.replay_log_bytes = replay_log_bytes
        self.parent_sentinel = parent_sentinel
        k = len(event_rings)
        self.pending: list[list[tuple[int, bytes]]] = [[] for _ in range(k)]
        self.blocked = [False] * k
        self.gates: list[asyncio.Event] = []
        self.streams: dict[int, _IngestStream] = {}
        self.codec = RecordCodec()
        self._encode = self.codec.encode_bytes
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

    def _send(self, st: _IngestStream, record: Any) -> None:
        kind, payload = self._encode(record)
        item = (kind, payload)
        if st.log is not None:
            st.log_bytes += len(payload)
            if st.log_bytes > self.replay_log_bytes:
                st.log = None  # too big to replay: a crash of its worker fails this stream
            else:
                st.log.append(item)
        self.pending[st.worker].append(item)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        retry = False
        for w, items in enumerate(self.pending):
            if not items:
                continue
            ring = self.event_rings[w]
            n = ring.try_write_batch(items)
            if n < len(items) and ring.occupancy == 0:
                # A single record bigger than a ring entry: chunked, waiting for room as needed.
                ring.write(items[n][0], items[n][1], timeout=None)
                n += 1
            if n:
                del items[:n]
            if items:
                retry = True
                if not self.blocked[w]:
                    self.blocked[w] = True
                    self.stalls += 1
                    self.gates[w].clear()
            elif self.blocked[w]:
                self.blocked[w] = False
                self.gates[w].set()
        if retry and not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_later(_BLOCKED_RETRY_S, self._flush)

    # --- streams ---------------------------------------------------------------------------

    def _open(self, rec: StreamOpen) -> None:
        opts = options_decoder.decode(rec.options)
        # Own copy: the task outlives this ring entry, whose space is handed back next.
        rec.options = msgspec.Raw(bytes(rec.options))
        st = _IngestStream(rec.stream_id, opts.worker)
        self.streams[rec.stream_id] = st
        # The worker learns of the stream (dialect, options) first; it needs no source.
        self._send(st, StreamOpen(rec.stream_id, rec.source_index, rec.dialect, _NO_SOURCE, rec.custom_id, rec.options))
        st.task = self.loop.create_task(self._run_stream(st, rec))

    async def _run_stream(self, st: _IngestStream, rec: StreamOpen) -> None:
        src = rec.source
        try:
            if src.replay_path is not None or src.replay_bytes is not None:
                tail = await self._read_replay(st, src)
            else:
                tail = await self._read_http(st, src, rec)
            self._end(st, StreamEnd(st.stream_id, st.seq, "eof-tail" if tail else "eof"))
        except asyncio.CancelledError:
            if not st.stopped:
                self._end(st, StreamEnd(st.stream_id, st.seq, "cancelled", None, "cancelled", "cancelled by the caller"))
        except StreamError as exc:
            self._end(st, StreamEnd(st.stream_id, st.seq, "error", exc.http_status, exc.kind, exc.message))
        except Exception as exc:  # anything unexpected ends this stream only
            log.exception("stream %d failed in the ingest", st.stream_id)
            self._end(st, StreamEnd(st.stream_id, st.seq, "error", None, "malformed", f"{type(exc).__name__}: {exc}"))

    def _end(self, st: _IngestStream, record: StreamEnd) -> None:
        if st.ended or st.stopped:
            return
        st.ended = True
        self._send(st, record)

    def _batch(self, st: _IngestStream, events: list, read_ns: int) -> None:
        batch = EventBatch(st.stream_id, st.seq, read_ns, [Event(e.event, e.id, e.data) for e in events])
        st.seq += 1
        self._send(st, batch)

    async def _read_replay(self, st: _IngestStream, src) -> bool:
        from pipeline.recording import Recording, aiter_replay

        recording = Recording.load(src.replay_path) if src.replay_path is not None else Recording(src.replay_bytes)
        parser = SseParser(max_event_bytes=self.pipeline.max_event_bytes)
        gate = self.gates[st.worker]
        paced = src.pace > 0
        clock = time.monotonic_ns
        async for chunk in aiter_replay(recording, _replay_read_size(src.read_size), src.pace if paced else None):
            if not gate.is_set():
                await gate.wait()
            read_ns = clock()
            try:
                events = parser.feed(chunk)
            except TooLargeError as exc:
                if isinstance(exc.received, list) and exc.received:
                    self._batch(st, exc.received, read_ns)
                raise
            if events:
                self._batch(st, events, read_ns)
            if not paced:
                # Where a socket read would yield to the loop, so do we: streams interleave.
                await asyncio.sleep(0)
        parser.close()
        return parser.discarded_tail

    async def _read_http(self, st: _IngestStream, src, rec: StreamOpen) -> bool:
        import aiohttp

        from pipeline.http import HttpOptions, HttpStreamHandler, limiter_for
        from pipeline.sources import Request

        if self._http is None:
            self._http_options = HttpOptions.from_dict(self.pipeline.http_options)
            # The caller bounds concurrency; the connector must not add a second, smaller limit.
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=False))
            self._limiter = limiter_for(self.pipeline, self._http_options)
        request = Request(src.url, src.method, dict(src.headers), src.body, rec.dialect, rec.custom_id)
        handler = HttpStreamHandler(
            self._http, request, self._http_options,
            max_event_bytes=self.pipeline.max_event_bytes, limiter=self._limiter,
        )
        gate = self.gates[st.worker]
        async with handler:
            async for events, read_ns in handler.events():
                self._batch(st, events, read_ns)
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
                kind, payload = self._encode(StreamEnd(
                    sid, 0, "error", None, "worker_crashed",
                    "its worker crashed and the stream was too long to replay"))
                items.append((kind, payload))
                st.stopped = True
                if st.task is not None and not st.task.done():
                    st.task.cancel()
                del self.streams[sid]
        self.pending[w] = items
        self.event_rings[w].orphaned = 0
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    # --- loops -----------------------------------------------------------------------------

    async def _read_submissions(self) -> None:
        ring = self.sub_ring
        decode = self.codec.decode
        while True:
            entries = ring.read_available()
            if not entries:
                ring.release()
                try:
                    await ring.wait_readable_async()
                except RingClosedError:
                    self._shutdown.set()
                    return
                continue
            for kind, view in entries:
                rec = decode(kind, view)
                del view  # records hold views into the ring only until handled below
                if kind == KIND_OPEN:
                    self._open(rec)
                elif kind == KIND_CONTROL:
                    if rec.op == OP_CANCEL:
                        self._cancel(rec.stream_id)
                    elif rec.op == OP_WORKER_RESTARTED:
                        self._worker_restarted(rec.stream_id)
                    elif rec.op == OP_SHUTDOWN:
                        self._shutdown.set()
            del entries, rec
            ring.release()

    async def _read_controls(self, w: int) -> None:
        ring = self.control_rings[w]
        decode = self.codec.decode
        controller = self.controllers[w]
        event_ring = self.event_rings[w]
        while True:
            entries = ring.read_available()
            if not entries:
                ring.release()
                await ring.wait_readable_async()
                continue
            for kind, view in entries:
                rec = decode(kind, view)
                view.release()
                if rec.op == OP_STOP:
                    self._stop(rec.stream_id)
                elif rec.op == OP_QUEUE_DELAY:
                    limit = controller.observe(rec.stream_id / 1e6, reader_waited=self.blocked[w])
                    event_ring.set_soft_limit(min(limit, event_ring.capacity))
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
            await asyncio.gather(*tasks, *loops, return_exceptions=True)
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
) -> None:
    """Process entry point of ingest `index`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the caller decides when we stop
    parent = multiprocessing.parent_process()
    parent_sentinel = parent.sentinel if parent is not None else None
    sub_ring = Ring.attach(sub_handle)
    event_rings = [Ring.attach(h) for h in event_handles]
    control_rings = [Ring.attach(h) for h in control_handles]
    try:
        ingest = Ingest(index, pipeline, sub_ring, event_rings, control_rings, replay_log_bytes, parent_sentinel)
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:  # uvloop is optional off Linux; the pool only runs on Linux anyway
            runner = asyncio.run
        runner(ingest.run())
    finally:
        for ring in event_rings:
            ring.close_producer()
        for ring in [sub_ring] + event_rings + control_rings:
            ring.close()
