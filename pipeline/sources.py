"""Stream sources: `Request` (one HTTP streaming request) and `Replay` (recorded bytes).

Both are msgspec Structs (tagged, so `Source` is a typed union) because they cross the
submission ring to an ingest process as typed records, never pickles (DESIGN.md section 4).
`Request` holds its API key in `headers`; its `repr`/`str` redact every secret header so a
logged or printed request never shows one.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal, Union

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec

from .errors import ConfigurationError
from .providers import DIALECTS, build_request, default_api_key_env
from .recording import DEFAULT_READ_SIZE, Recording, aiter_replay, iter_replay_chunks

__all__ = ["Replay", "Request", "Source", "is_secret_header", "redact_headers"]

REDACTED = "[REDACTED]"

# Header names that always carry credentials, and substrings that mark one ("x-foo-api-key",
# "x-auth-token", "x-client-secret"). Cookies carry session credentials too.
_SECRET_NAMES = frozenset({"authorization", "proxy-authorization", "x-api-key", "x-goog-api-key", "api-key", "cookie"})
_SECRET_PARTS = ("key", "token", "secret", "auth", "password")


def is_secret_header(name: str) -> bool:
    """Whether a header's value is a credential that must never be shown."""
    low = name.lower()
    return low in _SECRET_NAMES or any(part in low for part in _SECRET_PARTS)


def redact_headers(headers: dict[str, str]) -> dict[str, str]:
    """A copy of `headers` with every secret value replaced by "[REDACTED]"."""
    return {k: (REDACTED if is_secret_header(k) else v) for k, v in headers.items()}


def _api_key(dialect: str, api_key: str | None) -> str | None:
    """The key given, else the dialect's usual environment variable; "" counts as missing."""
    if api_key:
        return api_key
    for env in default_api_key_env(dialect):
        value = os.environ.get(env)
        if value:
            return value
    return None


class Request(msgspec.Struct, tag=True):
    """An HTTP streaming request: what to send, and which dialect reads the answer.

    `dialect` overrides the pipeline's dialect for this stream (the constructors' `provider=`);
    `custom_id` is copied to the stream's result (the CLI's JSONL `custom_id`).
    """

    url: str
    method: str = "POST"
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    body: bytes = b""
    dialect: str | None = None
    custom_id: str | None = None

    def __repr__(self) -> str:
        return (
            f"Request(method={self.method!r}, url={_redact_url(self.url)!r}, "
            f"headers={redact_headers(self.headers)!r}, body=<{len(self.body)} bytes>, "
            f"dialect={self.dialect!r}, custom_id={self.custom_id!r})"
        )

    __str__ = __repr__

    def __rich_repr__(self) -> Iterator[tuple[str, Any]]:
        # msgspec's own rich repr would list the raw headers.
        yield "method", self.method
        yield "url", _redact_url(self.url)
        yield "headers", redact_headers(self.headers)
        yield "dialect", self.dialect
        yield "custom_id", self.custom_id

    @property
    def redacted_headers(self) -> dict[str, str]:
        """The headers with every secret value replaced (safe to log)."""
        return redact_headers(self.headers)

    # -- constructors, one per dialect ----------------------------------------------------------

    @classmethod
    def from_body(
        cls,
        dialect: str,
        base_url: str,
        body: dict[str, Any] | bytes | str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        custom_id: str | None = None,
        headers: dict[str, str] | None = None,
        provider: str | None = None,
    ) -> "Request":
        """A request of `dialect` with the given JSON body (what the CLI reads from JSONL lines).

        The dialect's request builder adds what streaming needs (the `stream` flag, the URL path,
        the auth header). The API key comes from the dialect's usual environment variable unless
        given; with none, no auth header is sent. `provider` names the dialect that reads the
        response when it is not `dialect` itself (a server that speaks one API and streams another).
        """
        if provider is not None and provider not in DIALECTS:
            raise ConfigurationError(f"unknown provider dialect {provider!r}; known: {', '.join(DIALECTS)}")
        if isinstance(body, (bytes, str)):
            body = msgspec.json.decode(body)
        if not isinstance(body, dict):
            raise ConfigurationError(f"a request body must be a JSON object, not {type(body).__name__}")
        spec = build_request(
            dialect,
            base_url,
            model=model,
            body=body,
            api_key=_api_key(dialect, api_key),
            extra_headers=headers or None,
        )
        data = spec.body
        if not isinstance(data, (bytes, bytearray)):
            data = msgspec.json.encode(data)
        return cls(
            url=spec.url,
            method=spec.method,
            headers=dict(spec.headers),
            body=bytes(data),
            dialect=provider or dialect,
            custom_id=custom_id,
        )

    @classmethod
    def openai_chat(
        cls,
        *,
        model: str,
        messages: list[dict[str, Any]],
        base_url: str = "https://api.openai.com/v1",
        api_key: str | None = None,
        custom_id: str | None = None,
        provider: str | None = None,
        headers: dict[str, str] | None = None,
        **params: Any,
    ) -> "Request":
        """OpenAI Chat Completions (and compatible servers: vLLM, llama.cpp, OpenRouter...).
        `base_url` includes `/v1`, as the OpenAI SDK takes it; `params` go into the body."""
        body = {"model": model, "messages": messages, **params}
        return cls.from_body("openai-chat", base_url, body, model=model, api_key=api_key,
                             custom_id=custom_id, headers=headers, provider=provider)

    @classmethod
    def openai_responses(
        cls,
        *,
        model: str,
        input: Any,
        base_url: str = "https://api.openai.com/v1",
        api_key: str | None = None,
        custom_id: str | None = None,
        provider: str | None = None,
        headers: dict[str, str] | None = None,
        **params: Any,
    ) -> "Request":
        """OpenAI Responses API; `input` is a string or a list of input items."""
        body = {"model": model, "input": input, **params}
        return cls.from_body("openai-responses", base_url, body, model=model, api_key=api_key,
                             custom_id=custom_id, headers=headers, provider=provider)

    @classmethod
    def openai_completions(
        cls,
        *,
        model: str,
        prompt: Any,
        base_url: str = "https://api.openai.com/v1",
        api_key: str | None = None,
        custom_id: str | None = None,
        provider: str | None = None,
        headers: dict[str, str] | None = None,
        **params: Any,
    ) -> "Request":
        """OpenAI legacy Completions (`choices[].text`), still served by vLLM and TGI."""
        body = {"model": model, "prompt": prompt, **params}
        return cls.from_body("openai-completions", base_url, body, model=model, api_key=api_key,
                             custom_id=custom_id, headers=headers, provider=provider)

    @classmethod
    def anthropic(
        cls,
        *,
        model: str,
        messages: list[dict[str, Any]],
        max_tokens: int = 1024,
        base_url: str = "https://api.anthropic.com",
        api_key: str | None = None,
        custom_id: str | None = None,
        provider: str | None = None,
        headers: dict[str, str] | None = None,
        **params: Any,
    ) -> "Request":
        """Anthropic Messages. `base_url` is the host only, as the Anthropic SDK takes it.
        A leading `{"role": "system"}` message becomes the top-level `system` (the API has no
        system role) unless `system=` is given."""
        msgs = list(messages)
        if "system" not in params:
            system = [m for m in msgs if m.get("role") == "system"]
            if system:
                msgs = [m for m in msgs if m.get("role") != "system"]
                params["system"] = "\n\n".join(_text_of(m.get("content")) for m in system)
        body = {"model": model, "messages": msgs, "max_tokens": max_tokens, **params}
        return cls.from_body("anthropic", base_url, body, model=model, api_key=api_key,
                             custom_id=custom_id, headers=headers, provider=provider)

    @classmethod
    def gemini(
        cls,
        *,
        model: str,
        contents: list[dict[str, Any]] | None = None,
        messages: list[dict[str, Any]] | None = None,
        base_url: str = "https://generativelanguage.googleapis.com",
        api_key: str | None = None,
        custom_id: str | None = None,
        provider: str | None = None,
        headers: dict[str, str] | None = None,
        **params: Any,
    ) -> "Request":
        """Google Gemini `streamGenerateContent?alt=sse`. Give `contents` as the API takes them, or
        chat-style `messages` (role user/assistant/system, string content), converted here."""
        if (contents is None) == (messages is None):
            raise ConfigurationError("Request.gemini takes exactly one of contents= or messages=")
        if contents is None:
            contents = []
            system: list[str] = []
            for m in messages or []:
                role = m.get("role", "user")
                text = _text_of(m.get("content"))
                if role == "system":
                    system.append(text)
                else:
                    contents.append({"role": "model" if role in ("assistant", "model") else "user", "parts": [{"text": text}]})
            if system and "systemInstruction" not in params and "system_instruction" not in params:
                params["systemInstruction"] = {"parts": [{"text": "\n\n".join(system)}]}
        body = {"contents": contents, **params}
        return cls.from_body("gemini", base_url, body, model=model, api_key=api_key,
                             custom_id=custom_id, headers=headers, provider=provider)

    @classmethod
    def tgi(
        cls,
        base_url: str,
        *,
        inputs: str,
        parameters: dict[str, Any] | None = None,
        api_key: str | None = None,
        custom_id: str | None = None,
        provider: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> "Request":
        """Hugging Face TGI `/generate_stream` (token-id events); `base_url` is the server's root."""
        body: dict[str, Any] = {"inputs": inputs}
        if parameters:
            body["parameters"] = parameters
        return cls.from_body("tgi-generate", base_url, body, api_key=api_key,
                             custom_id=custom_id, headers=headers, provider=provider)


def _text_of(content: Any) -> str:
    """The text of a chat message's content (a string, or a list of text parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def _redact_url(url: str) -> str:
    """`url` with the values of secret query parameters (Gemini's `key=`) replaced."""
    if "?" not in url:
        return url
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if not any(is_secret_header(k) for k, _ in pairs):
        return url
    query = [(k, REDACTED if is_secret_header(k) else v) for k, v in pairs]
    return urlunsplit(parts._replace(query=urlencode(query, safe="[]")))


class Replay(msgspec.Struct, tag=True):
    """A recorded stream replayed as reads: the recording's bytes, or the path of an `.sse` file
    (with its optional `.timing` sidecar).

    `read_size`: bytes per read, "event" (one read per event) or "recorded" (the recorded reads).
    `pace`: None (or 0) replays as fast as the consumer takes it; 1.0 keeps the recorded timing,
    2.0 twice as fast (async reads only). A str or path-like `source` is stored in `path` (and `source`
    left empty) so the record stays typed: msgspec has no `bytes | str` union.
    """

    source: bytes = b""
    read_size: Union[int, Literal["event", "recorded"]] = DEFAULT_READ_SIZE
    pace: float | None = None
    provider: str | None = None
    custom_id: str | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        src = self.source
        if not isinstance(src, (bytes, bytearray, memoryview)):
            if self.path is not None:
                raise TypeError("Replay takes the recording as bytes or a path, not both")
            self.path = os.fspath(src)  # type: ignore[arg-type]
            if not isinstance(self.path, str):
                raise TypeError("a Replay path must be a str path (bytes are the recording itself)")
            self.source = b""
        elif type(src) is not bytes:
            self.source = bytes(src)
        rs = self.read_size
        if isinstance(rs, bool) or not (rs in ("event", "recorded") or (isinstance(rs, int) and rs > 0)):
            raise ConfigurationError(f"read_size must be a positive int, 'event' or 'recorded', not {rs!r}")
        if self.pace is not None and not self.pace >= 0:
            raise ConfigurationError("pace must be >= 0 (0 or None: as fast as possible)")
        if self.provider is not None and self.provider not in DIALECTS:
            raise ConfigurationError(f"unknown provider dialect {self.provider!r}; known: {', '.join(DIALECTS)}")

    @property
    def dialect(self) -> str | None:
        """The dialect that overrides the pipeline's for this stream (same role as Request.dialect)."""
        return self.provider

    def __repr__(self) -> str:
        what = f"path={self.path!r}" if self.path is not None else f"source=<{len(self.source)} bytes>"
        return (
            f"Replay({what}, read_size={self.read_size!r}, pace={self.pace!r}, "
            f"provider={self.provider!r}, custom_id={self.custom_id!r})"
        )

    __str__ = __repr__

    def recording(self) -> Recording:
        """The `pipeline.recording.Recording` this replay reads (loaded from `path`, or the bytes)."""
        if self.path is not None:
            return Recording.load(self.path)
        return Recording(self.source)

    def chunks(self) -> Iterator[bytes]:
        """The reads, synchronously and unpaced."""
        return iter_replay_chunks(self.recording(), self.read_size)

    def achunks(self) -> AsyncIterator[bytes]:
        """The reads, asynchronously, paced by `pace` when given."""
        return aiter_replay(self.recording(), self.read_size, self.pace)


# What a pipeline can stream from; a typed union so it can cross the ring as one record type.
Source = Union[Request, Replay]
