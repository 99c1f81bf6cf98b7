"""Google Gemini `streamGenerateContent?alt=sse` streams (Gemini API and Vertex AI): data-only
events, each a whole GenerateContentResponse.

Completion rule (fixtures MANIFEST): complete when candidate 0 has carried a finishReason;
there is no end marker, so Done is emitted at close(). We accept events after the finishReason
(e.g. a trailing usage-only chunk) instead of requiring it on the very last event. A prompt
blocked by promptFeedback.blockReason is a normal end with that reason (content_filter). A
top-level "error" object is an error end.

Token mapping: text parts -> Delta (candidate index), parts with thought=true -> Reasoning,
thoughtSignature -> Reasoning(signature=...), functionCall parts (whole) -> one ToolCall with
the args JSON-encoded, executableCode / codeExecutionResult / inlineData / fileData parts ->
ServerTool(kind=<part key>). usageMetadata on every event -> Usage only when it changed.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import msgspec

from ..errors import ConfigurationError
from ..sse import SseEvent
from ..tokens import Delta, Finish, Reasoning, ServerTool, StreamToken, ToolCall, Usage, normalize_finish
from .base import Adapter, HttpRequestSpec, base_join, error_payload, error_token, json_request, make_usage

__all__ = ["API_KEY_ENV", "GeminiAdapter", "build_request"]

API_KEY_ENV = ("GEMINI_API_KEY", "GOOGLE_API_KEY")


class _FunctionCall(msgspec.Struct, gc=False):
    name: str | None = None
    args: Any = None
    id: str | None = None


class _Part(msgspec.Struct, gc=False):
    text: str | None = None
    thought: bool | None = None
    thoughtSignature: str | None = None
    functionCall: _FunctionCall | None = None
    executableCode: Any = None
    codeExecutionResult: Any = None
    inlineData: Any = None
    fileData: Any = None


class _Content(msgspec.Struct, gc=False):
    parts: list[_Part] | None = None


class _Candidate(msgspec.Struct, gc=False):
    index: int = 0
    content: _Content | None = None
    finishReason: str | None = None


class _PromptFeedback(msgspec.Struct, gc=False):
    blockReason: str | None = None


class _Chunk(msgspec.Struct, gc=False):
    candidates: list[_Candidate] | None = None
    usageMetadata: dict[str, Any] | None = None
    promptFeedback: _PromptFeedback | None = None
    error: Any = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_encode = msgspec.json.encode

USAGE_ALIASES = {
    "thoughtsTokenCount": "reasoning_tokens",
    "cachedContentTokenCount": "cached_tokens",
}
_SERVER_PART_KEYS = ("executableCode", "codeExecutionResult", "inlineData", "fileData")


def gemini_usage(raw: dict) -> Usage:
    """Usage from usageMetadata; totalTokenCount also counts thoughts, so it is kept as sent."""
    return make_usage(raw, "promptTokenCount", "candidatesTokenCount", "totalTokenCount", USAGE_ALIASES)


class GeminiAdapter(Adapter):
    """`gemini`: GenerateContentResponse events to tokens."""

    dialect = "gemini"

    def __init__(self) -> None:
        super().__init__()
        self._finish0: str | None = None
        self._n_tools: dict[int, int] = {}  # candidate index -> function calls so far
        self._last_usage: dict | None = None
        self._blocked = False  # the prompt was blocked (promptFeedback.blockReason)

    def _on_event(self, ev: SseEvent, out: list[StreamToken]) -> None:
        if ev.event != "message":
            if ev.event == "error":
                self._end(out, error_token(self.dialect, error_payload(ev.data)))
            else:
                self._unknown()
            return
        chunk = _decode_chunk(ev.data)
        if chunk.candidates:
            for cand in chunk.candidates:
                self._candidate(cand, out)
        pf = chunk.promptFeedback
        if pf is not None and pf.blockReason and self._finish0 is None:
            self._finish0 = pf.blockReason
            self._blocked = True
            out.append(Finish(pf.blockReason, 0))
        usage = chunk.usageMetadata
        if usage is not None and usage != self._last_usage:
            self._last_usage = usage
            out.append(gemini_usage(usage))
        if chunk.error is not None:
            self._end(out, error_token(self.dialect, chunk.error))

    def _candidate(self, cand: _Candidate, out: list[StreamToken]) -> None:
        i = cand.index
        content = cand.content
        if content is not None and content.parts:
            for part in content.parts:
                text = part.text
                if text:
                    if part.thought:
                        out.append(Reasoning(text, None, False, i))
                    else:
                        out.append(Delta(text, i))
                if part.thoughtSignature:
                    out.append(Reasoning("", part.thoughtSignature, False, i))
                fc = part.functionCall
                if fc is not None:
                    args = _encode(fc.args if fc.args is not None else {}).decode()
                    ordinal = self._n_tools.get(i, 0)
                    self._n_tools[i] = ordinal + 1
                    out.append(ToolCall(ordinal, fc.id, fc.name, args, i))
                for key in _SERVER_PART_KEYS:
                    value = getattr(part, key)
                    if value is not None:
                        call_id = value.get("id") if isinstance(value, dict) else None
                        out.append(ServerTool(key, call_id if isinstance(call_id, str) else None, None,
                                              _encode(value).decode()))
        if cand.finishReason is not None:
            if i == 0:
                self._finish0 = cand.finishReason
            out.append(Finish(cand.finishReason, i))

    def _on_close(self, out: list[StreamToken]) -> None:
        reason = self._finish0
        if reason is None:
            self._truncated(out, "the body ended before candidate 0 had a finishReason")
            return
        finish = normalize_finish(reason)
        if self._blocked:
            finish = "content_filter"
        elif finish == "stop" and self._n_tools.get(0):
            # Gemini has no tool-call finish reason: STOP with function calls means "run tools".
            finish = "tool_calls"
        self._done(out, reason, finish)


def build_request(base_url: str, *, model: str | None, body: dict, api_key: str | None,
                  extra_headers: dict | None = None) -> HttpRequestSpec:
    """POST {base_url}/v1beta/models/{model}:streamGenerateContent?alt=sse with the key in the
    `x-goog-api-key` header (never in the URL). The model comes from `model` or body["model"]."""
    b = dict(body)
    body_model = b.pop("model", None)
    name = model if model is not None else body_model
    if not name:
        raise ConfigurationError("gemini: a model name is required (it is part of the URL)")
    name = str(name).removeprefix("models/")
    url = base_join(base_url, f"/v1beta/models/{quote(name, safe='-._~')}:streamGenerateContent?alt=sse")
    headers = {"x-goog-api-key": api_key} if api_key is not None else {}
    return json_request(url, b, headers, extra_headers)
