"""The error hierarchy: one root (`StreamError`) and one list of error kinds.

`StreamError` is what Python code raises; the `Error` token (pipeline.tokens) is how a stream
ends badly inside a pipeline. Both carry a `kind` from `ERROR_KINDS`, which says whether a
retry can help.
"""

from __future__ import annotations

from typing import Any

# kind -> retryable. One list for the whole project (DESIGN.md section 3).
ERROR_KINDS: dict[str, bool] = {
    "truncated": True,  # the body ended before the dialect's completion rule held
    "http": False,  # status >= 400 (429 and 5xx are overridden to retryable where they occur)
    "rate_limited": True,  # 429, or a provider's rate-limit error
    "provider": False,  # an in-band error event from the provider
    "malformed": False,  # bad framing or JSON
    "too_large": False,  # an event or line beyond max_event_bytes
    "idle_timeout": True,  # no bytes for longer than the idle timeout
    "timeout": True,  # the total timeout of a stream ran out
    "connect": True,  # could not connect
    "cancelled": False,  # the caller cancelled the stream
    "worker_crashed": True,  # a worker died and the stream could not be replayed
    "filtered": False,  # a transformer failed the stream (content filter with policy "fail")
    "decode": False,  # token ids that cannot be decoded
}


def is_retryable(kind: str, http_status: int | None = None) -> bool:
    """Whether an error of this kind (and HTTP status) may succeed when retried."""
    if http_status is not None and (http_status == 429 or http_status >= 500):
        return True
    return ERROR_KINDS.get(kind, False)


class StreamError(Exception):
    """Root of every error streamring raises; carries what a caller needs to decide."""

    kind: str = "malformed"

    def __init__(
        self,
        message: str,
        *,
        kind: str | None = None,
        http_status: int | None = None,
        retry_after: float | None = None,
        retryable: bool | None = None,
        received: Any = None,
    ) -> None:
        super().__init__(message)
        if kind is not None:
            if kind not in ERROR_KINDS:
                raise ValueError(f"unknown error kind {kind!r}")
            self.kind = kind
        self.message = message
        self.http_status = http_status
        self.retry_after = retry_after
        self.retryable = is_retryable(self.kind, http_status) if retryable is None else retryable
        # What was received before the error (events, tokens or a partial result), for the caller.
        self.received = received

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, message={self.message!r})"


class TooLargeError(StreamError):
    """An event or line grew beyond its limit."""

    kind = "too_large"


class MalformedError(StreamError):
    """Bad framing or a payload that does not decode."""

    kind = "malformed"


class DecodeError(StreamError):
    """Token ids that cannot be turned into text (unknown id, forbidden special, bad UTF-8 tail)."""

    kind = "decode"


class StreamTimeoutError(StreamError):
    """A wait ran out (`timeout`, or `idle_timeout` between chunks)."""

    kind = "timeout"


class HttpStatusError(StreamError):
    """The server answered with a status >= 400."""

    kind = "http"


class CancelledStreamError(StreamError):
    """The stream was cancelled by its caller."""

    kind = "cancelled"


class ConfigurationError(StreamError, ValueError):
    """A pipeline or source was configured in a way that cannot work (not a stream failure)."""

    kind = "malformed"


class UnsupportedPlatformError(StreamError, RuntimeError):
    """The multiprocess pool cannot run on this machine (not Linux x86-64)."""

    kind = "malformed"
