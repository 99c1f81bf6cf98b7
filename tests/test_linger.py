"""Lingering (workers/linger.py): while reads keep coming, the ingest's loop and the workers sleep
out the rest of a tick between passes, so one wake-up serves many reads; a quiet pass ends it."""

from __future__ import annotations

import asyncio
import time

import pytest

from conftest import PROVIDER_FIXTURES, provider_manifest, read_capture
from pipeline import PipelineBuilder
from pipeline.sources import Replay
from workers.linger import LoopLinger, Napper


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


def test_a_napper_lingers_after_work_and_says_park_after_two_quiet_ticks():
    assert Napper(0.0).nap() is False  # off: park at once
    napper = Napper(0.05)
    assert napper.nap() is False  # no work seen yet: nothing to linger for
    napper.worked()
    t0 = time.perf_counter()
    assert napper.nap() is True  # sleeps a tick
    assert 0.04 <= time.perf_counter() - t0 < 0.5
    assert napper.nap() is True  # reads often land just after a pass: one more
    assert napper.nap() is False  # two ticks with nothing: park
    napper.worked()
    assert napper.nap() is True  # work again: lingering again


def test_a_napper_naps_less_when_reads_pile_up_during_its_naps_and_more_when_they_do_not():
    napper = Napper(0.04, busy_bytes=1000)
    napper.worked(0)
    sizes = []
    for _ in range(12):  # every nap is followed by a pass that takes more than busy_bytes
        assert napper.nap() is True
        napper.worked(5000)
        sizes.append(napper.nap_s)
    assert sizes[0] == 0.02 and sizes == sorted(sizes, reverse=True) and sizes[-1] == 0.0
    t0 = time.perf_counter()
    assert napper.nap() is True  # busy: yields the core, does not sleep
    assert time.perf_counter() - t0 < 0.01
    napper.worked(10)  # little came: the nap grows back, up to the tick
    grown = []
    for _ in range(12):
        assert napper.nap() is True
        napper.worked(10)
        grown.append(napper.nap_s)
    assert grown == sorted(grown) and grown[-1] == 0.04


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
