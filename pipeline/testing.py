"""The mock LLM provider for tests and benchmarks: an aiohttp server on 127.0.0.1 that speaks
openai-chat, openai-responses, anthropic, gemini, tgi-generate and openai-completions streams
with the framing of the real captures, seeded deterministic content (real cl100k tokens, CJK and
emoji, tool calls, reasoning, exact usage), pacing, fault injection, event-id resumes and
recorded replay.

    async with MockProviderServer(seed=1) as mock:
        client = openai.AsyncOpenAI(base_url=mock.base_url("openai-chat"), api_key="x")
        ...
        mock.stream_log(request_id).event_times_ns

    with MockProviderProcess(seed=1) as mock:   # in its own process, from sync code
        ...

Request knobs (body `"mock": {...}` or `x-mock-*` headers, headers win): tokens,
tokens_per_event, tps, jitter, seed, tool_calls, reasoning, finish, fault, fault_at, key
(also `x-mock-stream-key`), event_ids, framing, batch, replay, pace, input_tokens. The
dialect's own fields work too: max_tokens (and its per-dialect names) sets the token count,
`n` the choices, `tools` turns on tool calls, `stream_options.include_usage` the usage chunk,
Anthropic `thinking`, Responses `reasoning.summary` and Gemini `thinkingConfig.includeThoughts`
turn on reasoning. `expected_stream()` tells what a clean stream carries without asking the
server; `FAULTS` lists every fault with its typed outcome.
"""

from __future__ import annotations

from ._mock.content import (
    DIALECTS,
    ExpectedChoice,
    ExpectedStream,
    ExpectedToolCall,
    MockOptions,
    count_input_tokens,
    expected_stream,
    expected_text,
    stream_seed,
)
from ._mock.faults import FAULTS, Fault, parse_fault
from ._mock.process import MockProviderProcess, main_mock, serve
from ._mock.server import MockProviderServer, StreamLog

__all__ = [
    "DIALECTS",
    "FAULTS",
    "ExpectedChoice",
    "ExpectedStream",
    "ExpectedToolCall",
    "Fault",
    "MockOptions",
    "MockProviderProcess",
    "MockProviderServer",
    "StreamLog",
    "count_input_tokens",
    "expected_stream",
    "expected_text",
    "main_mock",
    "parse_fault",
    "serve",
    "stream_seed",
]
