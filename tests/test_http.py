"""HttpStreamHandler and stream_request over loopback: results per dialect, retries, resume with
Last-Event-ID, timeouts, early stop, secrets, and that every connection is released.

Servers: real provider captures served as they are (expected values from MANIFEST.json), small
aiohttp servers written here for exact control of faults, and pipeline.testing's
MockProviderServer where it is available.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from email.utils import formatdate

import aiohttp
import msgspec
import psutil
import pytest
from aiohttp import web

from conftest import PROVIDER_FIXTURES, provider_manifest, read_capture
from pipeline import PipelineBuilder, StopSequence
from pipeline.errors import ConfigurationError, StreamError
from pipeline.http import HttpOptions, HttpStreamHandler, RateLimiter, parse_retry_after, stream_request
from pipeline.sources import Request
from pipeline.testing import MockProviderServer

CANARY = "sk-canary-7f3a9c2e51d04b8f"
FAST = dict(backoff_base=0.01, backoff_max=0.02)  # retries without real waiting


# --- a tiny server whose behaviour each test scripts ---------------------------------------------


class Tiny:
    """An aiohttp server on 127.0.0.1 running `handler`; records every request it got and can
    count its open connections."""

    def __init__(self, handler):
        self.handler = handler
        self.requests: list[dict] = []
        self.port = 0
        self.stopping = asyncio.Event()

    async def stall(self, seconds: float) -> None:
        """Send nothing for `seconds`, or until the server stops (so tests do not wait it out)."""
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _entry(self, request: web.Request):
        body = await request.read()
        self.requests.append({"path": request.path_qs, "headers": dict(request.headers), "body": body})
        return await self.handler(request, len(self.requests))

    async def __aenter__(self) -> "Tiny":
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._entry)
        self.runner = web.AppRunner(app, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc) -> None:
        self.stopping.set()
        await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self.runner.server.connections)  # type: ignore[union-attr]


async def sse(request: web.Request, parts, delay: float = 0.0, end: str = "clean") -> web.StreamResponse:
    """Send `parts` (bytes) as an event stream; `end`: "clean" or "drop" (abrupt close)."""
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    for p in parts:
        await resp.write(p)
        if delay:
            await asyncio.sleep(delay)
    if end == "drop":
        request.transport.close()  # type: ignore[union-attr]
        return resp
    await resp.write_eof()
    return resp


def chat_events(words, ids: bool = False, first_id: int = 1) -> list[bytes]:
    """An OpenAI chat stream as separate events (optionally with `id:` lines)."""
    payloads = [{"choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]} for w in words]
    payloads.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    out = []
    for i, p in enumerate(payloads):
        head = f"id: {first_id + i}\n".encode() if ids else b""
        out.append(head + b"data: " + json.dumps(p).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out

async def two_events_then_silence(request: web.Request, server: "Tiny") -> web.StreamResponse:
    """Two chat events 0.1 s apart, then nothing until the server stops: a stream gone idle."""
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    for e in chat_events(["a", "b"])[:2]:
        await resp.write(e)
        await asyncio.sleep(0.1)
    await server.stall(5)
    return resp



def chat_request(server: Tiny, api_key: str | None = "sk-test-000", **kw) -> Request:
    return Request.openai_chat(base_url=server.url + "/v1", model="m", messages=[{"role": "user", "content": "hi"}],
                               api_key=api_key, **kw)


def pipe(**http):
    return PipelineBuilder().provider("openai-chat").http(**http).build()


async def run(pipeline, request, **kw):
    stream = stream_request(pipeline, request, **kw) if kw else pipeline.stream_request(request)
    tokens = [t async for t in stream]
    return stream, tokens


def client_sockets_to(port: int) -> int:
    """Open TCP sockets of this process connected to `port` (the client ends)."""
    return sum(1 for c in psutil.Process().net_connections(kind="tcp") if c.raddr and c.raddr.port == port)


def unused_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# --- every dialect, from real captures --------------------------------------------------------

# One capture per dialect, with the constructor that requests it (the server checks the path).
DIALECT_CASES = {
    "openai-chat": ("openai-chat/text-usage.sse", "/v1/chat/completions"),
    "openai-responses": ("openai-responses/output-text-deltas.sse", "/v1/responses"),
    "openai-completions": ("other/openai-legacy-completions-rebuilt.sse", "/v1/completions"),
    "anthropic": ("anthropic/short-text.sse", "/v1/messages"),
    "gemini": ("gemini/text.sse", "/v1beta/models/gemini-x:streamGenerateContent?alt=sse"),
    "tgi-generate": ("tgi/generate-stream-1tok-details.sse", "/generate_stream"),
}


def make_request(dialect: str, base: str) -> Request:
    msgs = [{"role": "user", "content": "hi"}]
    if dialect == "openai-chat":
        return Request.openai_chat(base_url=base + "/v1", model="m", messages=msgs, api_key="k-1234")
    if dialect == "openai-responses":
        return Request.openai_responses(base_url=base + "/v1", model="m", input="hi", api_key="k-1234")
    if dialect == "openai-completions":
        return Request.openai_completions(base_url=base + "/v1", model="m", prompt="hi", api_key="k-1234")
    if dialect == "anthropic":
        return Request.anthropic(base_url=base, model="m", messages=msgs, api_key="k-1234")
    if dialect == "gemini":
        return Request.gemini(base_url=base, model="gemini-x", messages=msgs, api_key="k-1234")
    return Request.tgi(base, inputs="hi", parameters={"max_new_tokens": 1}, api_key="k-1234")


@pytest.mark.parametrize("dialect", sorted(DIALECT_CASES))
async def test_each_dialect_streams_a_real_capture_to_its_manifest_result(dialect):
    manifest = provider_manifest()
    if manifest is None:
        pytest.skip(f"real provider captures not found at {PROVIDER_FIXTURES}")
    name, path = DIALECT_CASES[dialect]
    expect = manifest["files"][name]["expect"]
    body = read_capture(name)
    # Small writes, so the body arrives over several reads.
    parts = [body[i : i + 97] for i in range(0, len(body), 97)]

    async def handler(request, n):
        return await sse(request, parts)

    async with Tiny(handler) as server:
        pipeline = PipelineBuilder().provider("openai-chat").build()  # the request's dialect wins
        stream, _ = await run(pipeline, make_request(dialect, server.url))
    assert server.requests[0]["path"] == path
    r = stream.result
    assert r.error is None, r.error
    assert r.text == expect["text"]
    assert r.finish_reason == expect["finish_reason"]
    if expect.get("usage", {}).get("output") is not None:
        assert r.usage.output_tokens == expect["usage"]["output"]


# --- the mock provider: every dialect, and its faults ------------------------------------------

MOCK_DIALECTS = ["openai-chat", "openai-responses", "openai-completions", "anthropic", "gemini", "tgi-generate"]


def mock_request(mock: MockProviderServer, dialect: str, key: str, fault: str | None = None,
                 api_key: str = "k-1234", tokens: int = 24) -> Request:
    """A request of `dialect` to the mock, named by a stream key so `mock.expected` can tell
    what a clean stream carries."""
    headers = {"x-mock-stream-key": key, "x-mock-tokens": str(tokens)}
    if fault:
        headers["x-mock-fault"] = fault
    base = mock.base_url(dialect)
    msgs = [{"role": "user", "content": "Tell me a story"}]
    common = dict(base_url=base, api_key=api_key, headers=headers)
    if dialect == "openai-chat":
        return Request.openai_chat(model="mock-model", messages=msgs, **common)
    if dialect == "openai-responses":
        return Request.openai_responses(model="mock-model", input="Tell me a story", **common)
    if dialect == "openai-completions":
        return Request.openai_completions(model="mock-model", prompt="Tell me a story", **common)
    if dialect == "anthropic":
        return Request.anthropic(model="mock-model", messages=msgs, **common)
    if dialect == "gemini":
        return Request.gemini(model="mock-model", messages=msgs, **common)
    return Request.tgi(base, inputs="Tell me a story", api_key=api_key, headers=headers)


def mock_expected(mock: MockProviderServer, request: Request):
    return mock.expected(request.dialect, json.loads(request.body), request.headers)


@pytest.mark.parametrize("dialect", MOCK_DIALECTS)
async def test_mock_provider_every_dialect_streams_to_the_expected_result(dialect):
    async with MockProviderServer(seed=3) as mock:
        request = mock_request(mock, dialect, key=f"clean-{dialect}")
        stream, _ = await run(pipe(), request)
        log = mock.streams[0]
    exp = mock_expected(mock, request)
    r = stream.result
    assert r.error is None, r.error
    assert r.text == exp.text and r.finish_reason == exp.finish_reason
    assert log.status == "complete" and len(mock.streams) == 1


@pytest.mark.parametrize("dialect", ["openai-chat", "anthropic", "gemini"])
async def test_mock_drop_resumes_with_last_event_id_matching_the_mocks_digests(dialect):
    async with MockProviderServer(seed=5) as mock:
        request = mock_request(mock, dialect, key=f"drop-{dialect}", fault="drop", tokens=40)
        stream, _ = await run(pipe(), request)
        first, second = mock.streams
    exp = mock_expected(mock, request)
    text = stream.result.text
    assert stream.result.error is None, stream.result.error
    assert text == exp.text
    assert stream.reconnects == 1 and first.status == "disconnected"
    assert second.resumed_from == first.request_id
    # What each connection delivered whole is exactly a prefix and the rest of our text: nothing
    # lost, nothing repeated at the seam.
    import hashlib

    splits = [k for k in range(len(text) + 1)
              if hashlib.sha256(text[:k].encode()).hexdigest() == first.text_sha256
              and hashlib.sha256(text[k:].encode()).hexdigest() == second.text_sha256]
    assert splits, "no split of the result matches the two connections' digests"


# fault -> (http options, expected error kind or None for a clean result), from the mock's FAULTS table.
MOCK_FAULTS = {
    "disconnect": ({}, "truncated"),
    "truncate": ({}, "truncated"),
    "stall:3": ({"idle_timeout": 0.3}, "idle_timeout"),
    "429:0": ({"retries": 1}, "rate_limited"),
    "503": ({"retries": 1}, "http"),
    "keepalive": ({}, None),
    "bytewise": ({}, None),
    "slow_headers:0.2": ({}, None),
    "ids": ({}, None),
    "error": ({}, "provider"),
    "malformed": ({}, "malformed"),
}


@pytest.mark.parametrize("fault", sorted(MOCK_FAULTS))
async def test_mock_fault_gives_its_typed_outcome(fault):
    options, kind = MOCK_FAULTS[fault]
    async with MockProviderServer(seed=7) as mock:
        request = mock_request(mock, "openai-chat", key=f"f-{fault}", fault=fault)
        stream, _ = await run(pipe(**FAST, **options), request)
        requests = len(mock.streams)
    err = stream.result.error
    if kind is None:
        assert err is None, err
        assert stream.result.text == mock_expected(mock, request).text
    else:
        assert err is not None and err.kind == kind, err
    if fault.startswith(("429", "503")):
        assert requests == 2 and err.http_status == int(fault[:3])
    else:
        assert requests == 1  # no content-bearing request is ever sent twice


async def test_mock_oversized_event_is_too_large_below_the_limit():
    async with MockProviderServer(seed=9) as mock:
        request = mock_request(mock, "anthropic", key="big", fault="oversized:64k")
        small = PipelineBuilder().max_event_bytes(16 * 1024).build()
        stream, _ = await run(small, request)
        big, _ = await run(PipelineBuilder().build(), request)
    assert stream.result.error.kind == "too_large"
    assert big.result.error is None and big.result.text == mock_expected(mock, request).text


# --- retries before the first byte ----------------------------------------------------------------


async def test_429_with_retry_after_is_waited_out_then_retried_to_success():
    async def handler(request, n):
        if n == 1:
            return web.json_response({"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "1"})
        return await sse(request, chat_events(["ok"]))

    async with Tiny(handler) as server:
        t0 = time.monotonic()
        stream, _ = await run(pipe(**FAST), chat_request(server))
        elapsed = time.monotonic() - t0
    assert stream.result.error is None and stream.result.text == "ok"
    assert len(server.requests) == 2 and stream.attempts == 2
    # The server's Retry-After (1 s), not the 10 ms backoff, decided the wait.
    assert 0.9 <= elapsed < 5


async def test_429_after_retries_are_exhausted_is_a_rate_limited_error_with_retry_after():
    async def handler(request, n):
        return web.json_response({"error": {"message": "rate limit reached"}}, status=429,
                                 headers={"retry-after-ms": "30"})

    async with Tiny(handler) as server:
        stream, tokens = await run(pipe(retries=2, **FAST), chat_request(server))
    err = stream.result.error
    assert len(server.requests) == 3  # the first request and two retries
    assert err.kind == "rate_limited" and err.http_status == 429 and err.retryable
    assert err.retry_after == pytest.approx(0.03)
    assert "rate limit reached" in err.message
    assert tokens[-1].kind == "rate_limited"


async def test_retry_after_longer_than_the_bound_is_reported_not_waited():
    async def handler(request, n):
        return web.json_response({"error": "busy"}, status=429, headers={"Retry-After": "120"})

    async with Tiny(handler) as server:
        t0 = time.monotonic()
        stream, _ = await run(pipe(max_retry_after=5, **FAST), chat_request(server))
    assert time.monotonic() - t0 < 2
    assert len(server.requests) == 1
    assert stream.result.error.retry_after == 120


@pytest.mark.parametrize("status", [500, 503])
async def test_5xx_before_the_first_byte_is_retried(status):
    async def handler(request, n):
        if n == 1:
            return web.json_response({"error": {"message": "oops"}}, status=status)
        return await sse(request, chat_events(["fine"]))

    async with Tiny(handler) as server:
        stream, _ = await run(pipe(**FAST), chat_request(server))
    assert stream.result.error is None and stream.result.text == "fine"
    assert len(server.requests) == 2


async def test_500_after_retries_is_an_http_error_with_status_and_body():
    async def handler(request, n):
        return web.json_response({"error": {"message": "internal boom 42", "type": "server_error"}}, status=500)

    async with Tiny(handler) as server:
        stream, _ = await run(pipe(retries=1, **FAST), chat_request(server))
    err = stream.result.error
    assert len(server.requests) == 2
    assert err.kind == "http" and err.http_status == 500 and err.retryable
    assert "internal boom 42" in err.message
    assert err.detail == {"error": {"message": "internal boom 42", "type": "server_error"}}


async def test_400_is_not_retried():
    async def handler(request, n):
        return web.json_response({"error": {"message": "bad model"}}, status=400)

    async with Tiny(handler) as server:
        stream, _ = await run(pipe(**FAST), chat_request(server))
    assert len(server.requests) == 1
    assert stream.result.error.kind == "http" and stream.result.error.http_status == 400
    assert not stream.result.error.retryable


async def test_connect_refused_is_a_connect_error_after_the_retries():
    port = unused_port()
    request = Request.openai_chat(base_url=f"http://127.0.0.1:{port}/v1", model="m", messages=[], api_key="k-1234")
    stream, _ = await run(pipe(retries=2, **FAST), request)
    err = stream.result.error
    assert err.kind == "connect" and err.retryable
    assert stream.attempts == 3


def test_retry_after_parses_seconds_milliseconds_and_http_dates():
    assert parse_retry_after({"retry-after": "7"}) == 7.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": formatdate(1_000_030.0, usegmt=True)}, now=1_000_000.0) == pytest.approx(30)
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


async def test_a_json_document_instead_of_a_stream_is_an_error_carrying_its_body():
    async def handler(request, n):
        return web.json_response({"error": {"message": "model overloaded, try later"}})  # status 200

    async with Tiny(handler) as server:
        stream, _ = await run(pipe(**FAST), chat_request(server))
    err = stream.result.error
    assert err.kind == "provider" and "model overloaded" in err.message
    assert err.detail == {"error": {"message": "model overloaded, try later"}}
    assert len(server.requests) == 1


async def test_redirects_are_not_followed():
    async def handler(request, n):
        if request.path.startswith("/v1"):
            raise web.HTTPTemporaryRedirect("/elsewhere/chat/completions")
        return await sse(request, chat_events(["moved"]))

    async with Tiny(handler) as server:
        stream, _ = await run(pipe(**FAST), chat_request(server))
    assert stream.result.error.kind == "http" and stream.result.error.http_status == 307
    assert [r["path"] for r in server.requests] == ["/v1/chat/completions"]


# --- idle and total timeouts --------------------------------------------------------------------


async def test_idle_timeout_fires_near_its_value_and_releases_the_connection():
    async def handler(request, n):
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chat_events(["partial"])[0])
        await server.stall(5)
        return resp

    async with Tiny(handler) as server, aiohttp.ClientSession() as http:
        t0 = time.monotonic()
        stream, tokens = await run(pipe(idle_timeout=0.4), chat_request(server), session=http)
        elapsed = time.monotonic() - t0
        await asyncio.sleep(0.05)
        assert client_sockets_to(server.port) == 0
    err = stream.result.error
    assert err.kind == "idle_timeout"
    assert stream.result.text == "partial"  # what came before the stall is kept
    assert 0.35 <= elapsed < 2.5
    assert len(server.requests) == 1  # a timeout after content is never re-sent


async def test_total_timeout_is_a_timeout_error():
    async def handler(request, n):
        return await sse(request, chat_events(["a"] * 50), delay=0.05)

    async with Tiny(handler) as server:
        t0 = time.monotonic()
        stream, _ = await run(pipe(total_timeout=0.4, idle_timeout=5), chat_request(server))
    assert stream.result.error.kind == "timeout"
    assert time.monotonic() - t0 < 2.5


async def test_slow_headers_beyond_the_idle_timeout_are_an_idle_timeout():
    async def handler(request, n):
        await server.stall(3)
        return await sse(request, chat_events(["late"]))

    async with Tiny(handler) as server:
        stream, _ = await run(pipe(idle_timeout=0.3, **FAST), chat_request(server))
    assert stream.result.error.kind == "idle_timeout"
    assert len(server.requests) == 1  # the request reached the server: not re-sent


# --- drops, resume, clean ends --------------------------------------------------------------------


WORDS = [f"w{i} " for i in range(12)]


async def test_drop_with_event_ids_resumes_with_last_event_id_without_loss_or_duplication():
    events = chat_events(WORDS, ids=True)  # ids 1..13 (13 = the finish chunk), then [DONE]

    async def handler(request, n):
        last = request.headers.get("Last-Event-ID")
        if last is None:
            # retry: 10 ms, six whole events, then half of the seventh, then an abrupt close.
            return await sse(request, [b"retry: 10\n\n", *events[:6], events[6][:20]], end="drop")
        return await sse(request, events[int(last):])

    async with Tiny(handler) as server:
        stream, _ = await run(pipe(), chat_request(server))
    assert stream.result.error is None
    assert stream.result.text == "".join(WORDS)
    assert len(server.requests) == 2 and stream.reconnects == 1
    assert server.requests[1]["headers"]["Last-Event-ID"] == "6"
    assert "Last-Event-ID" not in server.requests[0]["headers"]


async def test_the_last_event_id_survives_a_connection_that_sent_no_ids():
    with_ids = chat_events(WORDS, ids=True)
    plain = chat_events(WORDS)

    async def handler(request, n):
        if n == 1:
            return await sse(request, with_ids[:3], end="drop")  # ids 1..3
        if n == 2:
            return await sse(request, [b": note\n" + plain[3]], end="drop")  # one event without an id
        return await sse(request, plain[4:])

    async with Tiny(handler) as server:
        stream, _ = await run(pipe(), chat_request(server))
    # WHATWG: the last event ID buffer is kept across connections; an event without `id:` leaves it.
    assert [r["headers"].get("Last-Event-ID") for r in server.requests] == [None, "3", "3"]
    assert stream.result.error is None and stream.reconnects == 2


async def test_resume_gives_up_after_max_reconnects_and_reports_truncated():
    events = chat_events(WORDS, ids=True)

    async def handler(request, n):
        last = int(request.headers.get("Last-Event-ID", "0"))
        return await sse(request, events[last : last + 2], end="drop")  # always drops

    async with Tiny(handler) as server:
        stream, _ = await run(pipe(max_reconnects=3), chat_request(server))
    assert stream.result.error.kind == "truncated"
    assert len(server.requests) == 4
    assert stream.result.text == "".join(WORDS[:8])  # 2 words per connection, none repeated


async def test_drop_without_ids_is_truncated_and_not_re_requested():
    async def handler(request, n):
        events = chat_events(WORDS)
        return await sse(request, [*events[:3], events[3][:10]], end="drop")

    async with Tiny(handler) as server:
        stream, _ = await run(pipe(**FAST), chat_request(server))
    assert stream.result.error.kind == "truncated"
    assert stream.result.text == "".join(WORDS[:3])
    assert len(server.requests) == 1


async def test_a_clean_end_is_never_re_requested_even_with_ids():
    async def handler(request, n):
        return await sse(request, chat_events(WORDS, ids=True)[:4])  # ends cleanly, incomplete

    async with Tiny(handler) as server:
        stream, _ = await run(pipe(**FAST), chat_request(server))
    assert stream.result.error.kind == "truncated"
    assert len(server.requests) == 1


# --- early stop, cancellation, release ---------------------------------------------------------


async def test_stop_sequence_closes_the_connection_early():
    server_saw_close = asyncio.Event()

    async def handler(request, n):
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for ev in chat_events(["Hello", " STOP", " more"] + ["x"] * 200):
                await resp.write(ev)
                await asyncio.sleep(0.02)
        except (ConnectionError, asyncio.CancelledError):
            server_saw_close.set()
            raise
        return resp

    pipeline = PipelineBuilder().provider("openai-chat").add_transformer(StopSequence(["STOP"])).build()
    async with Tiny(handler) as server, aiohttp.ClientSession() as http:
        t0 = time.monotonic()
        stream, _ = await run(pipeline, chat_request(server), session=http)
        assert time.monotonic() - t0 < 2  # the whole stream would take > 4 s
        await asyncio.sleep(0.05)
        assert client_sockets_to(server.port) == 0
        await asyncio.wait_for(server_saw_close.wait(), 3)
    assert stream.result.text == "Hello "
    assert stream.result.error is None


async def test_cancelling_the_consumer_releases_the_connection():
    async def handler(request, n):
        return await sse(request, chat_events(["x"] * 400), delay=0.01)

    async with Tiny(handler) as server, aiohttp.ClientSession() as http:
        got = asyncio.Event()

        async def consume():
            async for _ in stream_request(pipe(), chat_request(server), session=http):
                got.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(got.wait(), 3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)
        assert client_sockets_to(server.port) == 0


async def test_handler_close_mid_stream_releases_and_ends_events():
    async def handler(request, n):
        return await sse(request, chat_events(["x"] * 400), delay=0.01)

    async with Tiny(handler) as server, aiohttp.ClientSession() as http:
        async with HttpStreamHandler(http, chat_request(server), HttpOptions()) as h:
            async for events, read_ns in h.events():
                assert events and isinstance(read_ns, int)
                break
        await asyncio.sleep(0.05)
        assert client_sockets_to(server.port) == 0


async def test_no_fd_or_connection_growth_across_every_path():
    async def handler(request, n):
        kind = request.headers.get("x-case")
        if kind == "ok":
            return await sse(request, chat_events(["a", "b"]))
        if kind == "500":
            return web.json_response({"error": "x"}, status=500)
        if kind == "drop":
            return await sse(request, chat_events(["a"])[:1] + [b"data: {"], end="drop")
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await server.stall(2)
        return resp

    proc = psutil.Process()
    async with Tiny(handler) as server:
        before = proc.num_fds()
        for round_ in range(3):
            for case in ("ok", "500", "drop", "stall"):
                req = chat_request(server, headers={"x-case": case})
                await run(pipe(idle_timeout=0.2, retries=0), req)
        await asyncio.sleep(0.1)
        assert proc.num_fds() <= before
        assert client_sockets_to(server.port) == 0


# --- too large ------------------------------------------------------------------------------------


async def test_oversize_event_delivers_the_events_before_it_then_fails_too_large():
    async def handler(request, n):
        events = chat_events(["a", "b"])
        big = b"data: " + b'{"x":"' + b"y" * 5000 + b'"}\n\n'
        return await sse(request, [events[0] + events[1] + big])

    pipeline = PipelineBuilder().provider("openai-chat").max_event_bytes(1000).build()
    async with Tiny(handler) as server, aiohttp.ClientSession() as http:
        h = HttpStreamHandler(http, chat_request(server), HttpOptions(), max_event_bytes=1000)
        batches = []
        with pytest.raises(StreamError) as info:
            async for events, _ in h.events():
                batches.append(events)
        await h.close()
        assert info.value.kind == "too_large"
        assert [len(b) for b in batches] == [2]
        stream, _ = await run(pipeline, chat_request(server))
    assert stream.result.error.kind == "too_large" and stream.result.text == "ab"


# --- secrets ------------------------------------------------------------------------------------


async def test_the_api_key_never_leaks_into_errors_logs_or_results(caplog):
    caplog.set_level(logging.DEBUG)

    async def handler(request, n):
        case = request.headers.get("x-case")
        echoed = json.dumps({"error": {"message": f"bad key {request.headers.get('Authorization')}"}})
        if case == "401":
            return web.Response(status=401, text=echoed, content_type="application/json")
        if case == "429":
            return web.Response(status=429, text=echoed, content_type="application/json", headers={"Retry-After": "0"})
        if case == "500":
            return web.Response(status=500, text=echoed, content_type="application/json")
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await server.stall(2)
        return resp

    texts = []
    async with Tiny(handler) as server, aiohttp.ClientSession() as http:
        requests = [chat_request(server, api_key=CANARY, headers={"x-case": c}) for c in ("401", "429", "500", "stall")]
        requests.append(Request.openai_chat(base_url=f"http://127.0.0.1:{unused_port()}/v1", model="m", messages=[],
                                            api_key=CANARY))
        options = HttpOptions(idle_timeout=0.3, retries=1, **FAST)
        kinds = []
        for req in requests:
            h = HttpStreamHandler(http, req, options)
            with pytest.raises(StreamError) as info:
                async for _ in h.events():
                    pass
            await h.close()
            kinds.append(info.value.kind)
            texts += [str(info.value), repr(info.value), repr(h), str(info.value.received), repr(req), str(req)]
            stream, tokens = await run(pipe(idle_timeout=0.3, retries=1, **FAST), req, session=http)
            texts += [msgspec.json.encode(stream.result).decode(), repr(tokens), repr(stream.result)]
    assert kinds == ["http", "rate_limited", "http", "idle_timeout", "connect"]
    texts.append(caplog.text)
    assert any("bad key" in t for t in texts)  # the echoed bodies did reach the errors...
    for t in texts:
        assert CANARY not in t  # ...with the key scrubbed out


async def test_no_auth_header_is_sent_without_a_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)

    async def handler(request, n):
        return await sse(request, chat_events(["x"]))

    async with Tiny(handler) as server:
        await run(pipe(), chat_request(server, api_key=None))
        monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env-1234")
        await run(pipe(), chat_request(server, api_key=None))
    assert "Authorization" not in server.requests[0]["headers"]
    assert server.requests[1]["headers"]["Authorization"] == "Bearer sk-from-env-1234"


# --- options and rate limits ----------------------------------------------------------------------


def test_http_options_come_from_the_builder_and_reject_unknown_names():
    p = PipelineBuilder().http(idle_timeout=5, retries=0, rpm=60).build()
    opts = HttpOptions.from_dict(p.http_options)
    assert (opts.idle_timeout, opts.retries, opts.rpm, opts.connect_timeout) == (5, 0, 60, 10.0)
    with pytest.raises(ConfigurationError):
        HttpOptions.from_dict({"idle_timout": 5})
    with pytest.raises(ConfigurationError):
        HttpOptions.from_dict({"retries": -1})


async def test_rate_limiter_spaces_requests_at_rpm_and_waits_out_token_debt(monkeypatch):
    now = [0.0]

    async def fake_sleep(d):
        now[0] += d

    monkeypatch.setattr("pipeline.http.asyncio.sleep", fake_sleep)
    lim = RateLimiter(rpm=120, clock=lambda: now[0])  # 2 per second, burst of one second = 2
    times = []
    for _ in range(5):
        await lim.acquire()
        times.append(now[0])
    assert times == pytest.approx([0, 0, 0.5, 1.0, 1.5])

    now[0] = 0.0
    lim = RateLimiter(tpm=600, clock=lambda: now[0])  # 10 tokens/s, burst 10
    await lim.acquire()
    assert now[0] == 0
    lim.record_tokens(40)  # 30 beyond the burst: 3 s of debt
    await lim.acquire()
    assert now[0] == pytest.approx(3.0)


async def test_rpm_limit_is_shared_by_a_pipelines_streams():
    async def handler(request, n):
        return await sse(request, chat_events(["x"]))

    pipeline = pipe(rpm=600)  # 10/s, burst 10: the 11th..13th request wait 0.1 s each
    async with Tiny(handler) as server:
        t0 = time.monotonic()
        for _ in range(13):
            await run(pipeline, chat_request(server))
        elapsed = time.monotonic() - t0
    assert elapsed >= 0.25


# --- read paths: aiohttp internals (fast) and the public fallback ----------------------------------

import pipeline.http as http_mod  # noqa: E402


@pytest.fixture(params=["fast", "public"])
def read_path(request, monkeypatch):
    """Run a test over the fast read path (sock_read off after the headers, one idle timer per
    body, buffered chunks drained in one piece) and over the public one (readany, sock_read),
    which is what runs on an aiohttp without the internals the fast path relies on."""
    if request.param == "public":
        monkeypatch.setattr(http_mod, "_FAST_DRAIN", False)
        monkeypatch.setattr(http_mod, "_SOCK_READ_SWITCHABLE", False)
    else:
        assert http_mod._FAST_DRAIN and http_mod._SOCK_READ_SWITCHABLE, "this aiohttp lacks the fast path"
    return request.param


def test_drain_returns_every_buffered_chunk_once_and_resumes_a_paused_protocol():
    class Proto:
        _reading_paused = False
        resumed = 0
        connected = True

        def pause_reading(self):
            self._reading_paused = True

        def resume_reading(self, resume_parser=True):
            self._reading_paused = False
            self.resumed += 1

    loop = asyncio.new_event_loop()
    try:
        proto = Proto()
        reader = aiohttp.StreamReader(proto, 16, loop=loop)  # pauses above 2 * 16 bytes buffered
        chunks = [b"data: 1\n\n", b"data: 22\n\n", b"data: 333\n\n", b"data: 4444\n\n"]
        for c in chunks:
            reader.feed_data(c)
        assert proto._reading_paused  # 40 bytes > 32: the reader asked the transport to pause
        assert http_mod._drain(reader) == b"".join(chunks)
        assert proto.resumed == 1 and not proto._reading_paused
        reader.feed_data(b"data: 5\n\n")
        assert http_mod._drain(reader) == b"data: 5\n\n"
        assert proto.resumed == 1  # not paused: nothing to resume
        reader.feed_eof()
        # The public API agrees the reader is empty and at its end.
        assert reader.at_eof() and reader.read_nowait() == b""
    finally:
        loop.close()


async def test_many_small_and_large_writes_reach_the_parser_exactly(read_path):
    # 300 events in writes that split lines anywhere, then ~1 MiB of events: far above aiohttp's
    # read buffer (2 x 64 KiB), so with a slow consumer reading pauses and must resume.
    small = b"".join(b"id: %d\ndata: {\"n\": %d}\n\n" % (i, i) for i in range(300))
    big = b"".join(b"data: " + b"x" * 4000 + b"%05d\n\n" % i for i in range(250))
    parts = [small[i:i + 37] for i in range(0, len(small), 37)] + [big[i:i + 65536] for i in range(0, len(big), 65536)]

    async def handler(request, n):
        return await sse(request, parts)

    async with Tiny(handler) as server, aiohttp.ClientSession() as http:
        h = HttpStreamHandler(http, chat_request(server), HttpOptions(idle_timeout=5))
        datas, batch_total = [], 0
        async with h:
            async for events, _ in h.events():
                if not datas:
                    await asyncio.sleep(0.2)  # let the server fill the buffer
                datas += [e.data for e in events]
                batch_total += h.batch_bytes
    expected = [b'{"n": %d}' % i for i in range(300)] + [b"x" * 4000 + b"%05d" % i for i in range(250)]
    assert datas == expected
    assert h.bytes_read == batch_total == len(small) + len(big)
    assert h.last_event_id == "299" and not h.discarded_tail


async def test_idle_timeout_mid_body_fires_near_its_value_on_either_path(read_path):
    async def handler(request, n):
        return await two_events_then_silence(request, server)

    async with Tiny(handler) as server, aiohttp.ClientSession() as http:
        t0 = time.monotonic()
        stream, _ = await run(pipe(idle_timeout=0.3), chat_request(server), session=http)
        elapsed = time.monotonic() - t0
        await asyncio.sleep(0.05)
        assert client_sockets_to(server.port) == 0
    assert stream.result.error.kind == "idle_timeout" and stream.result.text == "ab"
    # The last byte came at ~0.1 s; the silence after it is what counts.
    assert 0.35 <= elapsed < 2.0


async def test_drop_with_ids_resumes_exactly_on_either_path(read_path):
    events = chat_events(WORDS, ids=True)

    async def handler(request, n):
        last = request.headers.get("Last-Event-ID")
        if last is None:
            return await sse(request, [*events[:5], events[5][:15]], end="drop")
        return await sse(request, events[int(last):])

    async with Tiny(handler) as server:
        stream, _ = await run(pipe(**FAST), chat_request(server))
    assert stream.result.error is None and stream.result.text == "".join(WORDS)
    assert [r["headers"].get("Last-Event-ID") for r in server.requests] == [None, "5"]


async def test_time_the_consumer_holds_a_batch_is_not_the_servers_silence():
    # The server sends two events, is silent for 0.45 s, then ends. The consumer holds the first
    # batch for 0.6 s (> idle_timeout 0.3): the server's silence while the consumer was busy is
    # 0.45 s, but the client never waited 0.3 s for a byte, so no idle timeout.
    async def handler(request, n):
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        evs = chat_events(["a", "b"])
        await resp.write(evs[0])
        await resp.write(evs[1])
        await asyncio.sleep(0.45)
        for e in evs[2:]:
            await resp.write(e)
        await resp.write_eof()
        return resp

    async with Tiny(handler) as server, aiohttp.ClientSession() as http:
        h = HttpStreamHandler(http, chat_request(server), HttpOptions(idle_timeout=0.3))
        datas = []
        async with h:
            async for events, _ in h.events():
                if not datas:
                    await asyncio.sleep(0.6)
                datas += [e.data for e in events]
    assert datas[-1] == b"[DONE]" and len(datas) == 4


async def test_no_idle_timer_outlives_its_stream():
    async def handler(request, n):
        case = request.headers.get("x-case")
        if case == "drop":
            return await sse(request, chat_events(["a"])[:1], end="drop")
        return await sse(request, chat_events(["a", "b"]))

    def live_watch_timers() -> int:
        loop = asyncio.get_running_loop()
        return sum(1 for t in getattr(loop, "_scheduled", [])
                   if not t.cancelled() and isinstance(getattr(t._callback, "__self__", None), http_mod._IdleWatch))

    async with Tiny(handler) as server, aiohttp.ClientSession() as http:
        for case in ("ok", "drop", "early-exit"):
            h = HttpStreamHandler(http, chat_request(server, headers={"x-case": case}), HttpOptions(idle_timeout=30))
            async with h:
                async for _ in h.events():
                    if case == "early-exit":
                        assert live_watch_timers() == 1  # the watch is on while the body is read
                        break
            assert live_watch_timers() == 0, case
