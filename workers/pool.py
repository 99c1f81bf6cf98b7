"""The pool: creates the rings, spawns and supervises the ingest and worker processes, feeds
sources in lazily under a concurrency limit and hands results and tokens to the caller.

Rings (DESIGN.md section 4), all created here, in the caller's process, which owns and unlinks
them: I submission rings (caller -> ingest j), I*K event rings (ingest j -> worker k), I*K
control rings (worker k -> ingest j) and K output rings (worker k -> caller).

A Pool is used from one thread. Its sync entry points (`run`, handles' iteration) wait in
poll() on the output rings' doorbells and the children's sentinels; its async ones (`astream`,
`async for` over a handle) wait with `loop.add_reader` on the same fds.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import msgspec

from pipeline.errors import StreamError
from pipeline.metrics import MetricsRegistry, StreamMetricsSnapshot
from pipeline.sources import Replay, Request
from pipeline.tokens import Done, Error, StreamResult, StreamToken
from shm.multiwait import wait_any, wait_any_async
from shm.records import (
    KIND_OUTPUT,
    OP_CANCEL,
    OP_SHUTDOWN,
    Control,
    RecordCodec,
    Source,
    StreamOpen,
)
from shm.ring import DEFAULT_CAPACITY, Ring, check_platform
from shm.segment import cleanup_stale_segments

from .linger import DEFAULT_TICK_S
from .protocol import (
    KIND_PART,
    OP_WORKER_RESTARTED,
    OUT_RESULT,
    OUT_TOKENS,
    PartAssembler,
    StreamOptions,
    envelope_decoder,
    options_encoder,
    result_payload_decoder,
    ring_items,
    tokens_payload_decoder,
)

log = logging.getLogger("streamring.pool")

# Streams in flight at once unless the caller says otherwise: enough to keep a worker busy with
# paced streams, few enough that a burst of opens does not overrun a provider's rate limit.
DEFAULT_CONCURRENCY = 256
# Per stream, the bytes of records kept for replay after a worker crash. Most LLM streams are far
# smaller; a longer one is failed with a retryable `worker_crashed` if its worker dies.
DEFAULT_REPLAY_LOG_BYTES = 1 << 20
# All replay logs of one ingest process together: with the per-stream bound alone, their memory
# would grow with the concurrency limit (1,000 long streams: 1 GiB). Streams whose log does not
# fit are failed the same way if their worker dies.
DEFAULT_REPLAY_LOG_TOTAL = 256 << 20
# How long close() waits for children to exit on their own before terminating them.
_STOP_GRACE_S = 2.0


class PoolBrokenError(StreamError, RuntimeError):
    """A pool process died in a way the pool cannot recover from (an ingest process)."""

    kind = "worker_crashed"


class _CallerStream:
    __slots__ = ("sid", "source_index", "custom_id", "ingest", "worker", "next_seq", "done", "sink",
                 "want_tokens", "terminal_seen", "abandoned")

    def __init__(self, sid: int, source_index: int, custom_id: str | None, ingest: int, worker: int,
                 sink: deque, want_tokens: bool) -> None:
        self.sid = sid
        self.source_index = source_index
        self.custom_id = custom_id
        self.ingest = ingest
        self.worker = worker
        self.next_seq = 0
        self.done = False
        self.sink = sink
        self.want_tokens = want_tokens
        self.terminal_seen = False
        self.abandoned = False


def _to_source(src: Request | Replay) -> Source:
    if isinstance(src, Request):
        return Source(src.url, src.method, list(src.headers.items()), src.body)
    if isinstance(src, Replay):
        rs = src.read_size
        read_size = 0 if rs == "event" else -1 if rs == "recorded" else int(rs)
        return Source(
            replay_path=src.path,
            replay_bytes=None if src.path is not None else src.source,
            read_size=read_size,
            pace=float(src.pace or 0.0),
        )
    raise TypeError(f"a pool source is a Request or a Replay, not {type(src).__name__}")


class StreamHandle:
    """One stream submitted to a long-lived pool: iterate its tokens (sync or async), wait for
    its result, or cancel it."""

    def __init__(self, pool: "Pool", stream: _CallerStream) -> None:
        self._pool = pool
        self._stream = stream
        self._sink = stream.sink
        self._result: StreamResult | None = None

    @property
    def stream_id(self) -> int:
        return self._stream.sid

    @property
    def done(self) -> bool:
        """True once the stream's result has arrived."""
        return self._result is not None

    def _take(self) -> list[StreamToken] | None:
        while self._sink:
            kind, _, payload = self._sink.popleft()
            if kind == OUT_RESULT:
                self._result = payload
                continue
            return payload
        return None

    def __iter__(self) -> Iterator[StreamToken]:
        while True:
            batch = self._take()
            if batch is not None:
                yield from batch
                continue
            if self._result is not None:
                return
            self._pool._pump(block=True)

    async def __aiter__(self) -> AsyncIterator[StreamToken]:
        while True:
            batch = self._take()
            if batch is not None:
                for tok in batch:
                    yield tok
                continue
            if self._result is not None:
                return
            await self._pool._apump()

    def result(self) -> StreamResult:
        """Wait for the stream to end; its StreamResult."""
        for _ in self:
            pass
        assert self._result is not None
        return self._result

    async def aresult(self) -> StreamResult:
        """`result()` for asyncio callers."""
        async for _ in self:
            pass
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        """Stop the stream: its connection is closed and it ends with an Error(kind='cancelled')."""
        self._pool._cancel(self._stream)


class Pool:
    """The multiprocess pipeline for one StreamingPipeline: I ingest processes, K workers."""

    def __init__(
        self,
        pipeline: Any,
        *,
        workers: int | None = None,
        ingest: int = 1,
        concurrency: int = DEFAULT_CONCURRENCY,
        ring_capacity: int = DEFAULT_CAPACITY,
        replay_log_bytes: int = DEFAULT_REPLAY_LOG_BYTES,
        replay_log_total: int = DEFAULT_REPLAY_LOG_TOTAL,
        start_method: str = "forkserver",
        respawn: bool = True,
        track_latency: bool = False,
        linger_ms: float = DEFAULT_TICK_S * 1000,
    ) -> None:
        if workers is None:
            workers = max(1, (os.cpu_count() or 2) - ingest)
        if workers < 1 or ingest < 1:
            raise ValueError("a pool needs at least one worker and one ingest process")
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if not 0 <= linger_ms <= 100:
            raise ValueError("linger_ms must be between 0 and 100")
        # Most a read may wait in a lingering ingest or worker while reads trickle in (see
        # workers/linger.py); 0 turns lingering off.
        self.linger_s = linger_ms / 1000.0
        self.pipeline = pipeline
        self.workers = workers
        self.ingest = ingest
        self.concurrency = concurrency
        self.ring_capacity = ring_capacity
        self.replay_log_bytes = replay_log_bytes
        self.replay_log_total = replay_log_total
        self.start_method = start_method
        self.respawn = respawn
        self.respawns = 0
        self.registry = MetricsRegistry()
        self._rings: list[Ring] = []
        self._sub: list[Ring] = []
        self._events: list[list[Ring]] = []
        self._controls: list[list[Ring]] = []
        self._outputs: list[Ring] = []
        self._worker_procs: list[Any] = []
        self._ingest_procs: list[Any] = []
        self._streams: dict[int, _CallerStream] = {}
        self._ids = itertools.count(0)
        self._codec = RecordCodec()
        self._started = False
        self._closed = False
        self._broken: PoolBrokenError | None = None
        self._ctx: Any = None
        # Per ingest: ring items (opens, their continuation parts, controls) in the order they
        # must reach the submission ring; a payload's parts are never interleaved with others.
        self._sub_queues: list[deque] = []
        self._out_parts: list[PartAssembler] = []
        # Read-to-caller latency probes (ns per token batch) when `track_latency` is on.
        self.latencies_ns: list[int] | None = [] if track_latency else None

    # --- life cycle --------------------------------------------------------------------------

    def __enter__(self) -> "Pool":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Create the rings and start every process (done by `with pool`)."""
        if self._started:
            return
        check_platform()
        cleanup_stale_segments()  # what an owner killed with SIGKILL may have left
        self._started = True
        try:
            cap = self.ring_capacity
            I, K = self.ingest, self.workers
            self._sub = [self._ring(cap) for _ in range(I)]
            self._events = [[self._ring(cap) for _ in range(K)] for _ in range(I)]
            # Controls are a few bytes each: a small ring is plenty.
            self._controls = [[self._ring(max(16384, cap // 16)) for _ in range(K)] for _ in range(I)]
            self._outputs = [self._ring(cap) for _ in range(K)]
            self._sub_queues = [deque() for _ in range(I)]
            self._out_parts = [PartAssembler() for _ in range(K)]
            ctx = multiprocessing.get_context(self.start_method)
            if self.start_method == "forkserver":
                ctx.set_forkserver_preload(["workers.worker", "workers.ingest"])
            self._ctx = ctx
            self._worker_procs = [self._spawn_worker(k) for k in range(K)]
            self._ingest_procs = [self._spawn_ingest(j) for j in range(I)]
        except BaseException:
            self.close()
            raise

    def _ring(self, capacity: int) -> Ring:
        ring = Ring.create(capacity)
        self._rings.append(ring)
        return ring

    def _spawn_worker(self, k: int) -> Any:
        from .worker import worker_main

        proc = self._ctx.Process(
            target=worker_main,
            name=f"streamring-worker-{k}",
            args=(
                k,
                self.pipeline,
                [self._events[j][k].handle() for j in range(self.ingest)],
                [self._controls[j][k].handle() for j in range(self.ingest)],
                self._outputs[k].handle(),
                os.getpid(),
                self.linger_s,
            ),
            daemon=True,
        )
        proc.start()
        return proc

    def _spawn_ingest(self, j: int) -> Any:
        from .ingest import ingest_main

        proc = self._ctx.Process(
            target=ingest_main,
            name=f"streamring-ingest-{j}",
            args=(
                j,
                self.pipeline,
                self._sub[j].handle(),
                [self._events[j][k].handle() for k in range(self.workers)],
                [self._controls[j][k].handle() for k in range(self.workers)],
                self.replay_log_bytes,
                self.ingest,
                os.getpid(),
                self.linger_s,
                self.replay_log_total,
            ),
            daemon=True,
        )
        proc.start()
        return proc

    def close(self) -> None:
        """Stop every process and unlink every ring (idempotent; also on errors and Ctrl-C)."""
        if self._closed:
            return
        self._closed = True
        procs = self._ingest_procs + self._worker_procs
        try:
            for j, ring in enumerate(self._sub):
                # Half-sent parts of a large open would swallow the shutdown: close the ring
                # instead (the ingest stops on either).
                if not self._sub_queues or not self._sub_queues[j]:
                    ring.try_write(*self._codec.encode(Control(OP_SHUTDOWN)))
                ring.close_producer()
            for j, p in enumerate(self._ingest_procs):
                if not p.is_alive():
                    # A dead ingest never closes its event rings: do it for it, so its workers
                    # see the end instead of waiting out the grace period.
                    for ring in self._events[j]:
                        ring.close_producer()
            deadline = time.monotonic() + _STOP_GRACE_S
            while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
                # Keep draining outputs: a worker blocked on a full output ring could not exit.
                for ring in self._outputs:
                    if ring.read_available():
                        ring.release()
                wait_any(self._outputs, 0.02, [p.sentinel for p in procs if p.is_alive()][:1])
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(1.0)
                if p.is_alive():
                    p.kill()
                    p.join(1.0)
        finally:
            for p in procs:
                try:
                    p.close()
                except ValueError:
                    pass
            for ring in self._rings:
                ring.close()
            self._rings.clear()

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the workers (replacements included)."""
        return [p.pid for p in self._worker_procs]

    @property
    def ingest_pids(self) -> list[int]:
        """Process ids of the ingest processes."""
        return [p.pid for p in self._ingest_procs]

    def metrics(self) -> Any:
        """Metrics of every stream this pool finished, merged across its processes."""
        return self.registry.snapshot()

    # --- submitting --------------------------------------------------------------------------

    def _check(self) -> None:
        if self._broken is not None:
            raise self._broken
        if not self._started or self._closed:
            raise RuntimeError("the pool is not running (use it inside `with pipe.pool(...)`)")

    def _open(self, source: Request | Replay, source_index: int, sink: deque, want_tokens: bool) -> _CallerStream:
        self._check()
        sid = next(self._ids)
        k = sid % self.workers
        j = (sid // self.workers) % self.ingest
        dialect = source.dialect or self.pipeline.dialect
        st = _CallerStream(sid, source_index, source.custom_id, j, k, sink, want_tokens)
        opts = StreamOptions(k, want_tokens, time.monotonic_ns(), dialect)
        rec = StreamOpen(sid, source_index, dialect, _to_source(source), source.custom_id,
                         msgspec.Raw(options_encoder.encode(opts)))
        self._streams[sid] = st
        kind, payload = self._codec.encode_bytes(rec)
        q = self._sub_queues[j]
        q.extend(ring_items(kind, payload, self._sub[j].max_entry_payload))
        while not self._flush_sub(j):
            # The ingest is busy: deliver outputs meanwhile (a worker may be waiting on us).
            self._pump(block=True, timeout=0.005)
            self._check()
        return st

    def _flush_sub(self, j: int) -> bool:
        """Write what is queued for ingest j; True when nothing is left."""
        q = self._sub_queues[j]
        ring = self._sub[j]
        while q and ring.try_write(*q[0]):
            q.popleft()
        return not q

    def submit(self, source: Request | Replay) -> StreamHandle:
        """Start one stream now (a gateway's pool); its tokens arrive through the handle."""
        st = self._open(source, -1, deque(), True)
        st.source_index = st.sid
        return StreamHandle(self, st)

    def _cancel(self, st: _CallerStream) -> None:
        if st.done or self._closed:
            return
        self._send_control(st.ingest, Control(OP_CANCEL, st.sid))

    def _send_control(self, j: int, control: Control) -> None:
        self._sub_queues[j].append(self._codec.encode_bytes(control))
        self._flush_sub(j)

    # --- receiving ---------------------------------------------------------------------------

    def _pump(self, block: bool = False, timeout: float | None = 0.5) -> int:
        """Deliver every available output to its stream's sink; optionally wait for one first.
        Returns the number of outputs read."""
        n = self._drain()
        if n or not block:
            return n
        fired = wait_any(self._outputs, timeout, self._sentinels())
        if fired:
            self._on_child_exit()
        return self._drain()

    async def _apump(self) -> int:
        n = self._drain()
        if n:
            return n
        fired = await wait_any_async(self._outputs, 0.5, self._sentinels())
        if fired:
            self._on_child_exit()
        return self._drain()

    def _sentinels(self) -> list[int]:
        return [p.sentinel for p in self._ingest_procs + self._worker_procs]

    def _drain(self) -> int:
        for j, q in enumerate(self._sub_queues):
            if q:
                self._flush_sub(j)
        n = 0
        streams = self._streams
        decode_out = envelope_decoder.decode
        latencies = self.latencies_ns
        for k, ring in enumerate(self._outputs):
            entries = ring.read_available()
            if not entries:
                continue
            if latencies is not None:
                now = time.monotonic_ns()
            for kind, view in entries:
                if kind != KIND_OUTPUT:
                    if kind == KIND_PART:
                        whole = self._out_parts[k].feed(view)
                        view.release()
                        if whole is None or whole[0] != KIND_OUTPUT:
                            continue
                        view = memoryview(whole[1])
                    else:
                        view.release()
                        continue
                else:
                    self._out_parts[k].interrupt()
                out = decode_out(view)
                st = streams.get(out.stream_id)
                if st is None or st.done:
                    del out
                    view.release()
                    continue
                if out.kind == OUT_TOKENS:
                    if out.seq == st.next_seq:
                        st.next_seq += 1
                        if latencies is not None and out.read_ns:
                            latencies.append(now - out.read_ns)
                        tokens = tokens_payload_decoder.decode(out.payload)
                        if tokens and type(tokens[-1]) in (Done, Error):
                            st.terminal_seen = True
                        if not st.abandoned:
                            st.sink.append((OUT_TOKENS, st, tokens))
                        n += 1
                elif out.kind == OUT_RESULT:
                    result = result_payload_decoder.decode(out.payload)
                    self._finish(st, result)
                    n += 1
                del out
                view.release()
            ring.release()
        return n

    def _finish(self, st: _CallerStream, result: StreamResult) -> None:
        st.done = True
        del self._streams[st.sid]
        result.stream_id = st.sid
        result.source_index = st.source_index
        result.custom_id = st.custom_id
        if isinstance(result.metrics, dict):
            result.metrics = msgspec.convert(result.metrics, StreamMetricsSnapshot)
        if result.metrics is not None:
            self.registry.record(result.metrics, result)
        if st.abandoned:
            return
        if st.want_tokens and not st.terminal_seen:
            # The stream ended without its terminal token reaching us (its worker crashed and it
            # could not be replayed): the last batch still ends with its Error.
            err = result.error
            term = Error(err.kind, err.message, err.retryable, err.http_status, err.retry_after) if err else Done(result.finish_reason, result.finish or "stop")
            st.sink.append((OUT_TOKENS, st, [term]))
        st.sink.append((OUT_RESULT, st, result))

    def _on_child_exit(self) -> None:
        for j, p in enumerate(self._ingest_procs):
            if not p.is_alive():
                self._broken = PoolBrokenError(
                    f"ingest process {j} (pid {p.pid}) exited with code {p.exitcode}; its streams are lost",
                    kind="worker_crashed",
                )
                raise self._broken
        for k, p in enumerate(self._worker_procs):
            if p.is_alive():
                continue
            if not self.respawn or self._closed:
                self._broken = PoolBrokenError(f"worker {k} (pid {p.pid}) exited with code {p.exitcode}")
                raise self._broken
            log.warning("worker %d (pid %d) exited with code %s; starting a replacement", k, p.pid, p.exitcode)
            p.join(0)
            p.close()
            self._worker_procs[k] = self._spawn_worker(k)
            self.respawns += 1
            for j in range(self.ingest):
                self._send_control(j, Control(OP_WORKER_RESTARTED, k))

    # --- the entry points ----------------------------------------------------------------------

    def run(self, sources: Iterable[Request | Replay], *, concurrency: int | None = None) -> Iterator[StreamResult]:
        """StreamResults, one per source, as each stream finishes. Sources are read lazily,
        at most `concurrency` in flight; closing the iterator cancels what is still running."""
        feed = _Feed(self, sources, concurrency or self.concurrency, want_tokens=False)
        try:
            while True:
                feed.top_up()
                finished = False
                for kind, _, payload in feed.take():
                    if kind == OUT_RESULT:
                        finished = True
                        yield payload
                if feed.done:
                    return
                if not finished:  # (after a finish, refill the in-flight set before waiting)
                    self._check()
                    self._pump(block=True)
        finally:
            feed.cancel_rest()

    async def astream(self, sources: Iterable[Request | Replay], *, concurrency: int | None = None
                      ) -> AsyncIterator[tuple[int, list[StreamToken]]]:
        """`(source_index, tokens)` batches as they arrive; each stream's last batch ends with its
        Done or Error. Every token arrives exactly once."""
        feed = _Feed(self, sources, concurrency or self.concurrency, want_tokens=True)
        try:
            while True:
                feed.top_up()
                finished = False
                for kind, st, payload in feed.take():
                    if kind == OUT_RESULT:
                        finished = True
                    else:
                        yield st.source_index, payload
                if feed.done:
                    return
                if not finished:  # (after a finish, refill the in-flight set before waiting)
                    self._check()
                    await self._apump()
        finally:
            feed.cancel_rest()


class _Feed:
    """One `run`/`astream` call's sources: read lazily, kept at most `limit` in flight, their
    outputs collected in a sink of their own."""

    def __init__(self, pool: Pool, sources: Iterable[Request | Replay], limit: int, *, want_tokens: bool) -> None:
        self._pool = pool
        self._sources = enumerate(sources)
        self._limit = limit
        self._want_tokens = want_tokens
        self._sink: deque = deque()
        self._inflight: dict[int, _CallerStream] = {}
        self._exhausted = False

    def top_up(self) -> None:
        """Open sources until `limit` are in flight or none is left."""
        while not self._exhausted and len(self._inflight) < self._limit:
            nxt = next(self._sources, None)
            if nxt is None:
                self._exhausted = True
                return
            st = self._pool._open(nxt[1], nxt[0], self._sink, self._want_tokens)
            self._inflight[st.sid] = st

    def take(self) -> Iterator[tuple[int, _CallerStream, Any]]:
        """The outputs delivered so far, (kind, stream, payload); a result ends its stream."""
        sink = self._sink
        while sink:
            item = sink.popleft()
            if item[0] == OUT_RESULT:
                self._inflight.pop(item[1].sid, None)
            yield item

    @property
    def done(self) -> bool:
        """Every source was opened and has finished."""
        return self._exhausted and not self._inflight

    def cancel_rest(self) -> None:
        """Cancel what is still running (the caller stopped early) and drop its outputs."""
        for st in self._inflight.values():
            st.abandoned = True
            self._pool._cancel(st)
