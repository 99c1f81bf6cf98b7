"""Request and Replay: the HTTP request each constructor builds (as each API documents it), API
keys from the environment, redaction of secrets in reprs, typed round trips through msgpack,
and Replay's reads."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from conftest import PROVIDER_FIXTURES, provider_manifest, read_capture
from pipeline import PipelineBuilder
from pipeline.errors import ConfigurationError
from pipeline.sources import Replay, Request, Source, redact_headers

CANARY = "sk-canary-41d9e0b7c3"
MSGS = [{"role": "user", "content": "hi"}]


def body_of(req: Request) -> dict:
    return json.loads(req.body)


@pytest.fixture(autouse=True)
def _no_ambient_keys(monkeypatch):
    for env in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY", "HF_TOKEN", "CO_API_KEY"):
        monkeypatch.delenv(env, raising=False)


# --- constructors: the request each API documents ------------------------------------------------


def test_openai_chat_posts_to_chat_completions_with_stream_and_bearer_key():
    req = Request.openai_chat(base_url="https://api.example.com/v1", model="gpt-x", messages=MSGS,
                              api_key="k-123456", temperature=0.2, custom_id="row-7")
    assert (req.method, req.url) == ("POST", "https://api.example.com/v1/chat/completions")
    assert req.headers["authorization"] == "Bearer k-123456"
    body = body_of(req)
    assert body["model"] == "gpt-x" and body["messages"] == MSGS and body["temperature"] == 0.2
    assert body["stream"] is True
    assert req.dialect == "openai-chat" and req.custom_id == "row-7"


def test_openai_responses_and_completions_use_their_paths():
    r = Request.openai_responses(base_url="http://h/v1", model="m", input="hello", api_key="k-1234")
    c = Request.openai_completions(base_url="http://h/v1", model="m", prompt="once", api_key="k-1234", max_tokens=5)
    assert r.url == "http://h/v1/responses" and body_of(r)["input"] == "hello" and body_of(r)["stream"] is True
    assert c.url == "http://h/v1/completions" and body_of(c)["prompt"] == "once" and body_of(c)["max_tokens"] == 5
    assert (r.dialect, c.dialect) == ("openai-responses", "openai-completions")


def test_anthropic_takes_the_host_sends_x_api_key_and_lifts_the_system_message():
    req = Request.anthropic(model="claude-x", messages=[{"role": "system", "content": "be brief"}, *MSGS],
                            api_key="ak-123456")
    assert req.url == "https://api.anthropic.com/v1/messages"
    assert req.headers["x-api-key"] == "ak-123456" and "anthropic-version" in req.headers
    assert "authorization" not in req.headers
    body = body_of(req)
    assert body["system"] == "be brief" and body["messages"] == MSGS
    assert body["max_tokens"] == 1024 and body["stream"] is True


def test_gemini_puts_the_model_in_the_url_and_converts_chat_messages():
    req = Request.gemini(model="gemini-x", api_key="g-123456", messages=[
        {"role": "system", "content": "terse"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert req.url == "https://generativelanguage.googleapis.com/v1beta/models/gemini-x:streamGenerateContent?alt=sse"
    assert req.headers["x-goog-api-key"] == "g-123456"
    body = body_of(req)
    assert body["contents"] == [{"role": "user", "parts": [{"text": "hi"}]}, {"role": "model", "parts": [{"text": "yo"}]}]
    assert body["systemInstruction"] == {"parts": [{"text": "terse"}]}
    with pytest.raises(ConfigurationError):
        Request.gemini(model="gemini-x", contents=[], messages=MSGS)


def test_tgi_posts_inputs_and_parameters_to_generate_stream():
    req = Request.tgi("http://tgi:8080/", inputs="Once", parameters={"max_new_tokens": 3})
    assert req.url == "http://tgi:8080/generate_stream"
    assert body_of(req) == {"inputs": "Once", "parameters": {"max_new_tokens": 3}}
    assert req.dialect == "tgi-generate"


def test_from_body_takes_a_jsonl_line_and_rejects_non_objects():
    line = b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}'
    req = Request.from_body("openai-chat", "http://h/v1", line, custom_id="c1")
    assert body_of(req)["model"] == "m" and body_of(req)["stream"] is True and req.custom_id == "c1"
    assert Request.from_body("openai-chat", "http://h/v1", line.decode()).body == req.body
    with pytest.raises(ConfigurationError):
        Request.from_body("openai-chat", "http://h/v1", b"[1, 2]")


def test_provider_sets_the_reading_dialect_but_not_the_request_shape():
    req = Request.openai_chat(base_url="http://h/v1", model="m", messages=MSGS, provider="sse-generic")
    assert req.dialect == "sse-generic" and req.url == "http://h/v1/chat/completions"
    with pytest.raises(ConfigurationError):
        Request.openai_chat(base_url="http://h/v1", model="m", messages=MSGS, provider="no-such-dialect")


# --- API keys -------------------------------------------------------------------------------------


def test_api_keys_come_from_the_usual_environment_variables(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "env-openai-1")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "env-anthropic-1")
    monkeypatch.setenv("GOOGLE_API_KEY", "env-google-1")
    assert Request.openai_chat(model="m", messages=MSGS).headers["authorization"] == "Bearer env-openai-1"
    assert Request.anthropic(model="m", messages=MSGS).headers["x-api-key"] == "env-anthropic-1"
    assert Request.gemini(model="m", messages=MSGS).headers["x-goog-api-key"] == "env-google-1"
    monkeypatch.setenv("GEMINI_API_KEY", "env-gemini-1")  # preferred over GOOGLE_API_KEY
    assert Request.gemini(model="m", messages=MSGS).headers["x-goog-api-key"] == "env-gemini-1"
    # A key given explicitly wins over the environment.
    assert Request.openai_chat(model="m", messages=MSGS, api_key="given-1").headers["authorization"] == "Bearer given-1"


def test_a_missing_or_empty_key_sends_no_auth_header(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "")
    for req in (Request.openai_chat(model="m", messages=MSGS), Request.anthropic(model="m", messages=MSGS),
                Request.gemini(model="m", messages=MSGS), Request.tgi("http://t", inputs="x")):
        lowered = {k.lower() for k in req.headers}
        assert not lowered & {"authorization", "x-api-key", "x-goog-api-key"}, req


# --- secrets stay out of reprs --------------------------------------------------------------------


def test_repr_and_str_redact_every_secret_header():
    headers = {"Authorization": f"Bearer {CANARY}", "x-api-key": CANARY, "x-goog-api-key": CANARY,
               "api-key": CANARY, "X-Custom-Token": CANARY, "x-client-secret": CANARY, "x-trace": "visible-1"}
    req = Request(url=f"https://h/v1/x?alt=sse&key={CANARY}", headers=headers, body=b'{"a": 1}')
    for text in (repr(req), str(req), f"{req}", repr([req]), repr(list(req.__rich_repr__()))):
        assert CANARY not in text
        assert "visible-1" in text and "[REDACTED]" in text
    assert redact_headers(headers)["x-trace"] == "visible-1"
    assert req.headers["x-api-key"] == CANARY  # the request itself still carries it


def test_a_requests_repr_built_by_a_constructor_hides_the_key():
    for req in (Request.openai_chat(model="m", messages=MSGS, api_key=CANARY),
                Request.anthropic(model="m", messages=MSGS, api_key=CANARY),
                Request.gemini(model="m", messages=MSGS, api_key=CANARY)):
        assert CANARY not in repr(req)


# --- typed records --------------------------------------------------------------------------------


def test_sources_round_trip_through_msgpack_as_a_typed_union():
    req = Request.openai_chat(base_url="http://h/v1", model="m", messages=MSGS, api_key="k-1234", custom_id="a")
    rep = Replay(b"data: x\n\n", "event", provider="sse-generic", custom_id="b")
    rep_path = Replay(Path("/tmp/some.sse"), 100)
    dec = msgspec.msgpack.Decoder(list[Source])
    assert dec.decode(msgspec.msgpack.encode([req, rep, rep_path])) == [req, rep, rep_path]
    assert rep_path.path == "/tmp/some.sse" and rep_path.source == b""


def test_replay_rejects_bad_settings():
    for kw in ({"read_size": 0}, {"read_size": True}, {"read_size": "lines"}, {"pace": -1.0}, {"provider": "nope"}):
        with pytest.raises(ConfigurationError):
            Replay(b"x", **kw)


# --- Replay reads ------------------------------------------------------------------------------------

STREAM = b'data: {"a":1}\n\ndata: {"b":2}\n\n: note\n\ndata: [DONE]\n\n'


def test_replay_chunks_by_size_and_by_event():
    assert b"".join(Replay(STREAM, 7).chunks()) == STREAM
    assert [len(c) for c in Replay(STREAM, 16).chunks()] == [16, 16, 16, len(STREAM) - 48]
    assert list(Replay(STREAM, "event").chunks()) == [b'data: {"a":1}\n\n', b'data: {"b":2}\n\n', b": note\n\n", b"data: [DONE]\n\n"]


async def test_replay_of_a_file_uses_its_recorded_reads(tmp_path):
    path = tmp_path / "rec.sse"
    path.write_bytes(STREAM)
    (tmp_path / "rec.timing").write_text('{"offset": 5, "t_ns": 0}\n{"offset": %d, "t_ns": 1000}\n' % len(STREAM))
    rep = Replay(str(path), "recorded", pace=1000.0)
    assert list(rep.chunks()) == [STREAM[:5], STREAM[5:]]
    assert [c async for c in rep.achunks()] == [STREAM[:5], STREAM[5:]]


async def test_a_replay_streams_through_the_pipeline_with_its_own_dialect():
    manifest = provider_manifest()
    if manifest is None:
        pytest.skip(f"real provider captures not found at {PROVIDER_FIXTURES}")
    name = "anthropic/short-text.sse"
    expect = manifest["files"][name]["expect"]
    pipeline = PipelineBuilder().provider("openai-chat").build()
    stream = pipeline.stream_request(Replay(read_capture(name), 13, provider="anthropic", custom_id="r1"))
    tokens = [t async for t in stream]
    assert tokens and stream.result.text == expect["text"]
    assert stream.result.finish_reason == expect["finish_reason"]
    assert stream.result.custom_id == "r1"
