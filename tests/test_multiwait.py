"""Waiting on several rings at once (shm/multiwait.py): wake on any ring, on a sentinel, and
never sleep out the timeout when a producer's publish missed the waiting flag."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

import shm.ring as ring_module
from shm.multiwait import any_readable, wait_any, wait_any_async
from shm.ring import Ring


@pytest.fixture
def rings():
    made = [Ring.create(1 << 14) for _ in range(3)]
    yield made
    for r in made:
        r.close()


def _write_later(ring: Ring, delay: float) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(delay), ring.try_write(1, b"x")))
    t.start()
    return t


def test_wait_any_wakes_when_any_ring_gets_data(rings):
    t = _write_later(rings[2], 0.05)
    start = time.monotonic()
    assert wait_any(rings, 5.0) == []
    t.join()
    assert time.monotonic() - start < 2.0
    assert any_readable(rings) and rings[2].readable() and not rings[0].readable()


def test_wait_any_times_out_when_nothing_comes(rings):
    start = time.monotonic()
    assert wait_any(rings, 0.1) == []
    assert 0.09 <= time.monotonic() - start < 2.0
    assert not any_readable(rings)


def test_wait_any_returns_a_sentinel_that_fired(rings):
    r, w = os.pipe()
    try:
        threading.Timer(0.05, os.write, (w, b"!")).start()
        assert wait_any(rings, 5.0, [r]) == [r]
    finally:
        os.close(r)
        os.close(w)


def test_a_publish_that_rings_no_doorbell_is_seen_by_the_periodic_recheck(rings, monkeypatch):
    # The producer's unfenced publish may miss the consumer's waiting flag: simulate it by writing
    # without ringing the doorbell. The waiter re-checks on its own (1 ms after parking, then
    # every second) and never sleeps out its 5 s timeout.
    monkeypatch.setattr(ring_module, "_eventfd_write", lambda fd, n: None)
    t = _write_later(rings[1], 0.02)
    start = time.monotonic()
    wait_any(rings, 5.0)
    t.join()
    assert time.monotonic() - start < 2.5
    assert rings[1].readable()


async def test_wait_any_async_wakes_on_data_and_on_a_missed_doorbell(rings, monkeypatch):
    t = _write_later(rings[0], 0.05)
    start = time.monotonic()
    assert await wait_any_async(rings, 5.0) == []
    assert time.monotonic() - start < 2.0
    t.join()
    monkeypatch.setattr(ring_module, "_eventfd_write", lambda fd, n: None)
    t = _write_later(rings[2], 0.02)
    start = time.monotonic()
    await asyncio.wait_for(wait_any_async(rings[1:], 5.0), 10)
    t.join()
    assert time.monotonic() - start < 2.5
    assert rings[2].readable()
