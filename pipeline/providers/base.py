"""What every dialect adapter shares: the `Adapter` protocol, the HTTP request spec, and helpers
for usage counts and in-band errors.

An adapter is sans-I/O: `feed(events)` takes parsed `SseEvent`s and returns `StreamToken`s,
`close()` applies the dialect's completion rule at the end of the body. One instance per stream.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec

from ..sse import SseEvent
from ..tokens import Done, Error, StreamToken, Usage, normalize_finish

__all__ = [
    "Adapter",
    "HttpRequestSpec",
    "base_join",
    "classify_error",
    "dispatch_type",
    "error_payload",
    "error_token",
    "is_done_marker",
    "json_request",
    "make_usage",
    "usage_extras",
    "with_stream_flag",
]

# How much of an offending event's data an Error keeps as detail: enough to see what broke.
_DETAIL_DATA_BYTES = 200


class HttpRequestSpec(msgspec.Struct, gc=False):
    """One HTTP request to send for a stream: method, full URL, headers and the encoded body."""

    method: str
    url: str
    headers: dict[str, str]
    body: bytes


class _TypeOnly(msgspec.Struct, gc=False):
    type: str = ""


_decode_type = msgspec.json.Decoder(_TypeOnly).decode


class Adapter:
    """Turns one stream's SSE events into StreamTokens for one wire dialect.

    Subclasses implement `_on_event(event, out)` (append tokens to `out`, call `_end` when the
    stream is over) and `_on_close(out)` (the completion rule at the end of the body). The base
    class handles the `finished` latch, malformed JSON and truncation by a cut event.
    """

    dialect: ClassVar[str] = ""

    def __init__(self) -> None:
        self.finished = False
        self.unknown_events = 0

    def feed(self, events: list[SseEvent]) -> list[StreamToken]:
        """Tokens for a batch of events; [] once a terminal token (Done or Error) was emitted."""
        if self.finished:
            return []
        out: list[StreamToken] = []
        on_event = self._on_event
        ev = None
        try:
            for ev in events:
                on_event(ev, out)
                if self.finished:
                    break
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError too
            self._flush(out)
            self._end(out, self._malformed(ev, exc))
        return out

    def close(self, discarded_tail: bool = False) -> list[StreamToken]:
        """End of body: Done if the dialect's completion rule holds, else Error(kind="truncated").
        `discarded_tail` (the parser dropped an unfinished event) always means truncated: the
        lost event could have been anything, an in-band error included. [] once finished."""
        if self.finished:
            return []
        out: list[StreamToken] = []
        if discarded_tail:
            self._flush(out)
            self._end(out, Error.of("truncated", f"{self.dialect}: the body ended inside an event"))
            return out
        self._on_close(out)
        if not self.finished:  # a subclass that forgot to decide: never report success silently
            self._end(out, Error.of("truncated", f"{self.dialect}: the body ended before the stream was complete"))
        return out

    # --- for subclasses ---------------------------------------------------------------------

    def _on_event(self, ev: SseEvent, out: list[StreamToken]) -> None:
        raise NotImplementedError

    def _dispatch(self, ev: SseEvent, out: list[StreamToken]) -> None:
        """For dialects with named events: hand the event's data to the handler its type names
        in `self._handlers` (type -> handler(data, out)); an unknown type is skipped and counted."""
        handler = self._handlers.get(dispatch_type(ev))  # type: ignore[attr-defined]
        if handler is None:
            self._unknown()
            return
        handler(ev.data, out)

    def _on_close(self, out: list[StreamToken]) -> None:
        raise NotImplementedError

    def _flush(self, out: list[StreamToken]) -> None:
        """Emit whatever is buffered (e.g. a half-received server tool block) before an end."""

    def _end(self, out: list[StreamToken], token: StreamToken) -> None:
        out.append(token)
        self.finished = True

    def _done(self, out: list[StreamToken], reason: str | None, finish: str | None = None) -> None:
        self._end(out, Done(reason, finish or normalize_finish(reason)))

    def _truncated(self, out: list[StreamToken], why: str) -> None:
        self._flush(out)
        self._end(out, Error.of("truncated", f"{self.dialect}: {why}"))

    def _unknown(self) -> None:
        self.unknown_events += 1

    def _malformed(self, ev: SseEvent | None, exc: Exception) -> Error:
        detail = None
        if ev is not None:
            detail = {"event": ev.event, "data": bytes(ev.data[:_DETAIL_DATA_BYTES]).decode("utf-8", "replace")}
        where = f" in a {ev.event!r} event" if ev is not None else ""
        return Error.of("malformed", f"{self.dialect}: bad JSON{where}: {exc}", detail=detail)


def is_done_marker(data: bytes) -> bool:
    """True for OpenAI's `[DONE]` sentinel (data may be bytes or a memoryview into a ring)."""
    return len(data) < 16 and bytes(data).strip() == b"[DONE]"


def dispatch_type(ev: SseEvent) -> str:
    """The event's type: its SSE name, or the JSON `type` when a proxy dropped the `event:` line."""
    name = ev.event
    if name != "message":
        return name
    return _decode_type(ev.data).type or "message"



# --- usage --------------------------------------------------------------------------------------


def _is_count(v: Any) -> bool:
    return (type(v) is int or type(v) is float) and v == v  # bool is not int here; NaN excluded


def usage_extras(raw: dict, skip: frozenset[str], aliases: dict[str, str]) -> dict[str, Any] | None:
    """Provider extras of a usage object: every numeric field except `skip`, nested detail
    objects flattened to "parent.child", then renamed by `aliases` (e.g. to cached_tokens)."""
    extras: dict[str, Any] = {}
    for key, value in raw.items():
        if key in skip:
            continue
        if _is_count(value):
            extras[aliases.get(key, key)] = value
        elif type(value) is dict:
            for sub, v in value.items():
                if _is_count(v):
                    path = f"{key}.{sub}"
                    extras[aliases.get(path, path)] = v
    return extras or None


def _count(raw: dict, key: str) -> int | None:
    v = raw.get(key)
    return v if type(v) is int else None


def make_usage(raw: dict, input_key: str, output_key: str, total_key: str | None,
               aliases: dict[str, str]) -> Usage:
    """A Usage token from a provider usage object (only its integer counts; others go to extras)."""
    skip = frozenset(k for k in (input_key, output_key, total_key) if k)
    return Usage(
        _count(raw, input_key),
        _count(raw, output_key),
        _count(raw, total_key) if total_key else None,
        usage_extras(raw, skip, aliases),
    )


# --- in-band errors ---------------------------------------------------------------------------

# In-band error classification (the HTTP status was 200, so only the error's own type/code/status
# words tell). Rate limits and temporary quota exhaustion -> "rate_limited" (retryable);
# OpenAI's `insufficient_quota` is a billing state waiting does not fix -> "rate_limited" but not
# retryable; overload and server faults -> "provider", retryable; anything else -> "provider".
_RATE_WORDS = ("rate_limit", "ratelimit", "rate limit", "too_many_requests", "resource_exhausted", "quota")
_BILLING_WORDS = ("insufficient_quota", "billing")
_TRANSIENT_WORDS = ("overloaded", "server_error", "internal", "unavailable", "timeout", "api_error")
_TRANSIENT_CODES = frozenset({500, 502, 503, 504, 529})


def classify_error(err: Any) -> tuple[str, bool]:
    """(kind, retryable) for a provider's in-band error object."""
    words: list[str] = []
    codes: list[int] = []
    if isinstance(err, dict):
        for key in ("type", "code", "status", "error_type", "reason"):
            v = err.get(key)
            if isinstance(v, str):
                words.append(v.lower())
            elif type(v) is int:
                codes.append(v)
        status_code = err.get("status_code")
        if type(status_code) is int:
            codes.append(status_code)
    elif isinstance(err, str):
        words.append(err.lower())
    text = " ".join(words)
    if any(w in text for w in _BILLING_WORDS):
        return "rate_limited", False
    if 429 in codes or any(w in text for w in _RATE_WORDS):
        return "rate_limited", True
    if any(c in _TRANSIENT_CODES for c in codes) or any(w in text for w in _TRANSIENT_WORDS):
        return "provider", True
    return "provider", False


def error_payload(data: bytes) -> Any:
    """The error object of an `error` event: its "error" member, the whole JSON object, or the
    text itself when the data is not JSON (an error event is an error whatever its shape)."""
    try:
        obj = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return bytes(data).decode("utf-8", "replace")
    if isinstance(obj, dict) and obj.get("error") is not None:
        return obj["error"]
    return obj


def error_token(dialect: str, err: Any) -> Error:
    """The Error token for an in-band provider error object (kept whole as `detail`)."""
    message = ""
    if isinstance(err, dict):
        m = err.get("message")
        if isinstance(m, str):
            message = m
        elif isinstance(err.get("error"), str):  # TGI: {"error": "...", "error_type": "..."}
            message = err["error"]
    elif isinstance(err, str):
        message = err
    kind, retryable = classify_error(err)
    return Error.of(kind, f"{dialect}: {message or 'error event'}", detail=err, retryable=retryable)


# --- requests ---------------------------------------------------------------------------------


def json_request(url: str, body: dict, headers: dict[str, str], extra_headers: dict | None) -> HttpRequestSpec:
    """A POST with a JSON body expecting an event stream; `extra_headers` win over ours."""
    h = {"content-type": "application/json", "accept": "text/event-stream"}
    h.update(headers)
    if extra_headers:
        h.update({str(k): str(v) for k, v in extra_headers.items()})
    return HttpRequestSpec("POST", url, h, msgspec.json.encode(body))


def with_stream_flag(body: dict, model: str | None, include_usage: bool) -> dict:
    """A copy of an OpenAI-style body with `stream: true`, the model, and (for chat/completions)
    `stream_options.include_usage` unless the caller set stream_options (None removes it)."""
    b = dict(body)
    b["stream"] = True
    if model is not None:
        b["model"] = model
    if include_usage:
        if "stream_options" not in b:
            b["stream_options"] = {"include_usage": True}
        elif b["stream_options"] is None:
            del b["stream_options"]
    return b


def base_join(base_url: str, path: str) -> str:
    """base_url + path with exactly one slash between them."""
    return base_url.rstrip("/") + path
