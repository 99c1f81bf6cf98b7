"""The SPSC ring (shm/ring.py): framing, wrap, chunks, soft limit, waiting, liveness, handles,
index arithmetic far from zero (hypothesis), and a 10-million-entry cross-process stress test."""

from __future__ import annotations

import array
import asyncio
import multiprocessing as mp
import os
import platform
import struct
import threading
import time
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shm import ring as ringmod
from shm.doorbell import PeerDiedError, pid_sentinel
from shm.ring import MAX_KIND, Ring, RingClosedError, UnsupportedPlatformError, check_platform

SHM = "/dev/shm"


def my_entries() -> set[str]:
    return {n for n in os.listdir(SHM) if n.startswith(f"streamring-{os.getpid()}-")}


def open_fds() -> int:
    """Our kind of fds: eventfds (doorbells) and /dev/shm files (multiprocessing's own helper
    pipes and sockets, which live as long as the forkserver, are not ours to count)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue
        count += "eventfd" in target or target.startswith(SHM)
    return count


@pytest.fixture(autouse=True)
def no_leak():
    """Every test leaves no segment of this process and no extra fd behind."""
    before, fds = my_entries(), open_fds()
    yield
    assert my_entries() - before == set()
    assert open_fds() <= fds


@pytest.fixture
def pair():
    """An owner ring used as producer and an attached ring used as consumer."""
    prod = Ring.create(4096, guardian=False)
    cons = Ring.attach(prod.handle())
    yield prod, cons
    cons.close()
    prod.close()


def take(cons: Ring) -> list[tuple[int, bytes]]:
    out = [(k, bytes(v)) for k, v in cons.read_available()]
    cons.release()
    return out


def entry_bytes(n: int) -> int:
    """Space one entry takes by the spec: 8-byte header + payload, rounded up to 8."""
    return (8 + n + 7) // 8 * 8


# ---- framing ---------------------------------------------------------------------------------


def test_entries_come_out_in_order_with_their_kinds(pair):
    prod, cons = pair
    sent = [(1, b"a"), (2, b""), (MAX_KIND, b"xyz" * 10), (0, bytes(range(256)))]
    for k, p in sent:
        assert prod.try_write(k, p)
    assert take(cons) == sent
    assert take(cons) == []


def test_entries_are_8_byte_aligned_with_an_8_byte_header(pair):
    prod, cons = pair
    for n in (0, 1, 7, 8, 9, 100):
        before = prod.occupancy
        prod.try_write(1, b"x" * n)
        assert prod.occupancy - before == entry_bytes(n)
    take(cons)
    assert cons.occupancy == 0


def test_try_write_refuses_when_full_and_release_makes_room(pair):
    prod, cons = pair
    written = 0
    while prod.try_write(3, b"y" * 100):
        written += 1
    assert written == 4096 // entry_bytes(100)
    assert prod.occupancy == written * entry_bytes(100)
    views = cons.read_available()
    assert not prod.try_write(3, b"y" * 100)  # read but not released: still no room
    assert len(views) == written
    del views
    cons.release()
    assert prod.occupancy == 0
    assert prod.try_write(3, b"y" * 100)


def test_an_entry_that_does_not_fit_before_the_end_starts_at_zero_after_a_pad(pair):
    prod, cons = pair
    assert prod.try_write(1, b"a" * 3000)  # ends at 3008
    take(cons)
    payload = bytes(range(256)) * 4  # 1024 bytes: needs 1032, only 1088 - ... left before the end
    assert prod.try_write(2, payload[:1000])  # 1008 bytes: fits exactly up to 4016
    assert prod.try_write(3, payload[:900])  # 80 bytes left at the end: pad, then at 0
    out = cons.read_available()
    assert [(k, bytes(v)) for k, v in out] == [(2, payload[:1000]), (3, payload[:900])]
    assert all(v.contiguous for _, v in out)
    del out
    cons.release()
    # the pad counted as occupied space until released
    assert prod.occupancy == 0


def test_payload_larger_than_a_quarter_comes_out_whole(pair):
    prod, cons = pair
    assert prod.max_entry_payload == 4096 // 4 - 8
    big = os.urandom(2500)
    assert prod.try_write(7, big)
    assert prod.try_write(8, b"after")
    assert take(cons) == [(7, big), (8, b"after")]


def test_a_new_consumer_skips_the_rest_of_a_payload_its_predecessor_began(pair):
    prod, cons = pair
    assert prod.try_write(7, os.urandom(2500))  # three chunks of at most 1016 bytes: 1024 each
    assert prod.try_write(8, b"next")
    prod._hq[ringmod._I_HEAD] = 1024  # a consumer took the first chunk, released it, and died
    fresh = Ring.attach(prod.handle())
    try:
        assert take(fresh) == [(8, b"next")]
        assert fresh.orphaned == 2
    finally:
        fresh.close()


def test_a_payload_cut_short_by_a_dead_producer_is_dropped(pair):
    prod, cons = pair
    first = 7 | ringmod._CHUNK | ringmod._FIRST | ringmod._MORE
    assert prod._put(first, b"a" * 1000, 1000)  # the first chunk of a payload, then death
    prod._publish(prod._ptail)
    assert take(cons) == []
    assert prod.try_write(9, b"from the respawned producer")
    assert take(cons) == [(9, b"from the respawned producer")]
    assert cons.orphaned == 1


def test_try_write_of_more_than_the_capacity_points_to_write(pair):
    prod, _ = pair
    with pytest.raises(ValueError, match="write"):
        prod.try_write(1, bytes(10000))


def test_write_streams_a_payload_larger_than_the_ring(pair):
    prod, cons = pair
    huge = os.urandom(300_000)  # 73 ring capacities
    t = threading.Thread(target=prod.write, args=(5, huge, 30))
    t.start()
    got = []
    deadline = time.monotonic() + 30
    while not got and time.monotonic() < deadline:
        got = [(k, bytes(v)) for k, v in cons.read(timeout=1)]
        cons.release()
    t.join()
    assert got == [(5, huge)]


def test_kinds_outside_the_user_range_are_refused(pair):
    prod, _ = pair
    with pytest.raises(ValueError):
        prod.try_write(MAX_KIND + 1, b"x")
    with pytest.raises((ValueError, OverflowError)):
        prod.try_write(-1, b"x")


# ---- payload forms and the edges of the fast paths ---------------------------------------------


def _payload_forms(raw: bytes) -> list:
    """The same bytes in each form a caller may hand the ring (buffers of single bytes)."""
    return [raw, bytearray(raw), memoryview(raw), memoryview(bytearray(raw))[1:], array.array("B", raw)]


def test_every_bytes_like_form_arrives_byte_exact_through_try_write(pair):
    prod, cons = pair
    raw = bytes(range(1, 101))
    forms = _payload_forms(raw)
    for kind, form in enumerate(forms, start=1):
        assert prod.try_write(kind, form)
    assert take(cons) == [(1, raw), (2, raw), (3, raw), (4, raw[1:]), (5, raw)]


def test_every_bytes_like_form_arrives_byte_exact_through_try_write_batch(pair):
    prod, cons = pair
    raw = bytes(range(3, 67))
    items = [(k, f) for k, f in enumerate(_payload_forms(raw), start=1)]
    assert prod.try_write_batch(items) == len(items)
    assert take(cons) == [(1, raw), (2, raw), (3, raw), (4, raw[1:]), (5, raw)]


def test_a_negative_kind_is_refused_with_value_error_and_nothing_published(pair):
    prod, cons = pair
    with pytest.raises(ValueError):
        prod.try_write(-1, b"abc")
    with pytest.raises(ValueError):
        prod.try_write_batch([(-5, b"bad")])
    assert cons.read_available() == []
    assert prod.try_write(2, b"after")
    assert take(cons) == [(2, b"after")]


def test_payload_sizes_beyond_the_packer_cache_still_arrive_exact(pair, monkeypatch):
    prod, cons = pair
    # A full size cache: every size not in it takes the slower slice-and-store path.
    monkeypatch.setattr(ringmod, "_PACKERS_MAX", 3)
    table = prod._packers
    saved = dict(table)
    table.clear()
    try:
        sent = [(7, bytes([n % 251]) * n) for n in (5, 9, 17, 33, 65, 129, 5, 200)]
        for kind, payload in sent[:4]:
            assert prod.try_write(kind, payload)
        assert prod.try_write_batch(sent[4:]) == 4
        assert len(table) == 3
        assert take(cons) == sent
    finally:
        table.clear()
        table.update(saved)


def test_one_read_walks_past_an_entry_that_ends_exactly_at_the_end_of_the_data_area(pair):
    prod, cons = pair
    quarter = 4096 // 4 - 8  # largest payload in one entry: 1016 bytes, entry 1024
    for _ in range(2):
        assert prod.try_write(1, b"\0" * quarter)
    take(cons)  # the consumer now stands at byte 2048
    sent = [(2, b"b" * quarter), (3, b"c" * quarter), (4, b"d" * quarter)]  # 2048..4096, then 0..1024
    for k, p in sent:
        assert prod.try_write(k, p)
    assert prod.occupancy == 3 * 1024  # no pad: the second entry ends exactly at the end
    assert take(cons) == sent
    assert cons.occupancy == 0


def test_read_available_with_max_bytes_1_takes_exactly_one_entry_per_call(pair):
    prod, cons = pair
    sent = [(k, bytes([k]) * (k * 10)) for k in range(1, 6)]
    assert prod.try_write_batch(sent) == 5
    got = []
    for _ in range(5):
        out = cons.read_available(1)
        assert len(out) == 1
        got += [(k, bytes(v)) for k, v in out]
        del out
        cons.release()
    assert got == sent
    assert cons.read_available(1) == []


# ---- batches and the soft limit ---------------------------------------------------------------


def test_try_write_batch_writes_what_fits_and_publishes_once(pair):
    prod, cons = pair
    items = [(1, bytes([i]) * 56) for i in range(100)]  # 64 bytes each: 64 fit
    n = prod.try_write_batch(items)
    assert n == 4096 // 64
    assert take(cons) == [(k, p) for k, p in items[:n]]
    assert prod.try_write_batch(items, n) == 100 - n
    assert take(cons) == [(k, p) for k, p in items[n:]]


def test_write_batch_waits_for_room(pair):
    prod, cons = pair
    items = [(2, os.urandom(i % 300)) for i in range(2000)]
    got = []

    def consume():
        while len(got) < len(items):
            got.extend((k, bytes(v)) for k, v in cons.read(timeout=5))
            cons.release()

    t = threading.Thread(target=consume)
    t.start()
    assert prod.write_batch(items, timeout=30) == len(items)
    t.join(30)
    assert got == items


def test_soft_limit_caps_occupancy_but_an_empty_ring_takes_one_entry(pair):
    prod, cons = pair
    prod.set_soft_limit(1000)
    assert cons.soft_limit == 1000
    n = 0
    while prod.try_write(1, b"z" * 112):  # 120 bytes each
        n += 1
    assert n == 1000 // 120
    assert cons.occupancy == n * 120
    take(cons)
    prod.set_soft_limit(16)
    assert prod.try_write(1, b"q" * 500)  # empty: accepted although above the limit
    assert not prod.try_write(1, b"q")
    take(cons)
    prod.set_soft_limit(0)
    assert prod.soft_limit == 4096


# ---- waiting, wake-ups, liveness ----------------------------------------------------------------


def test_read_times_out_with_nothing(pair):
    _, cons = pair
    t0 = time.monotonic()
    assert cons.read(timeout=0.2) == []
    assert 0.15 <= time.monotonic() - t0 < 5


def test_write_times_out_when_full(pair):
    prod, _ = pair
    while prod.try_write(1, b"x" * 500):
        pass
    t0 = time.monotonic()
    assert prod.write(1, b"x" * 500, timeout=0.2) is False
    assert 0.15 <= time.monotonic() - t0 < 5


def test_parked_consumer_wakes_on_write(pair):
    prod, cons = pair
    result = []
    t = threading.Thread(target=lambda: result.append((cons.read(timeout=20), time.monotonic())))
    t.start()
    time.sleep(0.3)  # long past the spin: the consumer is parked on the doorbell
    sent = time.monotonic()
    prod.try_write(4, b"wake")
    t.join(20)
    out, woke = result[0]
    assert [(k, bytes(v)) for k, v in out] == [(4, b"wake")]
    assert woke - sent < 2.0
    del out, result
    cons.release()


def test_parked_producer_wakes_on_release(pair):
    prod, cons = pair
    while prod.try_write(1, b"x" * 500):
        pass
    t = threading.Thread(target=lambda: (time.sleep(0.3), take(cons)))
    t.start()
    t0 = time.monotonic()
    assert prod.write(1, b"x" * 500, timeout=20)
    assert time.monotonic() - t0 < 5
    t.join()


def test_closed_producer_ends_blocking_reads_after_the_last_entry(pair):
    prod, cons = pair
    prod.try_write(1, b"last")
    prod.close_producer()
    assert take(cons) == [(1, b"last")]
    with pytest.raises(RingClosedError):
        cons.read(timeout=5)


def _exit_soon(handle) -> None:
    ring = Ring.attach(handle)
    time.sleep(0.2)
    ring.close()


def test_reader_notices_a_dead_producer_by_sentinel():
    with Ring.create(4096, guardian=False) as ring:
        p = mp.get_context("forkserver").Process(target=_exit_soon, args=(ring.handle(),))
        p.start()
        t0 = time.monotonic()
        with pytest.raises(PeerDiedError):
            ring.read(timeout=30, peer_sentinel=p.sentinel)
        assert time.monotonic() - t0 < 10
        p.join()


def test_writer_notices_a_dead_consumer_by_pidfd_and_by_callable():
    with Ring.create(4096, guardian=False) as ring:
        while ring.try_write(1, b"x" * 500):
            pass
        p = mp.get_context("forkserver").Process(target=_exit_soon, args=(ring.handle(),))
        p.start()
        fd = pid_sentinel(p.pid)
        try:
            with pytest.raises(PeerDiedError):
                ring.write(1, b"x" * 500, timeout=30, peer_sentinel=fd)
        finally:
            os.close(fd)
        p.join()
        with pytest.raises(PeerDiedError):
            ring.write(1, b"x" * 500, timeout=30, peer_alive=p.is_alive)


async def test_async_wait_wakes_on_write_and_times_out(pair):
    prod, cons = pair
    assert await cons.wait_readable_async(timeout=0.1) is False
    loop = asyncio.get_running_loop()
    loop.call_later(0.1, lambda: threading.Thread(target=prod.try_write, args=(9, b"async")).start())
    assert await cons.wait_readable_async(timeout=10) is True
    assert take(cons) == [(9, b"async")]


def test_platform_other_than_x86_64_is_refused(monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    with pytest.raises(UnsupportedPlatformError, match="aarch64"):
        check_platform()
    with pytest.raises(UnsupportedPlatformError):
        Ring.create(4096, guardian=False)
    assert issubclass(UnsupportedPlatformError, RuntimeError)


# ---- handles across processes ------------------------------------------------------------------


def _echo(requests, replies) -> None:
    """Child: attach both rings, echo each payload reversed on the reply ring until closed."""
    inbox, outbox = Ring.attach(requests), Ring.attach(replies)
    try:
        while True:
            try:
                batch = inbox.read(timeout=30)
            except RingClosedError:
                break
            items = [(k + 1, bytes(v)[::-1]) for k, v in batch]
            del batch
            inbox.release()
            outbox.write_batch(items, timeout=30)
        outbox.close_producer()
    finally:
        inbox.close()
        outbox.close()


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_handle_crosses_to_a_child_started_with(method):
    requests, replies = Ring.create(8192, guardian=False), Ring.create(8192, guardian=False)
    try:
        p = mp.get_context(method).Process(target=_echo, args=(requests.handle(), replies.handle()))
        p.start()
        sent = [(i % 50, os.urandom(i % 700)) for i in range(500)]
        t = threading.Thread(target=lambda: (requests.write_batch(sent, timeout=30), requests.close_producer()))
        t.start()
        got = []
        while True:
            try:
                got.extend((k, bytes(v)) for k, v in replies.read(timeout=30, peer_sentinel=p.sentinel))
            except RingClosedError:
                break
            replies.release()
        t.join()
        p.join(30)
        assert p.exitcode == 0
        assert got == [(k + 1, v[::-1]) for k, v in sent]
    finally:
        requests.close()
        replies.close()


def _attach_from_pipe(conn) -> None:
    handle = conn.recv()
    ring = Ring.attach(handle)
    ring.write(1, b"via pipe", timeout=10)
    ring.close()


def test_handle_sent_over_a_connection_to_a_running_child():
    with Ring.create(4096, guardian=False) as ring:
        ctx = mp.get_context("forkserver")
        a, b = ctx.Pipe()
        p = ctx.Process(target=_attach_from_pipe, args=(b,))
        p.start()
        a.send(ring.handle())  # the fds go through multiprocessing's resource sharer
        assert [(k, bytes(v)) for k, v in ring.read(timeout=30, peer_sentinel=p.sentinel)] == [(1, b"via pipe")]
        ring.release()
        p.join(10)
        a.close()
        b.close()


# ---- index arithmetic far from zero (hypothesis) ------------------------------------------------

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("w"), st.integers(0, 1500), st.integers(0, 1000)),  # write n bytes, kind
        st.tuples(st.just("r"), st.just(0), st.just(0)),  # read everything and release
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    start=st.one_of(
        st.integers(0, 2**20).map(lambda x: x * 8),
        # Counters near 2**64 (they never wrap: 2**40 bytes left is 18 minutes at 1 TB/s).
        st.integers(2**61 - 2**37 - 2**20, 2**61 - 2**37).map(lambda x: x * 8),
    ),
    ops=_ops,
)
def test_ring_matches_a_fifo_model_with_counters_starting_anywhere(start, ops):
    prod = Ring.create(4096, guardian=False, _start=start)
    cons = Ring.attach(prod.handle())
    try:
        model: list[tuple[int, bytes]] = []
        seq = 0
        for op, n, kind in ops:
            if op == "w":
                payload = (seq.to_bytes(4, "little") * (n // 4 + 1))[:n]
                seq += 1
                ok = prod.try_write(kind, payload)
                if not model and cons.occupancy == 0:
                    assert ok, "an empty ring must take any payload up to its capacity"
                if ok:
                    model.append((kind, payload))
                assert 0 <= prod.occupancy <= 4096
            else:
                assert take(cons) == model
                model.clear()
                assert cons.occupancy == 0
        assert take(cons) == model
        assert prod._hq[ringmod._I_TAIL] >= start
        assert prod._hq[ringmod._I_TAIL] - prod._hq[ringmod._I_HEAD] == prod.occupancy
    finally:
        cons.close()
        prod.close()


# ---- cross-process stress ----------------------------------------------------------------------

STRESS_ENTRIES = 10_000_000
STRESS_CAPACITY = 128 * 1024  # entries above 32 KiB - 8 travel as chunks
_HDR = struct.Struct("<IIQ")  # crc32 of the body, total length, sequence number
_SEQ = struct.Struct("<Q")


def _stress_sizes() -> list[int]:
    """Payload sizes cycled by the producer: mostly 16..256, some to 4 KiB, a few to 64 KiB."""
    sizes = []
    x = 12345
    for i in range(1024):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        if i % 331 == 7:
            sizes.append(32 * 1024 + x % (32 * 1024 + 1))  # 32..64 KiB: chunks
        elif i % 37 == 3:
            sizes.append(257 + x % 3840)
        else:
            sizes.append(16 + x % 241)
    return sizes


def _stress_producer(handle, total: int) -> None:
    """Child: entries of cycled sizes, random bodies, each stamped with its sequence number."""
    ring = Ring.attach(handle)
    tpls = []
    for n in _stress_sizes():
        t = bytearray(os.urandom(n))
        _HDR.pack_into(t, 0, zlib.crc32(t[16:]), n, 0)
        tpls.append(t)
    pack_seq = _SEQ.pack_into
    seq = 0
    try:
        while seq < total:
            batch = []
            append = batch.append
            for _ in range(min(128, total - seq)):
                t = tpls[seq & 1023]
                pack_seq(t, 8, seq)  # safe to reuse: a batch never holds the same template twice
                append((seq % 7 + 1, t))
                seq += 1
            ring.write_batch(batch)
        ring.close_producer()
    finally:
        ring.close()


def test_stress_ten_million_entries_across_processes_none_torn_lost_reordered_or_duplicated():
    ring = Ring.create(STRESS_CAPACITY, guardian=False)
    try:
        p = mp.get_context("forkserver").Process(target=_stress_producer, args=(ring.handle(), STRESS_ENTRIES))
        t0 = time.monotonic()
        p.start()
        expected = 0
        chunked = 0
        unpack, crc32 = _HDR.unpack_from, zlib.crc32
        max_payload = ring.max_entry_payload
        while True:
            try:
                batch = ring.read(timeout=60, peer_sentinel=p.sentinel)
            except RingClosedError:
                break
            assert batch, "no progress for 60 s"
            for kind, view in batch:
                crc, length, seq = unpack(view)
                if seq != expected:
                    pytest.fail(f"entry {seq} arrived where {expected} was due (lost, reordered or duplicated)")
                if length != len(view) or kind != seq % 7 + 1 or crc32(view[16:]) != crc:
                    pytest.fail(f"entry {seq} is torn: length {len(view)}/{length}, kind {kind}")
                if length > max_payload:
                    chunked += 1
                expected += 1
            del batch, view
            ring.release()
        elapsed = time.monotonic() - t0
        p.join(30)
        assert p.exitcode == 0
        assert expected == STRESS_ENTRIES
        assert chunked > 1000  # continuations really happened
        # Speed is bench/'s business; on a quiet 2-core machine this takes about 25 s.
        print(f"stress: {STRESS_ENTRIES:,} entries in {elapsed:.1f} s, {chunked} chunked")
    finally:
        ring.close()


def test_a_chunked_payload_over_the_soft_limit_goes_whole_into_an_empty_ring():
    # An empty ring takes any payload that fits its capacity, soft limit or not; the chunks of
    # that payload must all go in, never only the first.
    ring = Ring.create(256 * 1024)
    try:
        ring.set_soft_limit(64 * 1024)
        payload = bytes(range(256)) * 600  # 153,600 bytes: three chunks
        assert ring.try_write(7, payload)
        got = ring.read_available()
        assert [(k, bytes(v)) for k, v in got] == [(7, payload)]
        del got
        ring.release()
        assert ring.orphaned == 0
    finally:
        ring.close()
