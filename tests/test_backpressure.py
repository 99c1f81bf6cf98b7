"""BackpressureController and bounded_read_ahead, driven by a fake clock (no timing asserted)."""

from __future__ import annotations

import asyncio
import gc
from collections import deque

import pytest

from pipeline.backpressure import BackpressureController, bounded_read_ahead
from pipeline.errors import ConfigurationError, StreamError, StreamTimeoutError


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def make(clock: FakeClock, **kw) -> BackpressureController:
    opts = dict(min_buffer=1_000, max_buffer=64_000, initial=8_000, target_delay=0.005, clock=clock, interval=0.1)
    opts.update(kw)
    return BackpressureController(**opts)


# --- permits --------------------------------------------------------------------------------


def test_try_acquire_respects_the_limit_and_counts_stalls():
    ctl = make(FakeClock(), initial=4_000)
    assert ctl.try_acquire(3_000)
    assert not ctl.try_acquire(2_000)  # 5000 > 4000
    assert ctl.stalls == 1 and ctl.in_flight == 3_000
    ctl.release(3_000)
    assert ctl.try_acquire(2_000) and ctl.in_flight == 2_000


def test_oversize_item_is_admitted_alone():
    ctl = make(FakeClock(), initial=1_000, max_buffer=1_000)
    assert ctl.try_acquire(50_000)  # nothing in flight: admitted although above the limit
    assert not ctl.try_acquire(1)  # but nothing else meanwhile
    ctl.release(50_000)
    assert ctl.in_flight == 0


async def test_oversize_item_waits_for_empty_then_is_admitted():
    ctl = make(FakeClock(), initial=1_000, max_buffer=1_000)
    await ctl.acquire(600)
    big = asyncio.ensure_future(ctl.acquire(10_000))
    await asyncio.sleep(0)
    assert not big.done()
    ctl.release(600)
    await asyncio.wait_for(big, 1)
    assert ctl.in_flight == 10_000


async def test_acquire_timeout_raises_typed_error_and_leaves_no_waiter():
    ctl = make(FakeClock(), initial=1_000)
    await ctl.acquire(1_000)
    with pytest.raises(StreamTimeoutError) as info:
        await ctl.acquire(10, timeout=0.01)
    assert isinstance(info.value, StreamError) and info.value.kind == "timeout"
    assert ctl.waiting == 0 and ctl.in_flight == 1_000
    ctl.release(1_000)
    assert ctl.in_flight == 0  # the abandoned request was not granted later


async def test_cancelled_acquire_leaks_no_permits():
    ctl = make(FakeClock(), initial=1_000)
    await ctl.acquire(1_000)
    task = asyncio.ensure_future(ctl.acquire(500))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    ctl.release(1_000)
    assert ctl.in_flight == 0 and ctl.waiting == 0


async def test_waiters_are_served_in_order():
    ctl = make(FakeClock(), initial=1_000)
    await ctl.acquire(1_000)
    order: list[int] = []

    async def want(i: int, n: int) -> None:
        await ctl.acquire(n)
        order.append(i)

    tasks = [asyncio.ensure_future(want(i, n)) for i, n in enumerate([800, 100, 100])]
    await asyncio.sleep(0)
    ctl.release(1_000)
    await asyncio.wait_for(asyncio.gather(*tasks), 1)
    assert order == [0, 1, 2]
    assert ctl.in_flight == 1_000


async def test_wait_time_is_measured_with_the_injected_clock():
    clock = FakeClock()
    ctl = make(clock, initial=1_000)
    await ctl.acquire(1_000)
    task = asyncio.ensure_future(ctl.acquire(1))
    await asyncio.sleep(0)
    clock.advance(0.25)
    ctl.release(1_000)
    await task
    assert ctl.wait_time_total == pytest.approx(0.25)


def test_release_more_than_in_flight_is_an_error():
    ctl = make(FakeClock())
    with pytest.raises(ValueError):
        ctl.release(1)


def test_bad_settings_are_configuration_errors():
    with pytest.raises(ConfigurationError):
        BackpressureController(min_buffer=10, max_buffer=5)
    with pytest.raises(ConfigurationError):
        BackpressureController(target_delay=0)


# --- adaptation -----------------------------------------------------------------------------


def simulate(ctl: BackpressureController, clock: FakeClock, service_s: float, steps: int, item: int = 500):
    """A reader that keeps the buffer full and a consumer taking one item per `service_s`.

    Returns the largest number of bytes buffered beyond the limit, and the bytes in the order
    they were released (each item carries its sequence number)."""
    queue: deque[tuple[int, float]] = deque()
    seq = 0
    released: list[int] = []
    worst_over = 0
    for _ in range(steps):
        while ctl.try_acquire(item):  # the reader reads until the controller says stop
            queue.append((seq, clock()))
            seq += 1
            worst_over = max(worst_over, ctl.in_flight - max(ctl.limit, item))
        clock.advance(service_s)
        s, queued_at = queue.popleft()
        ctl.release(item, queue_delay=clock() - queued_at, processing=service_s)
        released.append(s)
    while queue:
        s, _ = queue.popleft()
        ctl.release(item)
        released.append(s)
    return worst_over, released, seq


def test_slow_consumer_shrinks_the_limit_and_stays_under_it():
    clock = FakeClock()
    ctl = make(clock, initial=32_000)
    # 20 ms per 500-byte item: anything queued waits far more than the 5 ms target.
    worst_over, released, produced = simulate(ctl, clock, service_s=0.020, steps=400)
    assert ctl.limit == ctl.min_buffer
    assert worst_over <= 0  # buffered bytes never went above the limit
    assert released == list(range(produced))  # nothing dropped, order kept
    assert ctl.in_flight == 0 and ctl.acquired_total == ctl.released_total


def test_fast_consumer_grows_the_limit_to_max():
    clock = FakeClock()
    ctl = make(clock, initial=1_000)
    # The consumer takes each item at once (no queue delay) and is mostly idle; the reader
    # keeps hitting the limit, so the limit doubles every interval.
    for _ in range(200):
        while ctl.try_acquire(500):
            pass
        clock.advance(0.01)
        while ctl.in_flight:
            ctl.release(500, queue_delay=0.0, processing=0.0001)
    assert ctl.limit == ctl.max_buffer
    assert ctl.stalls > 0


def test_busy_processor_does_not_grow_the_limit():
    clock = FakeClock()
    ctl = make(clock, initial=4_000)
    # No queue delay, reader held back, but the processor is busy all the time: hold steady.
    for _ in range(100):
        ctl.observe(0.0, 0.01, reader_waited=True)
        clock.advance(0.01)
    assert ctl.limit == 4_000


def test_observe_drives_the_limit_without_permits():
    clock = FakeClock()
    ctl = make(clock, initial=16_000)
    for _ in range(50):
        clock.advance(0.02)
        ctl.observe(0.050, 0.02)  # a standing queue of 50 ms
    assert ctl.limit == ctl.min_buffer
    for _ in range(100):
        clock.advance(0.02)
        ctl.observe(0.0, 0.001, reader_waited=True)
    assert ctl.limit == ctl.max_buffer
    assert ctl.in_flight == 0


def test_adapt_capacity_shrinks_at_most_by_half_per_interval():
    clock = FakeClock()
    ctl = make(clock, initial=16_000)
    ctl.observe(10.0)  # a huge delay, inside the current interval
    assert ctl.adapt_capacity() == 8_000


async def test_growth_wakes_a_blocked_reader():
    clock = FakeClock()
    ctl = make(clock, initial=1_000)
    await ctl.acquire(1_000)
    blocked = asyncio.ensure_future(ctl.acquire(1_000))
    await asyncio.sleep(0)
    clock.advance(0.2)
    ctl.observe(0.0, 0.0)  # delay under target, reader waited: the interval ends with growth
    assert ctl.limit == 2_000
    await asyncio.wait_for(blocked, 1)
    assert ctl.in_flight == 2_000


# --- bounded_read_ahead ---------------------------------------------------------------------


class Source:
    """An async iterator of numbered chunks that records how far it got and whether it was closed."""

    def __init__(self, n: int, size: int = 1_000, fail_at: int | None = None) -> None:
        self.n, self.size, self.fail_at = n, size, fail_at
        self.produced = 0
        self.closed = False

    async def _gen(self):
        try:
            for i in range(self.n):
                if i == self.fail_at:
                    raise ValueError("source broke")
                await asyncio.sleep(0)
                self.produced += 1
                yield i.to_bytes(4, "big") * (self.size // 4)
        finally:
            self.closed = True

    def __aiter__(self):
        return self._gen()


def chunk_no(chunk: bytes) -> int:
    return int.from_bytes(chunk[:4], "big")


async def test_slow_consumer_keeps_in_flight_under_limit_and_loses_nothing():
    clock = FakeClock()
    ctl = BackpressureController(min_buffer=4_000, max_buffer=4_000, clock=clock)
    src = Source(200)
    seen, worst = [], 0
    async with bounded_read_ahead(src, ctl) as reader:
        async for chunk in reader:
            seen.append(chunk_no(chunk))
            for _ in range(5):  # let the reader run ahead as far as it can
                await asyncio.sleep(0)
            worst = max(worst, ctl.in_flight)
            clock.advance(0.01)
    assert seen == list(range(200))
    assert worst <= 4_000
    assert src.closed and ctl.in_flight == 0 and ctl.acquired_total == ctl.released_total == 200_000


async def test_slow_consumer_shrinks_the_limit_through_read_ahead():
    clock = FakeClock()
    ctl = BackpressureController(min_buffer=2_000, max_buffer=64_000, initial=32_000, clock=clock)
    reader = bounded_read_ahead(Source(300), ctl)
    count = 0
    async for _ in reader:
        count += 1
        for _ in range(3):
            await asyncio.sleep(0)
        clock.advance(0.02)  # 20 ms per chunk: queued chunks wait far longer than 5 ms
    assert count == 300
    assert ctl.limit == 2_000


async def test_early_break_with_aclose_cancels_reader_and_closes_source():
    ctl = BackpressureController(min_buffer=3_000, max_buffer=3_000)
    src = Source(10_000)
    reader = bounded_read_ahead(src, ctl)
    got = []
    async for chunk in reader:
        got.append(chunk_no(chunk))
        if len(got) == 3:
            break
    await reader.aclose()
    assert got == [0, 1, 2]
    assert src.closed
    assert reader._task is not None and reader._task.done()
    assert ctl.in_flight == 0  # queued chunks gave their permits back
    assert src.produced < 20  # it stopped reading, it did not drain the source


async def test_dropping_the_iterator_stops_the_reader():
    ctl = BackpressureController(min_buffer=3_000, max_buffer=3_000)
    src = Source(10_000)
    reader = bounded_read_ahead(src, ctl)
    task_box = []
    async for _ in reader:
        task_box.append(reader._task)
        break
    del reader
    gc.collect()
    for _ in range(10):
        await asyncio.sleep(0)
    assert task_box[0].done()
    assert src.closed and src.produced < 20


async def test_source_exception_reaches_the_consumer_after_earlier_chunks():
    ctl = BackpressureController()
    src = Source(10, fail_at=4)
    got = []
    with pytest.raises(ValueError, match="source broke"):
        async for chunk in bounded_read_ahead(src, ctl):
            got.append(chunk_no(chunk))
    assert got == [0, 1, 2, 3]
    assert src.closed and ctl.in_flight == 0


async def test_empty_source_ends_at_once():
    ctl = BackpressureController()
    src = Source(0)
    assert [c async for c in bounded_read_ahead(src, ctl)] == []
    assert src.closed


async def test_aclose_before_iterating_closes_the_source():
    ctl = BackpressureController()

    async def gen():
        yield b"x"

    g = gen()
    reader = bounded_read_ahead(g, ctl)
    await reader.aclose()
    with pytest.raises(StopAsyncIteration):
        await g.__anext__()  # closed
