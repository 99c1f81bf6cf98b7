"""Hugging Face TGI `/generate_stream`: one data event per token
`{index?, token{id, text, logprob, special}, generated_text, details}`, no [DONE].

Completion rule (fixtures MANIFEST): the event with a non-null `generated_text` is the last
one (Done right there; `details` gives finish_reason and counts when details were requested).
An event with an "error" field is an error end; a body that stops before the final event is
truncated.

Token mapping: each non-special token -> Delta(text, 0, logprobs=[token as sent],
token_ids=[id]); special tokens (</s>, <|eot_id|>, ...) add no text. details -> Finish and
Usage(input_length, generated_tokens).
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..sse import SseEvent
from ..tokens import Delta, Finish, StreamToken, Usage
from .base import Adapter, HttpRequestSpec, base_join, error_token, json_request

__all__ = ["API_KEY_ENV", "TgiGenerateAdapter", "build_request"]

API_KEY_ENV = ("HF_TOKEN",)


class _Token(msgspec.Struct, gc=False):
    id: int | None = None
    text: str = ""
    logprob: float | None = None
    special: bool = False


class _Details(msgspec.Struct, gc=False):
    finish_reason: str | None = None
    generated_tokens: int | None = None
    input_length: int | None = None


class _Event(msgspec.Struct, gc=False):
    token: _Token | None = None
    generated_text: str | None = None
    details: _Details | None = None
    error: Any = None
    error_type: str | None = None


_decode_event = msgspec.json.Decoder(_Event).decode


class TgiGenerateAdapter(Adapter):
    """`tgi-generate`: TGI /generate_stream token events to tokens."""

    dialect = "tgi-generate"

    def _on_event(self, ev: SseEvent, out: list[StreamToken]) -> None:
        if ev.event != "message":
            self._unknown()
            return
        e = _decode_event(ev.data)
        if e.error is not None:
            err = {"error": e.error, "error_type": e.error_type} if isinstance(e.error, str) else e.error
            self._end(out, error_token(self.dialect, err))
            return
        tok = e.token
        # An empty text is a token that ends inside a UTF-8 character: its id still matters.
        if tok is not None and not tok.special and (tok.text or tok.id is not None):
            entry = {"id": tok.id, "text": tok.text, "logprob": tok.logprob, "special": tok.special}
            out.append(Delta(tok.text, 0, [entry], None if tok.id is None else [tok.id]))
        if e.generated_text is not None:
            reason = None
            d = e.details
            if d is not None:
                reason = d.finish_reason
                if reason is not None:
                    out.append(Finish(reason, 0))
                if d.input_length is not None or d.generated_tokens is not None:
                    out.append(Usage(d.input_length, d.generated_tokens))
            self._done(out, reason)

    def _on_close(self, out: list[StreamToken]) -> None:
        self._truncated(out, "the body ended before the event with generated_text")


def build_request(base_url: str, *, model: str | None, body: dict, api_key: str | None,
                  extra_headers: dict | None = None) -> HttpRequestSpec:
    """POST {base_url}/generate_stream (body: {"inputs": ..., "parameters": {...}}). TGI serves
    one model per endpoint, so `model` is not sent; the stream needs no flag in the body."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key is not None else {}
    return json_request(base_join(base_url, "/generate_stream"), dict(body), headers, extra_headers)
