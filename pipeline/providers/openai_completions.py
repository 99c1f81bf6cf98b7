"""OpenAI legacy Completions streams (`/v1/completions`, object "text_completion"), the shape
vLLM's and llama.cpp's completions routes also use.

Completion rule: the same as Chat Completions (every choice seen has a finish_reason; [DONE]
and a usage-only chunk may follow and are not needed; in-band errors win).
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..tokens import Delta, Finish, StreamToken
from .base import HttpRequestSpec, base_join, json_request, with_stream_flag
from .openai_chat import OpenAIStyleAdapter

__all__ = ["API_KEY_ENV", "OpenAICompletionsAdapter", "build_request"]

API_KEY_ENV = ("OPENAI_API_KEY",)


class _Choice(msgspec.Struct, gc=False):
    index: int = 0
    text: str | None = None
    finish_reason: str | None = None
    # Legacy logprobs object {tokens, token_logprobs, top_logprobs, text_offset}, kept as sent.
    logprobs: Any = None
    token_ids: list[int] | None = None  # vLLM return_token_ids


class _Chunk(msgspec.Struct, gc=False):
    choices: list[_Choice] | None = None
    usage: dict[str, Any] | None = None
    error: Any = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


class OpenAICompletionsAdapter(OpenAIStyleAdapter):
    """`openai-completions`: legacy Completions chunks to tokens."""

    dialect = "openai-completions"

    def _chunk(self, data: bytes, out: list[StreamToken]) -> None:
        chunk = _decode_chunk(data)
        if chunk.choices:
            reasons = self._reasons
            for ch in chunk.choices:
                i = ch.index
                if i not in reasons:
                    reasons[i] = None
                if ch.text:
                    out.append(Delta(ch.text, i, ch.logprobs, ch.token_ids))
                if ch.finish_reason is not None:
                    reasons[i] = ch.finish_reason
                    out.append(Finish(ch.finish_reason, i))
        if chunk.usage is not None or chunk.error is not None:
            self._tail(chunk, out)


def build_request(base_url: str, *, model: str | None, body: dict, api_key: str | None,
                  extra_headers: dict | None = None) -> HttpRequestSpec:
    """POST {base_url}/completions with `stream: true` and `stream_options.include_usage`."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key is not None else {}
    return json_request(
        base_join(base_url, "/completions"), with_stream_flag(body, model, True), headers, extra_headers
    )
