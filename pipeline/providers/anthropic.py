"""Anthropic Messages streams (named events: message_start, content_block_start/delta/stop,
message_delta, message_stop, ping, error).

Completion rule (fixtures MANIFEST): complete at `message_stop` (Done is emitted right there);
an `error` event is an error end; a body without message_stop is truncated. A block left open
by max_tokens does not matter: message_stop still comes.

Token mapping: text blocks -> Delta (choice 0, blocks joined with no separator); thinking ->
Reasoning, signature_delta -> Reasoning(signature=...), redacted_thinking ->
Reasoning(redacted=True, content=<data>); tool_use -> ToolCall whose index is the 0-based
ordinal among the stream's tool_use blocks; server_tool_use / mcp_tool_use -> ServerTool with
the input JSON as data (emitted when the block stops); *_tool_result blocks -> ServerTool with
the block's JSON. message_start usage then message_delta usage -> Usage tokens (later wins).
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..tokens import Delta, Finish, Reasoning, ServerTool, StreamToken, ToolCall, Usage
from .base import (
    Adapter,
    HttpRequestSpec,
    base_join,
    error_payload,
    error_token,
    json_request,
    make_usage,
)

__all__ = ["API_KEY_ENV", "ANTHROPIC_VERSION", "AnthropicAdapter", "build_request"]

API_KEY_ENV = ("ANTHROPIC_API_KEY",)
ANTHROPIC_VERSION = "2023-06-01"

# --- wire structs -------------------------------------------------------------------------


class _Message(msgspec.Struct, gc=False):
    usage: dict[str, Any] | None = None


class _MessageStart(msgspec.Struct, gc=False):
    message: _Message | None = None


class _BlockStart(msgspec.Struct, gc=False):
    index: int = 0
    content_block: msgspec.Raw = msgspec.Raw(b"{}")


class _BlockType(msgspec.Struct, gc=False):
    type: str = ""


class _TextBlock(msgspec.Struct, gc=False):
    text: str = ""


class _ThinkingBlock(msgspec.Struct, gc=False):
    thinking: str = ""
    signature: str | None = None


class _RedactedBlock(msgspec.Struct, gc=False):
    data: str = ""


class _ToolUseBlock(msgspec.Struct, gc=False):
    id: str | None = None
    name: str | None = None
    input: Any = None


class _ResultBlock(msgspec.Struct, gc=False):
    tool_use_id: str | None = None


class _DeltaBody(msgspec.Struct, gc=False):
    type: str = ""
    text: str | None = None
    partial_json: str | None = None
    thinking: str | None = None
    signature: str | None = None


class _BlockDelta(msgspec.Struct, gc=False):
    index: int = 0
    delta: _DeltaBody | None = None


class _Index(msgspec.Struct, gc=False):
    index: int = 0


class _MessageDeltaBody(msgspec.Struct, gc=False):
    stop_reason: str | None = None


class _MessageDelta(msgspec.Struct, gc=False):
    delta: _MessageDeltaBody | None = None
    usage: dict[str, Any] | None = None


class _Empty(msgspec.Struct, gc=False):
    pass


_decode_message_start = msgspec.json.Decoder(_MessageStart).decode
_decode_block_start = msgspec.json.Decoder(_BlockStart).decode
_decode_block_type = msgspec.json.Decoder(_BlockType).decode
_decode_text_block = msgspec.json.Decoder(_TextBlock).decode
_decode_thinking_block = msgspec.json.Decoder(_ThinkingBlock).decode
_decode_redacted_block = msgspec.json.Decoder(_RedactedBlock).decode
_decode_tool_use_block = msgspec.json.Decoder(_ToolUseBlock).decode
_decode_result_block = msgspec.json.Decoder(_ResultBlock).decode
_decode_block_delta = msgspec.json.Decoder(_BlockDelta).decode
_decode_index = msgspec.json.Decoder(_Index).decode
_decode_message_delta = msgspec.json.Decoder(_MessageDelta).decode
_decode_empty = msgspec.json.Decoder(_Empty).decode

USAGE_ALIASES = {"cache_read_input_tokens": "cached_tokens"}

# Block kinds (what a content block index stands for while it is open).
_TEXT, _THINKING, _TOOL, _SERVER, _OTHER = range(5)
_SERVER_USE_TYPES = frozenset({"server_tool_use", "mcp_tool_use"})


def anthropic_usage(raw: dict) -> Usage:
    """Usage from a message_start or message_delta usage object (Anthropic sends no total)."""
    return make_usage(raw, "input_tokens", "output_tokens", None, USAGE_ALIASES)


class AnthropicAdapter(Adapter):
    """`anthropic`: Messages stream events to tokens."""

    dialect = "anthropic"

    def __init__(self) -> None:
        super().__init__()
        # content block index -> (kind, tool ordinal or None)
        self._blocks: dict[int, tuple[int, int | None]] = {}
        self._n_tools = 0
        # content block index -> [kind, id, name, input JSON parts] of an open server tool block
        self._server: dict[int, list] = {}
        self._stop_reason: str | None = None
        self._handlers = {
            "content_block_delta": self._block_delta,
            "ping": self._ping,
            "content_block_start": self._block_start,
            "content_block_stop": self._block_stop,
            "message_start": self._message_start,
            "message_delta": self._message_delta,
            "message_stop": self._message_stop,
            "error": self._error,
        }

    _on_event = Adapter._dispatch  # every event is named: a table lookup is the whole job

    def _on_close(self, out: list[StreamToken]) -> None:
        self._truncated(out, "the body ended before message_stop")

    def _flush(self, out: list[StreamToken]) -> None:
        for index in sorted(self._server):
            self._emit_server(index, out)

    # --- handlers, one per event type ------------------------------------------------------

    def _ping(self, data: bytes, out: list[StreamToken]) -> None:
        _decode_empty(data)

    def _message_start(self, data: bytes, out: list[StreamToken]) -> None:
        msg = _decode_message_start(data).message
        if msg is not None and msg.usage:
            out.append(anthropic_usage(msg.usage))

    def _block_start(self, data: bytes, out: list[StreamToken]) -> None:
        start = _decode_block_start(data)
        raw = start.content_block
        index = start.index
        btype = _decode_block_type(raw).type
        if btype == "text":
            self._blocks[index] = (_TEXT, None)
            text = _decode_text_block(raw).text
            if text:
                out.append(Delta(text, 0))
        elif btype == "tool_use":
            block = _decode_tool_use_block(raw)
            ordinal = self._n_tools
            self._n_tools += 1
            self._blocks[index] = (_TOOL, ordinal)
            # Streaming sends `input: {}` and the JSON in deltas; a non-empty input is whole.
            args = msgspec.json.encode(block.input).decode() if block.input else ""
            out.append(ToolCall(ordinal, block.id, block.name, args))
        elif btype == "thinking":
            self._blocks[index] = (_THINKING, None)
            block = _decode_thinking_block(raw)
            if block.thinking:
                out.append(Reasoning(block.thinking))
            if block.signature:
                out.append(Reasoning("", block.signature))
        elif btype == "redacted_thinking":
            self._blocks[index] = (_OTHER, None)
            out.append(Reasoning(_decode_redacted_block(raw).data, None, True))
        elif btype in _SERVER_USE_TYPES:
            block = _decode_tool_use_block(raw)
            self._blocks[index] = (_SERVER, None)
            parts = [msgspec.json.encode(block.input).decode()] if block.input else []
            self._server[index] = [btype, block.id, block.name, parts]
        elif btype.endswith("tool_result"):
            # web_search_tool_result, mcp_tool_result, tool_search_tool_result, ...: whole blocks.
            self._blocks[index] = (_OTHER, None)
            block = _decode_result_block(raw)
            out.append(ServerTool(btype, block.tool_use_id, None, bytes(raw).decode()))
        else:
            self._blocks[index] = (_OTHER, None)
            self._unknown()

    def _block_delta(self, data: bytes, out: list[StreamToken]) -> None:
        ev = _decode_block_delta(data)
        d = ev.delta
        if d is None:
            return
        dtype = d.type
        if dtype == "text_delta":
            if d.text:
                out.append(Delta(d.text, 0))
        elif dtype == "input_json_delta":
            if not d.partial_json:
                return
            kind, ordinal = self._blocks.get(ev.index, (_OTHER, None))
            if kind == _TOOL:
                out.append(ToolCall(ordinal, None, None, d.partial_json))  # type: ignore[arg-type]
            elif kind == _SERVER:
                server = self._server.get(ev.index)
                if server is not None:  # None: a delta after its block stopped; nothing to add to
                    server[3].append(d.partial_json)
        elif dtype == "thinking_delta":
            if d.thinking:
                out.append(Reasoning(d.thinking))
        elif dtype == "signature_delta":
            if d.signature:
                out.append(Reasoning("", d.signature))
        elif dtype == "citations_delta":
            pass  # citation metadata of a text block; not text
        else:
            self._unknown()

    def _block_stop(self, data: bytes, out: list[StreamToken]) -> None:
        index = _decode_index(data).index
        if index in self._server:
            self._emit_server(index, out)

    def _emit_server(self, index: int, out: list[StreamToken]) -> None:
        kind, call_id, name, parts = self._server.pop(index)
        out.append(ServerTool(kind, call_id, name, "".join(parts)))

    def _message_delta(self, data: bytes, out: list[StreamToken]) -> None:
        ev = _decode_message_delta(data)
        self._flush(out)  # a block cut by max_tokens never gets content_block_stop
        if ev.delta is not None and ev.delta.stop_reason is not None:
            self._stop_reason = ev.delta.stop_reason
            out.append(Finish(self._stop_reason, 0))
        if ev.usage:
            out.append(anthropic_usage(ev.usage))

    def _message_stop(self, data: bytes, out: list[StreamToken]) -> None:
        _decode_empty(data)
        self._flush(out)
        self._done(out, self._stop_reason)

    def _error(self, data: bytes, out: list[StreamToken]) -> None:
        self._flush(out)
        self._end(out, error_token(self.dialect, error_payload(data)))


def build_request(base_url: str, *, model: str | None, body: dict, api_key: str | None,
                  extra_headers: dict | None = None) -> HttpRequestSpec:
    """POST {base_url}/v1/messages with `stream: true`, `anthropic-version` and `x-api-key`."""
    b = dict(body)
    b["stream"] = True
    if model is not None:
        b["model"] = model
    headers = {"anthropic-version": ANTHROPIC_VERSION}
    if api_key is not None:
        headers["x-api-key"] = api_key
    return json_request(base_join(base_url, "/v1/messages"), b, headers, extra_headers)
