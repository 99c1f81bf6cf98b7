"""Stream transformers: per-token rewriting between the adapter and the caller, and the result.

A transformer sees each StreamToken of one stream in order and answers `PASS`, `SKIP`,
`Replace(token)`, `Emit([tokens])` or `Fail(kind, message)`; `finish()` releases held text at the
end of the stream. `TransformerChain` runs a list of them (DESIGN.md section 3), and
`TokenAccumulator`, always last, builds the `StreamResult`. Everything here is sans-I/O.

Built in: `ContentFilter` (redact, drop or fail on words and bounded regular expressions, across
token boundaries), `StopSequence` (client-side stop strings), `ToolArgumentSnapshots` (partial
tool arguments while they stream) and `Callback` (observe tokens).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from typing import Any

import jiter

from .errors import ERROR_KINDS, ConfigurationError
from .tokens import (
    Delta,
    Done,
    Error,
    ErrorResult,
    ChoiceResult,
    Finish,
    FunctionCall,
    Reasoning,
    Refusal,
    ServerTool,
    ServerToolResult,
    StreamResult,
    StreamToken,
    Text,
    ToolCall,
    ToolCallResult,
    Usage,
    UsageResult,
    normalize_finish,
)

__all__ = [
    "PASS",
    "SKIP",
    "Callback",
    "ContentFilter",
    "Emit",
    "Fail",
    "FilterPattern",
    "Pass",
    "Replace",
    "Skip",
    "StopSequence",
    "StreamObserver",
    "StreamTransformer",
    "TokenAccumulator",
    "ToolArgumentSnapshots",
    "TransformerChain",
    "parse_partial_json",
]

_TERMINALS = frozenset((Done, Error))


# --- the protocol ------------------------------------------------------------------------------


class Pass:
    """Keep the token as it is (use the singleton `PASS`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "PASS"


class Skip:
    """Drop the token (use the singleton `SKIP`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "SKIP"


PASS = Pass()
SKIP = Skip()


class Replace:
    """Replace the token with one other token."""

    __slots__ = ("token",)

    def __init__(self, token: StreamToken) -> None:
        self.token = token

    def __repr__(self) -> str:
        return f"Replace({self.token!r})"


class Emit:
    """Replace the token with zero or more tokens, in order."""

    __slots__ = ("tokens",)

    def __init__(self, tokens: list[StreamToken]) -> None:
        self.tokens = tokens

    def __repr__(self) -> str:
        return f"Emit({self.tokens!r})"


class Fail:
    """Fail the stream: the chain emits `Error.of(kind, message)` in place of the token and ends it."""

    __slots__ = ("kind", "message")

    def __init__(self, kind: str = "filtered", message: str = "") -> None:
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        self.kind = kind
        self.message = message

    def __repr__(self) -> str:
        return f"Fail({self.kind!r}, {self.message!r})"


TransformResult = Pass | Skip | Replace | Emit | Fail


class StreamTransformer:
    """Base class of per-stream token transformers; subclasses override `transform` (and `finish`
    when they hold tokens back). Instances given to a builder are templates, copied per stream."""

    def transform(self, token: StreamToken) -> TransformResult:
        """Decide what happens to one token (default: keep it)."""
        return PASS

    def finish(self) -> list[StreamToken]:
        """End of stream: release held tokens. Called once, before the terminal Done/Error passes."""
        return []

    def fresh(self) -> "StreamTransformer":
        """A new per-stream instance from this template."""
        return copy.deepcopy(self)


class StreamObserver(StreamTransformer):
    """A transformer that only looks: every token passes unchanged. The chain hands observers
    whole batches (`observe_batch`), so observing costs one Python loop per batch."""

    def observe(self, token: StreamToken) -> None:
        """Look at one token."""

    def observe_batch(self, tokens: list[StreamToken]) -> None:
        """Look at a batch of tokens, in order."""
        observe = self.observe
        for tok in tokens:
            observe(tok)

    def transform(self, token: StreamToken) -> TransformResult:
        self.observe(token)
        return PASS


# --- the chain ---------------------------------------------------------------------------------


class TransformerChain:
    """Runs one stream's transformers in order: each one's output is the next one's input.

    The chain ends the stream when a transformer lets a terminal token (Done or Error) through,
    emits one, or fails; later tokens are dropped. A transformer that holds text gets `finish()`
    before the terminal token reaches it, so held text comes out ahead of the end. A transformer
    that ends the stream itself (emits a terminal, or fails) is not asked to finish(), nor are
    the ones before it: what they hold comes after the end. `stop_requested` is then True.
    Exceptions raised by a transformer propagate to the caller, unless the chain was built
    with `contain=True`: then an exception from `transform` or `finish` fails the stream right
    there, as `Fail("filtered")` would (the tokens before it go on, and so does the text the
    transformers after it hold), so what a stream keeps does not depend on its batching.
    """

    __slots__ = ("_stages", "_observer", "_observe_all", "_finished", "_end_stage", "_contain", "ended",
                 "stop_requested")

    def __init__(self, transformers: list[StreamTransformer], *, contain: bool = False) -> None:
        self._stages = list(transformers)
        self._contain = contain
        self._observer = [isinstance(t, StreamObserver) for t in self._stages]
        # A chain of observers only (the default: just the accumulator) passes a batch without
        # a terminal token straight to each one's observe_batch: no per-stage dispatch per read.
        self._observe_all = [t.observe_batch for t in self._stages] if all(self._observer) else None
        self._finished = [False] * len(self._stages)
        # Stage that first let a terminal out; stages before it are abandoned (what they hold
        # comes after the end of the stream).
        self._end_stage = -1
        self.ended = False
        self.stop_requested = False

    @classmethod
    def from_templates(cls, templates: Iterable[StreamTransformer]) -> "TransformerChain":
        """A chain of fresh per-stream copies of transformer templates."""
        return cls([t.fresh() for t in templates])

    def process(self, tokens: list[StreamToken]) -> list[StreamToken]:
        """Run a batch of tokens through every transformer; returns what comes out of the last."""
        if self.ended or not tokens:
            return []
        # Nothing follows a terminal token: cut the batch after the first one (a C-level scan).
        if not _TERMINALS.isdisjoint(map(type, tokens)):
            tokens = _cut_after_terminal(tokens)
        elif self._observe_all is not None:
            for observe_batch in self._observe_all:
                observe_batch(tokens)
            return tokens
        return self._run_from(0, tokens)

    def finish(self) -> list[StreamToken]:
        """End of input without a terminal token: release what every transformer holds, feeding
        each one's released tokens through the ones after it."""
        out: list[StreamToken] = []
        for i, tr in enumerate(self._stages):
            if self._finished[i] or i < self._end_stage:
                continue
            self._finished[i] = True
            released = tr.finish()
            if released:
                released = _cut_after_terminal(released)
                if type(released[-1]) in _TERMINALS:
                    self._mark_end(i, producer=True)
                out.extend(self._run_from(i + 1, released))
        self.ended = True  # end of input: nothing more goes through
        return out

    # --- internals -----------------------------------------------------------------------------

    def _mark_end(self, stage: int, producer: bool) -> None:
        if self._end_stage < 0:
            self._end_stage = stage
        self.ended = True
        if producer:
            # A transformer ended the stream itself: the source can stop reading.
            self.stop_requested = True

    def _run_from(self, start: int, toks: list[StreamToken]) -> list[StreamToken]:
        # Invariant: a terminal token can only be the last one of `toks`.
        stages = self._stages
        observer = self._observer
        for i in range(start, len(stages)):
            if not toks:
                return toks
            if observer[i]:
                toks = self._observe_stage(i, stages[i], toks)  # type: ignore[arg-type]
            else:
                toks = self._transform_stage(i, stages[i], toks)
        return toks

    def _observe_stage(self, i: int, tr: StreamObserver, toks: list[StreamToken]) -> list[StreamToken]:
        last = toks[-1]
        if type(last) in _TERMINALS:
            if not self._finished[i]:
                self._finished[i] = True
                released = tr.finish()
                if released:
                    # Observers normally release nothing; a subclass that does gets the same order.
                    toks = toks[:-1] + [t for t in released if type(t) not in _TERMINALS] + [last]
            self._mark_end(i, producer=False)
        tr.observe_batch(toks)
        return toks

    def _transform_stage(self, i: int, tr: StreamTransformer, toks: list[StreamToken]) -> list[StreamToken]:
        transform = tr.transform
        out: list[StreamToken] | None = None  # stays None while everything passes (no copy)
        last = toks[-1]
        terminal = type(last) in _TERMINALS
        body = toks[:-1] if terminal else toks
        for k, tok in enumerate(body):
            try:
                r = transform(tok)
            except Exception as exc:
                r = self._failure(exc)
            if r is PASS:
                if out is not None:
                    out.append(tok)
                continue
            if out is None:
                out = toks[:k]
            if r is SKIP:
                continue
            if self._apply(i, r, out, from_terminal=False):
                return out
        if not terminal:
            return toks if out is None else out
        if out is None:
            out = list(body)
        if not self._finished[i]:
            self._finished[i] = True
            try:
                released = tr.finish()
            except Exception as exc:
                self._apply(i, self._failure(exc), out, from_terminal=False)
                return out
            for tok in released:
                out.append(tok)
                if type(tok) in _TERMINALS:
                    self._mark_end(i, producer=True)
                    return out
        try:
            r = transform(last)
        except Exception as exc:
            r = self._failure(exc)
        if r is PASS:
            out.append(last)
            self._mark_end(i, producer=False)
        elif r is not SKIP:
            self._apply(i, r, out, from_terminal=True)
        return out

    def _failure(self, exc: Exception) -> "Fail":
        """What a transformer's exception becomes in a containing chain (else it propagates)."""
        if not self._contain:
            raise exc
        return Fail("filtered", f"transformer failed: {type(exc).__name__}: {exc}")

    def _apply(self, i: int, r: Any, out: list[StreamToken], from_terminal: bool) -> bool:
        """Append a Replace/Emit/Fail outcome to `out`; True when it ended the stream."""
        rt = type(r)
        if rt is Replace:
            produced: Iterable[StreamToken] = (r.token,)
        elif rt is Emit:
            produced = r.tokens
        elif rt is Fail:
            out.append(Error.of(r.kind, r.message))
            self._finished[i] = True  # a failed transformer's held text is discarded
            self._mark_end(i, producer=not from_terminal)
            return True
        else:
            raise TypeError(f"{type(self._stages[i]).__name__}.transform returned {r!r}")
        for tok in produced:
            out.append(tok)
            if type(tok) in _TERMINALS:
                self._finished[i] = True
                self._mark_end(i, producer=not from_terminal)
                return True
        return False


def _cut_after_terminal(tokens: list[StreamToken]) -> list[StreamToken]:
    for k, tok in enumerate(tokens):
        if type(tok) in _TERMINALS:
            return tokens if k == len(tokens) - 1 else tokens[: k + 1]
    return tokens


# --- partial JSON ------------------------------------------------------------------------------


def parse_partial_json(raw: str) -> Any:
    """Parse tool arguments as the official SDKs do (openai, anthropic: `jiter.from_json(b,
    partial_mode=True)`): complete JSON as is; JSON cut short gives what is complete so far, an
    unfinished trailing string or number dropped with its key. Raises ValueError when even that
    fails. Empty or blank arguments are `{}` (a call without parameters)."""
    if not raw or raw.isspace():
        return {}
    return jiter.from_json(raw.encode("utf-8"), partial_mode=True)


# --- the accumulator ---------------------------------------------------------------------------


class _CallBuf:
    __slots__ = ("id", "name", "parts", "index")

    def __init__(self, index: int, id: str | None, name: str | None) -> None:
        self.index = index
        self.id = id
        self.name = name
        self.parts: list[str] = []

    def to_result(self) -> ToolCallResult:
        raw = "".join(self.parts)
        try:
            return ToolCallResult(self.id, self.name, parse_partial_json(raw), None, self.index)
        except ValueError:
            return ToolCallResult(self.id, self.name, None, raw, self.index)


class TokenAccumulator(StreamObserver):
    """Builds the StreamResult of one stream (always last in the chain; passes every token).

    Per token it only appends to lists; text is joined and tool arguments parsed when the result
    is built. `text`, `refusal`, `reasoning`, `tool_calls` and `finish_reason` are choice 0's;
    `choices` has every choice. Reasoning signatures and redacted blocks are not text: they are
    kept on the accumulator (`reasoning_signatures`, `redacted_reasoning`), not in the result.
    """

    def __init__(self) -> None:
        self._text0: list[str] = []
        self._texts: dict[int, list[str]] = {0: self._text0}
        self._logprobs: dict[int, list[Any]] = {}
        self._finish: dict[int, str | None] = {}
        self._refusal: list[str] = []
        self._reasoning: list[str] = []
        self.reasoning_signatures: list[str] = []
        self.redacted_reasoning: list[str] = []
        # (choice, tool index) -> calls at that index in arrival order (a new id there starts a
        # new call: some servers reuse index 0 for parallel calls).
        self._calls: dict[tuple[int, int], list[_CallBuf]] = {}
        self._functions: dict[int, _CallBuf] = {}
        self._server: list[ServerTool] = []
        self._usage: list[Usage] = []
        self._done: Done | None = None
        self._error: Error | None = None

    def fresh(self) -> "TokenAccumulator":
        return TokenAccumulator()

    def observe_batch(self, tokens: list[StreamToken]) -> None:
        append0 = self._text0.append
        other = self._observe_other
        for tok in tokens:
            if type(tok) is Delta and tok.index == 0 and tok.logprobs is None:
                append0(tok.content)
            else:
                other(tok)

    def observe(self, token: StreamToken) -> None:
        self.observe_batch([token])

    def _observe_other(self, tok: Any) -> None:
        tt = type(tok)
        if tt is Delta or tt is Text:
            i = tok.index
            parts = self._texts.get(i)
            if parts is None:
                parts = self._texts[i] = []
            parts.append(tok.content)
            if tt is Delta and tok.logprobs is not None:
                lp = self._logprobs.get(i)
                if lp is None:
                    lp = self._logprobs[i] = []
                if isinstance(tok.logprobs, list):
                    lp.extend(tok.logprobs)
                else:
                    lp.append(tok.logprobs)
        elif tt is ToolCall:
            key = (tok.choice, tok.index)
            calls = self._calls.get(key)
            if calls is None:
                call = _CallBuf(tok.index, tok.id, tok.name)
                self._calls[key] = [call]
            else:
                call = calls[-1]
                if tok.id is not None and call.id is not None and tok.id != call.id:
                    call = _CallBuf(tok.index, tok.id, tok.name)
                    calls.append(call)
                else:
                    # id and name come from the first fragment carrying them (some servers
                    # repeat them on every fragment: never concatenated).
                    if call.id is None:
                        call.id = tok.id
                    if call.name is None:
                        call.name = tok.name
            if tok.arguments:
                call.parts.append(tok.arguments)
        elif tt is Finish:
            self._finish[tok.index] = tok.reason
            if tok.index not in self._texts:
                self._texts[tok.index] = []
        elif tt is Usage:
            self._usage.append(tok)
        elif tt is Reasoning:
            if tok.index != 0:
                return
            if tok.content:
                if tok.redacted:
                    self.redacted_reasoning.append(tok.content)
                else:
                    self._reasoning.append(tok.content)
            if tok.signature is not None:
                self.reasoning_signatures.append(tok.signature)
        elif tt is Refusal:
            if tok.index == 0:
                self._refusal.append(tok.content)
        elif tt is FunctionCall:
            fn = self._functions.get(tok.choice)
            if fn is None:
                fn = self._functions[tok.choice] = _CallBuf(0, None, tok.name)
            elif fn.name is None:
                fn.name = tok.name
            if tok.arguments:
                fn.parts.append(tok.arguments)
        elif tt is ServerTool:
            # Adapters emit whole blocks: one token, one entry (never merged with another).
            self._server.append(tok)
        elif tt is Done:
            self._done = tok
        elif tt is Error:
            self._error = tok
        # RawEvent: nothing to accumulate.

    # --- the result ----------------------------------------------------------------------------

    @property
    def result(self) -> StreamResult:
        """The StreamResult of what was seen so far (no metrics)."""
        return self.build_result()

    def tool_calls_for(self, choice: int) -> list[ToolCallResult]:
        """Client tool calls of one choice, ordered by index (the legacy function_call last)."""
        out = []
        for key in sorted(k for k in self._calls if k[0] == choice):
            out.extend(c.to_result() for c in self._calls[key])
        fn = self._functions.get(choice)
        if fn is not None:
            out.append(fn.to_result())
        return out

    def build_result(self, metrics: Any = None) -> StreamResult:
        """Join and parse what was accumulated into a StreamResult; `metrics` is stored as given."""
        n = max(self._texts) + 1
        choices = []
        for i in range(n):
            parts = self._texts.get(i)
            lp = self._logprobs.get(i)
            choices.append(ChoiceResult(i, "".join(parts) if parts else "", self._finish.get(i), lp))
        done, error = self._done, self._error

        finish_reason = self._finish.get(0)
        if done is not None and done.finish_reason is not None:
            finish_reason = done.finish_reason
            choices[0].finish_reason = finish_reason
        if error is not None:
            finish: str | None = "error"
        elif done is not None and done.finish != "stop":
            # The adapter knew better than the table (e.g. Responses "incomplete" -> length).
            finish = done.finish
        elif done is not None or finish_reason is not None:
            finish = normalize_finish(finish_reason)
        else:
            finish = None

        return StreamResult(
            text=choices[0].text,
            choices=choices,
            refusal="".join(self._refusal) if self._refusal else None,
            reasoning="".join(self._reasoning) if self._reasoning else None,
            tool_calls=self.tool_calls_for(0),
            server_tools=[_server_result(e) for e in self._server],
            usage=_merge_usage(self._usage),
            finish_reason=finish_reason,
            finish=finish,
            error=None
            if error is None
            else ErrorResult(
                error.kind, error.message, error.retryable, error.http_status, error.retry_after, error.detail
            ),
            metrics=metrics,
        )


def _server_result(tok: ServerTool) -> ServerToolResult:
    """The block's data parsed from JSON when it parses, else the string as sent."""
    data: Any = None
    if tok.data:
        try:
            data = jiter.from_json(tok.data.encode("utf-8"))
        except ValueError:
            data = tok.data
    return ServerToolResult(tok.kind, tok.id, tok.name, data)


_USAGE_FIELDS = ("input_tokens", "output_tokens", "total_tokens")


def _merge_usage(usages: list[Usage]) -> UsageResult | None:
    """Field-wise merge, later non-None values overriding (Anthropic sends input at the start and
    output at the end; Gemini repeats cumulative counts). Estimated when any kept count was."""
    if not usages:
        return None
    values: dict[str, int | None] = dict.fromkeys(_USAGE_FIELDS)
    estimated_from: dict[str, bool] = {}
    extras: dict[str, Any] | None = None
    for u in usages:
        for f in _USAGE_FIELDS:
            v = getattr(u, f)
            if v is not None:
                values[f] = v
                estimated_from[f] = u.estimated
        if u.extras:
            extras = {**(extras or {}), **u.extras}
    total = values["total_tokens"]
    inp, outp = values["input_tokens"], values["output_tokens"]
    if total is None and inp is not None and outp is not None:
        total = inp + outp
    estimated = any(estimated_from.values()) if estimated_from else any(u.estimated for u in usages)
    return UsageResult(inp, outp, total, extras, estimated)


# --- held text (shared by ContentFilter and StopSequence) --------------------------------------


def _join_meta(deltas: list[Delta]) -> tuple[Any, list[int] | None]:
    """Concatenate the logprobs and token ids of several deltas (None when none had any)."""
    if len(deltas) == 1:
        return deltas[0].logprobs, deltas[0].token_ids
    lps: list[Any] | None = None
    ids: list[int] | None = None
    for d in deltas:
        if d.logprobs is not None:
            lps = lps if lps is not None else []
            lps.extend(d.logprobs) if isinstance(d.logprobs, list) else lps.append(d.logprobs)
        if d.token_ids is not None:
            ids = ids if ids is not None else []
            ids.extend(d.token_ids)
    return lps, ids


class _Held:
    """Text of one choice held back, plus the deltas whose metadata (logprobs, token ids) has not
    gone out yet, by the offset where each one's text ends in `text`. A delta's metadata travels
    with the emitted piece that completes its text."""

    __slots__ = ("text", "meta")

    def __init__(self) -> None:
        self.text = ""
        self.meta: list[tuple[int, Delta]] = []  # (end offset in text, delta)

    def add_meta(self, tok: Any, end: int) -> None:
        if type(tok) is Delta and (tok.logprobs is not None or tok.token_ids is not None):
            self.meta.append((end, tok))

    def take_meta(self, upto: int, dropped: list[tuple[int, int]] | None = None) -> list[Delta]:
        """Metadata of deltas whose text ends at or before `upto`; shifts the rest. Deltas that
        overlap a `dropped` range (a filtered match) lose theirs: it could reveal the match."""
        if not self.meta:
            return []
        out: list[Delta] = []
        rest: list[tuple[int, Delta]] = []
        for end, d in self.meta:
            begin = end - len(d.content)
            if dropped and any(a < end and begin < b for a, b in dropped):
                continue  # also when part of its text is still held
            if end <= upto:
                out.append(d)
            else:
                rest.append((end - upto, d))
        self.meta = rest
        return out


def _delta(text: str, index: int, meta: list[Delta]) -> Delta:
    if not meta:
        return Delta(text, index)
    lps, ids = _join_meta(meta)
    return Delta(text, index, lps, ids)


# --- ContentFilter -----------------------------------------------------------------------------


class FilterPattern:
    """One ContentFilter pattern: a regular expression and the longest text it can match
    (including any lookahead it examines), which bounds how much text is held back."""

    __slots__ = ("regex", "max_len", "flags")

    def __init__(self, regex: str | re.Pattern[str], max_len: int, flags: int = 0) -> None:
        if not isinstance(max_len, int) or max_len < 1:
            raise ConfigurationError(f"max_len must be a positive int, got {max_len!r}")
        if isinstance(regex, re.Pattern):
            # Keep a compiled pattern's own flags: it is re-compiled inside one alternation.
            flags |= regex.flags & (re.IGNORECASE | re.MULTILINE | re.DOTALL | re.VERBOSE)
        self.regex = regex
        self.max_len = max_len
        self.flags = flags

    def source(self) -> str:
        if isinstance(self.regex, re.Pattern):
            return self.regex.pattern
        return self.regex

    def __repr__(self) -> str:
        return f"FilterPattern({self.source()!r}, max_len={self.max_len})"


class ContentFilter(StreamTransformer):
    """Redacts, drops or fails on words and bounded regular expressions in generated text, also
    when a match is split across deltas.

    `patterns`: plain strings are literal words; `ContentFilter.regex(r"...", max_len=n)`, a
    `(regex, max_len)` tuple or a compiled pattern (with `max_match` as its bound) are regular
    expressions. Each choice holds back at most the longest bound minus one character and
    releases the rest at once; with words only (case-sensitive) it holds just the longest suffix
    that begins a word, so most deltas pass untouched. Policies: "redact" (put `replacement` in place of the match; a
    callable gets the matched text), "drop" (remove it), "fail" (emit the text before the match,
    then `Error(kind="filtered")`, ending the stream). Applies to Delta and Text content; other
    tokens pass. Lookbehind and `\\b` see up to the longest bound of preceding text.
    Deltas this filter re-cuts keep their logprobs and token ids unless they overlap a match.
    """

    POLICIES = ("redact", "drop", "fail")

    def __init__(
        self,
        patterns: Iterable[str | FilterPattern | tuple[str, int] | re.Pattern[str]],
        policy: str = "redact",
        replacement: str | Callable[[str], str] = "[REDACTED]",
        max_match: int | None = None,
        ignore_case: bool = False,
    ) -> None:
        if policy not in self.POLICIES:
            raise ConfigurationError(f"policy must be one of {self.POLICIES}, got {policy!r}")
        sources: list[str] = []
        words: list[str] = []
        longest = 0
        for p in patterns:
            if isinstance(p, str):
                words.append(p)
                if not p:
                    raise ConfigurationError("an empty word cannot be filtered")
                src, n = re.escape(p), len(p)
            else:
                if isinstance(p, tuple):
                    p = FilterPattern(p[0], p[1])
                elif isinstance(p, re.Pattern):
                    if max_match is None:
                        raise ConfigurationError(
                            f"regex {p.pattern!r} needs a max_len: use ContentFilter.regex(pattern, max_len=...)"
                        )
                    p = FilterPattern(p, max_match)
                elif not isinstance(p, FilterPattern):
                    raise ConfigurationError(f"not a filter pattern: {p!r}")
                src, n = p.source(), p.max_len
                if p.flags:
                    src = f"(?{_flag_letters(p.flags)}:{src})"
            sources.append(f"(?:{src})")
            longest = max(longest, n)
        if not sources:
            raise ConfigurationError("ContentFilter needs at least one pattern")
        try:
            rx = re.compile("|".join(sources), re.IGNORECASE if ignore_case else 0)
        except re.error as exc:
            raise ConfigurationError(f"bad filter pattern: {exc}") from exc
        if rx.fullmatch(""):
            raise ConfigurationError("a filter pattern matches the empty string")
        self.pattern = rx
        self.max_match = longest
        self.policy = policy
        self.replacement = replacement
        # Words only (case-sensitive): hold back just the longest suffix that begins a word, like
        # StopSequence, so most deltas pass untouched. A regex can only be bounded by its length.
        self._words_only = len(words) == len(sources) and not ignore_case
        self._hold = _PrefixHold(words) if self._words_only else None
        self._held: dict[int, _Held] = {}
        self._context: dict[int, str] = {}  # original text just before each held text

    @staticmethod
    def regex(pattern: str | re.Pattern[str], max_len: int, flags: int = 0) -> FilterPattern:
        """A regular-expression pattern that never matches (or looks at) more than `max_len` chars."""
        return FilterPattern(pattern, max_len, flags)

    def fresh(self) -> "ContentFilter":
        new = copy.copy(self)  # shares the compiled pattern and settings
        new._held = {}
        new._context = {}
        return new

    def transform(self, token: StreamToken) -> TransformResult:
        tt = type(token)
        if tt is Delta or tt is Text:
            return self._on_text(token)
        if tt is Finish:
            # The choice is over: what it holds can no longer be part of a longer match.
            held = self._release(token.index)  # type: ignore[union-attr]
            return Emit(held + [token]) if held else PASS
        return PASS

    def finish(self) -> list[StreamToken]:
        out: list[StreamToken] = []
        for i in list(self._held):
            out.extend(self._release(i))
            if out and type(out[-1]) is Error:
                break
        return out

    def _on_text(self, tok: Any) -> TransformResult:
        i = tok.index
        held = self._held.get(i)
        if held is None:
            held = self._held[i] = _Held()
        out = self._scan(i, held, tok, final=False)
        if out is None:
            return PASS
        if not out:
            return SKIP
        return Emit(out)

    def _release(self, i: int) -> list[StreamToken]:
        held = self._held.get(i)
        if held is None or not held.text:
            return []
        out = self._scan(i, held, None, final=True)
        return out or []

    def _scan(self, i: int, held: _Held, tok: Any, final: bool) -> list[StreamToken] | None:
        """Filter held text + this token's text; returns the tokens to emit (None: pass `tok`
        unchanged)."""
        pending = held.text
        if tok is None:
            s = pending
        else:
            s = pending + tok.content if pending else tok.content
        n = len(s)
        words_only = self._words_only
        if words_only and not pending and tok is not None:
            if not s or (self.pattern.search(s) is None and not self._hold(s)):  # type: ignore[misc]
                return None  # the common case: no match, nothing to hold: the token passes as is
        # Matches starting before `limit` are decided: the longest possible match (or lookahead)
        # from there fits in what we have. Later starts wait for more text (or the end).
        if words_only:
            ctx = ""
            limit = n if final or not s else n - self._hold(s)  # type: ignore[misc]
        else:
            ctx = self._context.get(i, "")
            limit = n if final else n - self.max_match + 1
        base = len(ctx)
        full = ctx + s if ctx else s
        pieces: list[str] = []
        dropped: list[tuple[int, int]] = []
        pos = 0
        for m in self.pattern.finditer(full, base):
            start, end = m.start() - base, m.end() - base
            if start >= limit:
                break
            if end == start:
                continue
            if self.policy == "fail":
                if tok is not None:
                    held.add_meta(tok, n)
                before = s[:start]
                meta = held.take_meta(start)
                out: list[StreamToken] = [_delta(before, i, meta)] if before else []
                held.text = ""
                held.meta = []
                out.append(Error.of("filtered", "content filter matched"))
                return out
            if start > pos:
                pieces.append(s[pos:start])
            if self.policy == "redact":
                rep = self.replacement
                pieces.append(rep(m.group()) if callable(rep) else rep)
            dropped.append((start, end))
            pos = end
        cut = max(pos, limit, 0)
        if tok is not None and not pending and cut == n and not dropped:
            # Nothing held before, nothing held now, nothing matched: the token goes as it is.
            if not words_only:
                self._context[i] = _tail(full, self.max_match)
            return None
        if cut > pos:
            pieces.append(s[pos:cut])
        if tok is not None:
            held.add_meta(tok, n)
        held.text = s[cut:]
        if not words_only:
            self._context[i] = _tail(full[: base + cut], self.max_match)
        meta = held.take_meta(cut, dropped)
        text = "".join(pieces)
        if not text:
            # Metadata of a fully dropped piece goes nowhere; of an empty release, waits.
            return []
        return [_delta(text, i, meta)]


class _PrefixHold:
    """Length of the longest suffix of a text that is a proper prefix of one of some strings:
    what must be held back, because more text could complete the string there."""

    # Up to this many strings, one C-level find per string beats a Python loop per suffix length.
    FIND_LIMIT = 8

    __slots__ = ("strings", "longest", "prefixes", "ends", "firsts")

    def __init__(self, strings: Iterable[str]) -> None:
        self.strings = tuple(strings)
        self.longest = max(map(len, self.strings))
        self.prefixes = frozenset(w[:k] for w in self.strings for k in range(1, len(w)))
        # The characters a proper prefix can end with: any other last character holds nothing.
        self.ends = frozenset(p[-1] for p in self.prefixes)
        # A held suffix starts with a string's first character ("\n", "#"...), which is rare in
        # text: checking the tail for one is a C-level scan.
        self.firsts = frozenset(p[0] for p in self.prefixes)

    def __call__(self, s: str) -> int:
        if s[-1] not in self.ends:
            return 0
        n = len(s)
        if self.firsts.isdisjoint(s[1 - self.longest :] if n >= self.longest else s):
            return 0
        if len(self.strings) <= self.FIND_LIMIT:
            best = 0
            for w in self.strings:
                first = w[0]
                j = s.find(first, max(0, n - len(w) + 1))
                while j >= 0 and n - j > best:
                    if w.startswith(s[j:]):
                        best = n - j
                        break
                    j = s.find(first, j + 1)
            return best
        prefixes = self.prefixes
        for k in range(min(n, self.longest - 1), 0, -1):
            if s[-k:] in prefixes:
                return k
        return 0


def _tail(s: str, n: int) -> str:
    return s[-n:] if len(s) > n else s


def _flag_letters(flags: int) -> str:
    letters = ""
    if flags & re.IGNORECASE:
        letters += "i"
    if flags & re.MULTILINE:
        letters += "m"
    if flags & re.DOTALL:
        letters += "s"
    if flags & re.VERBOSE:
        letters += "x"
    return letters or "u"


# --- StopSequence ------------------------------------------------------------------------------


class StopSequence(StreamTransformer):
    """Client-side stop strings: the text before the first stop goes out, then `Finish("stop")`,
    and the choice ends; when every one of `choices` choices has ended the stream ends with
    `Done("stop")` (the chain then asks the source to stop reading).

    Only the longest suffix of pending text that is a prefix of some stop string is held back;
    everything else is released at once. Works per choice; with `choices=1` (default) a stop in
    choice 0 ends the stream. Applies to Delta and Text content. Text held when the stream ends
    without a match is released by `finish()`.
    """

    def __init__(self, stops: Iterable[str], *, choices: int = 1) -> None:
        self.stops = tuple(dict.fromkeys(stops))
        if not self.stops or any(not isinstance(s, str) or not s for s in self.stops):
            raise ConfigurationError("StopSequence needs one or more non-empty strings")
        if choices < 1:
            raise ConfigurationError("choices must be at least 1")
        self.choices = choices
        self._single = self.stops[0] if len(self.stops) == 1 else None
        # What to hold back: the longest pending suffix that begins a stop.
        self._hold = _PrefixHold(self.stops)
        self._held: dict[int, _Held] = {}
        self._stopped: set[int] = set()  # choices ended by a stop string
        self._finished: dict[int, str | None] = {}  # choices the provider finished, by reason

    def fresh(self) -> "StopSequence":
        new = copy.copy(self)
        new._held = {}
        new._stopped = set()
        new._finished = {}
        return new

    def transform(self, token: StreamToken) -> TransformResult:
        tt = type(token)
        if tt is Delta or tt is Text:
            return self._on_text(token)
        if tt is Finish:
            i = token.index  # type: ignore[union-attr]
            if i in self._stopped:
                return SKIP  # the choice already finished at its stop
            self._finished[i] = token.reason  # type: ignore[union-attr]
            held = self._release(i)
            return Emit(held + [token]) if held else PASS
        return PASS

    def finish(self) -> list[StreamToken]:
        out: list[StreamToken] = []
        for i in list(self._held):
            out.extend(self._release(i))
        return out

    def _release(self, i: int) -> list[StreamToken]:
        held = self._held.get(i)
        if held is None or not held.text:
            return []
        text = held.text
        held.text = ""
        return [_delta(text, i, held.take_meta(len(text)))]

    def _find(self, s: str) -> int:
        if self._single is not None:
            return s.find(self._single)
        best = -1
        for stop in self.stops:
            p = s.find(stop)
            if p >= 0 and (best < 0 or p < best):
                best = p
        return best

    def _on_text(self, tok: Any) -> TransformResult:
        i = tok.index
        if self._stopped and i in self._stopped:
            return SKIP
        held = self._held.get(i)
        if held is None:
            held = self._held[i] = _Held()
        pending = held.text
        s = pending + tok.content if pending else tok.content
        if not s:
            return PASS
        p = self._find(s)
        if p >= 0:
            held.add_meta(tok, len(s))
            return Emit(self._stop(i, held, s, p, tok))
        k = self._hold(s)
        if not pending and k == 0:
            return PASS  # the common case: nothing held, nothing to hold, metadata intact
        held.add_meta(tok, len(s))
        cut = len(s) - k
        held.text = s[cut:]
        if cut == 0:
            return SKIP
        return Replace(_delta(s[:cut], i, held.take_meta(cut)))

    def _stop(self, i: int, held: _Held, s: str, p: int, tok: Any) -> list[StreamToken]:
        out: list[StreamToken] = []
        if p:
            # Deltas that contributed text before the stop keep their metadata.
            meta = [d for end, d in held.meta if end - len(d.content) < p]
            out.append(_delta(s[:p], i, meta))
        held.text = ""
        held.meta = []
        self._stopped.add(i)
        out.append(Finish("stop", i))
        if len(self._stopped) + len(self._finished) >= self.choices:
            # Every choice is over: release what other choices hold, then end the stream with
            # choice 0's reason.
            for j in list(self._held):
                if j not in self._stopped:
                    out.extend(self._release(j))
            reason = "stop" if 0 in self._stopped else self._finished.get(0)
            out.append(Done(reason, normalize_finish(reason)))
        return out


# --- observers ---------------------------------------------------------------------------------


class ToolArgumentSnapshots(StreamObserver):
    """Partial tool-call arguments while they stream: `snapshot(index)` parses what has arrived
    so far for a client tool call, with the same partial JSON rule as the final result.

    An observer: it passes every token and emits nothing. Parsing happens on demand (and is
    cached until the next fragment), so a stream nobody asks about costs one append per fragment.
    Keep a reference to the per-stream instance (not the template) to query it.
    """

    def __init__(self, choice: int = 0) -> None:
        self.choice = choice
        self._parts: dict[int, list[str]] = {}
        self._cache: dict[int, Any] = {}

    def fresh(self) -> "ToolArgumentSnapshots":
        return ToolArgumentSnapshots(self.choice)

    def observe_batch(self, tokens: list[StreamToken]) -> None:
        for tok in tokens:
            if type(tok) is ToolCall and tok.choice == self.choice:
                parts = self._parts.get(tok.index)
                if parts is None:
                    parts = self._parts[tok.index] = []
                if tok.arguments:
                    parts.append(tok.arguments)
                    self._cache.pop(tok.index, None)

    def observe(self, token: StreamToken) -> None:
        self.observe_batch([token])

    def raw(self, index: int) -> str:
        """The argument text received so far for tool call `index`."""
        parts = self._parts.get(index)
        if parts is None:
            raise KeyError(index)
        if len(parts) > 1:
            # Compact the fragments so the next join starts from one string.
            parts[:] = ["".join(parts)]
        return parts[0] if parts else ""

    def snapshot(self, index: int) -> Any:
        """The arguments of tool call `index` parsed so far (`{}` before any complete member;
        None when the text is not JSON even in partial mode). KeyError for an unknown index."""
        if index in self._cache:
            return self._cache[index]
        try:
            value = parse_partial_json(self.raw(index))
        except ValueError:
            value = None
        self._cache[index] = value
        return value

    @property
    def snapshots(self) -> dict[int, Any]:
        """Every tool call seen so far, by index, with its partial arguments."""
        return {i: self.snapshot(i) for i in sorted(self._parts)}


class Callback(StreamObserver):
    """Calls `fn(token)` for every token (logging, live display, custom metrics); passes all.

    For the multiprocess pool `fn` must be picklable (a module-level function); its calls happen
    in the worker process. `fresh()` shares `fn` across streams.
    """

    def __init__(self, fn: Callable[[StreamToken], Any]) -> None:
        self.fn = fn

    def fresh(self) -> "Callback":
        return Callback(self.fn)

    def observe(self, token: StreamToken) -> None:
        self.fn(token)
