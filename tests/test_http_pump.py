"""HttpStreamHandler.pump(): the events of each read handed to a sink from inside aiohttp's
data_received (no task wake-up per read), with events()' retries, resumes, timeouts and errors.

Every test runs over the four ways pump() can read a body: "direct" (a connection that decodes
the chunked body itself hands each read to the _Pusher, pipeline/chunked.py), "push" (the _Pusher
standing in for the reader's waiter), "pull" (readany() for a reader _Pusher cannot stand in for)
and "events" (an aiohttp without the internals: pump() falls back to events())."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web

import pipeline.chunked as chunked_mod
import pipeline.http as http_mod
from pipeline.chunked import sse_connector
from pipeline.errors import StreamError, TooLargeError
from pipeline.http import HttpOptions, HttpStreamHandler
from test_http import FAST, WORDS, Tiny, chat_events, chat_request, client_sockets_to, sse, two_events_then_silence


@pytest.fixture(params=["direct", "push", "pull", "events"])
def pump_path(request, monkeypatch):
    if request.param == "direct":
        # Sessions of these tests get the connector the ingest and stream_request use.
        plain = aiohttp.ClientSession
        monkeypatch.setattr(aiohttp, "ClientSession", lambda *a, **kw: plain(*a, connector=sse_connector(), **kw))
        feed = chunked_mod.ChunkedDecoder.feed
        calls = []

        def counted(self, data):
            calls.append(len(data))
            return feed(self, data)

        monkeypatch.setattr(chunked_mod.ChunkedDecoder, "feed", counted)
        yield request.param
        assert calls, "no body was decoded by pipeline/chunked.py"
        return
    if request.param == "pull":
        monkeypatch.setattr(http_mod, "_pushable", lambda content: False)
    elif request.param == "events":
        monkeypatch.setattr(http_mod, "_FAST_DRAIN", False)
    else:
        assert http_mod._FAST_DRAIN, "this aiohttp lacks the internals the push path relies on"
    yield request.param


class Sink:
    """Collects what pump() hands over; can ask for pauses."""

    def __init__(self, pause_after: int | None = None) -> None:
        self.datas: list[bytes] = []
        self.nbytes = 0
        self.calls = 0
        self.pause_after = pause_after
        self.paused = False
        self.pauses = 0
        self.called_while_paused = 0

    def __call__(self, events, read_ns: int, nbytes: int) -> bool:
        if self.paused:
            self.called_while_paused += 1
        assert isinstance(read_ns, int) and read_ns > 0
        self.calls += 1
        self.datas += [e.data for e in events]
        self.nbytes += nbytes
        if self.pause_after is not None and self.calls == self.pause_after:
            self.paused = True
            return False
        return True

    async def wait(self) -> None:
        self.pauses += 1
        await asyncio.sleep(0.2)  # the server keeps writing meanwhile: aiohttp buffers, then pauses
        self.paused = False


SMALL = b"".join(b"id: %d\ndata: {\"n\": %d}\n\n" % (i, i) for i in range(300))
BIG = b"".join(b"data: " + b"x" * 4000 + b"%05d\n\n" % i for i in range(250))
EXPECTED = [b'{"n": %d}' % i for i in range(300)] + [b"x" * 4000 + b"%05d" % i for i in range(250)]
# Writes that split lines anywhere, then ~1 MiB: far above aiohttp's read buffer (2 x 64 KiB).
PARTS = [SMALL[i:i + 37] for i in range(0, len(SMALL), 37)] + [BIG[i:i + 65536] for i in range(0, len(BIG), 65536)]


@pytest.mark.parametrize("pause_after", [None, 1, 7])
async def test_pump_hands_over_every_event_once_in_order(pump_path, pause_after):
    async def handler(request, n):
        return await sse(request, PARTS)

    sink = Sink(pause_after)
    async with Tiny(handler) as server, aiohttp.ClientSession() as http:
        h = HttpStreamHandler(http, chat_request(server), HttpOptions(idle_timeout=5))
        async with h:
            await h.pump(sink, sink.wait)
    assert sink.datas == EXPECTED
    assert h.bytes_read == sink.nbytes == len(SMALL) + len(BIG)
    assert h.last_event_id == "299" and not h.discarded_tail
    assert sink.pauses == (0 if pause_after is None else 1)
    assert sink.called_while_paused == 0


async def test_pump_idle_timeout_fires_near_its_value_and_releases_the_connection(pump_path):
    async def handler(request, n):
        return await two_events_then_silence(request, server)

    sink = Sink()
    async with Tiny(handler) as server, aiohttp.ClientSession() as http:
        h = HttpStreamHandler(http, chat_request(server), HttpOptions(idle_timeout=0.3))
        t0 = time.monotonic()
        with pytest.raises(StreamError) as info:
            async with h:
                await h.pump(sink, sink.wait)
        elapsed = time.monotonic() - t0
        await asyncio.sleep(0.05)
        assert client_sockets_to(server.port) == 0
    assert info.value.kind == "idle_timeout"
    assert len(sink.datas) == 2
    assert 0.35 <= elapsed < 2.0  # the last byte came at ~0.1 s; the silence after it counts


async def test_pump_resumes_a_drop_with_last_event_id_exactly(pump_path):
    events = chat_events(WORDS, ids=True)

    async def handler(request, n):
        last = request.headers.get("Last-Event-ID")
        if last is None:
            return await sse(request, [*events[:5], events[5][:15]], end="drop")
        return await sse(request, events[int(last):])

    sink = Sink()
    async with Tiny(handler) as server, aiohttp.ClientSession() as http:
        h = HttpStreamHandler(http, chat_request(server), HttpOptions(**FAST))
        async with h:
            await h.pump(sink, sink.wait)
    # Each event once: the cut-off sixth event came whole from the resumed connection.
    expected = [e.split(b"data: ", 1)[1].rstrip(b"\n") for e in events]
    assert sink.datas == expected
    assert [r["headers"].get("Last-Event-ID") for r in server.requests] == [None, "5"]
    assert h.reconnects == 1


async def test_pump_hands_over_the_events_before_an_oversize_one_then_raises_too_large(pump_path):
    head = chat_events(["a", "b"])[:2]
    big = b"data: " + b"y" * 5000 + b"\n\n"

    async def handler(request, n):
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for part in (*head, big):
            await resp.write(part)
        await server.stall(5)  # the body is not over: the connection must be closed, not pooled
        return resp

    sink = Sink()
    async with Tiny(handler) as server, aiohttp.ClientSession() as http:
        h = HttpStreamHandler(http, chat_request(server), HttpOptions(), max_event_bytes=1000)
        with pytest.raises(TooLargeError):
            async with h:
                await h.pump(sink, sink.wait)
        await asyncio.sleep(0.05)
        assert client_sockets_to(server.port) == 0
    assert sink.datas == [e.split(b"data: ", 1)[1].rstrip(b"\n") for e in head]


async def test_a_sink_that_raises_fails_the_pump_not_aiohttp(pump_path):
    class Boom(Exception):
        pass

    def sink(events, read_ns, nbytes):
        raise Boom("sink failed")

    async def handler(request, n):
        return await sse(request, chat_events(["a", "b", "c"]), delay=0.01)

    async with Tiny(handler) as server, aiohttp.ClientSession() as http:
        h = HttpStreamHandler(http, chat_request(server), HttpOptions())
        with pytest.raises(Boom):
            async with h:
                await h.pump(sink, asyncio.sleep)
        await asyncio.sleep(0.05)
        assert client_sockets_to(server.port) == 0
        # The session is still good for the next stream.
        ok = Sink()
        h2 = HttpStreamHandler(http, chat_request(server), HttpOptions())
        async with h2:
            await h2.pump(ok, ok.wait)
        assert len(ok.datas) == len(chat_events(["a", "b", "c"]))


async def test_cancelling_a_pump_releases_the_connection(pump_path):
    async def handler(request, n):
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chat_events(["a"])[0])
        await server.stall(5)
        return resp

    sink = Sink()
    async with Tiny(handler) as server, aiohttp.ClientSession() as http:
        h = HttpStreamHandler(http, chat_request(server), HttpOptions(idle_timeout=5))

        async def go():
            async with h:
                await h.pump(sink, sink.wait)

        task = asyncio.ensure_future(go())
        for _ in range(100):
            if sink.datas:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)
        assert client_sockets_to(server.port) == 0
    assert len(sink.datas) == 1


async def test_close_from_the_sink_ends_the_pump_and_releases_the_connection(pump_path):
    async def handler(request, n):
        # With ids: a drop would be resumed, so only a close that is honoured ends it at once.
        return await sse(request, chat_events(["x"] * 400, ids=True), delay=0.01)

    async with Tiny(handler) as server, aiohttp.ClientSession() as http:
        h = HttpStreamHandler(http, chat_request(server), HttpOptions(**FAST))
        got: list[bytes] = []

        def sink(events, read_ns, nbytes):
            got.extend(e.data for e in events)
            if len(got) >= 3:
                asyncio.get_running_loop().create_task(h.close())  # a consumer done early
            return True

        await asyncio.wait_for(h.pump(sink, asyncio.sleep), 5)  # ends, never hangs or resumes
        await asyncio.sleep(0.05)
        assert client_sockets_to(server.port) == 0
    assert 3 <= len(got) < 400
    assert len(server.requests) == 1  # closed by us: not a drop to resume from


async def test_reads_that_trickle_in_go_straight_to_the_sink_in_order():
    """On a connection from sse_connector(), reads arriving while pump() waits are handed to the
    sink from data_received itself (_Pusher._direct), with pauses in between honoured."""
    if not http_mod._FAST_DRAIN:
        pytest.skip("this aiohttp lacks the reader internals _Pusher relies on: pump() reads through events()")
    events = chat_events(WORDS * 3)
    seen = []
    direct = http_mod._Pusher._direct

    def counted(self, data):
        seen.append(len(data))
        return direct(self, data)

    async def handler(request, n):
        return await sse(request, events, delay=0.01)  # slow enough that the pump is waiting

    sink = Sink(pause_after=10)
    mp = pytest.MonkeyPatch()
    mp.setattr(http_mod._Pusher, "_direct", counted)
    try:
        async with Tiny(handler) as server, aiohttp.ClientSession(connector=sse_connector()) as http:
            h = HttpStreamHandler(http, chat_request(server), HttpOptions())
            async with h:
                await h.pump(sink, sink.wait)
    finally:
        mp.undo()
    assert sink.datas == [e.split(b"data: ", 1)[1].rstrip(b"\n") for e in events]
    assert sink.pauses == 1 and sink.called_while_paused == 0
    # Reads before the pause came one by one, straight to the sink (after it, the 0.2 s pause
    # let the whole rest gather in the body's reader).
    assert len(seen) >= 8
