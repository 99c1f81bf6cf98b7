"""OpenAI Chat Completions streams (`chat.completion.chunk`), and every OpenAI-compatible server
that speaks them: vLLM, TGI's chat route, llama.cpp, OpenRouter, Groq, Together, DeepSeek...

Completion rule (fixtures MANIFEST): complete when every choice index that appeared has a
non-null finish_reason; `data: [DONE]` usually follows but some servers omit it, so [DONE] ends
the stream at once when the rule holds and is otherwise `truncated`, and a body without [DONE]
is judged at close(). An in-band error (a chunk with a top-level "error", or an `error` event)
ends the stream even after finish_reasons.

This is the benchmark shape: one typed decode per event and a short Python path per token.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..sse import SseEvent
from ..tokens import Delta, Finish, FunctionCall, Reasoning, Refusal, StreamToken, ToolCall, Usage
from .base import (
    Adapter,
    HttpRequestSpec,
    base_join,
    error_payload,
    error_token,
    is_done_marker,
    json_request,
    make_usage,
    with_stream_flag,
)

__all__ = ["API_KEY_ENV", "OpenAIChatAdapter", "build_request"]

API_KEY_ENV = ("OPENAI_API_KEY",)

# --- wire structs: only the fields we read ----------------------------------------------------


class _Function(msgspec.Struct, gc=False):
    name: str | None = None
    arguments: str | None = None


class _ToolCallDelta(msgspec.Struct, gc=False):
    index: int | None = None
    id: str | None = None
    function: _Function | None = None


class _ReasoningDetail(msgspec.Struct, gc=False):
    # OpenRouter `reasoning_details`: the text duplicates `reasoning`; only signatures and
    # encrypted blobs are new information.
    type: str | None = None
    signature: str | None = None
    data: str | None = None


class _Delta(msgspec.Struct, gc=False):
    content: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None  # DeepSeek, vLLM (older name)
    reasoning: str | None = None  # OpenRouter, Groq, vLLM (newer name)
    reasoning_details: list[_ReasoningDetail] | None = None
    tool_calls: list[_ToolCallDelta] | None = None
    function_call: _Function | None = None
    token_id: int | None = None  # Together


class _Logprobs(msgspec.Struct, gc=False):
    content: list[Any] | None = None


class _Choice(msgspec.Struct, gc=False):
    index: int = 0
    delta: _Delta | None = None
    finish_reason: str | None = None
    logprobs: _Logprobs | None = None
    token_ids: list[int] | None = None  # vLLM return_token_ids


class _Chunk(msgspec.Struct, gc=False):
    choices: list[_Choice] | None = None
    usage: dict[str, Any] | None = None
    error: Any = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode

USAGE_ALIASES = {
    "prompt_tokens_details.cached_tokens": "cached_tokens",
    "completion_tokens_details.reasoning_tokens": "reasoning_tokens",
}


def openai_usage(raw: dict) -> Usage:
    """Usage from an OpenAI-style usage object (prompt/completion/total tokens plus details)."""
    return make_usage(raw, "prompt_tokens", "completion_tokens", "total_tokens", USAGE_ALIASES)


class OpenAIStyleAdapter(Adapter):
    """The part shared by Chat Completions and legacy Completions: [DONE], the per-choice
    finish_reason rule, usage, and in-band errors. Subclasses decode one chunk in `_chunk`."""

    def __init__(self) -> None:
        super().__init__()
        # choice index -> its last finish_reason (None while the choice is still open)
        self._reasons: dict[int, str | None] = {}
        self._last_usage: dict | None = None

    def _on_event(self, ev: SseEvent, out: list[StreamToken]) -> None:
        if ev.event != "message":
            self._named_event(ev, out)
            return
        data = ev.data
        if data[:1] != b"{" and is_done_marker(data):
            self._on_done_marker(out)
            return
        self._chunk(data, out)

    def _named_event(self, ev: SseEvent, out: list[StreamToken]) -> None:
        if ev.event == "error":  # Groq: `event: error` + {"error": {...}}, then the body closes
            self._end(out, error_token(self.dialect, error_payload(ev.data)))
        else:
            self._unknown()

    def _chunk(self, data: bytes, out: list[StreamToken]) -> None:
        raise NotImplementedError

    def _tail(self, chunk: _Chunk | Any, out: list[StreamToken]) -> None:
        """Usage and in-band error of a chunk (the error after the usage: keep both)."""
        usage = chunk.usage
        if usage is not None and usage != self._last_usage:  # continuous usage repeats itself
            self._last_usage = usage
            out.append(openai_usage(usage))
        if chunk.error is not None:
            self._end(out, error_token(self.dialect, chunk.error))

    def _complete(self) -> bool:
        reasons = self._reasons
        return bool(reasons) and None not in reasons.values()

    def _on_done_marker(self, out: list[StreamToken]) -> None:
        if self._complete():
            self._done(out, self._reasons.get(0))
        else:
            self._truncated(out, f"[DONE] before every choice had a finish_reason (open: {self._open()})")

    def _on_close(self, out: list[StreamToken]) -> None:
        if self._complete():
            self._done(out, self._reasons.get(0))
        else:
            self._truncated(out, f"the body ended before every choice had a finish_reason (open: {self._open()})")

    def _open(self) -> list[int]:
        return sorted(i for i, r in self._reasons.items() if r is None) if self._reasons else []


class OpenAIChatAdapter(OpenAIStyleAdapter):
    """`openai-chat`: Chat Completions chunks to tokens."""

    dialect = "openai-chat"

    def __init__(self) -> None:
        super().__init__()
        # choice -> {call id -> ordinal}, for servers that omit tool_calls[].index
        self._tool_ids: dict[int, dict[str, int]] = {}

    def feed(self, events: list[SseEvent]) -> list[StreamToken]:
        """Tokens for a batch of events. The hot path of the library: one typed decode per
        event and a few attribute checks per choice, all inline."""
        if self.finished:
            return []
        out: list[StreamToken] = []
        append = out.append
        reasons = self._reasons
        decode = _decode_chunk
        ev = None
        try:
            for ev in events:
                if ev.event != "message":
                    self._named_event(ev, out)
                    if self.finished:
                        break
                    continue
                try:
                    chunk = decode(ev.data)
                except msgspec.DecodeError:
                    # `[DONE]` is not JSON: looked at only when a decode fails (once a stream).
                    if not is_done_marker(ev.data):
                        raise
                    self._on_done_marker(out)
                    break
                choices = chunk.choices
                if choices:
                    for ch in choices:
                        i = ch.index
                        if i not in reasons:
                            reasons[i] = None
                        d = ch.delta
                        if d is not None:
                            c = d.content
                            if c:
                                lp = ch.logprobs
                                ids = ch.token_ids
                                if ids is None and d.token_id is not None:
                                    ids = [d.token_id]
                                append(Delta(c, i, None if lp is None else lp.content, ids))
                            # Rarer fields, checked in one go on the common path.
                            if (
                                d.tool_calls is not None
                                or d.reasoning_content
                                or d.reasoning
                                or d.refusal
                                or d.reasoning_details
                                or d.function_call is not None
                            ):
                                self._rare(d, i, out)
                        fr = ch.finish_reason
                        if fr is not None:
                            reasons[i] = fr
                            append(Finish(fr, i))
                if chunk.usage is not None or chunk.error is not None:
                    self._tail(chunk, out)
                    if self.finished:
                        break
        except msgspec.DecodeError as exc:
            self._end(out, self._malformed(ev, exc))
        return out

    def _rare(self, d: _Delta, i: int, out: list[StreamToken]) -> None:
        if d.refusal:
            out.append(Refusal(d.refusal, i))
        # vLLM may send both names with the same text: take one, never both.
        r = d.reasoning_content or d.reasoning
        if r:
            out.append(Reasoning(r, None, False, i))
        if d.reasoning_details:
            for det in d.reasoning_details:
                if det.signature:
                    out.append(Reasoning("", det.signature, False, i))
                if det.type == "reasoning.encrypted" and det.data:
                    out.append(Reasoning(det.data, None, True, i))
        if d.tool_calls is not None:
            for tc in d.tool_calls:
                fn = tc.function
                name = args = None
                if fn is not None:
                    name, args = fn.name, fn.arguments
                idx = tc.index if tc.index is not None else self._tool_index(i, tc.id)
                if tc.id or name or args:
                    out.append(ToolCall(idx, tc.id or None, name or None, args or "", i))
        fc = d.function_call
        if fc is not None and (fc.name or fc.arguments):
            out.append(FunctionCall(fc.name or None, fc.arguments or "", i))

    def _tool_index(self, choice: int, call_id: str | None) -> int:
        """Ordinal of a tool call from a server that sends no index: a new id starts a new call,
        a fragment without id continues the last one."""
        ids = self._tool_ids.setdefault(choice, {})
        if call_id and call_id not in ids:
            ids[call_id] = len(ids)
            return ids[call_id]
        if call_id:
            return ids[call_id]
        return max(len(ids) - 1, 0)


def build_request(base_url: str, *, model: str | None, body: dict, api_key: str | None,
                  extra_headers: dict | None = None) -> HttpRequestSpec:
    """POST {base_url}/chat/completions (base_url includes /v1, as the SDK takes it) with
    `stream: true` and `stream_options.include_usage` unless the body sets stream_options."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key is not None else {}
    return json_request(
        base_join(base_url, "/chat/completions"), with_stream_flag(body, model, True), headers, extra_headers
    )
