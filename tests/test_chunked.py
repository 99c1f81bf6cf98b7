"""pipeline/chunked.py: ChunkedDecoder against the framing as RFC 9112 section 7.1 writes it, cut
at every point; SseResponseHandler on loopback connections (reuse, aiohttp's responses in
between, broken framing, drops, and aiohttp without the internals it relies on)."""

from __future__ import annotations

import asyncio
import gzip
import random

import aiohttp
import pytest

import pipeline.chunked as chunked_mod
from pipeline.chunked import ChunkedDecoder, ChunkedFormatError, _plain_chunked_200, sse_connector


def encode(pieces: list[bytes], *, ext: bool = False, trailers: tuple[bytes, ...] = (), upper: bool = False) -> bytes:
    """A chunked body: each piece one chunk, then the last chunk and the trailer section."""
    out = []
    for p in pieces:
        size = f"{len(p):X}" if upper else f"{len(p):x}"
        out.append(size.encode() + (b";name=value" if ext else b"") + b"\r\n" + p + b"\r\n")
    out.append(b"0" + (b";last" if ext else b"") + b"\r\n")
    for t in trailers:
        out.append(t + b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def decode_in_reads(wire: bytes, cuts: list[int]) -> tuple[bytes, ChunkedDecoder]:
    dec = ChunkedDecoder()
    body = []
    prev = 0
    for c in [*cuts, len(wire)]:
        if dec.done:
            break
        body.append(dec.feed(wire[prev:c]))
        prev = c
    return b"".join(body), dec


PIECES = [b"data: {\"a\": 1}\n\n", b"x" * 300, b"\r\n\r\n", b"0\r\n", b"data: last\n\n"]


@pytest.mark.parametrize("ext,trailers,upper", [(False, (), False), (True, (b"X-Checksum: 1",), True)])
def test_every_single_cut_gives_the_body(ext, trailers, upper):
    wire = encode(PIECES, ext=ext, trailers=trailers, upper=upper)
    want = b"".join(PIECES)
    for cut in range(len(wire) + 1):
        body, dec = decode_in_reads(wire, [cut])
        assert body == want, cut
        assert dec.done and dec.tail == b"", cut


def test_byte_by_byte():
    wire = encode(PIECES, ext=True, trailers=(b"A: b", b"C: d"))
    body, dec = decode_in_reads(wire, list(range(1, len(wire))))
    assert body == b"".join(PIECES) and dec.done


def test_random_pieces_and_reads():
    rng = random.Random(5)
    for _ in range(300):
        pieces = [rng.randbytes(rng.choice([1, 2, 15, 16, 17, 255, 256, 4096])) for _ in range(rng.randint(0, 8))]
        wire = encode(pieces, ext=rng.random() < 0.3, upper=rng.random() < 0.5)
        cuts = sorted(rng.sample(range(len(wire) + 1), rng.randint(0, min(12, len(wire)))))
        body, dec = decode_in_reads(wire, cuts)
        assert body == b"".join(pieces)
        assert dec.done


def test_what_follows_the_body_is_its_tail():
    wire = encode([b"abc"]) + b"HTTP/1.1 200 OK\r\n"
    dec = ChunkedDecoder()
    assert dec.feed(wire) == b"abc"
    assert dec.done and dec.tail == b"HTTP/1.1 200 OK\r\n"


def test_no_end_without_the_last_chunk():
    dec = ChunkedDecoder()
    assert dec.feed(b"3\r\nabc\r\n") == b"abc"
    assert not dec.done
    assert dec.feed(b"0\r\n") == b""
    assert not dec.done  # the trailer section's empty line is still to come
    dec.feed(b"\r\n")
    assert dec.done


@pytest.mark.parametrize("wire", [
    b"zz\r\nabc\r\n",  # not hex
    b"\r\nabc\r\n",  # no size
    b"-3\r\nabc\r\n",  # a sign is not hex
    b"0x3\r\nabc\r\n",  # nor a prefix
    b"3\r\nabcX\r\n",  # data longer than its size
    b"3\r\nabc\n",  # bare LF after the data
    b"1" * 17 + b"\r\n",  # a size beyond 64 bits
])
def test_broken_framing_is_a_typed_error(wire):
    dec = ChunkedDecoder()
    with pytest.raises(ChunkedFormatError):
        dec.feed(wire)


def test_an_endless_size_line_is_refused():
    dec = ChunkedDecoder()
    with pytest.raises(ChunkedFormatError):
        for _ in range(100):
            dec.feed(b"1" * 100)


@pytest.mark.parametrize("head,want", [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n", (200, True)),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding:  Chunked \r\n\r\n", (200, True)),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", (200, False)),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", (200, False)),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Encoding: gzip\r\n\r\n", (200, False)),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", (200, False)),
    (b"HTTP/1.1 200 OK\r\n\r\n", (200, False)),  # read to the close: aiohttp's
    (b"HTTP/1.1 429 Too Many Requests\r\nTransfer-Encoding: chunked\r\n\r\n", (429, False)),
    (b"HTTP/1.1 100 Continue\r\n\r\n", (100, False)),
])
def test_only_plain_chunked_200s_are_ours(head, want):
    assert _plain_chunked_200(head) == want


# --- SseResponseHandler on real connections ----------------------------------------------------

SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


class RawServer:
    """A loopback server answering each request on a connection with the next of `responses`
    (bytes, written in `split`-byte writes): it counts connections and requests."""

    def __init__(self, responses: list[bytes], split: int = 0, drop: bool = False) -> None:
        self.responses = responses
        self.split = split
        self.drop = drop  # close the connection after each response
        self.connections = 0
        self.requests = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                resp = self.responses[self.requests]
                self.requests += 1
                step = self.split or len(resp)
                for i in range(0, len(resp), step):
                    writer.write(resp[i : i + step])
                    await writer.drain()
                    await asyncio.sleep(0)
                if self.drop:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> "RawServer":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = "http://127.0.0.1:%d/v1/chat" % self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()


def sse_body(n: int, tag: str) -> bytes:
    return b"".join(b"data: %s-%d\n\n" % (tag.encode(), i) for i in range(n))


async def read_all(http: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async def go() -> tuple[int, bytes]:
        async with http.post(url, json={"stream": True}) as resp:
            return resp.status, await resp.read()

    return await asyncio.wait_for(go(), 10)  # a body whose end we miss fails, never hangs


@pytest.fixture
def decoded(monkeypatch):
    """Body bytes ChunkedDecoder produced (proof that our decoding, not aiohttp's, ran)."""
    out = []
    feed = chunked_mod.ChunkedDecoder.feed

    def counted(self, data):
        body = feed(self, data)
        out.append(body)
        return body

    monkeypatch.setattr(chunked_mod.ChunkedDecoder, "feed", counted)
    return out


@pytest.mark.parametrize("split", [0, 1, 7])
async def test_chunked_bodies_decode_ours_and_the_connection_is_reused(decoded, split):
    one, two = sse_body(5, "a"), sse_body(9, "b")
    responses = [SSE_HEAD + encode([one[:10], one[10:]]), SSE_HEAD + encode([two], ext=True, trailers=(b"X: y",))]
    async with RawServer(responses, split) as server, aiohttp.ClientSession(connector=sse_connector()) as http:
        assert await read_all(http, server.url) == (200, one)
        assert await read_all(http, server.url) == (200, two)
    assert b"".join(decoded) == one + two
    assert (server.connections, server.requests) == (1, 2)  # kept alive after our decoding


async def test_after_a_response_left_to_aiohttp_the_next_one_is_ours_again(decoded):
    error = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops"
    gz = gzip.compress(sse_body(3, "g"))
    zipped = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n" + encode([gz])
    plain = sse_body(4, "p")
    responses = [error, zipped, SSE_HEAD + encode([plain])]
    async with RawServer(responses) as server, aiohttp.ClientSession(connector=sse_connector()) as http:
        assert await read_all(http, server.url) == (500, b"oops")
        assert await read_all(http, server.url) == (200, sse_body(3, "g"))  # aiohttp inflates it
        assert await read_all(http, server.url) == (200, plain)
    assert b"".join(decoded) == plain
    assert server.connections == 1


async def test_an_interim_response_before_the_real_one(decoded):
    body = sse_body(3, "c")
    responses = [b"HTTP/1.1 100 Continue\r\n\r\n" + SSE_HEAD + encode([body])]
    async with RawServer(responses, split=5) as server, aiohttp.ClientSession(connector=sse_connector()) as http:
        assert await read_all(http, server.url) == (200, body)
    assert b"".join(decoded) == body


@pytest.mark.parametrize("bad", [b"zz\r\nabc\r\n", b"3\r\nabcdef"])
async def test_broken_framing_fails_the_body_as_a_payload_error_and_closes(bad):
    responses = [SSE_HEAD + b"5\r\nhello\r\n" + bad]
    async with RawServer(responses) as server, aiohttp.ClientSession(connector=sse_connector()) as http:
        async with http.post(server.url, json={}) as resp:
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        assert len(http.connector._conns) == 0  # not put back for reuse  # type: ignore[union-attr]


async def test_a_drop_mid_chunk_is_a_payload_error():
    async with RawServer([SSE_HEAD + b"a\r\nhello"], drop=True) as server, aiohttp.ClientSession(connector=sse_connector()) as http:
        async with http.post(server.url, json={}) as resp:
            got = await resp.content.readany()
            with pytest.raises(aiohttp.ClientPayloadError):
                while await resp.content.readany():
                    pass
    assert got == b"hello"


async def test_without_the_internals_it_relies_on_aiohttp_reads_everything(decoded, monkeypatch):
    body = sse_body(4, "f")
    monkeypatch.setattr(chunked_mod, "raw_chunked_supported", lambda: False)
    async with RawServer([SSE_HEAD + encode([body])]) as server, aiohttp.ClientSession(connector=sse_connector()) as http:
        assert http.connector._factory.func is not chunked_mod.SseResponseHandler  # type: ignore[union-attr]
        assert await read_all(http, server.url) == (200, body)
    assert decoded == []


async def test_a_protocol_missing_state_it_reads_leaves_every_response_to_aiohttp(decoded, monkeypatch):
    body = sse_body(4, "m")
    monkeypatch.setattr(chunked_mod, "_PROTOCOL_FIELDS", (*chunked_mod._PROTOCOL_FIELDS, "_no_such_field"))
    async with RawServer([SSE_HEAD + encode([body])] * 2) as server, aiohttp.ClientSession(connector=sse_connector()) as http:
        assert await read_all(http, server.url) == (200, body)
        assert await read_all(http, server.url) == (200, body)
    assert decoded == []
