"""Every fault of the mock provider, in every dialect, read by the project's own parser, adapters
and HTTP client, ends in its documented typed outcome (pipeline.testing.FAULTS)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import aiohttp
import pytest

from pipeline import PipelineBuilder, SseParser
from pipeline.providers import get_adapter
from pipeline.sources import Request
from pipeline.testing import DIALECTS, FAULTS, MockProviderServer, expected_stream, parse_fault
from pipeline.tokens import Delta, Done, Error, Text

PROMPT = "Count the rivers of 東京 👋"


def body_for(dialect: str, tokens: int = 30, seed: int = 21, **mock) -> dict:
    """A minimal native request of `dialect` with mock knobs."""
    m = {"seed": seed, **mock}
    if dialect in ("openai-chat", "openai-completions"):
        key = "messages" if dialect == "openai-chat" else "prompt"
        value = [{"role": "user", "content": PROMPT}] if dialect == "openai-chat" else PROMPT
        return {"model": "m", key: value, "stream": True, "max_tokens": tokens, "stream_options": {"include_usage": True}, "mock": m}
    if dialect == "openai-responses":
        return {"model": "m", "input": PROMPT, "stream": True, "max_output_tokens": tokens, "mock": m}
    if dialect == "anthropic":
        return {"model": "m", "max_tokens": tokens, "messages": [{"role": "user", "content": PROMPT}], "stream": True, "mock": m}
    if dialect == "gemini":
        return {"contents": [{"parts": [{"text": PROMPT}]}], "generationConfig": {"maxOutputTokens": tokens}, "mock": m}
    return {"inputs": PROMPT, "parameters": {"max_new_tokens": tokens}, "mock": m}


async def fetch(session, url, body, headers=None):
    """(status, headers, reads, payload error) of one POST, reading the body raw."""
    reads, err = [], None
    async with session.post(url, json=body, headers=headers or {}) as resp:
        try:
            async for chunk in resp.content.iter_any():
                reads.append(chunk)
        except aiohttp.ClientPayloadError as exc:
            err = exc
        return resp.status, resp.headers, reads, err


def tokens_of(dialect: str, reads: list[bytes], max_event_bytes: int | None = None) -> list:
    """SseParser + the dialect adapter over the reads, closed at the end (as core does)."""
    parser = SseParser(max_event_bytes) if max_event_bytes else SseParser()
    adapter = get_adapter(dialect)()
    out: list = []
    for r in reads:
        out += adapter.feed(parser.feed(r))
        if adapter.finished:
            return out
    out += adapter.feed(parser.close())
    if not adapter.finished:
        out += adapter.close(parser.discarded_tail)
    return out


def text_of(tokens: list) -> str:
    return "".join(t.content for t in tokens if isinstance(t, (Delta, Text)) and t.index == 0)


async def run_http(mock, dialect: str, body: dict, headers: dict | None = None, **http):
    """The project's own HTTP client (stream_request) against the mock: (result, stream)."""
    http.setdefault("retries", 0)
    pipe = PipelineBuilder().provider(dialect).http(**http).build()
    req = Request(url=mock.url(dialect), headers={"content-type": "application/json", **(headers or {})}, body=json.dumps(body).encode(), dialect=dialect)
    stream = pipe.stream_request(req)
    result = await asyncio.wait_for(stream.collect(), 30)
    return result, stream


@pytest.fixture
async def mock():
    async with MockProviderServer(seed=77) as server:
        yield server


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


def test_every_fault_is_documented_and_parses():
    for name, (arg, does, outcome) in FAULTS.items():
        assert parse_fault(name).name == name and does and outcome
    assert parse_fault("stall:2.5").number(0) == 2.5
    assert parse_fault("oversized:5MiB").oversize_bytes() == 5 * 1024 * 1024
    assert parse_fault("rate_limited").name == "429"
    with pytest.raises(ValueError):
        parse_fault("no_such_fault")


# --- faults a client sees in the body -----------------------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_disconnect_at_byte_n_is_truncated(mock, session, dialect):
    body = body_for(dialect, 40, fault="disconnect:700")
    status, headers, reads, err = await fetch(session, mock.url(dialect), body)
    assert status == 200 and headers["x-mock-fault"] == "disconnect:700"
    assert err is not None  # the chunked body never ended: a transport error, not a clean end
    assert sum(map(len, reads)) == 700
    tokens = tokens_of(dialect, reads)
    assert isinstance(tokens[-1], Error) and tokens[-1].kind == "truncated" and tokens[-1].retryable
    full = expected_stream(dialect, body).text
    assert full.startswith(text_of(tokens)) and len(text_of(tokens)) < len(full)
    log = mock.stream_log(headers["x-request-id"])
    assert log.status == "disconnected" and log.bytes_sent == 700


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_clean_eof_before_the_end_is_truncated(mock, session, dialect):
    body = body_for(dialect, 20, fault="truncate")
    status, _, reads, err = await fetch(session, mock.url(dialect), body)
    assert status == 200 and err is None
    tokens = tokens_of(dialect, reads)
    assert isinstance(tokens[-1], Error) and tokens[-1].kind == "truncated"
    assert expected_stream(dialect, body).text.startswith(text_of(tokens))


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_malformed_chunk_is_malformed(mock, session, dialect):
    body = body_for(dialect, 20, fault="malformed")
    _, _, reads, _ = await fetch(session, mock.url(dialect), body)
    tokens = tokens_of(dialect, reads)
    assert isinstance(tokens[-1], Error) and tokens[-1].kind == "malformed"
    full = expected_stream(dialect, body).text
    got = text_of(tokens)
    assert got and full.startswith(got) and got != full


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_in_band_error_is_a_provider_error_keeping_the_text_before_it(mock, session, dialect):
    body = body_for(dialect, 20, fault="error", fault_at=8)
    _, headers, reads, _ = await fetch(session, mock.url(dialect), body)
    tokens = tokens_of(dialect, reads)
    assert isinstance(tokens[-1], Error) and tokens[-1].kind == "provider"
    got = text_of(tokens)
    # The first 8 content events (8 or more tokens: a character split over tokens comes whole)
    # arrived, and the client got exactly the text the server says it sent.
    log = mock.stream_log(headers["x-request-id"])
    assert 8 <= log.text_tokens < 20 and got and expected_stream(dialect, body).text.startswith(got)
    assert log.text_sha256 == hashlib.sha256(got.encode()).hexdigest()
    assert not any(isinstance(t, Done) for t in tokens)


@pytest.mark.parametrize("fault", ["keepalive", "crlf", "cr", "lf", "bytewise", "ids"])
@pytest.mark.parametrize("dialect", DIALECTS)
async def test_framing_faults_give_the_clean_result(mock, session, dialect, fault):
    body = body_for(dialect, 15, fault=fault)
    _, _, reads, err = await fetch(session, mock.url(dialect), body)
    data = b"".join(reads)
    assert err is None
    if fault == "keepalive":
        assert b": keep-alive" in data
    elif fault == "cr":
        assert b"\r" in data and b"\n" not in data
    elif fault == "crlf":
        assert b"\n" not in data.replace(b"\r\n", b"")
    elif fault == "ids":
        assert b"id: mock-" in data or b"id:mock-" in data
    clean_body = body_for(dialect, 15)
    _, _, clean, _ = await fetch(session, mock.url(dialect), clean_body)
    faulted_tokens, clean_tokens = tokens_of(dialect, reads), tokens_of(dialect, clean)
    assert isinstance(faulted_tokens[-1], Done)
    assert faulted_tokens == clean_tokens


async def test_one_byte_writes_reach_the_client_in_many_reads(mock, session):
    body = body_for("anthropic", 10, fault="bytewise")
    _, _, reads, _ = await fetch(session, mock.url("anthropic"), body)
    # Not every write is its own read (TCP coalesces), but far more reads than events arrive.
    assert len(reads) > 30
    assert text_of(tokens_of("anthropic", reads)) == expected_stream("anthropic", body).text


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_oversized_event_is_too_large_under_a_smaller_limit(mock, session, dialect):
    body = body_for(dialect, 10, fault="oversized")
    _, _, reads, _ = await fetch(session, mock.url(dialect), body)
    assert max(len(e) for e in b"".join(reads).replace(b"\r", b"\n").split(b"\n")) > 4 * 1024 * 1024
    small = PipelineBuilder().provider(dialect).max_event_bytes(1024 * 1024).build().collect(reads)
    assert small.error is not None and small.error.kind == "too_large"
    big = PipelineBuilder().provider(dialect).build().collect(reads)  # 16 MiB default
    assert big.ok, big.error
    exp = expected_stream(dialect, body)
    assert big.text == exp.text and len(exp.text) > 4 * 1024 * 1024


# --- faults the HTTP client handles ---------------------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_429_is_rate_limited_with_retry_after(mock, session, dialect):
    body = body_for(dialect, fault="429:3")
    status, headers, reads, _ = await fetch(session, mock.url(dialect), body)
    assert status == 429 and headers["Retry-After"] == "3"
    err = json.loads(b"".join(reads))
    # Each API's own error body shape.
    if dialect == "anthropic":
        assert err["type"] == "error" and err["error"]["type"] == "rate_limit_error"
    elif dialect == "gemini":
        assert err["error"]["code"] == 429 and err["error"]["status"] == "RESOURCE_EXHAUSTED"
    elif dialect == "tgi-generate":
        assert err["error_type"] == "overloaded"
    else:
        assert err["error"]["code"] == "rate_limit_exceeded"
    result, _ = await run_http(mock, dialect, body)
    assert result.error.kind == "rate_limited" and result.error.http_status == 429
    assert result.error.retry_after == 3.0 and result.error.retryable


@pytest.mark.parametrize("status", [500, 503])
@pytest.mark.parametrize("dialect", DIALECTS)
async def test_5xx_is_a_retryable_http_error(mock, session, dialect, status):
    body = body_for(dialect, fault=str(status))
    code, headers, reads, _ = await fetch(session, mock.url(dialect), body)
    assert code == status and headers["content-type"].startswith("application/json")
    assert json.loads(b"".join(reads))
    result, _ = await run_http(mock, dialect, body)
    assert result.error.kind == "http" and result.error.http_status == status and result.error.retryable
    assert result.text == ""


async def test_5xx_then_success_with_client_retries(mock):
    # The rate picks the fault per request: with retries the client gets through.
    async with MockProviderServer(seed=3, fault_rates={"503": 0.5}) as flaky:
        body = body_for("openai-chat", 8)
        results = [await run_http(flaky, "openai-chat", body, retries=8, backoff_base=0.001, backoff_max=0.002) for _ in range(8)]
        assert all(r.ok and r.text == expected_stream("openai-chat", body).text for r, _ in results)
        statuses = [log.http_status for log in flaky.streams]
        assert 503 in statuses and statuses.count(200) == 8


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_stall_is_an_idle_timeout_at_the_client(mock, dialect):
    body = body_for(dialect, 20, fault="stall:3")
    t0 = time.monotonic()
    result, _ = await run_http(mock, dialect, body, idle_timeout=0.3)
    assert result.error is not None and result.error.kind == "idle_timeout" and result.error.retryable
    assert time.monotonic() - t0 < 2.5  # the client gave up long before the stall ended
    full = expected_stream(dialect, body).text
    assert result.text and full.startswith(result.text) and result.text != full


async def test_short_stall_under_the_idle_timeout_completes(mock):
    body = body_for("gemini", 10, fault="stall:0.2")
    result, _ = await run_http(mock, "gemini", body, idle_timeout=3)
    assert result.ok and result.text == expected_stream("gemini", body).text


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_drop_then_resume_with_last_event_id_loses_and_repeats_nothing(mock, session, dialect):
    body = body_for(dialect, 30, fault="drop")
    _, _, reads, err = await fetch(session, mock.url(dialect), body)
    raw = b"".join(reads)
    assert err is not None and raw.startswith(b"retry:") and b"id:" in raw
    parser = SseParser()
    parser.feed(raw)
    assert parser.retry == 10

    result, stream = await run_http(mock, dialect, body)
    assert result.ok, result.error
    exp = expected_stream(dialect, body)
    assert result.text == exp.text and result.usage.output_tokens == 30
    assert stream.reconnects == 1
    first, second = mock.streams[-2:]
    assert first.status == "disconnected" and second.resumed_from == first.request_id
    assert second.status == "complete"
    # Together the two legs sent each token exactly once.
    assert first.text_tokens + second.text_tokens == 30


async def test_a_paced_stream_resumed_after_a_drop_is_paced_and_exact(mock):
    body = body_for("openai-chat", 40, fault="drop", tps=200)
    result, stream = await run_http(mock, "openai-chat", body)
    assert result.ok, result.error
    assert result.text == expected_stream("openai-chat", body).text and stream.reconnects == 1
    first, second = mock.streams[-2:]
    assert first.status == "disconnected" and second.resumed_from == first.request_id and second.status == "complete"
    assert first.text_tokens + second.text_tokens == 40
    # The second leg keeps the pace: its content events (one token each) 5 ms apart.
    content = second.text_tokens
    spread = (second.event_times_ns[-1] - second.event_times_ns[0]) / 1e9
    assert content >= 10 and spread >= (content - 2) * 0.005 - 0.002


async def test_a_stall_in_a_paced_stream_still_stalls(mock):
    body = body_for("anthropic", 20, fault="stall:0.3", tps=400)
    result, _ = await run_http(mock, "anthropic", body, idle_timeout=5)
    assert result.ok and result.text == expected_stream("anthropic", body).text
    log = mock.streams[-1]
    gaps = [b - a for a, b in zip(log.event_times_ns, log.event_times_ns[1:])]
    assert log.status == "complete" and max(gaps) >= 0.29e9 and sorted(gaps)[-2] < 0.2e9


async def test_last_event_id_continues_right_after_that_event(mock, session):
    body = body_for("anthropic", 12, fault="ids")
    _, _, reads, _ = await fetch(session, mock.url("anthropic"), body)
    events = SseParser().feed(b"".join(reads))
    k = 6
    resume_id = events[k].id
    _, headers, rest, _ = await fetch(session, mock.url("anthropic"), body, {"Last-Event-ID": resume_id})
    tail = SseParser().feed(b"".join(rest))
    assert [(e.event, e.data, e.id) for e in tail] == [(e.event, e.data, e.id) for e in events[k + 1 :]]
    assert mock.stream_log(headers["x-request-id"]).resumed_from == resume_id.rpartition(".")[0]
    # An id the server never sent is refused rather than silently restarted.
    status, _, _, _ = await fetch(session, mock.url("anthropic"), body, {"Last-Event-ID": "mock-999999.3"})
    assert status == 410


async def test_slow_headers_delay_the_response_not_the_result(mock):
    body = body_for("openai-responses", 10, fault="slow_headers:0.3")
    result, _ = await run_http(mock, "openai-responses", body)
    assert result.ok and result.text == expected_stream("openai-responses", body).text
    log = mock.streams[-1]
    assert (log.headers_ns - log.started_ns) / 1e9 >= 0.29


async def test_fault_rates_are_seeded_and_each_outcome_matches_its_fault(session):
    rates = {"disconnect": 0.15, "500": 0.15, "error": 0.15, "keepalive": 0.15}

    async def run(seed: int) -> list[tuple[str | None, str]]:
        async with MockProviderServer(seed=seed, fault_rates=rates) as server:
            out = []
            for i in range(24):
                body = body_for("openai-chat", 12, seed=i)
                status, headers, reads, _ = await fetch(session, server.url("openai-chat"), body)
                fault = headers.get("x-mock-fault")
                if status != 200:
                    kind = f"http {status}"
                else:
                    last = tokens_of("openai-chat", reads)[-1]
                    kind = last.kind if isinstance(last, Error) else "done"
                out.append((fault, kind))
            return out

    a, b, c = await run(5), await run(5), await run(6)
    assert a == b and a != c
    expected_kind = {None: "done", "keepalive": "done", "disconnect": "truncated", "500": "http 500", "error": "provider"}
    assert all(kind == expected_kind[fault] for fault, kind in a)
    assert len({f for f, _ in a}) >= 4  # a mix, drawn at roughly the rates
