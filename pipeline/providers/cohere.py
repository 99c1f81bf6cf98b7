"""Cohere v2 chat streams (`/v2/chat`): named events with hyphens (message-start,
content-start, content-delta, content-end, tool-plan-delta, tool-call-start/delta/end,
citation-start/end, message-end), then a bare `data: [DONE]`.

Completion rule (fixtures MANIFEST): complete at `message-end` (Done right there); the trailing
[DONE] is ignored, never required. finish_reason ERROR or an `error` event is an error end; a
body without message-end is truncated.

Token mapping: content text -> Delta (choice 0); thinking content and tool_plan -> Reasoning;
tool-call-start -> ToolCall (index = ordinal among the stream's tool calls) with its argument
deltas; message-end usage.tokens -> Usage input/output, billed_units -> extras.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..sse import SseEvent
from ..tokens import Delta, Finish, Reasoning, StreamToken, ToolCall, Usage
from .base import (
    Adapter,
    HttpRequestSpec,
    base_join,
    error_payload,
    error_token,
    is_done_marker,
    json_request,
    usage_extras,
)

__all__ = ["API_KEY_ENV", "CohereV2Adapter", "build_request"]

API_KEY_ENV = ("CO_API_KEY",)


class _Function(msgspec.Struct, gc=False):
    name: str | None = None
    arguments: str | None = None


class _ToolCallBody(msgspec.Struct, gc=False):
    id: str | None = None
    function: _Function | None = None


class _ContentBody(msgspec.Struct, gc=False):
    text: str | None = None
    thinking: str | None = None


class _MessageBody(msgspec.Struct, gc=False):
    content: _ContentBody | None = None
    tool_plan: str | None = None
    tool_calls: _ToolCallBody | None = None


class _Delta(msgspec.Struct, gc=False):
    message: _MessageBody | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: Any = None


class _Event(msgspec.Struct, gc=False):
    index: int = 0
    delta: _Delta | None = None


class _Empty(msgspec.Struct, gc=False):
    pass


_decode_event = msgspec.json.Decoder(_Event).decode
_decode_empty = msgspec.json.Decoder(_Empty).decode


def _message(data: bytes) -> tuple[int, _MessageBody | None]:
    ev = _decode_event(data)
    return ev.index, (ev.delta.message if ev.delta is not None else None)


class CohereV2Adapter(Adapter):
    """`cohere-v2`: Cohere v2 chat stream events to tokens."""

    dialect = "cohere-v2"

    def __init__(self) -> None:
        super().__init__()
        self._tools: dict[int, int] = {}  # provider tool-call index -> ordinal
        self._handlers = {
            "content-delta": self._content,
            "content-start": self._content,
            "tool-plan-delta": self._tool_plan,
            "tool-call-start": self._tool_start,
            "tool-call-delta": self._tool_delta,
            "message-end": self._message_end,
            "message-start": self._ignore,
            "content-end": self._ignore,
            "tool-call-end": self._ignore,
            "citation-start": self._ignore,
            "citation-end": self._ignore,
            "debug": self._ignore,
            "error": self._error,
        }

    def _on_event(self, ev: SseEvent, out: list[StreamToken]) -> None:
        if ev.event == "message" and is_done_marker(ev.data):
            return  # the bare trailing marker: neither an end nor required
        self._dispatch(ev, out)

    def _on_close(self, out: list[StreamToken]) -> None:
        self._truncated(out, "the body ended before message-end")

    def _ignore(self, data: bytes, out: list[StreamToken]) -> None:
        _decode_empty(data)

    def _content(self, data: bytes, out: list[StreamToken]) -> None:
        _, msg = _message(data)
        if msg is None or msg.content is None:
            return
        if msg.content.text:
            out.append(Delta(msg.content.text, 0))
        if msg.content.thinking:
            out.append(Reasoning(msg.content.thinking))

    def _tool_plan(self, data: bytes, out: list[StreamToken]) -> None:
        _, msg = _message(data)
        if msg is not None and msg.tool_plan:
            out.append(Reasoning(msg.tool_plan))

    def _tool_start(self, data: bytes, out: list[StreamToken]) -> None:
        index, msg = _message(data)
        ordinal = self._tools.setdefault(index, len(self._tools))
        tc = msg.tool_calls if msg is not None else None
        fn = tc.function if tc is not None else None
        out.append(ToolCall(ordinal, tc.id if tc is not None else None, fn.name if fn else None,
                            (fn.arguments or "") if fn else ""))

    def _tool_delta(self, data: bytes, out: list[StreamToken]) -> None:
        index, msg = _message(data)
        tc = msg.tool_calls if msg is not None else None
        if tc is None or tc.function is None or not tc.function.arguments:
            return
        ordinal = self._tools.setdefault(index, len(self._tools))
        out.append(ToolCall(ordinal, None, None, tc.function.arguments))

    def _message_end(self, data: bytes, out: list[StreamToken]) -> None:
        delta = _decode_event(data).delta or _Delta()
        reason = delta.finish_reason
        if delta.usage:
            out.append(_usage(delta.usage))
        if reason is not None:
            out.append(Finish(reason, 0))
        if reason == "ERROR" or delta.error is not None:
            err = delta.error if delta.error is not None else {"message": "finish_reason ERROR"}
            self._end(out, error_token(self.dialect, err))
            return
        self._done(out, reason)

    def _error(self, data: bytes, out: list[StreamToken]) -> None:
        self._end(out, error_token(self.dialect, error_payload(data)))


def _usage(raw: dict) -> Usage:
    tokens = raw.get("tokens")
    tokens = tokens if isinstance(tokens, dict) else {}
    inp, outp = tokens.get("input_tokens"), tokens.get("output_tokens")
    # billed_units differ from tokens (the prompt template is not billed): kept as extras.
    return Usage(
        int(inp) if _num(inp) else None,
        int(outp) if _num(outp) else None,
        None,
        usage_extras(raw, frozenset({"tokens"}), {}),
    )


def _num(v: Any) -> bool:
    return type(v) is int or (type(v) is float and v == v and v.is_integer())


def build_request(base_url: str, *, model: str | None, body: dict, api_key: str | None,
                  extra_headers: dict | None = None) -> HttpRequestSpec:
    """POST {base_url}/v2/chat with `stream: true`."""
    b = dict(body)
    b["stream"] = True
    if model is not None:
        b["model"] = model
    headers = {"authorization": f"Bearer {api_key}"} if api_key is not None else {}
    return json_request(base_join(base_url, "/v2/chat"), b, headers, extra_headers)
