"""Provider adapters: one module per wire dialect, each turning `SseEvent` batches into
`StreamToken` batches and building the HTTP request for its API.

    adapter = get_adapter("anthropic")()      # one instance per stream
    tokens = adapter.feed(events)              # ... as events arrive
    tokens += adapter.close(discarded_tail)    # at the end of the body: Done or Error(truncated)
"""

from __future__ import annotations

from types import ModuleType

from ..errors import ConfigurationError
from . import anthropic, cohere, gemini, generic, openai_chat, openai_completions, openai_responses, tgi
from .base import Adapter, HttpRequestSpec

__all__ = [
    "DIALECTS",
    "Adapter",
    "HttpRequestSpec",
    "build_request",
    "default_api_key_env",
    "get_adapter",
]

DIALECTS: tuple[str, ...] = (
    "openai-chat",
    "openai-responses",
    "anthropic",
    "gemini",
    "tgi-generate",
    "openai-completions",
    "cohere-v2",
    "sse-generic",
)

# dialect -> (adapter class, module with build_request and API_KEY_ENV)
_REGISTRY: dict[str, tuple[type[Adapter], ModuleType]] = {
    "openai-chat": (openai_chat.OpenAIChatAdapter, openai_chat),
    "openai-responses": (openai_responses.OpenAIResponsesAdapter, openai_responses),
    "anthropic": (anthropic.AnthropicAdapter, anthropic),
    "gemini": (gemini.GeminiAdapter, gemini),
    "tgi-generate": (tgi.TgiGenerateAdapter, tgi),
    "openai-completions": (openai_completions.OpenAICompletionsAdapter, openai_completions),
    "cohere-v2": (cohere.CohereV2Adapter, cohere),
    "sse-generic": (generic.GenericSseAdapter, generic),
}


def _entry(dialect: str) -> tuple[type[Adapter], ModuleType]:
    try:
        return _REGISTRY[dialect]
    except (KeyError, TypeError):
        raise ConfigurationError(
            f"unknown dialect {dialect!r}; known dialects: {', '.join(DIALECTS)}"
        ) from None


def get_adapter(dialect: str) -> type[Adapter]:
    """The adapter class for a dialect name (instantiate one per stream)."""
    return _entry(dialect)[0]


def build_request(dialect: str, base_url: str, *, model: str | None = None, body: dict | None = None,
                  api_key: str | None = None, extra_headers: dict | None = None) -> HttpRequestSpec:
    """The HTTP request that opens a stream of this dialect (see each module's build_request)."""
    return _entry(dialect)[1].build_request(
        base_url, model=model, body=body or {}, api_key=api_key, extra_headers=extra_headers
    )


def default_api_key_env(dialect: str) -> list[str]:
    """Environment variables that hold this dialect's API key, in order of preference."""
    return list(_entry(dialect)[1].API_KEY_ENV)
