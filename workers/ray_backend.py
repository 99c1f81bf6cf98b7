"""The pool on a Ray cluster: one actor per node (or `actors_per_node`) runs a local `Pool`
(ingest, workers and rings on that node); the caller shards sources across the actors and gets
results, token batches and metrics back through Ray in batches, never per token.

    with pipe.pool(backend="ray", address="auto") as pool:      # needs `streamring[ray]`
        for result in pool.run(sources): ...

Transport (why a pull method and not a Ray streaming generator): the caller keeps exactly one
`exchange()` call outstanding per actor. Each call carries the sources the actor should start
next (lazily, at most `2 * concurrency` unresolved per actor, so a million-line JSONL file is
never shipped at once) and returns whatever finished since the last call, after a short linger
so that busy actors answer with large batches. One RPC per batch, in both directions, and the
caller can feed, re-route and cancel work between batches, which a one-shot streaming generator
cannot. Replies are numbered and held by the actor until the caller acknowledges them with its
next call, so a reply lost to a transient `ActorUnavailableError` is sent again, and sources
are deduplicated by id on the actor, so re-sending a call is harmless. Payloads both ways are
msgspec msgpack (sources are tagged Structs, results and tokens the ring's own types): Ray
carries bytes, never pickles of our records.

Failure: an actor that dies (or whose pool breaks) is killed and dropped; its unresolved sources
go to the next live actor in ring order. In `run()` results come whole, so every one of them
re-runs. In `astream()` a stream that delivered nothing re-runs; a Replay re-runs and the tokens
already delivered are skipped (its tokens are a function of its bytes); an HTTP stream that
delivered tokens ends with `Error(kind="worker_crashed", retryable=True)` (re-sending could bill
twice and would repeat text). A source re-run more than `max_attempts` times, or left with no
live actor, fails the same way. Ray kills a dead worker's child processes, including our segment
guardian, so the caller also runs a small cleanup task on that node that unlinks the dead
owner's /dev/shm segments.

Ray is imported here only: the single-machine pipeline never imports this module.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, Union

import msgspec

try:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("backend='ray' needs Ray: pip install 'streamring[ray]'") from exc
try:
    from ray.exceptions import ActorUnavailableError
except ImportError:  # pragma: no cover - Ray before 2.31 has no transient actor error

    class ActorUnavailableError(RayActorError):  # type: ignore[no-redef]
        """Never raised by this Ray version."""

from pipeline.metrics import MetricsRegistry, MetricsSnapshot, StreamMetricsSnapshot
from pipeline.sources import Replay, Request
from pipeline.tokens import Done, Error, ErrorResult, StreamResult, StreamToken

from .pool import DEFAULT_CONCURRENCY, Pool, PoolBrokenError

__all__ = ["RayPool", "default_shard_key"]

log = logging.getLogger("streamring.ray")

# How long an idle exchange waits on the actor for something to report before answering empty:
# bounds how late a newly read source reaches an actor whose streams are all still running.
DEFAULT_EXCHANGE_WAIT_S = 0.1
# After the first output is ready, how long the actor lingers for more before answering: a busy
# actor then answers with one large batch instead of many one-result RPCs.
DEFAULT_LINGER_S = 0.002
# How often (at most) an actor attaches its pool's metrics to a reply, so an actor lost mid-run
# still contributes what it reported.
DEFAULT_METRICS_INTERVAL_S = 1.0
# Attempts per source across actor losses before it is reported failed.
DEFAULT_MAX_ATTEMPTS = 3
# Re-sends of one call when Ray says the actor is only temporarily unavailable.
_UNAVAILABLE_RETRIES = 5

Source = Union[Request, Replay]
_TERMINAL = (Done, Error)


# --- the wire between the caller and its actors (msgspec, never pickles of our records) ---------


class _Items(msgspec.Struct, array_like=True):
    """Sources for an actor: (stream id, source) pairs."""

    items: list[tuple[int, Source]]


class _Reply(msgspec.Struct, array_like=True):
    """One batch from an actor. `results` (run mode: source_index holds the stream id) or
    `tokens` ((stream id, tokens) batches); `error` when its pool broke."""

    seq: int
    run_id: int
    results: list[StreamResult] = []
    tokens: list[tuple[int, list[StreamToken]]] = []
    error: str | None = None
    metrics: MetricsSnapshot | None = None


_items_encoder = msgspec.msgpack.Encoder()
_items_decoder = msgspec.msgpack.Decoder(_Items)
_reply_encoder = msgspec.msgpack.Encoder()
_reply_decoder = msgspec.msgpack.Decoder(_Reply)
_metrics_decoder = msgspec.msgpack.Decoder(MetricsSnapshot)

_END = object()  # in an actor's inbox: the caller has no more sources for this run (for now)


# --- the actor --------------------------------------------------------------------------------


class PoolActor:
    """Runs one local Pool on its node (in a thread of its own: the pool is single-threaded)
    and trades batches with the RayPool through `exchange()`."""

    def __init__(self, pipeline: Any, pool_options: dict[str, Any], linger_s: float, metrics_interval_s: float) -> None:
        self._pipeline = pipeline
        self._pool_options = pool_options
        self._linger_s = linger_s
        self._metrics_interval_s = metrics_interval_s
        self._cond = threading.Condition()
        self._inbox: deque = deque()  # (run_id, mode, sid, source) or (run_id, _END)
        self._outbox: list = []  # StreamResults or (sid, tokens) of the current run
        self._run_id = -1
        self._concurrency: dict[int, int] = {}  # per run: the pool's streams in flight
        self._seen: set[int] = set()  # stream ids received in the current run (re-sends are dropped)
        self._cancelled = -1  # the run the caller abandoned
        self._seq = 0
        self._held: bytes | None = None  # the last reply, until acknowledged
        self._error: str | None = None
        self._busy = False  # the driver is inside a run
        self._stop = False
        self._metrics: MetricsSnapshot | None = None
        self._metrics_sent: MetricsSnapshot | None = None
        self._metrics_at = 0.0
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._pool: Pool | None = None
        self._thread = threading.Thread(target=self._drive, name="streamring-ray-driver", daemon=True)
        self._thread.start()

    # --- called by the RayPool (Ray's thread) --------------------------------------------------

    def ready(self) -> dict[str, Any]:
        """Wait for the local pool to start; where it runs (node, pids)."""
        self._ready.wait()
        if self._start_error is not None:
            raise self._start_error
        pool = self._pool
        assert pool is not None
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "worker_pids": pool.worker_pids,
            "ingest_pids": pool.ingest_pids,
            "workers": pool.workers,
            "ingest": pool.ingest,
        }

    def exchange(self, run_id: int, mode: str, concurrency: int, ack: int, items: bytes | None, end: bool,
                 wait_s: float) -> bytes:
        """Take sources (and "no more for now" when `end`), then answer with what finished since
        the last reply: at once when something is ready, else after at most `wait_s`."""
        with self._cond:
            self._concurrency = {run_id: concurrency}
            if run_id != self._run_id:
                if self._run_id >= 0:
                    self._cancelled = self._run_id  # the caller moved on: abandon what is left
                    self._inbox = deque(it for it in self._inbox if it[0] > self._cancelled)
                self._run_id = run_id
                self._seen = set()
                self._outbox = []
                self._held = None
            if items:
                for sid, source in _items_decoder.decode(items).items:
                    if sid not in self._seen:
                        self._seen.add(sid)
                        self._inbox.append((run_id, mode, sid, source))
            if end:
                self._inbox.append((run_id, _END))
            self._cond.notify_all()
            if self._held is not None and ack < self._seq:
                return self._held  # the caller never got it: send it again
            deadline = time.monotonic() + wait_s
            while not self._outbox and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._outbox and self._linger_s > 0:
                # Let a busy pool add to the batch (the driver notifies on every output).
                until = time.monotonic() + self._linger_s
                while (left := until - time.monotonic()) > 0:
                    self._cond.wait(left)
            out, self._outbox = self._outbox, []
            metrics = None
            if self._metrics is not None and self._metrics is not self._metrics_sent:
                metrics = self._metrics_sent = self._metrics
            self._seq += 1
            if mode == "run":
                reply = _Reply(self._seq, run_id, results=out, error=self._error, metrics=metrics)
            else:
                reply = _Reply(self._seq, run_id, tokens=out, error=self._error, metrics=metrics)
            self._held = _reply_encoder.encode(reply)
            return self._held

    def cancel(self, run_id: int) -> None:
        """The caller abandoned `run_id`: drop its queued sources and cancel its streams."""
        with self._cond:
            self._cancelled = max(self._cancelled, run_id)
            self._inbox = deque(it for it in self._inbox if it[0] != run_id)
            if self._run_id == run_id:
                self._outbox = []
            self._cond.notify_all()

    def metrics(self, timeout: float = 2.0) -> bytes | None:
        """The pool's merged metrics (msgpack MetricsSnapshot), once the current run settles."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._busy or self._inbox) and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            snap = self._metrics
        return None if snap is None else _reply_encoder.encode(snap)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the driver and close the pool (its processes stop, its segments are unlinked)."""
        with self._cond:
            self._stop = True
            self._cancelled = self._run_id
            self._cond.notify_all()
        self._thread.join(timeout)

    # --- the driver thread ---------------------------------------------------------------------

    def _drive(self) -> None:
        try:
            pool = Pool(self._pipeline, **self._pool_options)
            pool.start()
        except BaseException as exc:  # reported by ready()
            self._start_error = exc
            self._ready.set()
            return
        self._pool = pool
        self._take_metrics(force=True)
        self._ready.set()
        try:
            while True:
                with self._cond:
                    while not self._inbox and not self._stop:
                        self._cond.wait()
                    if self._stop:
                        return
                    head = self._inbox[0]
                    if len(head) == 2 or head[0] <= self._cancelled:
                        self._inbox.popleft()  # an END with nothing before it, or an abandoned run's
                        continue
                    run_id, mode = head[0], head[1]
                    self._busy = True
                try:
                    concurrency = self._concurrency.get(run_id)
                    if mode == "run":
                        self._run_results(pool, run_id, concurrency)
                    else:
                        asyncio.run(self._run_tokens(pool, run_id, concurrency))
                except BaseException as exc:  # the pool broke: the caller drops this actor
                    log.warning("the pool of this actor broke: %r", exc)
                    with self._cond:
                        self._error = f"{type(exc).__name__}: {exc}"
                        self._cond.notify_all()
                    return
                finally:
                    self._take_metrics(force=True)
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()
        finally:
            pool.close()

    def _sources(self, run_id: int, sids: dict[int, int]) -> Iterator[Source]:
        """The run's sources as the caller sends them; ends at its END, at another run's first
        source, or when cancelled. Blocks while the caller has sent nothing new: the caller keeps
        up to 2 * concurrency unresolved, so this only waits one round trip when it falls behind."""
        local = 0
        while True:
            with self._cond:
                while not self._inbox and not self._stop and self._cancelled < run_id:
                    self._cond.wait()
                if self._stop or self._cancelled >= run_id:
                    return
                item = self._inbox[0]
                if item[0] != run_id:
                    return
                self._inbox.popleft()
            if len(item) == 2:
                return
            sids[local] = item[2]
            local += 1
            yield item[3]

    def _push(self, run_id: int, out: Any) -> None:
        with self._cond:
            if run_id == self._run_id and self._cancelled < run_id:
                self._outbox.append(out)
                self._cond.notify_all()

    def _take_metrics(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._metrics_at < self._metrics_interval_s:
            return
        assert self._pool is not None
        snap = self._pool.metrics()
        self._metrics_at = now
        with self._cond:
            self._metrics = snap

    def _run_results(self, pool: Pool, run_id: int, concurrency: int | None) -> None:
        sids: dict[int, int] = {}
        gen = pool.run(self._sources(run_id, sids), concurrency=concurrency)
        try:
            for result in gen:
                result.source_index = sids.pop(result.source_index)
                self._push(run_id, result)
                self._take_metrics()
                if self._cancelled >= run_id or self._stop:
                    break
        finally:
            gen.close()  # cancels what is still running

    async def _run_tokens(self, pool: Pool, run_id: int, concurrency: int | None) -> None:
        sids: dict[int, int] = {}
        agen = pool.astream(self._sources(run_id, sids), concurrency=concurrency)
        try:
            async for local, tokens in agen:
                sid = sids[local]
                if tokens and type(tokens[-1]) in _TERMINAL:
                    del sids[local]
                    self._take_metrics()
                self._push(run_id, (sid, tokens))
                if self._cancelled >= run_id or self._stop:
                    break
        finally:
            await agen.aclose()


def _remove_dead_owner_segments(pid: int, wait_s: float = 10.0) -> list[str]:
    """On the dead actor's node: unlink the /dev/shm segments that `pid` created once it has
    exited (Ray kills its children, the segment guardian among them, so nobody else will)."""
    import psutil

    from shm.segment import PREFIX, SHM_DIR, cleanup_stale_segments

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break  # exited; only its parent has not reaped it yet
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    else:
        return []  # still running: not ours to clean
    removed = []
    prefix = f"{PREFIX}{pid}-"
    for name in os.listdir(SHM_DIR):
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed + cleanup_stale_segments()


# --- the caller -------------------------------------------------------------------------------


def default_shard_key(index: int, source: Source) -> int:
    """The stable shard key: a CRC-32 of the source's custom_id when it has one (the same
    request goes to the same actor whatever its position), else its index in the run."""
    cid = source.custom_id
    return zlib.crc32(cid.encode()) if cid is not None else index


def _retrieve(fut: Any) -> None:
    # The reply is read with ray.get; this only keeps asyncio from logging a dropped future's error.
    if not fut.cancelled():
        fut.exception()


class _Slot:
    """One actor position: its handle while alive, and what the current run left with it."""

    __slots__ = ("index", "node_id", "actor", "info", "alive", "pending", "outstanding", "ref", "fut",
                 "ack", "used", "end_sent", "last_call", "unavailable", "metrics")

    def __init__(self, index: int, node_id: str) -> None:
        self.index = index
        self.node_id = node_id
        self.actor: Any = None
        self.info: dict[str, Any] = {}
        self.alive = False
        self.metrics: MetricsSnapshot | None = None
        self.reset()

    def reset(self) -> None:
        self.pending: deque[int] = deque()  # stream ids assigned, not sent yet
        self.outstanding: set[int] = set()  # sent, not resolved
        self.ref: Any = None  # the outstanding exchange call
        self.fut: Any = None  # its asyncio future (astream)
        self.ack = 0
        self.used = False  # sources were sent in this run
        self.end_sent = False
        self.last_call: tuple | None = None
        self.unavailable = 0


class _Item:
    __slots__ = ("index", "source", "custom_id", "key", "attempts", "delivered", "skip")

    def __init__(self, index: int, source: Source, key: int) -> None:
        self.index = index
        self.source = source
        self.custom_id = source.custom_id
        self.key = key
        self.attempts = 1
        self.delivered = 0  # tokens handed to the caller (astream)
        self.skip = 0  # tokens of a re-run replay to drop (already delivered)


class _Run:
    """The state of one `run()` / `astream()` over the actors."""

    def __init__(self, run_id: int, mode: str, sources: Iterable[Source], concurrency: int) -> None:
        self.id = run_id
        self.mode = mode
        self.sources = enumerate(sources)
        self.exhausted = False
        self.concurrency = concurrency  # streams in flight per actor
        # Unresolved sources per actor: its pool runs `concurrency` streams and as many wait in
        # its inbox, so it does not starve for the length of a round trip.
        self.limit = 2 * concurrency
        self.items: dict[int, _Item] = {}
        self.outputs: deque = deque()

    @property
    def finished(self) -> bool:
        return self.exhausted and not self.items


class RayPool:
    """The multiprocess pipeline on a Ray cluster: a local Pool per actor, `actors_per_node`
    actors on every alive node with CPUs. `run`, `astream` and `metrics` behave as the local
    Pool's; `concurrency` is per actor (each node has its own network and cores)."""

    def __init__(
        self,
        pipeline: Any,
        *,
        workers: int | None = None,
        ingest: int = 1,
        address: str | None = None,
        actors_per_node: int = 1,
        concurrency: int = DEFAULT_CONCURRENCY,
        shard_key: Callable[[int, Source], int] = default_shard_key,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        exchange_wait_s: float = DEFAULT_EXCHANGE_WAIT_S,
        linger_s: float = DEFAULT_LINGER_S,
        metrics_interval_s: float = DEFAULT_METRICS_INTERVAL_S,
        init_options: dict[str, Any] | None = None,
        actor_options: dict[str, Any] | None = None,
        **pool_options: Any,
    ) -> None:
        if actors_per_node < 1:
            raise ValueError("actors_per_node must be >= 1")
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.pipeline = pipeline
        self.workers = workers
        self.ingest = ingest
        self.address = address
        self.actors_per_node = actors_per_node
        self.concurrency = concurrency
        self.shard_key = shard_key
        self.max_attempts = max_attempts
        self.exchange_wait_s = exchange_wait_s
        self.linger_s = linger_s
        self.metrics_interval_s = metrics_interval_s
        self.init_options = dict(init_options or {})
        self.actor_options = dict(actor_options or {})
        self.pool_options = pool_options
        self.lost_actors = 0
        self._slots: list[_Slot] = []
        self._lost_metrics: list[MetricsSnapshot] = []
        self._cleanups: list[Any] = []
        self._ids = itertools.count(0)
        self._run_ids = itertools.count(0)
        self._active: _Run | None = None
        self._owns_ray = False
        self._started = False
        self._closed = False
        self._pipeline_ref: Any = None
        self._actor_cls: Any = None
        self._cleanup_task: Any = None

    # --- life cycle ------------------------------------------------------------------------------

    def __enter__(self) -> "RayPool":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Connect to Ray (starting a local instance when none is given) and start the actors."""
        if self._started:
            return
        self._started = True
        try:
            if not ray.is_initialized():
                ray.init(address=self.address, **self.init_options)
                self._owns_ray = True
            nodes = sorted(
                (n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0),
                key=lambda n: n["NodeID"],
            )
            if not nodes:
                raise RuntimeError("the Ray cluster has no alive node with CPUs")
            self._cpus = {n["NodeID"]: int(n["Resources"]["CPU"]) for n in nodes}
            self._pipeline_ref = ray.put(self.pipeline)
            self._actor_cls = ray.remote(PoolActor)
            self._cleanup_task = ray.remote(_remove_dead_owner_segments)
            node_ids = [n["NodeID"] for n in nodes for _ in range(self.actors_per_node)]
            self._slots = [_Slot(i, node_id) for i, node_id in enumerate(node_ids)]
            self._spawn(self._slots)
        except BaseException:
            self.close()
            raise

    def _pool_options_for(self, node_id: str) -> dict[str, Any]:
        opts = dict(self.pool_options, ingest=self.ingest, concurrency=self.concurrency)
        workers = self.workers
        if workers is None:
            # The node's CPUs shared by its actors, less their ingest processes.
            workers = max(1, self._cpus.get(node_id, 2) // self.actors_per_node - self.ingest)
        opts["workers"] = workers
        return opts

    def _spawn(self, slots: list[_Slot]) -> None:
        for slot in slots:
            options = dict(num_cpus=0, max_restarts=0, max_concurrency=1,
                           scheduling_strategy=NodeAffinitySchedulingStrategy(slot.node_id, soft=False))
            options.update(self.actor_options)
            slot.actor = self._actor_cls.options(**options).remote(
                self._pipeline_ref, self._pool_options_for(slot.node_id), self.linger_s, self.metrics_interval_s)
        infos = ray.get([s.actor.ready.remote() for s in slots])
        for slot, info in zip(slots, infos):
            slot.info = info
            slot.alive = True
            slot.metrics = None

    def close(self) -> None:
        """Stop every actor (each closes its pool) and disconnect from Ray if we connected."""
        if self._closed:
            return
        self._closed = True
        try:
            live = [s for s in self._slots if s.alive and s.actor is not None]
            if live and ray.is_initialized():
                refs = {s.actor.shutdown.remote(): s for s in live}
                ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=10)
                stopped = set()
                for ref in ready:
                    try:
                        ray.get(ref)
                        stopped.add(refs[ref].index)
                    except Exception:  # it died meanwhile: cleaned up below like a lost one
                        pass
                for s in live:
                    s.alive = False
                    try:
                        ray.kill(s.actor)
                    except Exception:
                        pass
                    if s.index not in stopped:
                        self._clean_node_of(s)
            if self._cleanups and ray.is_initialized():
                ray.wait(self._cleanups, num_returns=len(self._cleanups), timeout=15)
        finally:
            self._slots_actors_dropped()
            if self._owns_ray:
                ray.shutdown()

    def _slots_actors_dropped(self) -> None:
        for s in self._slots:
            s.actor = None
            s.ref = s.fut = None

    @property
    def actors(self) -> list[Any]:
        """The live actors' handles, by slot (a slot's actor is replaced between runs)."""
        return [s.actor for s in self._slots if s.alive]

    @property
    def actor_info(self) -> list[dict[str, Any]]:
        """Per live actor: node id, its pid, its pool's worker and ingest pids."""
        return [dict(s.info) for s in self._slots if s.alive]

    def slot_for(self, index: int, source: Source) -> int:
        """The slot (position in `actors` while all are alive) that `source` at `index` goes to."""
        return self.shard_key(index, source) % len(self._slots)

    def metrics(self) -> MetricsSnapshot:
        """Metrics of every stream the actors finished, merged: live actors are asked now (once
        their current run settles), lost ones contribute their last report."""
        registry = MetricsRegistry()
        for snap in self._lost_metrics:
            registry.merge(snap)
        live = [s for s in self._slots if s.alive]
        refs = [s.actor.metrics.remote() for s in live]
        for slot, ref in zip(live, refs):
            try:
                data = ray.get(ref, timeout=30)
            except (RayActorError, GetTimeoutError):
                data = None  # its last report stands
            if data is not None:
                slot.metrics = _metrics_decoder.decode(data)
            if slot.metrics is not None:
                registry.merge(slot.metrics)
        return registry.snapshot()

    # --- the run loop (shared by run and astream) -------------------------------------------

    def _begin(self, sources: Iterable[Source], mode: str, concurrency: int | None) -> _Run:
        if not self._started or self._closed:
            raise RuntimeError("the pool is not running (use it inside `with pipe.pool(backend='ray', ...)`)")
        if self._active is not None:
            raise RuntimeError("a RayPool runs one run()/astream() at a time")
        # Replace actors lost in an earlier run, on nodes that are still alive.
        alive_nodes = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        dead = [s for s in self._slots if not s.alive and s.node_id in alive_nodes]
        if dead:
            self._spawn(dead)
        if not any(s.alive for s in self._slots):
            raise PoolBrokenError("no Ray actor is alive")
        for s in self._slots:
            s.reset()
        run = _Run(next(self._run_ids), mode, sources, concurrency or self.concurrency)
        self._active = run
        return run

    def _end(self, run: _Run) -> None:
        self._active = None
        for s in self._slots:
            if not s.alive or not s.used:
                continue
            try:
                if not run.finished:
                    s.actor.cancel.remote(run.id)  # abandoned: stop its streams
                elif not s.end_sent:
                    # Its last results came before it was told "no more": tell it now, so its
                    # pool.run ends (fire and forget; the reply is empty).
                    s.actor.exchange.remote(run.id, run.mode, run.concurrency, s.ack, None, True, 0.0)
            except Exception:
                pass
            s.ref = s.fut = None

    def _live(self) -> list[_Slot]:
        return [s for s in self._slots if s.alive]

    def _assign(self, sid: int, item: _Item, start: int | None = None) -> bool:
        """Queue `sid` on its slot, or the next live one in ring order; False when none lives."""
        n = len(self._slots)
        first = item.key % n if start is None else start
        for step in range(n):
            slot = self._slots[(first + step) % n]
            if slot.alive:
                slot.pending.append(sid)
                return True
        return False

    def _fill(self, run: _Run) -> None:
        live = self._live()
        if not live:
            return
        # Read only what the next calls can send: the actors' free room (plus one each, so a
        # full actor's next source does not stop the others from filling).
        budget = sum(max(0, run.limit - len(s.outstanding)) + 1 for s in live)
        queued = sum(len(s.pending) for s in live)
        while not run.exhausted and queued < budget:
            nxt = next(run.sources, None)
            if nxt is None:
                run.exhausted = True
                break
            index, source = nxt
            if not isinstance(source, (Request, Replay)):
                raise TypeError(f"a pool source is a Request or a Replay, not {type(source).__name__}")
            sid = next(self._ids)
            item = _Item(index, source, self.shard_key(index, source))
            run.items[sid] = item
            self._assign(sid, item)
            queued += 1

    def _issue(self, run: _Run, want_future: bool) -> None:
        for slot in self._slots:
            if not slot.alive or slot.ref is not None:
                continue
            room = run.limit - len(slot.outstanding)
            chunk = []
            while slot.pending and len(chunk) < room:
                chunk.append(slot.pending.popleft())
            if chunk:
                slot.used = True
                slot.end_sent = False
            # "No more for now": lets the actor's pool.run end once its streams are done.
            end = slot.used and run.exhausted and not slot.pending and not slot.end_sent
            if not chunk and not slot.outstanding and not end:
                continue
            slot.outstanding.update(chunk)
            payload = _items_encoder.encode(_Items([(sid, run.items[sid].source) for sid in chunk])) if chunk else None
            slot.end_sent = slot.end_sent or end
            slot.last_call = (run.id, run.mode, run.concurrency, payload, end)
            self._call(slot, want_future)

    def _call(self, slot: _Slot, want_future: bool) -> None:
        assert slot.last_call is not None
        run_id, mode, concurrency, payload, end = slot.last_call
        slot.ref = slot.actor.exchange.remote(run_id, mode, concurrency, slot.ack, payload, end, self.exchange_wait_s)
        slot.fut = None
        if want_future:
            slot.fut = asyncio.wrap_future(slot.ref.future())
            slot.fut.add_done_callback(_retrieve)

    def _on_reply(self, run: _Run, slot: _Slot, want_future: bool) -> None:
        ref, slot.ref, slot.fut = slot.ref, None, None
        try:
            data = ray.get(ref)
        except ActorUnavailableError as exc:
            slot.unavailable += 1
            if slot.unavailable <= _UNAVAILABLE_RETRIES:
                time.sleep(0.05 * slot.unavailable)
                self._call(slot, want_future)  # same sources, same ack: the actor drops repeats
                return
            self._lose(run, slot, f"actor unavailable: {exc}")
            return
        except RayActorError as exc:
            self._lose(run, slot, f"actor died: {type(exc).__name__}")
            return
        slot.unavailable = 0
        reply = _reply_decoder.decode(data)
        slot.ack = reply.seq
        if reply.metrics is not None:
            slot.metrics = reply.metrics
        if reply.run_id != run.id:
            return
        if run.mode == "run":
            self._take_results(run, slot, reply.results)
        else:
            self._take_tokens(run, slot, reply.tokens)
        if reply.error is not None:
            self._lose(run, slot, f"its pool broke: {reply.error}")

    def _take_results(self, run: _Run, slot: _Slot, results: list[StreamResult]) -> None:
        for result in results:
            sid = result.source_index
            if sid not in slot.outstanding:
                continue  # resolved already (cannot happen unless an actor repeats itself)
            slot.outstanding.discard(sid)
            item = run.items.pop(sid)
            result.source_index = item.index
            result.stream_id = sid
            result.custom_id = item.custom_id
            if isinstance(result.metrics, dict):
                result.metrics = msgspec.convert(result.metrics, StreamMetricsSnapshot)
            run.outputs.append(result)

    def _take_tokens(self, run: _Run, slot: _Slot, batches: list[tuple[int, list[StreamToken]]]) -> None:
        for sid, tokens in batches:
            if sid not in slot.outstanding:
                continue
            item = run.items[sid]
            terminal = bool(tokens) and type(tokens[-1]) in _TERMINAL
            if item.skip:
                # A re-run replay: its first `skip` tokens were delivered by the lost actor.
                body = tokens[:-1] if terminal else tokens
                drop = min(item.skip, len(body))
                item.skip -= drop
                tokens = tokens[drop:]
            item.delivered += len(tokens)
            if terminal:
                slot.outstanding.discard(sid)
                del run.items[sid]
            if tokens:
                run.outputs.append((item.index, tokens))

    def _lose(self, run: _Run, slot: _Slot, reason: str) -> None:
        """Drop a dead actor; re-route or fail what it had not resolved."""
        log.warning("Ray actor %d on node %s lost (%s); re-routing %d streams",
                    slot.index, slot.node_id[:12], reason, len(slot.outstanding) + len(slot.pending))
        slot.alive = False
        self.lost_actors += 1
        if slot.metrics is not None:
            self._lost_metrics.append(slot.metrics)
            slot.metrics = None
        try:
            ray.kill(slot.actor)
        except Exception:
            pass
        self._clean_node_of(slot)
        orphans = list(slot.outstanding) + list(slot.pending)
        slot.outstanding.clear()
        slot.pending.clear()
        slot.ref = slot.fut = None
        for sid in orphans:
            item = run.items[sid]
            rerun = run.mode == "run" or item.delivered == 0 or isinstance(item.source, Replay)
            if not rerun:
                self._fail(run, sid, f"its Ray actor was lost after it delivered tokens ({reason})")
                continue
            item.attempts += 1
            if item.attempts > self.max_attempts:
                self._fail(run, sid, f"its Ray actor was lost {self.max_attempts} times ({reason})")
                continue
            item.skip = item.delivered
            if not self._assign(sid, item, start=(slot.index + 1) % len(self._slots)):
                self._fail(run, sid, f"no Ray actor is left ({reason})")

    def _clean_node_of(self, slot: _Slot) -> None:
        """Unlink a killed actor's segments from its node (a task there; see the module doc)."""
        pid = slot.info.get("pid")
        if pid is None:
            return
        if self._cleanups:  # forget the finished ones
            self._cleanups = ray.wait(self._cleanups, num_returns=len(self._cleanups), timeout=0)[1]
        self._cleanups.append(self._cleanup_task.options(
            num_cpus=0, max_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(slot.node_id, soft=False),
        ).remote(pid))

    def _fail(self, run: _Run, sid: int, message: str) -> None:
        item = run.items.pop(sid)
        if run.mode == "run":
            run.outputs.append(StreamResult(
                finish="error",
                error=ErrorResult("worker_crashed", message, True),
                stream_id=sid,
                source_index=item.index,
                custom_id=item.custom_id,
            ))
        else:
            run.outputs.append((item.index, [Error("worker_crashed", message, True)]))

    def _check_broken(self, run: _Run) -> None:
        if not run.finished and not self._live():
            # What was assigned has been reported failed (by _lose); the rest cannot run.
            raise PoolBrokenError("every Ray actor of the pool is lost")

    # --- the entry points -------------------------------------------------------------------------

    def run(self, sources: Iterable[Source], *, concurrency: int | None = None) -> Iterator[StreamResult]:
        """StreamResults, one per source, as each stream finishes (in batches from the actors).
        Sources are read lazily; closing the iterator cancels what is still running."""
        run = self._begin(sources, "run", concurrency)
        try:
            while True:
                self._fill(run)
                self._issue(run, False)
                while run.outputs:
                    yield run.outputs.popleft()
                if run.finished:
                    return
                self._check_broken(run)
                waiting = {s.ref: s for s in self._slots if s.ref is not None}
                if not waiting:
                    continue
                refs = list(waiting)
                ready, rest = ray.wait(refs, num_returns=1)
                if rest:  # take every reply that is already in, not just the first
                    ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
                for ref in ready:
                    self._on_reply(run, waiting[ref], False)
        finally:
            self._end(run)

    async def astream(self, sources: Iterable[Source], *, concurrency: int | None = None
                      ) -> AsyncIterator[tuple[int, list[StreamToken]]]:
        """`(source_index, tokens)` batches as they arrive; each stream's last batch ends with its
        Done or Error, and every token arrives once (see the module doc for actor loss)."""
        run = self._begin(sources, "tokens", concurrency)
        try:
            while True:
                self._fill(run)
                self._issue(run, True)
                while run.outputs:
                    yield run.outputs.popleft()
                if run.finished:
                    return
                self._check_broken(run)
                waiting = {s.fut: s for s in self._slots if s.fut is not None}
                if not waiting:
                    continue
                done, _ = await asyncio.wait(list(waiting), return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    self._on_reply(run, waiting[fut], True)
        finally:
            self._end(run)
