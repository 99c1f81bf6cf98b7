"""Recordings (pipeline.recording): bytes plus read timing, saved and loaded, replayed by size, by
event and by recorded read, paced or not; and a stream recorded from the mock provider replays
to identical tokens, from disk and from the mock's replay directory."""

from __future__ import annotations

import gc
import json
import os
import time
import weakref

import aiohttp
import pytest

from pipeline import PipelineBuilder, SseParser
from pipeline.providers import get_adapter
from pipeline.recording import Recording, RecordingCache, RecordingWriter, aiter_replay, iter_replay_chunks, split_events, timing_path
from pipeline.testing import MockProviderServer

# Three events, one per line-end style, then a comment-only block and an unterminated tail.
MIXED = b"data: a\n\ndata: b\r\n\r\nevent: x\rdata: c\r\r: note\n\ndata: tail"


def test_save_and_load_round_trip(tmp_path):
    path = tmp_path / "s.sse"
    reads = [(3, 0), (10, 1_500), (len(MIXED), 9_000_000)]
    Recording.save(path, MIXED, reads)
    assert timing_path(path) == tmp_path / "s.timing"
    lines = [json.loads(line) for line in timing_path(path).read_text().splitlines()]
    assert lines == [{"offset": o, "t_ns": t} for o, t in reads]
    rec = Recording.load(path)
    assert rec.data == MIXED and rec.reads == reads and rec.duration_ns == 9_000_000


def test_recording_without_timing_has_no_sidecar(tmp_path):
    path = tmp_path / "plain.sse"
    Recording.save(path, b"data: x\n\n")
    assert not timing_path(path).exists()
    assert Recording.load(path).reads == []


def test_recording_cache_shares_an_unchanged_file_while_it_is_in_use(tmp_path):
    path = tmp_path / "c.sse"
    Recording.save(path, b"data: one\n\n", [(11, 0)])
    cache = RecordingCache()
    first = cache.load(path)
    assert cache.load(str(path)) is first  # str and Path name the same file
    assert first.data == b"data: one\n\n" and first.reads == [(11, 0)]

    # A changed body (size and mtime), then a changed sidecar only: each is loaded afresh.
    Recording.save(path, b"data: two!\n\n", [(12, 0)])
    second = cache.load(path)
    assert second is not first and second.data == b"data: two!\n\n"
    st = os.stat(path)
    timing_path(path).write_text(json.dumps({"offset": 12, "t_ns": 5}) + "\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the body's stat is unchanged
    third = cache.load(path)
    assert third is not second and third.reads == [(12, 5)]


def test_recording_cache_keeps_nothing_alive(tmp_path):
    path = tmp_path / "d.sse"
    Recording.save(path, b"data: x\n\n")
    cache = RecordingCache()
    ref = weakref.ref(cache.load(path))
    gc.collect()
    assert ref() is None  # the cache's reference is weak
    assert cache.load(path).data == b"data: x\n\n"
    with pytest.raises(FileNotFoundError):
        cache.load(tmp_path / "missing.sse")


def test_bad_read_offsets_are_refused():
    with pytest.raises(ValueError):
        Recording(b"abcdef", [(4, 0), (2, 1)])
    with pytest.raises(ValueError):
        Recording(b"abcdef", [(4, 0)])  # the reads must cover the data


def test_writer_records_bytes_and_relative_times(tmp_path):
    path = tmp_path / "w.sse"
    with RecordingWriter(path) as w:
        w.append(b"data: 1\n", 1_000_000_000)
        w.append(b"\ndata: 2\n\n", 1_000_250_000)
        assert w.offset == 18
    rec = Recording.load(path)
    assert rec.data == b"data: 1\n\ndata: 2\n\n"
    assert rec.reads == [(8, 0), (18, 250_000)]


def test_event_split_handles_lf_crlf_and_cr():
    ends = split_events(MIXED)
    chunks = [MIXED[a:b] for a, b in zip([0] + ends, ends)]
    assert chunks == [b"data: a\n\n", b"data: b\r\n\r\n", b"event: x\rdata: c\r\r", b": note\n\n", b"data: tail"]
    assert list(iter_replay_chunks(Recording(MIXED), "event")) == chunks
    # A CR then LF is one line end: "\r\n" alone is not a blank line, "\r\r\n" is (CR, then CRLF).
    data = b"data: a\r\ndata: b\r\r\ndata: c"
    assert split_events(data) == [len(b"data: a\r\ndata: b\r\r\n"), len(data)]


def test_each_event_chunk_dispatches_exactly_its_event():
    parser = SseParser()
    per_chunk = [[e.data for e in parser.feed(c)] for c in iter_replay_chunks(Recording(MIXED), "event")]
    assert per_chunk == [[b"a"], [b"b"], [b"c"], [], []]


@pytest.mark.parametrize("size", [1, 7, 16384])
def test_fixed_size_reads_cover_the_data(size):
    chunks = list(iter_replay_chunks(Recording(MIXED), size))
    assert b"".join(chunks) == MIXED
    assert all(len(c) == size for c in chunks[:-1]) and 0 < len(chunks[-1]) <= size


def test_recorded_reads_are_replayed_as_recorded():
    rec = Recording(MIXED, [(5, 0), (6, 10), (len(MIXED), 20)])
    assert list(iter_replay_chunks(rec, "recorded")) == [MIXED[:5], MIXED[5:6], MIXED[6:]]
    # Without timing, "recorded" falls back to one read per event.
    assert list(iter_replay_chunks(Recording(MIXED), "recorded")) == list(iter_replay_chunks(Recording(MIXED), "event"))


async def test_paced_replay_keeps_the_recorded_times():
    rec = Recording(MIXED, [(9, 0), (20, 60_000_000), (len(MIXED), 120_000_000)])
    t0 = time.monotonic()
    chunks = [c async for c in aiter_replay(rec, "recorded", pace=1.0)]
    real = time.monotonic() - t0
    assert b"".join(chunks) == MIXED and len(chunks) == 3
    t0 = time.monotonic()
    fast = [c async for c in aiter_replay(rec, "recorded", pace=4.0)]
    quick = time.monotonic() - t0
    t0 = time.monotonic()
    unpaced = [c async for c in aiter_replay(rec, "event")]
    assert fast == chunks and b"".join(unpaced) == MIXED
    # Sleeps never end early: real time takes at least the recorded 120 ms, 4x at least 30 ms.
    assert real >= 0.115 and 0.029 <= quick and quick < real
    assert time.monotonic() - t0 < 0.1


def _tokens(dialect: str, chunks) -> list:
    parser, adapter, out = SseParser(), get_adapter(dialect)(), []
    for c in chunks:
        out += adapter.feed(parser.feed(c))
    out += adapter.feed(parser.close())
    return out + adapter.close(parser.discarded_tail)


async def _record_from_mock(session, mock, dialect: str, body: dict, path) -> tuple[list[bytes], Recording]:
    reads = []
    with RecordingWriter(path) as w:
        async with session.post(mock.url(dialect), json=body) as resp:
            async for chunk in resp.content.iter_any():
                w.append(chunk, time.monotonic_ns())
                reads.append(chunk)
    return reads, Recording.load(path)


@pytest.mark.parametrize("dialect", ["anthropic", "gemini", "openai-responses"])
async def test_a_recorded_mock_stream_replays_to_identical_tokens(tmp_path, dialect):
    body = {
        "model": "m", "stream": True, "max_tokens": 30, "max_output_tokens": 30,
        "messages": [{"role": "user", "content": "hi"}], "contents": [{"parts": [{"text": "hi"}]}],
        "generationConfig": {"maxOutputTokens": 30},
        "mock": {"seed": 8, "tps": 400, "tool_calls": 1, "reasoning": 6},
    }
    async with MockProviderServer(seed=2) as mock, aiohttp.ClientSession() as session:
        reads, rec = await _record_from_mock(session, mock, dialect, body, tmp_path / "live.sse")
    live = _tokens(dialect, reads)
    assert type(live[-1]).__name__ == "Done"
    assert rec.data == b"".join(reads) and len(rec.reads) == len(reads)
    assert rec.duration_ns > 0
    for size in (1, 13, 4096, "event", "recorded"):
        assert _tokens(dialect, iter_replay_chunks(rec, size)) == live, size
    pipe = PipelineBuilder().provider(dialect).build()
    assert pipe.collect(iter_replay_chunks(rec, "event")).text == pipe.collect(reads).text


async def test_mock_serves_recordings_with_their_timing(tmp_path):
    async with MockProviderServer(seed=4) as mock, aiohttp.ClientSession() as session:
        body = {"model": "m", "stream": True, "max_tokens": 24, "messages": [{"role": "user", "content": "hi"}],
                "stream_options": {"include_usage": True}, "mock": {"seed": 1, "tps": 200}}
        reads, rec = await _record_from_mock(session, mock, "openai-chat", body, tmp_path / "chat.sse")
    live = _tokens("openai-chat", reads)
    assert rec.duration_ns >= 0.08e9  # 24 tokens at 200/s: the recording holds the pacing
    async with MockProviderServer(replay_dir=tmp_path) as replayer, aiohttp.ClientSession() as session:
        # By name on GET /replay, in real time.
        t0 = time.monotonic()
        async with session.get(f"http://127.0.0.1:{replayer.port}/replay/chat") as resp:
            served = await resp.read()
        elapsed = time.monotonic() - t0
        assert served == rec.data and elapsed >= rec.duration_ns / 1e9 * 0.9
        log = replayer.streams[-1]
        assert log.replay == "chat" and log.events_sent == len(rec.reads)
        sent_spread = log.event_times_ns[-1] - log.event_times_ns[0]
        assert sent_spread >= (rec.reads[-1][1] - rec.reads[0][1]) * 0.9
        # On a dialect path with x-mock-replay, as fast as possible, read through the pipeline.
        t0 = time.monotonic()
        async with session.post(replayer.url("openai-chat"), json={"stream": True}, headers={"x-mock-replay": "chat.sse", "x-mock-pace": "0"}) as resp:
            chunks = [c async for c in resp.content.iter_any()]
        assert time.monotonic() - t0 < rec.duration_ns / 1e9
        assert _tokens("openai-chat", chunks) == live
        # Unknown names and paths outside the directory are not served.
        for name in ("nope", "../" + tmp_path.name + "/chat.sse", "chat.timing"):
            async with session.get(f"http://127.0.0.1:{replayer.port}/replay/{name}") as resp:
                assert resp.status == 404, name
