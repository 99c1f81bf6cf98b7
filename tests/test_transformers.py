"""Transformer protocol, TransformerChain, TokenAccumulator and the built-in transformers.

Expected values are written out by hand from the inputs (or, for the split-invariance
properties, from `re.sub` / `str.find` over the whole text), never from the code under test.
"""

from __future__ import annotations

import pickle
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import ConfigurationError
from pipeline.tokens import (
    Delta,
    Done,
    Error,
    Finish,
    FunctionCall,
    Reasoning,
    Refusal,
    ServerTool,
    Text,
    ToolCall,
    Usage,
)
from pipeline.transformers import (
    PASS,
    SKIP,
    Callback,
    ContentFilter,
    Emit,
    Fail,
    Replace,
    StopSequence,
    StreamObserver,
    StreamTransformer,
    TokenAccumulator,
    ToolArgumentSnapshots,
    TransformerChain,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run(chain: TransformerChain, batches: list[list]) -> list:
    """Feed batches, then end of input; everything that came out of the chain."""
    out: list = []
    for b in batches:
        out += chain.process(b)
    out += chain.finish()
    return out


def accumulate(tokens: list) -> TokenAccumulator:
    acc = TokenAccumulator()
    TransformerChain([acc]).process(tokens)
    return acc


def text_of(tokens: list, index: int = 0) -> str:
    return "".join(t.content for t in tokens if type(t) in (Delta, Text) and t.index == index)


def splits(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:])] or [""]


# --- TokenAccumulator --------------------------------------------------------------------------


def test_accumulator_joins_choice_zero_text_from_deltas_and_text_parts():
    r = accumulate([Delta("Hel"), Delta("lo"), Text(", world"), Delta("!"), Done("stop")]).result
    assert r.text == "Hello, world!"
    assert r.finish_reason == "stop" and r.finish == "stop"
    assert r.error is None and r.ok


def test_accumulator_empty_stream_has_empty_text_and_one_choice():
    r = accumulate([Done(None)]).result
    assert r.text == ""
    assert [c.index for c in r.choices] == [0]
    assert r.refusal is None and r.reasoning is None and r.usage is None and r.tool_calls == []


def test_accumulator_keeps_interleaved_choices_apart():
    toks = [
        Delta("A", 0), Delta("x", 1), Delta("B", 0), Delta("1", 2), Delta("y", 1),
        Finish("length", 1), Delta("C", 0), Finish("stop", 0), Finish("stop", 2), Done("stop"),
    ]
    r = accumulate(toks).result
    assert r.text == "ABC"
    assert [(c.index, c.text, c.finish_reason) for c in r.choices] == [
        (0, "ABC", "stop"), (1, "xy", "length"), (2, "1", "stop"),
    ]


def test_accumulator_concatenates_logprobs_per_choice():
    lp = lambda tok: {"token": tok, "logprob": -0.5}  # noqa: E731
    toks = [Delta("a", 0, [lp("a")]), Delta("b", 0, [lp("b"), lp("c")]), Delta("z", 1, [lp("z")]), Done("stop")]
    r = accumulate(toks).result
    assert r.choices[0].logprobs == [lp("a"), lp("b"), lp("c")]
    assert r.choices[1].logprobs == [lp("z")]
    assert r.text == "ab"


def test_accumulator_without_logprobs_reports_none():
    assert accumulate([Delta("a"), Done("stop")]).result.choices[0].logprobs is None


def test_tool_calls_ordered_by_index_with_interleaved_fragments():
    toks = [
        ToolCall(1, "call_b", "get_time", ""),
        ToolCall(0, "call_a", "get_weather", '{"ci'),
        ToolCall(1, None, None, '{"tz": "UTC"}'),
        ToolCall(0, None, None, 'ty": "Paris"}'),
        Done("tool_calls"),
    ]
    r = accumulate(toks).result
    assert [(t.index, t.id, t.name, t.arguments, t.raw_arguments) for t in r.tool_calls] == [
        (0, "call_a", "get_weather", {"city": "Paris"}, None),
        (1, "call_b", "get_time", {"tz": "UTC"}, None),
    ]
    assert r.finish == "tool_calls"


def test_tool_call_id_and_name_come_from_first_fragment_that_carries_them():
    # Some servers repeat id and name on every fragment; others send the name late.
    toks = [
        ToolCall(0, None, None, ""),
        ToolCall(0, "call_1", "lookup", '{"q": '),
        ToolCall(0, "call_1", "lookup", '"x"}'),
    ]
    [call] = accumulate(toks).result.tool_calls
    assert (call.id, call.name, call.arguments) == ("call_1", "lookup", {"q": "x"})


def test_new_id_at_same_index_starts_a_new_call():
    toks = [ToolCall(0, "a", "f", "{}"), ToolCall(0, "b", "g", '{"k": 1}')]
    calls = accumulate(toks).result.tool_calls
    assert [(c.id, c.name, c.arguments) for c in calls] == [("a", "f", {}), ("b", "g", {"k": 1})]


@pytest.mark.parametrize(
    "raw, expected",
    [
        # openai/anthropic SDKs: jiter.from_json(..., partial_mode=True) drops an unfinished
        # trailing string (or number, or literal) together with its key.
        ('{"city": "Par', {}),
        ('{"city": "Paris", "units": "cel', {"city": "Paris"}),
        ('{"city": "Paris", "days": [1, 2', {"city": "Paris", "days": [1, 2]}),
        ('{"a": {"b": true, "c": nu', {"a": {"b": True}}),
        ('{"ci', {}),
        ("", {}),
        ("  ", {}),
        ('{"city": "Paris"}', {"city": "Paris"}),
    ],
)
def test_tool_arguments_cut_short_follow_the_sdk_partial_rule(raw, expected):
    [call] = accumulate([ToolCall(0, "c", "f", raw), Error.of("truncated")]).result.tool_calls
    assert call.arguments == expected
    assert call.raw_arguments is None


def test_unparseable_tool_arguments_keep_the_raw_string():
    [call] = accumulate([ToolCall(0, "c", "f", "city=Paris"), Done("tool_calls")]).result.tool_calls
    assert call.arguments is None
    assert call.raw_arguments == "city=Paris"


def test_legacy_function_call_becomes_a_tool_call_without_id():
    toks = [FunctionCall("get_weather", ""), FunctionCall(None, '{"city":'), FunctionCall(None, ' "Oslo"}'),
            Done("function_call")]
    r = accumulate(toks).result
    assert [(c.id, c.name, c.arguments) for c in r.tool_calls] == [(None, "get_weather", {"city": "Oslo"})]
    assert r.finish == "tool_calls"


def test_usage_anthropic_split_merges_fields_and_sums_total():
    toks = [
        Usage(input_tokens=12, output_tokens=1, extras={"cache_read_input_tokens": 4}),
        Delta("hi"),
        Usage(output_tokens=30, extras={"server_tool_use": {"web_search_requests": 1}}),
        Done("end_turn"),
    ]
    u = accumulate(toks).result.usage
    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (12, 30, 42)
    assert u.extras == {"cache_read_input_tokens": 4, "server_tool_use": {"web_search_requests": 1}}
    assert u.estimated is False


def test_usage_provider_total_wins_over_the_sum():
    u = accumulate([Usage(5, 7, 20, {"reasoning_tokens": 8}), Done("stop")]).result.usage
    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (5, 7, 20)


def test_usage_total_unknown_when_one_side_missing():
    u = accumulate([Usage(input_tokens=5), Done("stop")]).result.usage
    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (5, None, None)


def test_usage_estimated_only_while_an_estimated_count_is_kept():
    est_then_real = accumulate([Usage(output_tokens=9, estimated=True), Usage(3, 10)]).result.usage
    assert (est_then_real.output_tokens, est_then_real.estimated) == (10, False)
    real_then_est = accumulate([Usage(3, None), Usage(output_tokens=9, estimated=True)]).result.usage
    assert (real_then_est.total_tokens, real_then_est.estimated) == (12, True)


def test_server_tools_are_kept_apart_from_client_calls():
    toks = [
        ServerTool("server_tool_use", "srvtoolu_1", "web_search", '{"query": "weather"}'),
        ServerTool("web_search_tool_result", "srvtoolu_1", None, "[{\"url\": \"https://x\"}]"),
        ServerTool("code_execution_result", None, None, "not json"),
        ServerTool("executableCode", None, None, '{"language": "PYTHON", "code": "print(1)"}'),
        ServerTool("codeExecutionResult", None, None, ""),
        Done("end_turn"),
    ]
    r = accumulate(toks).result
    assert r.tool_calls == []
    assert [(s.kind, s.id, s.name, s.data) for s in r.server_tools] == [
        ("server_tool_use", "srvtoolu_1", "web_search", {"query": "weather"}),
        ("web_search_tool_result", "srvtoolu_1", None, [{"url": "https://x"}]),
        ("code_execution_result", None, None, "not json"),
        ("executableCode", None, None, {"language": "PYTHON", "code": "print(1)"}),
        ("codeExecutionResult", None, None, None),
    ]


def test_error_result_keeps_text_and_marks_finish_error():
    err = Error.of("truncated", "body ended early", detail={"code": 1})
    r = accumulate([Delta("partial"), err]).result
    assert r.text == "partial"
    assert r.finish == "error" and not r.ok
    assert (r.error.kind, r.error.message, r.error.retryable, r.error.detail) == (
        "truncated", "body ended early", True, {"code": 1},
    )


def test_refusal_and_reasoning_are_joined_apart_from_text():
    toks = [
        Reasoning("Let me "), Reasoning("think."), Reasoning("", signature="sig=="),
        Reasoning("opaque", redacted=True), Refusal("I can't "), Refusal("help."), Delta("ok"), Done("end_turn"),
    ]
    acc = accumulate(toks)
    r = acc.result
    assert (r.text, r.reasoning, r.refusal) == ("ok", "Let me think.", "I can't help.")
    assert acc.reasoning_signatures == ["sig=="]
    assert acc.redacted_reasoning == ["opaque"]


@pytest.mark.parametrize(
    "tokens, reason, finish",
    [
        ([Done("length")], "length", "length"),
        ([Done("MAX_TOKENS")], "MAX_TOKENS", "length"),
        ([Done("max_output_tokens", "length")], "max_output_tokens", "length"),
        ([Finish("tool_calls", 0), Done(None)], "tool_calls", "tool_calls"),
        ([Finish("SAFETY", 0)], "SAFETY", "content_filter"),
        ([Delta("x")], None, None),
    ],
)
def test_finish_reason_is_the_providers_and_finish_is_normalized(tokens, reason, finish):
    r = accumulate(tokens).result
    assert (r.finish_reason, r.finish) == (reason, finish)


def test_build_result_stores_the_given_metrics():
    acc = accumulate([Delta("a"), Done("stop")])
    assert acc.build_result(metrics={"ttft": 1}).metrics == {"ttft": 1}


# --- the chain ---------------------------------------------------------------------------------


class Upper(StreamTransformer):
    def transform(self, token):
        if type(token) is Delta:
            return Replace(Delta(token.content.upper(), token.index))
        return PASS


class DropUsage(StreamTransformer):
    def transform(self, token):
        return SKIP if type(token) is Usage else PASS


class Twice(StreamTransformer):
    def transform(self, token):
        return Emit([token, token]) if type(token) is Delta else PASS


class FailOn(StreamTransformer):
    def __init__(self, word: str) -> None:
        self.word = word

    def transform(self, token):
        if type(token) is Delta and self.word in token.content:
            return Fail("filtered", f"saw {self.word}")
        return PASS


class Recorder(StreamTransformer):
    def __init__(self) -> None:
        self.seen: list = []

    def transform(self, token):
        self.seen.append(token)
        return PASS


def test_chain_passes_outputs_of_one_transformer_to_the_next():
    rec = Recorder()
    out = run(TransformerChain([Upper(), Twice(), DropUsage(), rec]), [[Delta("ab"), Usage(1, 2), Delta("c")]])
    assert out == [Delta("AB"), Delta("AB"), Delta("C"), Delta("C")]
    assert rec.seen == out


def test_chain_returns_an_all_pass_batch_without_copying():
    batch = [Delta("a"), Delta("b")]
    assert TransformerChain([Recorder(), StreamTransformer()]).process(batch) is batch


def test_fail_ends_the_stream_with_a_filtered_error_and_requests_stop():
    acc = TokenAccumulator()
    chain = TransformerChain([FailOn("bad"), acc])
    out = chain.process([Delta("fine "), Delta("bad word"), Delta("more")])
    assert out == [Delta("fine "), Error.of("filtered", "saw bad")]
    assert chain.ended and chain.stop_requested
    assert chain.process([Delta("late"), Done("stop")]) == []
    r = acc.result
    assert (r.text, r.finish, r.error.kind, r.error.retryable) == ("fine ", "error", "filtered", False)


class _RaiseOn(StreamTransformer):
    """Raises on a token holding `word` (when `at_finish`, at finish() instead, holding text)."""

    def __init__(self, word: str, at_finish: bool = False) -> None:
        self.word, self.at_finish, self.held = word, at_finish, []

    def transform(self, token):
        text = getattr(token, "content", None) or ""
        if self.word in text:
            if self.at_finish:
                self.held.append(token)
                return SKIP
            raise ValueError(f"saw {self.word}")
        return PASS

    def finish(self):
        if self.held:
            raise RuntimeError("cannot release")
        return []


def test_a_raising_transformer_propagates_from_a_plain_chain():
    with pytest.raises(ValueError):
        TransformerChain([_RaiseOn("bad")]).process([Delta("bad")])


def test_a_containing_chain_fails_the_stream_at_the_raising_token():
    acc = TokenAccumulator()
    chain = TransformerChain([_RaiseOn("bad"), acc], contain=True)
    out = chain.process([Delta("fine "), Delta("bad word"), Delta("more")])
    assert out == [Delta("fine "), Error.of("filtered", "transformer failed: ValueError: saw bad")]
    assert chain.ended and chain.stop_requested
    r = acc.result
    assert (r.text, r.error.kind) == ("fine ", "filtered")


def test_a_containing_chain_fails_the_stream_when_finish_raises():
    acc = TokenAccumulator()
    chain = TransformerChain([_RaiseOn("held", at_finish=True), acc], contain=True)
    out = chain.process([Delta("kept "), Delta("held"), Done("stop")])
    assert out == [Delta("kept "), Error.of("filtered", "transformer failed: RuntimeError: cannot release")]
    assert (acc.result.text, acc.result.error.kind) == ("kept ", "filtered")


@pytest.mark.parametrize("reads", [1, 3])
def test_what_a_stream_keeps_when_a_transformer_raises_does_not_depend_on_the_reads(reads):
    import json

    from pipeline import PipelineBuilder

    events = [b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}).encode()
              + b"\n\n" for w in ["x ", "a bad word", " y"]]
    chunks = [b"".join(events)] if reads == 1 else events
    result = PipelineBuilder().add_transformer(_RaiseOn("bad")).build().collect(chunks)
    assert result.text == "x "
    assert result.error.kind == "filtered" and "ValueError: saw bad" in result.error.message


def test_fail_with_an_unknown_kind_is_refused_at_once():
    with pytest.raises(ValueError):
        Fail("oops")


def test_finish_ends_the_chain():
    chain = TransformerChain([Recorder()])
    chain.process([Delta("a")])
    assert chain.finish() == [] and chain.ended and not chain.stop_requested
    assert chain.process([Delta("b")]) == []


def test_tokens_after_a_terminal_are_dropped_and_stop_is_not_requested():
    rec = Recorder()
    chain = TransformerChain([rec])
    assert chain.process([Delta("a"), Done("stop"), Delta("b")]) == [Delta("a"), Done("stop")]
    assert chain.ended and not chain.stop_requested
    assert chain.process([Delta("c")]) == []
    assert rec.seen == [Delta("a"), Done("stop")]


def test_held_text_is_released_before_the_terminal_token():
    rec = Recorder()
    chain = TransformerChain([StopSequence(["\n\n"]), rec])
    out = chain.process([Delta("line\n")])
    assert out == [Delta("line")]
    out = chain.process([Done("stop")])
    assert out == [Delta("\n"), Done("stop")]
    assert rec.seen == [Delta("line"), Delta("\n"), Done("stop")]
    assert chain.finish() == []


def test_error_terminal_also_releases_held_text_first():
    chain = TransformerChain([ContentFilter(["secret"])])
    assert chain.process([Delta("abc sec")]) == [Delta("abc ")]
    assert chain.process([Error.of("truncated")]) == [Delta("sec"), Error.of("truncated")]


def test_finish_without_terminal_feeds_released_text_through_later_transformers():
    acc = TokenAccumulator()
    chain = TransformerChain([StopSequence(["END"]), Upper(), acc])
    out = run(chain, [[Delta("abc E")]])
    assert out == [Delta("ABC "), Delta("E")]
    assert acc.result.text == "ABC E"


def test_emitting_around_a_terminal_in_response_to_it_is_not_an_early_stop():
    class AddUsageAtEnd(StreamTransformer):
        def transform(self, token):
            return Emit([Usage(output_tokens=1), token]) if type(token) is Done else PASS

    chain = TransformerChain([AddUsageAtEnd()])
    assert chain.process([Delta("x"), Done("stop")]) == [Delta("x"), Usage(output_tokens=1), Done("stop")]
    assert chain.ended and not chain.stop_requested


def test_transformer_returning_garbage_is_a_type_error():
    class Bad(StreamTransformer):
        def transform(self, token):
            return token

    with pytest.raises(TypeError):
        TransformerChain([Bad()]).process([Delta("x")])


def test_fresh_gives_independent_per_stream_state():
    stop_t = StopSequence(["xyz"])
    filt_t = ContentFilter(["secret"])
    rec_t = Recorder()
    templates = [stop_t, filt_t, rec_t, TokenAccumulator()]
    c1 = TransformerChain.from_templates(templates)
    c2 = TransformerChain.from_templates(templates)
    c1.process([Delta("hold xy")])
    c1.process([Delta(" sec")])
    out2 = run(c2, [[Delta("ret"), Done("stop")]])
    assert out2 == [Delta("ret"), Done("stop")]  # nothing held by stream 1 leaks into stream 2
    assert rec_t.seen == []  # the template itself saw nothing
    assert stop_t._held == {} and filt_t._held == {}


def test_transformer_templates_pickle_for_the_pool():
    f = pickle.loads(pickle.dumps(ContentFilter([ContentFilter.regex(r"\d{4}", max_len=4), "x"], policy="drop")))
    assert text_of(run(TransformerChain([f.fresh()]), [[Delta("a1234bxc"), Done("stop")]])) == "abc"
    s = pickle.loads(pickle.dumps(StopSequence(["##"])))
    assert text_of(run(TransformerChain([s.fresh()]), [[Delta("a#"), Delta("#b")]])) == "a"


# --- ContentFilter -----------------------------------------------------------------------------


def filtered(f: ContentFilter, pieces: list[str], end=Done("stop")) -> list:
    chain = TransformerChain([f.fresh()])
    out = []
    for p in pieces:
        out += chain.process([Delta(p)])
    out += chain.process([end]) if end is not None else chain.finish()
    return out


def test_content_filter_redacts_a_word_in_one_delta():
    assert text_of(filtered(ContentFilter(["secret"]), ["my secret plan"])) == "my [REDACTED] plan"


def test_content_filter_catches_a_word_split_across_three_deltas():
    assert text_of(filtered(ContentFilter(["secret"]), ["my se", "cr", "et plan"])) == "my [REDACTED] plan"


def test_content_filter_drop_policy_removes_the_match():
    assert text_of(filtered(ContentFilter(["darn"], policy="drop"), ["oh da", "rn it"])) == "oh  it"


def test_content_filter_callable_replacement_gets_the_match():
    f = ContentFilter([ContentFilter.regex(r"\d{3}-\d{4}", max_len=8)], replacement=lambda m: "#" * len(m))
    assert text_of(filtered(f, ["call 55", "5-12", "34 now"])) == "call ######## now"


def test_content_filter_fail_policy_emits_text_before_match_then_filtered_error():
    chain = TransformerChain([ContentFilter(["secret"], policy="fail"), TokenAccumulator()])
    out = chain.process([Delta("the se"), Delta("cret is")])
    assert text_of(out) == "the "
    assert type(out[-1]) is Error and out[-1].kind == "filtered"
    assert "secret" not in out[-1].message  # the filtered text does not leak through the error
    assert chain.ended and chain.stop_requested
    assert chain.process([Done("stop")]) == []


def test_content_filter_regex_needs_a_max_len():
    with pytest.raises(ConfigurationError):
        ContentFilter([re.compile(r"\d+")])
    with pytest.raises(ConfigurationError):
        ContentFilter([ContentFilter.regex(r"\d+", max_len=0)])
    with pytest.raises(ConfigurationError):
        ContentFilter([ContentFilter.regex(r"\d*", max_len=5)])  # matches the empty string
    with pytest.raises(ConfigurationError):
        ContentFilter(["x"], policy="mask")
    # A tuple or a compiled pattern with max_match are fine.
    assert text_of(filtered(ContentFilter([(r"\d{2}", 2)]), ["a1", "2b"])) == "a[REDACTED]b"
    assert text_of(filtered(ContentFilter([re.compile("ab", re.I)], max_match=2), ["xA", "By"])) == "x[REDACTED]y"


def test_content_filter_word_boundary_sees_text_before_the_held_part():
    f = ContentFilter([ContentFilter.regex(r"\bcat\b", max_len=4)])
    assert text_of(filtered(f, ["a bobcat", " and a ca", "t."])) == "a bobcat and a [REDACTED]."


def test_content_filter_holds_text_per_choice():
    chain = TransformerChain([ContentFilter(["secret"])])
    out = chain.process([Delta("sec", 0), Delta("ret", 1), Delta("ret", 0), Delta("sec", 1)])
    out += chain.process([Done("stop")])
    assert text_of(out, 0) == "[REDACTED]"
    assert text_of(out, 1) == "retsec"


def test_content_filter_releases_held_text_before_a_choice_finish():
    chain = TransformerChain([ContentFilter(["secret"])])
    assert chain.process([Delta("a sec", 1)]) == [Delta("a ", 1)]
    assert chain.process([Finish("length", 1)]) == [Delta("sec", 1), Finish("length", 1)]


def test_content_filter_words_hold_only_a_suffix_that_begins_a_word():
    chain = TransformerChain([ContentFilter(["secret", "classified"])])
    untouched = Delta("nothing here", 0, ["lp"])
    assert chain.process([untouched])[0] is untouched  # no word starts at its end: passes as is
    assert chain.process([Delta("the cla")]) == [Delta("the ")]
    assert chain.process([Delta("ss")]) == []
    assert chain.process([Delta("y s")]) == [Delta("classy ")]
    assert chain.process([Delta("ecre")]) == []
    assert chain.process([Delta("tary")]) == [Delta("[REDACTED]ary")]


def test_content_filter_regex_holds_its_bound_minus_one():
    chain = TransformerChain([ContentFilter([ContentFilter.regex(r"\d{3}-\d{4}", max_len=8)])])
    # A regex can only be bounded by its length: the last 7 characters wait.
    assert chain.process([Delta("ring me at noon")]) == [Delta("ring me ")]
    assert chain.process([Delta("!")]) == [Delta("a")]
    assert chain.process([Done("stop")]) == [Delta("t noon!"), Done("stop")]


def test_content_filter_keeps_logprobs_of_deltas_that_do_not_overlap_a_match():
    chain = TransformerChain([ContentFilter(["bad"])])
    out = chain.process([Delta("ok ", 0, ["lp1"]), Delta("ba", 0, ["lp2"]), Delta("d!", 0, ["lp3"])])
    out += chain.process([Done("stop")])
    assert text_of(out) == "ok [REDACTED]!"
    kept = [lp for t in out if type(t) is Delta and t.logprobs for lp in t.logprobs]
    assert kept == ["lp1"]  # lp2 and lp3 cover the matched word


def test_content_filter_passes_other_tokens():
    t = ToolCall(0, "c", "f", "secret")
    assert filtered(ContentFilter(["secret"]), [], end=None) == []
    assert TransformerChain([ContentFilter(["secret"])]).process([t, Usage(1, 2)]) == [t, Usage(1, 2)]


WORDS = ["abc", "bca", "cc", "abcab"]
REGEXES = [(r"\d{2,4}", 4), (r"\bab\b", 3)]


def _oracle_rx(words=WORDS, regexes=REGEXES, flags=0) -> re.Pattern[str]:
    return re.compile("|".join([re.escape(w) for w in words] + [p for p, _ in regexes]), flags)


@FAST
@given(
    text=st.text(alphabet="abcAB 12", max_size=60),
    cuts=st.lists(st.integers(0, 60), max_size=12),
    mode=st.sampled_from(["words", "many_words", "mixed", "ignore_case"]),
)
def test_content_filter_any_split_gives_the_whole_text_result(text, cuts, mode):
    regexes = REGEXES if mode == "mixed" else []
    words = WORDS + [f"ba{k}" for k in range(8)] if mode == "many_words" else WORDS
    pats = words + [ContentFilter.regex(p, max_len=n) for p, n in regexes]
    f = ContentFilter(pats, replacement="<X>", ignore_case=mode == "ignore_case")
    expected = _oracle_rx(words, regexes, re.I if mode == "ignore_case" else 0).sub("<X>", text)
    assert text_of(filtered(f, splits(text, cuts))) == expected
    assert text_of(filtered(f, [text])) == expected


@FAST
@given(text=st.text(alphabet="abc 12", max_size=60), cuts=st.lists(st.integers(0, 60), max_size=12))
def test_content_filter_never_holds_more_than_longest_match_minus_one(text, cuts):
    # A same-length replacement makes held text = input so far - output so far.
    f = ContentFilter(WORDS + [ContentFilter.regex(p, max_len=n) for p, n in REGEXES],
                      replacement=lambda m: "*" * len(m))
    longest = 5
    chain = TransformerChain([f.fresh()])
    fed = emitted = 0
    for piece in splits(text, cuts):
        fed += len(piece)
        emitted += len(text_of(chain.process([Delta(piece)])))
        assert 0 <= fed - emitted <= longest - 1
    emitted += len(text_of(chain.process([Done("stop")])))
    assert emitted == len(text)


@FAST
@given(text=st.text(alphabet="abc 12", max_size=40), cuts=st.lists(st.integers(0, 40), max_size=8))
def test_content_filter_drop_and_fail_are_split_invariant(text, cuts):
    rx = _oracle_rx()
    pats = WORDS + [ContentFilter.regex(p, max_len=n) for p, n in REGEXES]
    assert text_of(filtered(ContentFilter(pats, policy="drop"), splits(text, cuts))) == rx.sub("", text)
    out = filtered(ContentFilter(pats, policy="fail"), splits(text, cuts))
    m = rx.search(text)
    if m is None:
        assert text_of(out) == text and out[-1] == Done("stop")
    else:
        assert text_of(out) == text[: m.start()]
        assert type(out[-1]) is Error and out[-1].kind == "filtered"


# --- StopSequence ------------------------------------------------------------------------------


def test_stop_sequence_issue_example():
    acc = TokenAccumulator()
    chain = TransformerChain([StopSequence(["own fox"]), acc])
    out = []
    for piece in ["The quick br", "own", " fox", " jumps"]:
        out += chain.process([Delta(piece)])
    assert out == [Delta("The quick br"), Finish("stop", 0), Done("stop", "stop")]
    assert chain.ended and chain.stop_requested
    assert chain.process([Done("length")]) == []
    r = acc.result
    assert (r.text, r.finish_reason, r.finish) == ("The quick br", "stop", "stop")


def test_stop_sequence_holds_only_the_longest_suffix_that_can_start_a_stop():
    chain = TransformerChain([StopSequence(["abcd", "cx"])])
    # "zab" : "ab" is a prefix of "abcd" -> hold 2; "zabc": "abc" prefix of abcd -> hold 3.
    assert chain.process([Delta("zab")]) == [Delta("z")]
    assert chain.process([Delta("c")]) == []
    # "abcy": no suffix is a prefix of a stop -> release everything at once.
    assert chain.process([Delta("y")]) == [Delta("abcy")]
    assert not chain.ended


def test_stop_sequence_earliest_stop_wins():
    out = run(TransformerChain([StopSequence(["world", "lo"])]), [[Delta("hello world")]])
    assert out == [Delta("hel"), Finish("stop", 0), Done("stop", "stop")]


def test_stop_sequence_at_start_emits_no_text():
    out = run(TransformerChain([StopSequence(["###"])]), [[Delta("#"), Delta("##tail")]])
    assert out == [Finish("stop", 0), Done("stop", "stop")]


def test_stop_sequence_releases_held_text_when_nothing_matched():
    chain = TransformerChain([StopSequence(["\n\nUser:"])])
    out = chain.process([Delta("answer\n\nUs")])
    assert out == [Delta("answer")]
    assert chain.finish() == [Delta("\n\nUs")]
    assert not chain.stop_requested


def test_stop_sequence_provider_finish_releases_held_text_first():
    out = TransformerChain([StopSequence(["END"])]).process([Delta("x EN"), Finish("length", 0), Done("length")])
    assert out == [Delta("x "), Delta("EN"), Finish("length", 0), Done("length")]


def test_stop_sequence_keeps_logprobs_of_text_before_the_stop():
    out = TransformerChain([StopSequence(["\n\n"])]).process(
        [Delta("a", 0, ["la"]), Delta("\n", 0, ["l1"]), Delta("b", 0, ["lb"])]
    )
    assert out == [Delta("a", 0, ["la"]), Delta("\nb", 0, ["l1", "lb"])]


def test_stop_sequence_per_choice_ends_stream_when_every_choice_stopped():
    chain = TransformerChain([StopSequence(["."], choices=2), TokenAccumulator()])
    out = chain.process([Delta("one. x", 0), Delta("tw", 1), Delta("more", 0)])
    assert out == [Delta("one", 0), Finish("stop", 0), Delta("tw", 1)]
    assert not chain.ended
    out = chain.process([Delta("o.", 1)])
    assert out == [Delta("o", 1), Finish("stop", 1), Done("stop", "stop")]
    assert chain.stop_requested


def test_stop_sequence_rejects_empty_stops():
    with pytest.raises(ConfigurationError):
        StopSequence([""])
    with pytest.raises(ConfigurationError):
        StopSequence([])


STOPS = ["aab", "ba", "ccc"]
# More than a handful of strings takes the other hold-back path (a set of prefixes).
MANY_STOPS = STOPS + [f"cab{k}" for k in range(8)]


@FAST
@given(
    text=st.text(alphabet="abc", max_size=50),
    cuts=st.lists(st.integers(0, 50), max_size=12),
    stops=st.sampled_from([STOPS, MANY_STOPS]),
)
def test_stop_sequence_any_split_matches_whole_text_search(text, cuts, stops):
    hits = [p for p in (text.find(s) for s in stops) if p >= 0]
    chain = TransformerChain([StopSequence(stops)])
    out = []
    for piece in splits(text, cuts):
        out += chain.process([Delta(piece)])
    out += chain.process([Done("length")])
    if hits:
        assert text_of(out) == text[: min(hits)]
        assert out[-2:] == [Finish("stop", 0), Done("stop", "stop")]
        assert chain.stop_requested
    else:
        assert text_of(out) == text
        assert out[-1] == Done("length") and not chain.stop_requested


@FAST
@given(
    text=st.text(alphabet="abc", max_size=50),
    cuts=st.lists(st.integers(0, 50), max_size=12),
    stops=st.sampled_from([STOPS, MANY_STOPS]),
)
def test_stop_sequence_holds_exactly_the_longest_stop_prefix(text, cuts, stops):
    chain = TransformerChain([StopSequence(stops)])
    fed = ""
    emitted = 0
    for piece in splits(text, cuts):
        fed += piece
        emitted += len(text_of(chain.process([Delta(piece)])))
        if chain.ended:
            break
        held = fed[emitted:]
        # What is held is exactly the longest suffix of the text that begins some stop.
        longest = max((k for k in range(1, len(fed) + 1) if any(s.startswith(fed[-k:]) for s in stops)), default=0)
        assert len(held) == longest


# --- observers ---------------------------------------------------------------------------------


def test_tool_argument_snapshots_follow_the_partial_rule_while_streaming():
    snaps_t = ToolArgumentSnapshots()
    snaps = snaps_t.fresh()
    chain = TransformerChain([snaps])
    chain.process([ToolCall(0, "a", "weather", '{"ci'), ToolCall(1, "b", "time", "")])
    assert snaps.snapshots == {0: {}, 1: {}}
    chain.process([ToolCall(0, None, None, 'ty": "Paris", "unit": "cel')])
    assert snaps.snapshot(0) == {"city": "Paris"}
    chain.process([ToolCall(0, None, None, 'sius"}'), ToolCall(1, None, None, '{"tz": "UTC"}')])
    assert snaps.snapshots == {0: {"city": "Paris", "unit": "celsius"}, 1: {"tz": "UTC"}}
    assert snaps.raw(0) == '{"city": "Paris", "unit": "celsius"}'
    with pytest.raises(KeyError):
        snaps.snapshot(7)
    assert snaps_t.snapshots == {}


def test_tool_argument_snapshot_is_none_when_not_json_even_partially():
    snaps = ToolArgumentSnapshots()
    TransformerChain([snaps]).process([ToolCall(0, "a", "f", "city=Paris")])
    assert snaps.snapshot(0) is None


def test_tool_argument_snapshots_pass_every_token():
    batch = [Delta("x"), ToolCall(0, "a", "f", "{}"), Done("tool_calls")]
    assert TransformerChain([ToolArgumentSnapshots()]).process(batch) == batch


def test_callback_sees_every_token_including_the_terminal_and_held_releases():
    seen: list = []
    chain = TransformerChain([StopSequence(["zz"]), Callback(seen.append)])
    chain.process([Delta("az"), Usage(1, 1), Done("stop")])
    assert seen == [Delta("a"), Usage(1, 1), Delta("z"), Done("stop")]


class _Seen(StreamObserver):
    """An observer that records every batch it is shown and whether finish() was called."""

    def __init__(self) -> None:
        self.batches: list[list] = []
        self.finished = 0

    def observe_batch(self, tokens) -> None:
        self.batches.append(list(tokens))

    def finish(self):
        self.finished += 1
        return []


def test_a_chain_of_observers_shows_each_batch_to_each_observer_then_ends_at_the_terminal():
    a, b = _Seen(), _Seen()
    chain = TransformerChain([a, b])
    first = [Delta("x"), Delta("y")]
    assert chain.process(first) == first
    assert chain.process([Delta("z"), Done("stop"), Delta("after")]) == [Delta("z"), Done("stop")]
    assert chain.process([Delta("late")]) == []  # nothing after the end
    for seen in (a, b):
        assert seen.batches == [[Delta("x"), Delta("y")], [Delta("z"), Done("stop")]]
        assert seen.finished == 1  # held text (none here) is asked for before the terminal
    assert chain.ended and not chain.stop_requested
