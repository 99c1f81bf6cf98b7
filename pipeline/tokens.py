"""Provider-neutral stream tokens (a tagged union of msgspec Structs) and the StreamResult.

Every dialect adapter turns SSE events into these tokens; transformers, the accumulator, the
ring and the caller only ever see these types. They are `array_like` and `gc=False` because they
cross the shared-memory ring in volume: compact msgpack, no cycle tracking.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

from .errors import ERROR_KINDS, StreamError, is_retryable

_TOKEN = dict(tag=True, array_like=True, gc=False, omit_defaults=False)


class Delta(msgspec.Struct, **_TOKEN):
    """A piece of generated text of one choice."""

    content: str
    index: int = 0
    # Provider logprob entries for this piece, as sent (JSON-like objects), when requested.
    logprobs: Any = None
    # Token ids the provider sent for this piece (TGI, vLLM), kept as metadata.
    token_ids: list[int] | None = None


class Text(msgspec.Struct, **_TOKEN):
    """A whole text known at once (a non-streamed part), appended to a choice's text."""

    content: str
    index: int = 0


class Refusal(msgspec.Struct, **_TOKEN):
    """A piece of a refusal message (OpenAI `delta.refusal`), kept apart from the text."""

    content: str
    index: int = 0


class Reasoning(msgspec.Struct, **_TOKEN):
    """Thinking or reasoning text, or its signature (Anthropic), or an opaque redacted block."""

    content: str = ""
    signature: str | None = None
    redacted: bool = False
    index: int = 0


class ToolCall(msgspec.Struct, **_TOKEN):
    """A streamed fragment of a client tool call; fragments with the same `index` belong together."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""
    choice: int = 0


class FunctionCall(msgspec.Struct, **_TOKEN):
    """OpenAI's legacy single `function_call`, streamed."""

    name: str | None = None
    arguments: str = ""
    choice: int = 0


class ServerTool(msgspec.Struct, **_TOKEN):
    """A tool run by the provider (server_tool_use, mcp_tool_use, code execution) or its result.

    `kind` is the provider's block type; `data` is the block's JSON as text. Never counted as a
    client tool call, never dropped.
    """

    kind: str
    id: str | None = None
    name: str | None = None
    data: str = ""


class Usage(msgspec.Struct, **_TOKEN):
    """Token counts; each field None when the provider did not send it.

    `total_tokens` is the provider's own total when sent. `extras` holds provider extras (cached,
    reasoning tokens...). `estimated` marks counts made by the client, not reported by the provider.
    """

    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    extras: dict[str, Any] | None = None
    estimated: bool = False


class Finish(msgspec.Struct, **_TOKEN):
    """One choice reached its end with the provider's own finish reason (n > 1 has one per choice)."""

    reason: str | None
    index: int = 0


class Done(msgspec.Struct, **_TOKEN):
    """The stream ended normally. `finish_reason` is choice 0's, as the provider spelled it."""

    finish_reason: str | None = None
    finish: str = "stop"


class Error(msgspec.Struct, **_TOKEN):
    """The stream ended badly. `kind` is one of `ERROR_KINDS`."""

    kind: str
    message: str = ""
    retryable: bool = False
    http_status: int | None = None
    retry_after: float | None = None
    # Provider error body or code, when one was sent (never request headers).
    detail: Any = None

    @classmethod
    def of(
        cls,
        kind: str,
        message: str = "",
        *,
        http_status: int | None = None,
        retry_after: float | None = None,
        detail: Any = None,
        retryable: bool | None = None,
    ) -> "Error":
        """An Error with `retryable` derived from the kind and status unless given."""
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        return cls(
            kind,
            message,
            is_retryable(kind, http_status) if retryable is None else retryable,
            http_status,
            retry_after,
            detail,
        )

    @classmethod
    def from_exception(cls, exc: StreamError) -> "Error":
        """The token for a raised StreamError."""
        return cls(exc.kind, exc.message, exc.retryable, exc.http_status, exc.retry_after, None)

    def to_exception(self) -> StreamError:
        """The StreamError to raise for this token."""
        return StreamError(
            self.message or self.kind,
            kind=self.kind,
            http_status=self.http_status,
            retry_after=self.retry_after,
            retryable=self.retryable,
        )


class RawEvent(msgspec.Struct, **_TOKEN):
    """An SSE event passed through as it is (the `sse-generic` dialect)."""

    event: str
    data: bytes
    id: str | None = None


StreamToken = Union[
    Delta, Text, Refusal, Reasoning, ToolCall, FunctionCall, ServerTool, Usage, Finish, Done, Error, RawEvent
]
TOKEN_TYPES: tuple[type, ...] = StreamToken.__args__  # type: ignore[attr-defined]
TERMINAL_TYPES = (Done, Error)

# Codecs for token batches crossing processes (msgpack, typed: no pickle anywhere).
token_batch_encoder = msgspec.msgpack.Encoder()
token_batch_decoder = msgspec.msgpack.Decoder(list[StreamToken])

# Normalized finish values (StreamResult.finish), from each provider's own strings.
FINISH_NORMALIZED: dict[str, str] = {
    "stop": "stop",
    "end_turn": "stop",
    "stop_sequence": "stop",
    "STOP": "stop",
    "eos_token": "stop",
    "eos": "stop",
    "stop_sequence_hit": "stop",
    "completed": "stop",
    "COMPLETE": "stop",
    "pause_turn": "stop",
    "length": "length",
    "max_tokens": "length",
    "MAX_TOKENS": "length",
    "incomplete": "length",
    "MAX_TOKENS_REACHED": "length",
    "tool_calls": "tool_calls",
    "tool_use": "tool_calls",
    "function_call": "tool_calls",
    "TOOL_CALL": "tool_calls",
    "content_filter": "content_filter",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "refusal": "content_filter",
    "failed": "error",
    "ERROR": "error",
}


def normalize_finish(reason: str | None) -> str:
    """Map a provider's finish reason to one of stop, length, tool_calls, content_filter, error."""
    if reason is None:
        return "stop"
    return FINISH_NORMALIZED.get(reason, FINISH_NORMALIZED.get(reason.lower(), "stop"))


def _mergeable(a: StreamToken, b: StreamToken) -> bool:
    ta = type(a)
    if ta is not type(b):
        return False
    if ta is Delta:
        return (
            a.index == b.index  # type: ignore[union-attr]
            and a.logprobs is None
            and b.logprobs is None  # type: ignore[union-attr]
            and (a.token_ids is None) == (b.token_ids is None)  # type: ignore[union-attr]
        )
    if ta is Text or ta is Refusal:
        return a.index == b.index  # type: ignore[union-attr]
    if ta is Reasoning:
        return (
            a.index == b.index  # type: ignore[union-attr]
            and not a.redacted
            and not b.redacted  # type: ignore[union-attr]
            and a.signature is None  # type: ignore[union-attr]
            and b.signature is None  # type: ignore[union-attr]
        )
    if ta is ToolCall:
        # A later fragment may add arguments only; a new id or name starts a new call.
        return a.index == b.index and a.choice == b.choice and b.id is None and b.name is None  # type: ignore[union-attr]
    if ta is FunctionCall:
        return a.choice == b.choice and b.name is None  # type: ignore[union-attr]
    return False


def _combine(a: StreamToken, b: StreamToken) -> StreamToken:
    ta = type(a)
    if ta is Delta:
        ids = None if a.token_ids is None else a.token_ids + b.token_ids  # type: ignore[union-attr,operator]
        return Delta(a.content + b.content, a.index, None, ids)  # type: ignore[union-attr]
    if ta is Text:
        return Text(a.content + b.content, a.index)  # type: ignore[union-attr]
    if ta is Refusal:
        return Refusal(a.content + b.content, a.index)  # type: ignore[union-attr]
    if ta is Reasoning:
        return Reasoning(a.content + b.content, None, False, a.index)  # type: ignore[union-attr]
    if ta is ToolCall:
        return ToolCall(a.index, a.id, a.name, a.arguments + b.arguments, a.choice)  # type: ignore[union-attr]
    if ta is FunctionCall:
        return FunctionCall(a.name, a.arguments + b.arguments, a.choice)  # type: ignore[union-attr]
    raise TypeError(f"cannot merge {ta.__name__}")


def merge(tokens: list[StreamToken]) -> list[StreamToken]:
    """Combine adjacent compatible tokens (text pieces of one choice, argument fragments of one
    call) so a batch carries fewer, larger tokens. Concatenated content is unchanged."""
    out: list[StreamToken] = []
    for tok in tokens:
        if out and _mergeable(out[-1], tok):
            out[-1] = _combine(out[-1], tok)
        else:
            out.append(tok)
    return out


# --- the result of one stream (built by TokenAccumulator) -------------------------------------


class ToolCallResult(msgspec.Struct, gc=False):
    """A finished client tool call. `arguments` is parsed JSON (partial mode when the stream ended
    inside it); `raw_arguments` is kept only when even partial parsing failed."""

    id: str | None
    name: str | None
    arguments: Any
    raw_arguments: str | None = None
    index: int = 0


class ServerToolResult(msgspec.Struct, gc=False):
    """A provider-run tool call or its result, kept as sent."""

    kind: str
    id: str | None = None
    name: str | None = None
    data: Any = None


class UsageResult(msgspec.Struct, gc=False):
    """Final token usage of a stream."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    extras: dict[str, Any] | None = None
    estimated: bool = False


class ChoiceResult(msgspec.Struct, gc=False):
    """One choice of a stream (n > 1 gives several)."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[Any] | None = None


class ErrorResult(msgspec.Struct, gc=False):
    """How a stream failed, in a result (mirrors the Error token)."""

    kind: str
    message: str = ""
    retryable: bool = False
    http_status: int | None = None
    retry_after: float | None = None
    detail: Any = None


class StreamResult(msgspec.Struct, gc=False):
    """Everything one stream produced: text, choices, tool calls, usage, outcome and metrics."""

    text: str = ""
    choices: list[ChoiceResult] = msgspec.field(default_factory=list)
    refusal: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallResult] = msgspec.field(default_factory=list)
    server_tools: list[ServerToolResult] = msgspec.field(default_factory=list)
    usage: UsageResult | None = None
    finish_reason: str | None = None
    finish: str | None = None
    error: ErrorResult | None = None
    metrics: Any = None
    stream_id: int = 0
    source_index: int = 0
    custom_id: str | None = None

    @property
    def ok(self) -> bool:
        """True when the stream ended normally."""
        return self.error is None


result_encoder = msgspec.msgpack.Encoder()
result_decoder = msgspec.msgpack.Decoder(StreamResult)
