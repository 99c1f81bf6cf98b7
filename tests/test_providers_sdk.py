"""Differential tests: our adapters against the official SDKs' own stream accumulation, on the
real captures. The SDKs are test-only oracles (openai's ChatCompletionStreamState, anthropic's
beta accumulate_event, which also tracks mcp_tool_use input)."""

from __future__ import annotations

import json

import pytest

from pipeline.providers import get_adapter
from pipeline.sse import SseParser
from pipeline.tokens import Delta, Done, Finish, Reasoning, Refusal, ServerTool, ToolCall, Usage

from conftest import capture_cases, provider_manifest, read_capture

openai_streaming = pytest.importorskip("openai.lib.streaming.chat._completions")
openai_types = pytest.importorskip("openai.types.chat")
anthropic_beta = pytest.importorskip("anthropic.lib.streaming._beta_messages")
anthropic_types = pytest.importorskip("anthropic.types.beta")
anthropic_models = pytest.importorskip("anthropic._models")
jiter = pytest.importorskip("jiter")

MANIFEST = provider_manifest() or {"files": {}}


def cases(dialect: str) -> list:
    all_cases = capture_cases()
    if not MANIFEST["files"]:
        return all_cases
    return [c for c in all_cases if MANIFEST["files"][c.values[0]]["dialect"] == dialect]


def our_tokens(dialect: str, data: bytes) -> list:
    parser = SseParser()
    events = parser.feed(data) + parser.close()
    adapter = get_adapter(dialect)()
    return adapter.feed(events) + adapter.close(parser.discarded_tail)


def events(data: bytes):
    parser = SseParser()
    return parser.feed(data) + parser.close()


# --- OpenAI Chat Completions ---------------------------------------------------------------


@pytest.mark.parametrize("name", cases("openai-chat"))
def test_openai_chat_matches_sdk_stream_state(name: str) -> None:
    if MANIFEST["files"][name]["outcome"] != "complete":
        pytest.skip("the openai SDK raises on in-band errors instead of accumulating them")
    state = openai_streaming.ChatCompletionStreamState()
    for ev in events(read_capture(name)):
        if ev.event != "message" or ev.data.strip() == b"[DONE]":
            continue
        # As the SDK's Stream does: loose construction of the chunk model from the JSON.
        chunk = openai_types.ChatCompletionChunk.construct(**json.loads(ev.data))
        state.handle_chunk(chunk)
    snapshot = state.current_completion_snapshot  # get_final_completion raises on "length"

    tokens = our_tokens("openai-chat", read_capture(name))
    assert type(tokens[-1]) is Done
    for choice in snapshot.choices:
        i = choice.index
        ours_text = "".join(t.content for t in tokens if type(t) is Delta and t.index == i)
        assert ours_text == (choice.message.content or "")
        ours_refusal = "".join(t.content for t in tokens if type(t) is Refusal and t.index == i)
        assert ours_refusal == (choice.message.refusal or "")
        finishes = [t.reason for t in tokens if type(t) is Finish and t.index == i]
        assert finishes and finishes[-1] == choice.finish_reason
        calls: dict[int, dict] = {}
        for t in tokens:
            if type(t) is ToolCall and t.choice == i:
                c = calls.setdefault(t.index, {"id": None, "name": None, "arguments": ""})
                c["id"] = c["id"] or t.id
                c["name"] = c["name"] or t.name
                c["arguments"] += t.arguments
        sdk_calls = {
            tc.index: {"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments}
            for tc in (choice.message.tool_calls or [])
        }
        assert calls == sdk_calls
        sdk_logprobs = choice.logprobs.content if choice.logprobs is not None else None
        ours_logprobs = [lp for t in tokens if type(t) is Delta and t.index == i and t.logprobs for lp in t.logprobs]
        if sdk_logprobs:
            assert ours_logprobs == [lp.to_dict() if hasattr(lp, "to_dict") else lp for lp in sdk_logprobs]
    assert tokens[-1].finish_reason == snapshot.choices[0].finish_reason if snapshot.choices else True


# --- Anthropic Messages -----------------------------------------------------------------------


@pytest.mark.parametrize("name", cases("anthropic"))
def test_anthropic_matches_sdk_accumulation(name: str) -> None:
    snapshot = None
    bufs: dict[int, bytes] = {}
    for ev in events(read_capture(name)):
        if ev.event == "ping":  # the SDK's Stream drops pings before accumulating
            continue
        event = anthropic_models.construct_type(
            type_=anthropic_types.BetaRawMessageStreamEvent, value=json.loads(ev.data)
        )
        snapshot = anthropic_beta.accumulate_event(
            event=event, current_snapshot=snapshot, json_bufs=bufs, request_headers=None
        )
    assert snapshot is not None

    tokens = our_tokens("anthropic", read_capture(name))
    assert type(tokens[-1]) is Done
    assert tokens[-1].finish_reason == snapshot.stop_reason
    text = "".join(b.text for b in snapshot.content if b.type == "text")
    assert "".join(t.content for t in tokens if type(t) is Delta) == text

    thinking = "".join(b.thinking for b in snapshot.content if b.type == "thinking")
    ours_thinking = "".join(t.content for t in tokens if type(t) is Reasoning and not t.redacted)
    assert ours_thinking == thinking
    signatures = [b.signature for b in snapshot.content if b.type == "thinking" and b.signature]
    assert [t.signature for t in tokens if type(t) is Reasoning and t.signature] == signatures
    redacted = [b.data for b in snapshot.content if b.type == "redacted_thinking"]
    assert [t.content for t in tokens if type(t) is Reasoning and t.redacted] == redacted

    # Client tool calls: the SDK parses input with jiter partial mode; parse ours the same way.
    calls: dict[int, dict] = {}
    for t in tokens:
        if type(t) is ToolCall:
            c = calls.setdefault(t.index, {"id": None, "name": None, "arguments": ""})
            c["id"] = c["id"] or t.id
            c["name"] = c["name"] or t.name
            c["arguments"] += t.arguments
    sdk_tools = [b for b in snapshot.content if b.type == "tool_use"]
    assert len(calls) == len(sdk_tools)
    for ordinal, block in enumerate(sdk_tools):
        ours = calls[ordinal]
        assert (ours["id"], ours["name"]) == (block.id, block.name)
        parsed = jiter.from_json(ours["arguments"].encode(), partial_mode=True) if ours["arguments"] else {}
        assert parsed == block.input

    # Provider-run tools: use blocks carry the input as data, result blocks their whole JSON.
    servers = [t for t in tokens if type(t) is ServerTool]
    sdk_servers = [b for b in snapshot.content if b.type in ("server_tool_use", "mcp_tool_use") or b.type.endswith("tool_result")]
    assert [(s.kind, s.id) for s in servers] == [
        (b.type, getattr(b, "id", None) or getattr(b, "tool_use_id", None)) for b in sdk_servers
    ]
    for ours, block in zip(servers, sdk_servers):
        if block.type in ("server_tool_use", "mcp_tool_use"):
            assert ours.name == block.name
            assert json.loads(ours.data or "{}") == block.input
        else:
            assert json.loads(ours.data) == block.to_dict()

    usage = {"input_tokens": None, "output_tokens": None}
    for t in tokens:
        if type(t) is Usage:
            for key in usage:
                if getattr(t, key) is not None:
                    usage[key] = getattr(t, key)
    assert usage == {"input_tokens": snapshot.usage.input_tokens, "output_tokens": snapshot.usage.output_tokens}
