"""A request from the endpoint flags (`--provider`, `--base-url`, `--api-key-env`, `--header`, ...)
that `run` and `record` share."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from ._common import UsageError

# Where each vendor's official SDK points by default (the CLI's default --base-url).
_DEFAULT_BASE_URLS = {
    "openai-chat": "https://api.openai.com/v1",
    "openai-responses": "https://api.openai.com/v1",
    "openai-completions": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com",
    "cohere-v2": "https://api.cohere.com",
}
# Dialects whose request names no model (the server serves one).
_MODEL_OPTIONAL = ("tgi-generate", "sse-generic")


def needs_model(dialect: str) -> bool:
    """Whether a request of `dialect` must name a model."""
    return dialect not in _MODEL_OPTIONAL


def http_options(args: argparse.Namespace) -> dict[str, Any]:
    """The HttpOptions fields the flags set (timeouts, retries, rate limits), checked now."""
    from ..http import HttpOptions

    opts: dict[str, Any] = {}
    for name, key in (("idle_timeout", "idle_timeout"), ("timeout", "total_timeout"), ("retries", "retries"),
                      ("rpm", "rpm"), ("tpm", "tpm")):
        v = getattr(args, name, None)
        if v is not None:
            opts[key] = v
    HttpOptions.from_dict(opts)  # a bad value is a usage error now, not in a child process
    return opts


def api_key(args: argparse.Namespace) -> str | None:
    """The key named by --api-key-env (None: the dialect's usual variable, read by Request)."""
    name = getattr(args, "api_key_env", None)
    if not name:
        return None
    value = os.environ.get(name)
    if not value:
        raise UsageError(f"--api-key-env {name}: that environment variable is not set")
    return value


def base_url(args: argparse.Namespace) -> str:
    """--base-url, else the vendor's public API."""
    if args.base_url:
        return args.base_url
    url = _DEFAULT_BASE_URLS.get(args.provider)
    if url is None:
        raise UsageError(f"--base-url is required for provider {args.provider}")
    return url


def headers(args: argparse.Namespace) -> dict[str, str] | None:
    """The --header 'Name: value' items as a dict (None when none were given)."""
    items = getattr(args, "header", None) or []
    if not items:
        return None
    out = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise UsageError(f"--header {item!r}: expected 'Name: value'")
        out[name.strip()] = value.strip()
    return out


def prompt_body(dialect: str, prompt: str, max_tokens: int | None) -> dict[str, Any]:
    """A minimal request body of `dialect` asking `prompt` (what `--prompt` sends)."""
    if dialect in ("openai-chat", "cohere-v2"):
        body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]}
        if max_tokens:
            body["max_tokens"] = max_tokens
    elif dialect == "openai-responses":
        body = {"input": prompt}
        if max_tokens:
            body["max_output_tokens"] = max_tokens
    elif dialect == "openai-completions":
        body = {"prompt": prompt}
        if max_tokens:
            body["max_tokens"] = max_tokens
    elif dialect == "anthropic":
        # The Messages API requires max_tokens; 1024 is what the SDK examples use.
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens or 1024}
    elif dialect == "gemini":
        body = {"contents": [{"role": "user", "parts": [{"text": prompt}]}]}
        if max_tokens:
            body["generationConfig"] = {"maxOutputTokens": max_tokens}
    elif dialect == "tgi-generate":
        body = {"inputs": prompt}
        if max_tokens:
            body["parameters"] = {"max_new_tokens": max_tokens}
    else:
        body = {"prompt": prompt}
    return body


def parse_body(text: str) -> dict[str, Any]:
    """--body: inline JSON, or @FILE."""
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"--body {text}: {exc.strerror or exc}") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise UsageError("--body must be a JSON object")
    return body


def one_request(dialect: str, url: str, body: dict[str, Any], *, model: str | None, key: str | None,
                extra_headers: dict[str, str] | None) -> Any:
    """The Request of one body given on the command line; a body the dialect refuses is a usage error."""
    from ..sources import Request

    try:
        return Request.from_body(dialect, url, body, model=model, api_key=key, headers=extra_headers)
    except (ConfigurationError, ValueError) as exc:
        raise UsageError(str(exc)) from None
