"""The mock provider: an aiohttp server on loopback that speaks each dialect's streaming API with
seeded content, pacing, fault injection, event-id resumes and recorded replay, and logs when it
sent every event of every stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping

import msgspec
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from ..recording import Recording, iter_replay_chunks
from .content import DIALECTS, ExpectedStream, MockOptions, build_plan, parse_options, plan_expected, stream_seed
from .dialects import DIALECT_FRAMING, frame, http_error_body, render
from .faults import EOLS as _EOLS
from .faults import Fault, FaultPicker, parse_fault, shape_body
from .pacer import DONE, DRAIN, Body, PacedStream, Pacer

__all__ = ["MockProviderServer", "StreamLog"]

_OPENAI_STYLE = ("openai-chat", "openai-responses", "openai-completions")
# Streams kept for Last-Event-ID resumes (bounded: each holds its whole body).
_RESUME_KEEP = 64


class StreamLog(msgspec.Struct, kw_only=True):
    """What the mock did for one request: when each event left (monotonic ns, the clients' clock
    on this machine), how much it sent, and the digest of choice 0's text in the events it sent
    whole (`text_sha256`, `text_tokens`)."""

    request_id: str
    key: str | None = None
    dialect: str | None = None
    path: str = ""
    seed: int | None = None
    fault: str | None = None
    status: str = "open"  # open, complete, truncated, disconnected, client_closed, http_error, bad_request, cancelled
    http_status: int = 200
    started_ns: int = 0
    headers_ns: int | None = None
    ended_ns: int | None = None
    event_times_ns: list[int] = msgspec.field(default_factory=list)
    events_sent: int = 0
    bytes_sent: int = 0
    text_sha256: str | None = None
    text_tokens: int = 0
    resumed_from: str | None = None
    resume_after: int | None = None
    replay: str | None = None


class _Control:
    """How a stream's bytes go out: pacing and the byte-level faults."""

    __slots__ = ("cut_at", "stall_before", "stall_s", "bytewise", "tps", "jitter", "batch", "rng")

    def __init__(self, opts: MockOptions, seed: int) -> None:
        self.cut_at: int | None = None  # close abruptly once this many body bytes went out
        self.stall_before: int | None = None  # event index
        self.stall_s = 0.0
        self.bytewise = False
        self.tps = float(opts.tps) if opts.tps else None
        self.jitter = min(max(float(opts.jitter or 0.0), 0.0), 1.0)
        self.batch = max(1, int(opts.batch or 1))
        self.rng = random.Random(f"{seed}:pace")


class MockProviderServer:
    """An LLM provider on 127.0.0.1 for tests and benchmarks: `async with MockProviderServer(seed=1)
    as mock:` then point a client at `mock.base_url(dialect)`. See pipeline/testing.py.

    The last `max_logs` streams' logs are kept (each holds one timestamp per event)."""

    def __init__(
        self,
        *,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        fault_rates: Mapping[str, float] | None = None,
        replay_dir: str | Path | None = None,
        max_logs: int = 10_000,
        shutdown_timeout: float = 0.5,
    ) -> None:
        self.seed = int(seed)
        self.host = host
        self._port = int(port)
        self._picker = FaultPicker(fault_rates, self.seed)
        self.replay_dir = Path(replay_dir).resolve() if replay_dir is not None else None
        self._max_logs = max_logs
        self._shutdown_timeout = shutdown_timeout
        self._logs: OrderedDict[str, StreamLog] = OrderedDict()
        self._by_key: dict[str, str] = {}
        self._resumable: OrderedDict[str, tuple[Body, str]] = OrderedDict()  # request id -> body, dialect
        self._counter = 0
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._tasks: set[asyncio.Task] = set()  # open streams, cancelled at close (a stall must not hold it)
        self._pacer: Pacer | None = None  # sends every fault-free stream's frames (created in start)

    # --- lifecycle ------------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        routes = [
            web.post("/v1/chat/completions", self._dialect_handler("openai-chat")),
            web.post("/v1/completions", self._dialect_handler("openai-completions")),
            web.post("/v1/responses", self._dialect_handler("openai-responses")),
            web.post("/v1/messages", self._dialect_handler("anthropic")),
            web.post("/v1beta/models/{model_action}", self._dialect_handler("gemini")),
            web.post("/generate_stream", self._dialect_handler("tgi-generate")),
            web.get("/replay/{name:.+}", self._replay_get),
            web.get("/mock/streams", self._get_streams),
            web.get("/mock/streams/{rid}", self._get_stream),
            web.get("/mock/health", self._health),
        ]
        app.add_routes(routes)
        return app

    async def start(self) -> "MockProviderServer":
        """Bind and listen (port 0: a free port, read it from `port`)."""
        self._pacer = Pacer(asyncio.get_running_loop())
        self._runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=self._shutdown_timeout, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.host, self._port, reuse_address=True)
        await self._site.start()
        server = self._site._server  # the asyncio.Server: the only way to read the bound port
        assert server is not None and server.sockets
        self._port = server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop listening, end open streams, release the socket (idempotent)."""
        runner, self._runner, self._site = self._runner, None, None
        if runner is not None:
            for task in list(self._tasks):
                task.cancel()
            await runner.cleanup()
        pacer, self._pacer = self._pacer, None
        if pacer is not None:
            pacer.close()

    async def __aenter__(self) -> "MockProviderServer":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- addresses and logs ---------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port."""
        return self._port

    def base_url(self, dialect: str = "openai-chat") -> str:
        """The base URL as the official SDK of `dialect` takes it (`.../v1` for OpenAI-style)."""
        return _base_url(self.host, self._port, dialect)

    def url(self, dialect: str, model: str = "mock-model") -> str:
        """The full streaming endpoint of `dialect`."""
        return _endpoint(self.host, self._port, dialect, model)

    @property
    def streams(self) -> list[StreamLog]:
        """Every stream's log, oldest first."""
        return list(self._logs.values())

    def stream_log(self, request_id_or_key: str) -> StreamLog | None:
        """One stream's log by its `x-request-id` or the client's `x-mock-stream-key`."""
        rid = self._by_key.get(request_id_or_key, request_id_or_key)
        return self._logs.get(rid)

    def seed_for(self, key: str) -> int:
        """The seed of a stream that named no seed but carried stream key `key`."""
        return stream_seed(self.seed, key)

    def expected(self, dialect: str, body: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> ExpectedStream:
        """What this server sends for `body` (with the seed it would pick for it); the request
        must name a seed or a stream key."""
        hl = {k.lower(): v for k, v in (headers or {}).items()}
        opts = parse_options(body, hl)
        seed = _request_seed(opts, body)
        if seed is None:
            if opts.key is None:
                raise ValueError("the request names neither a seed nor a stream key")
            seed = self.seed_for(opts.key)
        fault = parse_fault(opts.fault) if opts.fault else None
        size = fault.oversize_bytes() if fault else None
        return plan_expected(build_plan(dialect, body, opts, seed, oversize_bytes=size, oversize_at=opts.fault_at))

    # --- handlers -------------------------------------------------------------------------

    def _new_log(self, request: web.Request, dialect: str | None) -> StreamLog:
        self._counter += 1
        rid = f"mock-{self._counter:06d}"
        log = StreamLog(request_id=rid, dialect=dialect, path=request.path_qs, started_ns=time.monotonic_ns())
        self._logs[rid] = log
        if len(self._logs) > self._max_logs:
            old_rid, old = self._logs.popitem(last=False)
            if old.key is not None and self._by_key.get(old.key) == old_rid:
                del self._by_key[old.key]
        return log

    def _dialect_handler(self, dialect: str):
        async def handler(request: web.Request) -> web.StreamResponse:
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            try:
                return await self._handle(request, dialect)
            finally:
                self._tasks.discard(task)

        return handler

    async def _handle(self, request: web.Request, dialect: str) -> web.StreamResponse:
        log = self._new_log(request, dialect)
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            raw = await request.read()
            body = json.loads(raw) if raw.strip() else {}
            if not isinstance(body, dict):
                raise ValueError("the request body is not a JSON object")
            opts = parse_options(body, headers)
            fault = parse_fault(opts.fault) if opts.fault else None
        except (ValueError, msgspec.ValidationError) as exc:
            return self._bad_request(log, dialect, str(exc))
        if opts.key is not None:
            log.key = opts.key
            self._by_key[opts.key] = log.request_id
        if opts.replay is not None:
            return await self._serve_replay(request, log, opts.replay, opts.pace)
        last_id = request.headers.get("Last-Event-ID")
        if last_id and last_id.startswith("mock-") and "." in last_id:
            return await self._resume(request, log, last_id, opts)
        if dialect in _OPENAI_STYLE and body.get("stream") is not True:
            return self._bad_request(log, dialect, "the mock serves streams only: set stream=true")
        if fault is None:
            fault = self._picker.pick()
        log.fault = str(fault) if fault else None
        seed = _request_seed(opts, body)
        if seed is None:
            seed = stream_seed(self.seed, opts.key if opts.key is not None else log.request_id)
        log.seed = seed
        resp_headers = self._headers(log, fault)
        if fault is not None and fault.name == "slow_headers":
            await asyncio.sleep(fault.number(1.0))
        if fault is not None and fault.http_status is not None:
            return self._http_error(log, dialect, fault, resp_headers)

        if dialect == "gemini":
            model = request.match_info["model_action"].partition(":")[0]
            if "model" not in body:
                body = dict(body, model=model)
        wire, ctl, truncated = self._build_body(log, dialect, body, opts, seed, fault)
        resp, writer = await self._prepare(request, log, resp_headers, dialect != "gemini")
        await self._send(request, resp, writer, log, wire, ctl)
        if log.status == "complete" and truncated:
            log.status = "truncated"
        return resp

    def _build_body(
        self, log: StreamLog, dialect: str, body: Mapping[str, Any], opts: MockOptions, seed: int, fault: Fault | None
    ) -> tuple[Body, _Control, bool]:
        """The stream's body (after its fault), how to send it, and whether it ends early on
        purpose. Synchronous so the plan and its event objects are freed before the body goes out."""
        size = fault.oversize_bytes() if fault else None
        plan = build_plan(dialect, body, opts, seed, oversize_bytes=size, oversize_at=opts.fault_at)
        events = render(plan)
        ctl = _Control(opts, seed)
        eol, sep = DIALECT_FRAMING[dialect]
        if opts.framing:
            eol = _EOLS[opts.framing]
        body_plan = shape_body(fault, events, plan, opts, eol)
        events = body_plan.events
        ctl.bytewise = body_plan.bytewise
        ctl.stall_before, ctl.stall_s = body_plan.stall_before, body_plan.stall_s
        with_ids = opts.event_ids or body_plan.event_ids
        ids: list[str | None] = [
            f"{log.request_id}.{i}" if with_ids and e.comment is None and e.retry is None else None for i, e in enumerate(events)
        ]
        frames = [frame(e, body_plan.eol, sep, eid) for e, eid in zip(events, ids)]
        wire = Body.of(frames, events)
        if with_ids:
            self._resumable[log.request_id] = (wire, dialect)
            while len(self._resumable) > _RESUME_KEEP:
                self._resumable.popitem(last=False)
        if body_plan.cut_at_byte is not None:
            ctl.cut_at = body_plan.cut_at_byte if body_plan.cut_at_byte >= 0 else sum(map(len, frames)) // 2
        elif body_plan.cut_inside is not None and body_plan.cut_inside < len(frames):
            ctl.cut_at = sum(map(len, frames[: body_plan.cut_inside])) + len(frames[body_plan.cut_inside]) // 2
        return wire, ctl, body_plan.truncated

    def _headers(self, log: StreamLog, fault: Fault | None) -> dict[str, str]:
        h = {"x-request-id": log.request_id, "cache-control": "no-cache"}
        if log.key is not None:
            h["x-mock-stream-key"] = log.key
        if log.seed is not None:
            h["x-mock-seed"] = str(log.seed)
        if fault is not None:
            h["x-mock-fault"] = str(fault)
        return h

    def _bad_request(self, log: StreamLog, dialect: str, message: str) -> web.Response:
        log.status, log.http_status, log.ended_ns = "bad_request", 400, time.monotonic_ns()
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}})
        return web.Response(status=400, body=body, content_type="application/json", headers={"x-request-id": log.request_id})

    def _http_error(self, log: StreamLog, dialect: str, fault: Fault, headers: dict[str, str]) -> web.Response:
        status = fault.http_status
        assert status is not None
        if status == 429 or (status == 503 and fault.arg):
            headers["Retry-After"] = _retry_after(fault.number(1.0))
        log.status, log.http_status = "http_error", status
        log.headers_ns = log.ended_ns = time.monotonic_ns()
        return web.Response(status=status, body=http_error_body(dialect, status), content_type="application/json", headers=headers)

    async def _prepare(
        self, request: web.Request, log: StreamLog, headers: dict[str, str], charset: bool
    ) -> tuple[web.StreamResponse, AbstractStreamWriter | None]:
        resp = web.StreamResponse(status=200, headers=headers)
        resp.content_type = "text/event-stream"
        if charset:  # OpenAI, Anthropic and TGI say `; charset=utf-8`, Gemini does not
            resp.charset = "utf-8"
        writer = await resp.prepare(request)
        log.headers_ns = time.monotonic_ns()
        return resp, writer

    async def _send(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        writer: AbstractStreamWriter | None,
        log: StreamLog,
        wire: Body,
        ctl: _Control,
    ) -> None:
        """Write the frames with pacing and byte faults; keep the log current as events leave."""
        if ctl.cut_at is None and not ctl.bytewise and ctl.stall_before is None and self._pacer is not None:
            direct = _direct_write(writer)
            if direct is not None:
                await self._send_paced(resp, writer, direct, log, wire, ctl)
                return
        # A byte-level fault (or a writer without a synchronous write): one coroutine per stream.
        frames, ntoks, ntok0s, texts = wire.frames, wire.ntok, wire.ntok0, wire.text0
        hasher = hashlib.sha256()
        loop = asyncio.get_running_loop()
        next_t = loop.time()
        pending: list[int] = []  # indices of frames written since the last time stamp
        written = 0
        times = log.event_times_ns

        def stamp() -> None:
            now = time.monotonic_ns()
            for j in pending:
                times.append(now)
                if texts[j]:
                    hasher.update(texts[j].encode("utf-8"))
                log.text_tokens += ntok0s[j]
            log.events_sent += len(pending)
            pending.clear()

        buf: list[bytes] = []

        async def flush() -> None:
            nonlocal buf
            if buf:
                data = b"".join(buf)
                buf = []
                await resp.write(data)
                stamp()

        try:
            for i, fr in enumerate(frames):
                ntok = ntoks[i]
                if ctl.stall_before == i:
                    await flush()
                    await asyncio.sleep(ctl.stall_s)
                if ctl.tps and ntok:
                    gap = ntok / ctl.tps
                    if ctl.jitter:
                        gap *= 1.0 + ctl.jitter * (2.0 * ctl.rng.random() - 1.0)
                    next_t += gap
                    delay = next_t - loop.time()
                    if delay > 0:
                        await flush()
                        await asyncio.sleep(delay)
                    else:
                        next_t = loop.time() if delay < -0.05 else next_t  # do not burst to catch up
                if ctl.cut_at is not None and written + len(fr) > ctl.cut_at:
                    await flush()
                    head = fr[: ctl.cut_at - written]
                    if head:
                        await resp.write(head)
                    log.bytes_sent = ctl.cut_at
                    log.status = "disconnected"
                    _drop_connection(request)
                    return
                if ctl.bytewise:
                    for k in range(len(fr)):
                        await resp.write(fr[k : k + 1])
                        # Yield so the byte leaves now and a reader in this loop can see it alone.
                        await asyncio.sleep(0)
                    pending.append(i)
                    stamp()
                else:
                    buf.append(fr)
                    pending.append(i)
                    if len(buf) >= ctl.batch:
                        await flush()
                written += len(fr)
                log.bytes_sent = written
            await flush()
            await resp.write_eof()
            log.status = "complete"
        except ConnectionError:
            # The client went away (aiohttp raises ClientConnectionResetError, a ConnectionError).
            log.status = "client_closed"
        except asyncio.CancelledError:
            log.status = "cancelled"
            raise
        finally:
            log.ended_ns = time.monotonic_ns()
            log.text_sha256 = hasher.hexdigest()

    async def _send_paced(
        self,
        resp: web.StreamResponse,
        writer: Any,
        write: Callable[[bytes], None],
        log: StreamLog,
        wire: Body,
        ctl: _Control,
    ) -> None:
        """`_send` for a stream without byte-level faults: the server's one pacer writes its frames
        (same grouping, pacing and log as `_send`) while this handler waits for the end."""
        pacer = self._pacer
        assert pacer is not None
        stream = PacedStream(
            write=write, flow=writer.protocol, chunked=writer.chunked, body=wire, log=log,
            loop=asyncio.get_running_loop(), tps=ctl.tps, jitter=ctl.jitter, rng=ctl.rng, batch=ctl.batch,
        )
        try:
            while (state := await pacer.run(stream)) == DRAIN:
                await writer.drain()  # what resp.write does once the transport pauses writing
            if state == DONE:
                await resp.write_eof()
                log.status = "complete"
            else:
                log.status = "client_closed"
        except ConnectionError:
            log.status = "client_closed"
        except asyncio.CancelledError:
            pacer.discard(stream)
            log.status = "cancelled"
            raise
        finally:
            log.ended_ns = time.monotonic_ns()
            log.text_sha256 = stream.digest()

    async def _resume(self, request: web.Request, log: StreamLog, last_id: str, opts: MockOptions) -> web.StreamResponse:
        rid, _, n = last_id.rpartition(".")
        stored = self._resumable.get(rid)
        if stored is None or not n.isdigit():
            log.status, log.http_status, log.ended_ns = "http_error", 410, time.monotonic_ns()
            body = json.dumps({"error": {"message": f"unknown Last-Event-ID {last_id!r}", "type": "invalid_request_error"}})
            return web.Response(status=410, body=body, content_type="application/json", headers={"x-request-id": log.request_id})
        wire, dialect = stored
        after = int(n)
        log.resumed_from, log.resume_after, log.dialect = rid, after, dialect
        parent = self._logs.get(rid)
        if parent is not None:
            log.seed = parent.seed
        start = after + 1
        resp, writer = await self._prepare(request, log, self._headers(log, None), dialect != "gemini")
        await self._send(request, resp, writer, log, wire.tail(start), _Control(opts, log.seed or 0))
        return resp

    # --- replay ---------------------------------------------------------------------------

    def _replay_path(self, name: str) -> Path | None:
        if self.replay_dir is None:
            return None
        for candidate in (name, name + ".sse"):
            p = (self.replay_dir / candidate).resolve()
            # Never serve a file outside the replay directory.
            if p.is_file() and p.is_relative_to(self.replay_dir) and p.suffix != ".timing":
                return p
        return None

    async def _replay_get(self, request: web.Request) -> web.StreamResponse:
        log = self._new_log(request, None)
        pace_q = request.query.get("pace") or request.headers.get("x-mock-pace")
        pace = float(pace_q) if pace_q else None
        return await self._serve_replay(request, log, request.match_info["name"], pace)

    async def _serve_replay(self, request: web.Request, log: StreamLog, name: str, pace: float | None) -> web.StreamResponse:
        log.replay = name
        path = self._replay_path(name)
        if path is None:
            log.status, log.http_status, log.ended_ns = "http_error", 404, time.monotonic_ns()
            body = json.dumps({"error": {"message": f"no recording {name!r}", "type": "not_found"}})
            return web.Response(status=404, body=body, content_type="application/json", headers={"x-request-id": log.request_id})
        rec = Recording.load(path)
        pace = 1.0 if pace is None else pace
        resp, _ = await self._prepare(request, log, self._headers(log, None), False)  # bytes as recorded
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        times = [t for _, t in rec.reads]
        try:
            for k, chunk in enumerate(iter_replay_chunks(rec, "recorded")):
                if pace and times:
                    delay = t0 + times[k] / 1e9 / pace - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await resp.write(chunk)
                log.event_times_ns.append(time.monotonic_ns())
                log.events_sent += 1
                log.bytes_sent += len(chunk)
            await resp.write_eof()
            log.status = "complete"
        except ConnectionError:
            log.status = "client_closed"
        finally:
            log.ended_ns = time.monotonic_ns()
        return resp

    # --- introspection endpoints ----------------------------------------------------------

    async def _get_streams(self, request: web.Request) -> web.Response:
        return web.Response(body=msgspec.json.encode(self.streams), content_type="application/json")

    async def _get_stream(self, request: web.Request) -> web.Response:
        log = self.stream_log(request.match_info["rid"])
        if log is None:
            return web.Response(status=404, body=b'{"error":"no such stream"}', content_type="application/json")
        return web.Response(body=msgspec.json.encode(log), content_type="application/json")

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(body=json.dumps({"ok": True, "port": self._port, "seed": self.seed}), content_type="application/json")


def _request_seed(opts: MockOptions, body: Mapping[str, Any]) -> int | None:
    if opts.seed is not None:
        return int(opts.seed)
    s = body.get("seed")
    return int(s) if isinstance(s, int) and not isinstance(s, bool) else None


def _retry_after(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


def _direct_write(writer: AbstractStreamWriter | None) -> Callable[[bytes], None] | None:
    """The writer's synchronous write of body bytes framed by the caller (one HTTP/1.1 chunk per
    write when `writer.chunked`), or None when this aiohttp's StreamWriter has none or would
    change the bytes (compression, a declared length, chunk-sent signals, headers not yet sent).
    Going through it keeps the writer's byte counts right; `write_eof()` then ends the body."""
    write = getattr(writer, "_write", None)
    protocol = getattr(writer, "protocol", None)
    if (
        not callable(write)
        or not isinstance(getattr(writer, "chunked", None), bool)
        or not isinstance(getattr(protocol, "writing_paused", None), bool)
        or getattr(writer, "_compress", None) is not None
        or getattr(writer, "length", None) is not None
        or getattr(writer, "_on_chunk_sent", None) is not None
        or getattr(writer, "on_body_write", None) is not None
        or getattr(writer, "_headers_buf", None)  # headers still buffered: they must go first
        or getattr(writer, "_eof", False)
    ):
        return None
    return write


def _drop_connection(request: web.Request) -> None:
    """Close the socket mid-body: what was written is flushed, the chunked body never ends."""
    transport = request.transport
    if transport is not None:
        transport.close()


def _base_url(host: str, port: int, dialect: str) -> str:
    root = f"http://{host}:{port}"
    if dialect in _OPENAI_STYLE:
        return root + "/v1"
    if dialect in DIALECTS:
        return root
    raise ValueError(f"the mock does not speak {dialect!r}")


def _endpoint(host: str, port: int, dialect: str, model: str = "mock-model") -> str:
    root = f"http://{host}:{port}"
    return root + {
        "openai-chat": "/v1/chat/completions",
        "openai-completions": "/v1/completions",
        "openai-responses": "/v1/responses",
        "anthropic": "/v1/messages",
        "gemini": f"/v1beta/models/{model}:streamGenerateContent?alt=sse",
        "tgi-generate": "/generate_stream",
    }[dialect]
