"""Lingering (workers/linger.py): while reads keep coming, the ingest's loop and the workers sleep
out the rest of a tick between passes, so one wake-up serves many reads; a quiet pass ends it."""

from __future__ import annotations

import asyncio
import time

import pytest

from conftest import PROVIDER_FIXTURES, provider_manifest, read_capture
from pipeline import PipelineBuilder
from pipeline.sources import Replay
from workers.linger import BusyWindow, LoopLinger


async def test_the_loop_lingers_while_reads_come_and_stops_after_a_quiet_tick():
    loop = asyncio.get_running_loop()
    flushed: list[float] = []
    linger = LoopLinger(loop, 0.05, before_sleep=lambda: flushed.append(time.perf_counter()))
    t0 = time.perf_counter()
    linger.note()
    assert linger.active
    await asyncio.sleep(0)  # the tick runs: a read came, so it flushes, then sleeps out the tick
    t1 = time.perf_counter()
    assert len(flushed) == 1 and flushed[0] - t0 < 0.02  # the flush comes before the sleep
    assert 0.04 <= t1 - t0 < 0.5
    await asyncio.sleep(0)  # a pass with no read: reads often land just after, so one more tick
    t2 = time.perf_counter()
    assert linger.active and len(flushed) == 1
    assert 0.04 <= t2 - t1 < 0.5
    await asyncio.sleep(0)  # a second quiet pass: ticking ends, no more sleeping
    await asyncio.sleep(0)
    t3 = time.perf_counter()
    assert not linger.active and len(flushed) == 1
    assert t3 - t2 < 0.03
    linger.note()  # the next read starts it again
    assert linger.active
    await asyncio.sleep(0)
    assert len(flushed) == 2


async def test_a_pass_that_took_the_whole_tick_does_not_sleep():
    loop = asyncio.get_running_loop()
    linger = LoopLinger(loop, 0.05)
    linger.note()
    time.sleep(0.06)  # this pass was busy for longer than the tick
    t0 = time.perf_counter()
    await asyncio.sleep(0)
    assert time.perf_counter() - t0 < 0.03


async def test_lingering_off_never_ticks():
    linger = LoopLinger(asyncio.get_running_loop(), 0.0)
    linger.note()
    assert not linger.active


def test_a_worker_looks_again_for_a_tick_after_a_busy_pass_and_parks_at_once_after_a_light_one():
    window = BusyWindow(0.05, busy_bytes=1000)
    assert window.again() is False  # nothing seen yet: park
    window.worked(10)
    assert window.again() is False  # a light pass: park at once (the ingest wakes us per tick)
    window.worked(5000)  # reads pour in
    t0 = time.perf_counter()
    looks = 0
    while window.again():
        looks += 1
    elapsed = time.perf_counter() - t0
    assert looks > 10 and 0.04 <= elapsed < 0.5  # looked again for about a tick, never slept it
    assert window.again() is False


def test_linger_ms_is_checked():
    pipe = PipelineBuilder().provider("openai-chat").build()
    for bad in (-1, 1000):
        with pytest.raises(ValueError, match="linger_ms"):
            pipe.pool(workers=1, linger_ms=bad)


@pytest.mark.skipif(provider_manifest() is None, reason=f"provider captures not found at {PROVIDER_FIXTURES}")
@pytest.mark.parametrize("linger_ms", [0, 20])
def test_a_pool_gives_the_in_process_results_with_lingering_off_and_long(no_shm_leak, linger_ms):
    files = provider_manifest()["files"]
    cases = sorted(n for n in files if n.startswith("openai-chat/"))[:6]
    assert len(cases) == 6
    pipe = PipelineBuilder().provider("openai-chat").build()
    expected = [pipe.collect([read_capture(c)]) for c in cases]
    with pipe.pool(workers=1, linger_ms=linger_ms) as pool:
        got = {r.source_index: r for r in pool.run(Replay(read_capture(c), read_size="event") for c in cases)}
    assert [got[i].text for i in range(len(cases))] == [e.text for e in expected]
    assert [got[i].finish_reason for i in range(len(cases))] == [e.finish_reason for e in expected]


async def test_next_tick_wakes_pollers_at_each_tick_and_never_strands_one():
    loop = asyncio.get_running_loop()
    linger = LoopLinger(loop, 0.03)
    assert linger.next_tick().done()  # not ticking: nothing to wait for
    linger.note()
    t0 = time.perf_counter()
    first = linger.next_tick()
    assert not first.done()
    await asyncio.wait_for(first, 1.0)  # resolved by the first tick
    waiting = [linger.next_tick() for _ in range(3)]
    await asyncio.wait_for(asyncio.gather(*waiting), 1.0)  # all of them, at the next tick
    assert time.perf_counter() - t0 >= 0.025  # the first tick slept in between
    for _ in range(5):  # ticking ends after a quiet tick; every poller is released on the way
        if not linger.active:
            break
        await asyncio.wait_for(linger.next_tick(), 1.0)
    assert not linger.active
    assert linger.next_tick().done()
