"""OpenAI Responses API streams (named events `response.*`, the name equal to the JSON type; no
[DONE]).

Completion rule (fixtures MANIFEST): `response.completed` or `response.incomplete` ends the
stream normally (Done right there, finish_reason = the terminal status string); an `error` event
or `response.failed` is an error end (Finish("failed") then Error; the `error` event ends the
stream at once rather than waiting for the response.failed that follows it); a body that stops
before a terminal event is truncated.

Token mapping: output_text deltas -> Delta (choice 0, logprobs as sent); refusal deltas ->
Refusal; reasoning summary / reasoning text deltas -> Reasoning, an encrypted reasoning item ->
Reasoning(redacted=True); function_call and custom_tool_call items -> ToolCall (index = ordinal
among those items) plus their argument deltas; other output items (web_search_call, mcp_call,
code_interpreter_call, ...) -> ServerTool with the finished item's JSON.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..sse import SseEvent
from ..tokens import (
    Delta,
    Finish,
    Reasoning,
    Refusal,
    ServerTool,
    StreamToken,
    ToolCall,
    Usage,
    normalize_finish,
)
from .base import (
    Adapter,
    HttpRequestSpec,
    base_join,
    dispatch_type,
    error_payload,
    error_token,
    json_request,
    make_usage,
)

__all__ = ["API_KEY_ENV", "OpenAIResponsesAdapter", "build_request"]

API_KEY_ENV = ("OPENAI_API_KEY",)


class _Empty(msgspec.Struct, gc=False):
    pass


class _TextDelta(msgspec.Struct, gc=False):
    delta: str = ""
    logprobs: list[Any] | None = None


class _ArgsDelta(msgspec.Struct, gc=False):
    output_index: int | None = None
    item_id: str | None = None
    delta: str = ""


class _ItemEvent(msgspec.Struct, gc=False):
    output_index: int | None = None
    item: msgspec.Raw = msgspec.Raw(b"{}")


class _Item(msgspec.Struct, gc=False):
    type: str = ""
    id: str | None = None
    call_id: str | None = None
    name: Any = None
    arguments: Any = None  # function_call: a JSON string
    input: Any = None  # custom_tool_call: free text
    encrypted_content: Any = None


class _Response(msgspec.Struct, gc=False):
    status: str | None = None
    usage: dict[str, Any] | None = None
    error: Any = None
    incomplete_details: Any = None


class _Terminal(msgspec.Struct, gc=False):
    response: _Response | None = None


_decode_empty = msgspec.json.Decoder(_Empty).decode
_decode_text_delta = msgspec.json.Decoder(_TextDelta).decode
_decode_args_delta = msgspec.json.Decoder(_ArgsDelta).decode
_decode_item_event = msgspec.json.Decoder(_ItemEvent).decode
_decode_item = msgspec.json.Decoder(_Item).decode
_decode_terminal = msgspec.json.Decoder(_Terminal).decode

USAGE_ALIASES = {
    "input_tokens_details.cached_tokens": "cached_tokens",
    "output_tokens_details.reasoning_tokens": "reasoning_tokens",
}
_CLIENT_CALL_TYPES = frozenset({"function_call", "custom_tool_call"})
# Output items that carry no tool: their content arrives through their own deltas.
_PLAIN_ITEM_TYPES = frozenset({"message", "reasoning"})
# Progress notifications of provider-run tools; the finished item arrives in output_item.done.
_IGNORED_PREFIXES = (
    "response.web_search_call.",
    "response.file_search_call.",
    "response.code_interpreter_call",
    "response.image_generation_call.",
    "response.mcp_",
    "response.audio",
    "response.output_text.annotation",
)
_IGNORED = frozenset({
    "response.created",
    "response.in_progress",
    "response.queued",
    "response.content_part.added",
    "response.content_part.done",
    "response.output_text.done",
    "response.refusal.done",
    "response.reasoning_summary_part.added",
    "response.reasoning_summary_part.done",
    "response.reasoning_summary_text.done",
    "response.reasoning_text.done",
})


def responses_usage(raw: dict) -> Usage:
    """Usage from a terminal response's usage object."""
    return make_usage(raw, "input_tokens", "output_tokens", "total_tokens", USAGE_ALIASES)


class OpenAIResponsesAdapter(Adapter):
    """`openai-responses`: Responses API events to tokens."""

    dialect = "openai-responses"

    def __init__(self) -> None:
        super().__init__()
        # output_index (or item id) -> [tool ordinal, arguments received so far]
        self._calls: dict[int | str, list] = {}
        self._n_tools = 0
        self._handlers = {
            "response.output_text.delta": self._text_delta,
            "response.refusal.delta": self._refusal_delta,
            "response.reasoning_summary_text.delta": self._reasoning_delta,
            "response.reasoning_text.delta": self._reasoning_delta,
            "response.function_call_arguments.delta": self._args_delta,
            "response.custom_tool_call_input.delta": self._args_delta,
            "response.function_call_arguments.done": self._ignore,
            "response.custom_tool_call_input.done": self._ignore,
            "response.output_item.added": self._item_added,
            "response.output_item.done": self._item_done,
            "response.completed": self._completed,
            "response.incomplete": self._completed,
            "response.failed": self._failed,
            "error": self._error,
        }
        for name in _IGNORED:
            self._handlers[name] = self._ignore

    def _on_event(self, ev: SseEvent, out: list[StreamToken]) -> None:
        name = dispatch_type(ev)
        handler = self._handlers.get(name)
        if handler is not None:
            handler(ev.data, out)
        elif name.startswith(_IGNORED_PREFIXES):
            _decode_empty(ev.data)
        else:
            self._unknown()

    def _on_close(self, out: list[StreamToken]) -> None:
        self._truncated(out, "the body ended before response.completed / incomplete / failed")

    # --- handlers ------------------------------------------------------------------------

    def _ignore(self, data: bytes, out: list[StreamToken]) -> None:
        _decode_empty(data)  # still valid JSON, or the stream is malformed

    def _text_delta(self, data: bytes, out: list[StreamToken]) -> None:
        ev = _decode_text_delta(data)
        if ev.delta:
            out.append(Delta(ev.delta, 0, ev.logprobs or None))

    def _refusal_delta(self, data: bytes, out: list[StreamToken]) -> None:
        ev = _decode_text_delta(data)
        if ev.delta:
            out.append(Refusal(ev.delta, 0))

    def _reasoning_delta(self, data: bytes, out: list[StreamToken]) -> None:
        ev = _decode_text_delta(data)
        if ev.delta:
            out.append(Reasoning(ev.delta))

    def _args_delta(self, data: bytes, out: list[StreamToken]) -> None:
        ev = _decode_args_delta(data)
        call = self._find_call(ev.output_index, ev.item_id)
        if call is None or not ev.delta:
            return
        call[1] += ev.delta
        out.append(ToolCall(call[0], None, None, ev.delta))

    def _find_call(self, output_index: int | None, item_id: str | None) -> list | None:
        call = self._calls.get(output_index) if output_index is not None else None
        if call is None and item_id is not None:
            call = self._calls.get(item_id)
        return call

    def _item_added(self, data: bytes, out: list[StreamToken]) -> None:
        ev = _decode_item_event(data)
        item = _decode_item(ev.item)
        if item.type in _CLIENT_CALL_TYPES:
            self._new_call(ev.output_index, item, out)

    def _new_call(self, output_index: int | None, item: _Item, out: list[StreamToken]) -> list:
        args = _call_args(item)
        call = [self._n_tools, args]
        self._n_tools += 1
        if output_index is not None:
            self._calls[output_index] = call
        if item.id is not None:
            self._calls[item.id] = call
        name = item.name if isinstance(item.name, str) else None
        out.append(ToolCall(call[0], item.call_id or item.id, name, args))
        return call

    def _item_done(self, data: bytes, out: list[StreamToken]) -> None:
        ev = _decode_item_event(data)
        item = _decode_item(ev.item)
        itype = item.type
        if itype in _CLIENT_CALL_TYPES:
            call = self._find_call(ev.output_index, item.id)
            if call is None:  # never announced: the finished item is the whole call
                self._new_call(ev.output_index, item, out)
                return
            full = _call_args(item)
            if len(full) > len(call[1]) and full.startswith(call[1]):  # deltas were not all sent
                out.append(ToolCall(call[0], None, None, full[len(call[1]):]))
                call[1] = full
        elif itype == "reasoning":
            if isinstance(item.encrypted_content, str) and item.encrypted_content:
                out.append(Reasoning(item.encrypted_content, None, True))
        elif itype not in _PLAIN_ITEM_TYPES:
            name = item.name if isinstance(item.name, str) else None
            out.append(ServerTool(itype, item.id, name, bytes(ev.item).decode()))

    def _completed(self, data: bytes, out: list[StreamToken]) -> None:
        resp = _decode_terminal(data).response or _Response()
        status = resp.status or "completed"
        if resp.usage:
            out.append(responses_usage(resp.usage))
        out.append(Finish(status, 0))
        finish = normalize_finish(status)
        details = resp.incomplete_details
        if isinstance(details, dict) and details.get("reason") == "content_filter":
            finish = "content_filter"
        elif finish == "stop" and self._n_tools:
            finish = "tool_calls"  # the Responses API has no finish reason; calls mean "run tools"
        self._done(out, status, finish)

    def _failed(self, data: bytes, out: list[StreamToken]) -> None:
        resp = _decode_terminal(data).response or _Response()
        if resp.usage:
            out.append(responses_usage(resp.usage))
        out.append(Finish(resp.status or "failed", 0))
        err = resp.error if resp.error is not None else {"message": "response.failed"}
        self._end(out, error_token(self.dialect, err))

    def _error(self, data: bytes, out: list[StreamToken]) -> None:
        # {"type": "error", "error": {...}}, or the older shape with code / message at the top.
        err = error_payload(data)
        out.append(Finish("failed", 0))
        self._end(out, error_token(self.dialect, err))


def _call_args(item: _Item) -> str:
    value = item.arguments if item.type == "function_call" else item.input
    return value if isinstance(value, str) else ""


def build_request(base_url: str, *, model: str | None, body: dict, api_key: str | None,
                  extra_headers: dict | None = None) -> HttpRequestSpec:
    """POST {base_url}/responses (base_url includes /v1) with `stream: true`."""
    b = dict(body)
    b["stream"] = True
    if model is not None:
        b["model"] = model
    headers = {"authorization": f"Bearer {api_key}"} if api_key is not None else {}
    return json_request(base_join(base_url, "/responses"), b, headers, extra_headers)
