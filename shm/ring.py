"""The single-producer single-consumer ring: one shared-memory segment, a lock-free index.

Layout (DESIGN.md section 4). A 4 KiB header, then a data area of `capacity` bytes (a power of
two). Header fields that different sides write sit on separate 64-byte lines::

    line 0  magic, version, capacity, data offset       (written once, at create)
    line 1  tail              u64, producer only          bytes ever written
    line 2  head              u64, consumer only          bytes ever released
    line 3  consumer_waiting  u64, consumer only          1 while the consumer is parked
    line 4  producer_waiting  u64, producer only          1 while the producer is parked
    line 5  soft_limit        u64, producer side          occupancy cap, 0 = capacity
    line 6  producer_closed   u64, producer only          1 after close_producer()

`tail` and `head` grow forever (2**64 bytes is centuries at any speed this moves); the position of
a counter in the data area is `counter & (capacity - 1)`. Occupancy is `tail - head`.

Entries: an 8-byte header (u32 payload length, u32 kind) then the payload, padded to 8 bytes. An
entry never wraps: when it does not fit before the end, a pad entry (kind PAD) fills the rest and
the entry starts at 0, so every payload is one contiguous slice. An entry is at most a quarter of
the ring; a larger payload travels as chunk entries (kind | CHUNK, with FIRST on the first and
MORE on all but the last) that the consumer joins back into one payload. A consumer that starts
in the middle of a chunked payload (a respawned consumer) skips the orphaned chunks, and a payload
cut short by a producer that died is dropped when the next one starts; `orphaned` counts both.

Memory ordering. The producer stores the payload, then the entry header, then `tail`; the
consumer loads `tail`, then the entries below it, then stores `head`. On x86-64 (TSO) stores
become visible to other cores in program order and loads are not reordered with older loads, nor
stores with older loads, so a consumer that sees a new `tail` also sees every byte written before
it, and the producer never overwrites bytes the consumer has not finished reading. This needs
each counter to be one aligned 8-byte store and load: the counters are accessed through
`memoryview.cast('Q')` on an 8-aligned offset, and CPython 3.11's `pack_single`/`unpack_single`
(Objects/memoryobject.c) copy a `unsigned long long` with a fixed-size `memcpy`, which the compiler
emits as one 8-byte `mov` (objdump of libpython3.11's pack_single shows `mov %r13,(%r12)` on the
'Q' path); aligned 8-byte moves are atomic on x86-64. (`struct.pack_into('<Q')` is NOT used for
counters: the standard-size packers may write byte by byte.) Each store happens in its own C call
from the interpreter loop, so the C compiler cannot reorder them either.

Parking. "Set my waiting flag, then re-check the counter" on the waiting side against "publish
the counter, then check the flag" on the other is Dekker's pattern: TSO lets a load pass an older
store still in the store buffer, so without a store-load fence on both sides each can miss the
other. Python has no fence instruction, but acquiring and releasing an uncontended
`threading.Lock` executes a `lock`-prefixed CAS (glibc sem_trywait/sem_post), a full fence on
x86-64 (`_fence()`, ~70 ns). The waiting side takes it on every park (a slow path). The publishing
side does not: at one message per call a fence is 15% of a write. Instead the only miss left (a
publisher's flag read that overtook its own counter store) is closed by time: x86 drains store
buffers in order within nanoseconds (and a context switch serializes), so the parked side wakes
after `_RECHECK_S` (1 ms) even when nobody rang, re-checks, and only then sleeps for long
(re-checking every second; no measurable CPU). A wake-up lost to that race therefore costs at most
1 ms, never liveness; `Ring.late_wakeups` counts them (bench/ring.py reports it).

aarch64 would need release stores for `tail`/`head` (or `dmb ish` before them), acquire loads
(`ldar`, or `dmb ishld` after them) and a full `dmb ish` for the Dekker step; Python offers none
of those directly, so `check_platform()` refuses anything but x86-64 Linux with
`UnsupportedPlatformError` (the in-process pipeline still works everywhere).

Hot paths. At one message per call the interpreter's per-operation cost is the whole cost (an
integer result above 256 is an allocation, ~15-25 ns), so `try_write`, `try_write_batch` and
`read_available` do the fewest operations per entry: the producer stores header and payload with
one `struct.pack_into("<II{n}s")` compiled once per size (a payload `s` does not take, such as a
memoryview, falls back to slice-and-store); the consumer reads a header with one `unpack_from`,
walks offsets within a lap instead of masking a counter per entry, and slices payloads from a view
that starts 8 bytes in. Measured in-process on the 2-core machine, 64 B payloads (min of rounds):
try_write ~390 -> ~270 ns, try_write_batch ~300 -> ~175 ns per entry, read_available ~320 -> ~235 ns
per entry. The entry header needs no atomic store: the consumer reads it only below a published `tail`.

Waiting. A blocked side spins for a short adaptive time (it grows when spinning pays off and
shrinks when it ends in a park), then sets its waiting flag, fences, re-checks, and sleeps on an
eventfd doorbell. The other side writes the doorbell only when it sees the flag set, so a busy
ring makes no system calls and an idle one sleeps in poll().
"""

from __future__ import annotations

import os
import platform
import struct
import sys
import threading
import time
from itertools import islice
from typing import Callable, Sequence

from .doorbell import Doorbell, PeerAlive, PeerDiedError
from .segment import Segment

__all__ = [
    "DEFAULT_CAPACITY",
    "HEADER_SIZE",
    "MAX_KIND",
    "Ring",
    "RingClosedError",
    "RingHandle",
    "UnsupportedPlatformError",
    "check_platform",
]

# 256 KiB per ring: the pool makes I + 2*I*K + K rings, so a worker's share (2*I event and control
# rings plus its output ring) stays under 2 MiB for I <= 3, and one ring still holds thousands of
# event batches and a 64 KiB entry (a quarter) without chunking.
DEFAULT_CAPACITY = 256 * 1024
MIN_CAPACITY = 4096
HEADER_SIZE = 4096  # keeps the data area page-aligned

# Counters are u64 and never wrap: 2**64 bytes is 580 years at 1 GB/s. The test hook may start
# them high, but leaves 2**40 bytes of headroom.
_MAX_START = 2**64 - 2**40
_MAGIC = int.from_bytes(b"STRMRNG1", "little")
_VERSION = 1
# u64 slot indices in the header (8 slots per 64-byte line).
_I_MAGIC, _I_VERSION, _I_CAPACITY, _I_DATA_OFF = 0, 1, 2, 3
_I_TAIL = 8
_I_HEAD = 16
_I_CWAIT = 24
_I_PWAIT = 32
_I_SOFT = 40
_I_PCLOSED = 48

# Entry kinds. User kinds are 0 .. MAX_KIND; the top three bits mark chunks, all ones marks a pad.
_PAD = 0xFFFFFFFF
_MORE = 0x80000000  # more chunks of this payload follow
_CHUNK = 0x40000000  # this entry is one chunk of a larger payload
_FIRST = 0x20000000  # first chunk
MAX_KIND = _FIRST - 1

# Entry header: u32 payload length, u32 kind, little-endian. The header needs no atomic store (the
# consumer reads it only after it sees a `tail` past it), so the hot paths use struct: the consumer
# reads it with one unpack_from (no shifts or masks on a u64), and the producer writes header and
# payload together with one pack_into of "<II{n}s", compiled once per payload size (_learn_size).
_ENTRY = struct.Struct("<II")
_unpack_entry = _ENTRY.unpack_from

# Packers for whole entries (header + payload) by payload size, one table per largest-entry size
# (so a cached size always fits the ring as one entry: the hot path needs no size check), shared
# by the rings of that size in this process. Bounded, because payload sizes vary (a cached size
# costs ~380 B, so a full table ~0.8 MB): past the bound a size not cached takes the
# slice-and-store path, ~70 ns slower per write.
_PACKER_TABLES: dict[int, dict[int, Callable]] = {}
_PACKERS_MAX = 2048


def _packer_table(chunk: int) -> dict[int, Callable]:
    return _PACKER_TABLES.setdefault(chunk, {})


def _learn_size(table: dict[int, Callable], n: int) -> None:
    """Cache a packer for n-byte payloads (n already checked to fit one entry)."""
    if len(table) < _PACKERS_MAX:
        table[n] = struct.Struct(f"<II{n}s").pack_into

# A parked side re-checks after _RECHECK_S even if nobody rang (closes the publish/flag race, see
# "Parking"), then every _IDLE_RECHECK_S (belt and braces; negligible CPU when idle).
_RECHECK_S = 0.001
_IDLE_RECHECK_S = 1.0

_SPIN_MIN_NS = 2_000
_SPIN_MAX_NS = 200_000
_SPIN_START_NS = 50_000

_FENCE_LOCK = threading.Lock()
_fence_acquire = _FENCE_LOCK.acquire
_fence_release = _FENCE_LOCK.release
_eventfd_write = os.eventfd_write if hasattr(os, "eventfd_write") else None
_monotonic_ns = time.monotonic_ns
_sched_yield = getattr(os, "sched_yield", lambda: None)


class UnsupportedPlatformError(RuntimeError):
    """The ring's lock-free publication is only proven on x86-64 Linux (see the module notes)."""


class RingClosedError(EOFError):
    """The producer closed the ring and every entry has been read."""


def check_platform() -> None:
    """Raise UnsupportedPlatformError unless this is x86-64 Linux with eventfd."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        raise UnsupportedPlatformError(
            f"the shared-memory ring needs x86-64 memory ordering (TSO); this machine is {machine!r}. "
            "Use the in-process pipeline here."
        )
    if not sys.platform.startswith("linux") or _eventfd_write is None:
        raise UnsupportedPlatformError("the shared-memory ring needs Linux (eventfd, /dev/shm)")


def _fence() -> None:
    """A full memory fence on x86-64: an uncontended lock round trip is a lock-prefixed CAS."""
    _fence_acquire()
    _fence_release()


def _byte_view(payload) -> memoryview:
    """A flat unsigned-byte view of any bytes-like payload (for slicing chunks)."""
    view = memoryview(payload)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _rebuild_handle(segment: str, data_fd, space_fd) -> "RingHandle":
    return RingHandle(segment, data_fd.detach(), space_fd.detach(), _owned=True)


class RingHandle:
    """What a child needs to attach: the segment name and the two doorbell fds.

    Picklable across `spawn` and `forkserver` process starts (the fds travel as
    `multiprocessing.reduction.DupFd`: passed with the child at start, or through the resource
    sharer when sent later over a multiprocessing connection). Attach it once."""

    __slots__ = ("segment", "data_fd", "space_fd", "_owned")

    def __init__(self, segment: str, data_fd: int, space_fd: int, *, _owned: bool = False) -> None:
        self.segment = segment
        self.data_fd = data_fd
        self.space_fd = space_fd
        self._owned = _owned  # True when the fds are this handle's own copies (after unpickling)

    def __reduce__(self):
        from multiprocessing.reduction import DupFd

        return (_rebuild_handle, (self.segment, DupFd(self.data_fd), DupFd(self.space_fd)))

    def __repr__(self) -> str:
        return f"RingHandle({self.segment!r})"


class Ring:
    """One SPSC ring. The owner calls `Ring.create()`, children `Ring.attach(handle)`.

    Producer methods: try_write, write, try_write_batch, write_batch, set_soft_limit,
    close_producer. Consumer methods: read_available, read, release, wait_readable,
    wait_readable_async. Each process uses one side."""

    __slots__ = (
        "_seg", "_hq", "_data", "_data8", "_packers", "_packer_get", "_cap", "_mask", "_chunk", "_max_need",
        "_data_bell", "_space_bell", "_data_fd", "_space_fd", "_owner",
        "_ptail", "_phead", "_plimit", "_pend", "_pfast", "_dq", "late_wakeups", "_cpos", "_chead", "_partial",
        "_cspin", "_pspin", "_peer_sentinel", "_peer_alive", "orphaned", "__weakref__",
    )

    def __init__(self, seg: Segment, data_bell: Doorbell, space_bell: Doorbell, owner: bool) -> None:
        self._seg = seg
        buf = seg.buf
        hq = buf[:HEADER_SIZE].cast("Q")
        if hq[_I_MAGIC] != _MAGIC or hq[_I_VERSION] != _VERSION:
            hq.release()
            raise ValueError(f"segment {seg.name} does not hold a streamring ring")
        cap = hq[_I_CAPACITY]
        if cap < MIN_CAPACITY or cap & (cap - 1) or HEADER_SIZE + cap > seg.size:
            hq.release()
            raise ValueError(f"segment {seg.name} has a corrupt ring header (capacity {cap})")
        self._hq = hq
        self._data = buf[HEADER_SIZE : HEADER_SIZE + cap]
        # Entry headers as u64 (length | kind << 32, little-endian = the u32 pair): one store each.
        self._dq = self._data.cast("Q")
        # The data area from byte 8: an entry's payload at `off` is data8[off : off + n], which
        # saves the consumer one integer add (an allocation in CPython) per entry.
        self._data8 = self._data[8:]
        self._cap = cap
        self._mask = cap - 1
        self._max_need = cap // 4  # largest entry, header included
        self._chunk = self._max_need - 8  # largest payload in one entry
        self._packers = _packer_table(self._chunk)
        self._packer_get = self._packers.get
        self._data_bell = data_bell
        self._space_bell = space_bell
        self._data_fd = data_bell.fileno()
        self._space_fd = space_bell.fileno()
        self._owner = owner
        # Producer's view: its own tail, a cached head (stale only means too little room).
        self._ptail = hq[_I_TAIL]
        self._phead = hq[_I_HEAD]
        soft = hq[_I_SOFT]
        self._plimit = min(soft, cap) if soft else cap
        self._pend = self._phead + self._plimit  # a write may end at or below this (cached head)
        # ...and the hot path's single check: below _pend and before the end of this lap.
        self._pfast = min(self._pend, (self._ptail | self._mask) + 1)
        # Consumer's view: where reading got to, and what it published.
        self._cpos = self._chead = hq[_I_HEAD]
        self._partial: bytearray | None = None
        self._cspin = _SPIN_START_NS
        self._pspin = _SPIN_START_NS
        self._peer_sentinel: int | None = None
        self._peer_alive: PeerAlive | None = None
        self.orphaned = 0  # chunks dropped because their payload could not be completed
        self.late_wakeups = 0  # parks ended by the re-check timer with data waiting (see Parking)

    # ---- life cycle -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        capacity: int = DEFAULT_CAPACITY,
        *,
        soft_limit: int = 0,
        guardian: bool = True,
        _start: int = 0,
    ) -> "Ring":
        """Create a ring in a new segment (the owner's side). `capacity` is a power of two.

        `_start` is a test hook: both counters start there (a multiple of 8) to exercise
        counters far from zero."""
        check_platform()
        if capacity < MIN_CAPACITY or capacity & (capacity - 1):
            raise ValueError(f"capacity must be a power of two >= {MIN_CAPACITY}, got {capacity}")
        if _start % 8 or not 0 <= _start <= _MAX_START:
            raise ValueError(f"_start must be a multiple of 8 in 0..{_MAX_START}")
        seg = Segment.create(HEADER_SIZE + capacity, guardian=guardian)
        try:
            hq = seg.buf[:HEADER_SIZE].cast("Q")
            hq[_I_VERSION] = _VERSION
            hq[_I_CAPACITY] = capacity
            hq[_I_DATA_OFF] = HEADER_SIZE
            hq[_I_TAIL] = _start
            hq[_I_HEAD] = _start
            hq[_I_SOFT] = soft_limit
            hq[_I_MAGIC] = _MAGIC
            hq.release()
            data_bell = Doorbell.create()
            space_bell = Doorbell.create()
        except BaseException:
            seg.close()
            raise
        return cls(seg, data_bell, space_bell, owner=True)

    @classmethod
    def attach(cls, handle: RingHandle) -> "Ring":
        """Map the ring a handle names (a child's side). Registers nothing with any tracker."""
        check_platform()
        if handle._owned:
            data_fd, space_fd = handle.data_fd, handle.space_fd
            handle._owned = False
            handle.data_fd = handle.space_fd = -1
        else:
            # Same process as the handle's maker (tests, fork): own copies so each Ring closes its own.
            data_fd, space_fd = os.dup(handle.data_fd), os.dup(handle.space_fd)
        data_bell, space_bell = Doorbell(data_fd), Doorbell(space_fd)
        try:
            seg = Segment.attach(handle.segment)
        except BaseException:
            data_bell.close()
            space_bell.close()
            raise
        try:
            return cls(seg, data_bell, space_bell, owner=False)
        except BaseException:
            seg.close()
            data_bell.close()
            space_bell.close()
            raise

    def handle(self) -> RingHandle:
        """A picklable handle for `Ring.attach` in another process."""
        return RingHandle(self._seg.name, self._data_fd, self._space_fd)

    def close(self) -> None:
        """Unmap and close the doorbells; the owner also unlinks the segment. Idempotent."""
        if self._hq is None:
            return
        self._hq.release()
        self._dq.release()
        self._data8.release()
        self._data.release()
        self._hq = self._data = self._data8 = self._dq = None
        self._seg.close()
        self._data_bell.close()
        self._space_bell.close()

    def __enter__(self) -> "Ring":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ring({self._seg.name!r}, capacity={self._cap})"

    @property
    def name(self) -> str:
        """The segment's name."""
        return self._seg.name

    @property
    def capacity(self) -> int:
        """Bytes in the data area (entry headers and padding count against it)."""
        return self._cap

    @property
    def max_entry_payload(self) -> int:
        """The largest payload that travels as one entry; larger ones are chunked."""
        return self._chunk

    @property
    def occupancy(self) -> int:
        """Bytes written and not yet released (either side may read it)."""
        hq = self._hq
        head = hq[_I_HEAD]
        return hq[_I_TAIL] - head

    @property
    def soft_limit(self) -> int:
        """The producer's occupancy cap in bytes (the capacity when unset)."""
        soft = self._hq[_I_SOFT]
        return min(soft, self._cap) if soft else self._cap

    def set_soft_limit(self, limit: int) -> None:
        """Cap occupancy below capacity (0 = no cap). Writes beyond it are refused or wait; an
        empty ring always takes one entry, so a limit below the largest entry cannot stall."""
        if limit < 0:
            raise ValueError("soft limit must be >= 0")
        self._hq[_I_SOFT] = limit
        self._plimit = min(limit, self._cap) if limit else self._cap
        self._pend = self._phead + self._plimit
        self._pfast = min(self._pend, (self._ptail | self._mask) + 1)

    def set_peer(self, *, sentinel: int | None = None, peer_alive: PeerAlive | None = None) -> None:
        """Default liveness watch for every blocking wait on this ring (see shm.doorbell)."""
        self._peer_sentinel = sentinel
        self._peer_alive = peer_alive

    # ---- producer ---------------------------------------------------------------------------

    def _publish(self, tail: int) -> None:
        hq = self._hq
        hq[_I_TAIL] = tail
        # No fence here (see "Parking" in the module notes): the parked side re-checks after
        # _RECHECK_S, which covers a flag read that overtook this store.
        if hq[_I_CWAIT]:
            _eventfd_write(self._data_fd, 1)

    def _room(self, tail: int, need: int) -> bool:
        """Slow path: refresh head and the soft limit from the header; is there room for `need`?"""
        hq = self._hq
        head = self._phead = hq[_I_HEAD]
        soft = hq[_I_SOFT]
        self._plimit = limit = min(soft, self._cap) if soft else self._cap
        self._pend = head + limit
        used = tail - head
        # An empty ring takes any entry (it always fits the capacity), so a tiny limit cannot stall.
        return used + need <= limit or used == 0

    def try_write(self, kind: int, payload) -> bool:
        """Write one payload (bytes-like) and publish it; False when there is no room now.

        A payload larger than `max_entry_payload` goes as chunks, all or nothing; one larger than
        the capacity can only go through `write()` (ValueError here)."""
        # The per-message hot path, kept to the fewest interpreter operations (each integer op
        # above 256 allocates): one size lookup, one C call that stores header and payload, the
        # tail store, the flag load. Everything unusual goes to _try_write_other.
        n = len(payload)
        tail = self._ptail
        end = tail + ((n + 15) & -8)
        pack = self._packer_get(n)  # None for a size not seen yet, or one that needs chunks
        if pack is None or end > self._pfast or kind > MAX_KIND:
            return self._try_write_other(kind, payload, n)
        try:
            pack(self._data, tail & self._mask, n, kind, payload)
        except struct.error:  # a payload "s" does not take (memoryview, array), or a negative kind
            return self._try_write_other(kind, payload, n)
        self._ptail = end
        hq = self._hq
        hq[_I_TAIL] = end  # _publish() inlined
        if hq[_I_CWAIT]:
            _eventfd_write(self._data_fd, 1)
        return True

    def _try_write_other(self, kind: int, payload, n: int) -> bool:
        """try_write off the hot path: a new payload size, a pad, a full-looking ring, chunks."""
        if n > self._chunk or not 0 <= kind <= MAX_KIND:
            return self._try_write_slow(kind, payload, publish=True)
        if n not in self._packers:
            _learn_size(self._packers, n)
        if not self._put(kind, payload, n):
            return False
        self._publish(self._ptail)
        return True

    def _put(self, kind: int, payload, n: int, checked: bool = False) -> bool:
        """Write one entry (padding first if needed) without publishing; False when it does not fit.
        `checked`: the caller already made sure of room for this entry (a chunk of a payload whose
        whole room was checked), so the soft limit is not applied to it again."""
        need = (n + 15) & -8
        tail = self._ptail
        cap = self._cap
        off = tail & self._mask
        pad = cap - off if need > cap - off else 0
        if not checked and tail + pad + need > self._pend and not self._room(tail, pad + need):
            return False
        dq = self._dq
        if pad:
            dq[off >> 3] = (pad - 8) | _PAD << 32
            tail += pad
            off = 0
        self._data[off + 8 : off + 8 + n] = payload
        dq[off >> 3] = n | kind << 32
        self._ptail = tail = tail + need
        self._pfast = min(self._pend, (tail | self._mask) + 1)
        return True

    def _chunk_plan(self, n: int) -> list[tuple[int, int, int]]:
        """(start, end, flags) of each chunk of an n-byte payload."""
        step = self._chunk
        plan = []
        for start in range(0, n, step):
            end = min(start + step, n)
            flags = _CHUNK | (_FIRST if start == 0 else 0) | (_MORE if end < n else 0)
            plan.append((start, end, flags))
        return plan

    def _try_write_slow(self, kind: int, payload, *, publish: bool, strict: bool = True) -> bool:
        if not 0 <= kind <= MAX_KIND:
            raise ValueError(f"kind must be in 0..{MAX_KIND}, got {kind}")
        n = len(payload)
        if n <= self._chunk:
            ok = self._put(kind, payload, n)
        else:
            plan = self._chunk_plan(n)
            # Where would the chunks end, pads included? Then all or nothing.
            tail = start_tail = self._ptail
            cap, mask = self._cap, self._mask
            for start, end, _ in plan:
                need = (end - start + 15) & -8
                off = tail & mask
                if need > cap - off:
                    tail += cap - off
                tail += need
            total = tail - start_tail
            if total > cap:
                if strict:
                    raise ValueError(f"a {n}-byte payload does not fit a {cap}-byte ring at once: use write()")
                return False
            if not self._room(start_tail, total):
                return False
            view = _byte_view(payload)
            for start, end, flags in plan:
                # Room for all chunks was checked above (an empty ring takes a payload over the
                # soft limit): checking each chunk against the limit again would cut it in half.
                self._put(kind | flags, view[start:end], end - start, checked=True)
            ok = True
        if ok and publish:
            self._publish(self._ptail)
        return ok

    def write(
        self,
        kind: int,
        payload,
        timeout: float | None = None,
        *,
        peer_alive: PeerAlive | None = None,
        peer_sentinel: int | None = None,
    ) -> bool:
        """Write one payload, waiting for room; False if `timeout` passed with nothing written.

        A payload too large for the ring at once goes chunk by chunk as the consumer frees room;
        the timeout applies only until its first chunk is in (a half-sent payload is finished)."""
        n = len(payload)
        if n <= self._chunk:
            if self.try_write(kind, payload):
                return True
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                if not self._wait_space(deadline, peer_alive, peer_sentinel):
                    return False
                if self.try_write(kind, payload):
                    return True
        if not 0 <= kind <= MAX_KIND:
            raise ValueError(f"kind must be in 0..{MAX_KIND}, got {kind}")
        deadline = None if timeout is None else time.monotonic() + timeout
        view = _byte_view(payload)
        for start, end, flags in self._chunk_plan(n):
            piece = view[start:end]
            while not self._put(kind | flags, piece, end - start):
                self._publish(self._ptail)
                if not self._wait_space(deadline, peer_alive, peer_sentinel):
                    return False  # only before the first chunk: the deadline is dropped below
            deadline = None
        self._publish(self._ptail)
        return True

    def try_write_batch(self, items: Sequence[tuple[int, object]], start: int = 0) -> int:
        """Write items[start:] (kind, payload) while they fit; publish once. Returns how many."""
        # try_write's hot path per entry, with the ring's fields in locals and one publish.
        tail = self._ptail
        pfast, chunk, mask, data = self._pfast, self._chunk, self._mask, self._data
        packer_get = self._packer_get
        count = 0
        for kind, payload in (items if not start else islice(items, start, None)):
            n = len(payload)
            end = tail + ((n + 15) & -8)
            pack = packer_get(n)
            if pack is not None and end <= pfast and kind <= MAX_KIND:
                try:
                    pack(data, tail & mask, n, kind, payload)
                    tail = end
                    count += 1
                    continue
                except struct.error:
                    pass
            # Rare: a new size, chunks, a pad, or the cached head says full. The careful path.
            self._ptail = tail
            if n > chunk or not 0 <= kind <= MAX_KIND:
                ok = self._try_write_slow(kind, payload, publish=False, strict=False)
            else:
                if n not in self._packers:
                    _learn_size(self._packers, n)
                ok = self._put(kind, payload, n)
            if not ok:
                break
            tail, pfast = self._ptail, self._pfast
            count += 1
        self._ptail = tail
        if count:
            self._publish(tail)
        return count

    def write_batch(
        self,
        items: Sequence[tuple[int, object]],
        timeout: float | None = None,
        *,
        peer_alive: PeerAlive | None = None,
        peer_sentinel: int | None = None,
    ) -> int:
        """Write every (kind, payload), publishing once per run that fits and waiting for room in
        between. Returns how many were written (fewer only when `timeout` passed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        done = self.try_write_batch(items)
        total = len(items)
        while done < total:
            kind, payload = items[done]
            if len(payload) > self._chunk:
                # Too big to wait for at once: write() streams it chunk by chunk.
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not self.write(kind, payload, remaining, peer_alive=peer_alive, peer_sentinel=peer_sentinel):
                    break
                done += 1
            elif not self._wait_space(deadline, peer_alive, peer_sentinel):
                break
            done += self.try_write_batch(items, done)
        return done

    def close_producer(self) -> None:
        """Tell the consumer nothing more will come: once drained, its blocking reads raise
        RingClosedError."""
        hq = self._hq
        hq[_I_PCLOSED] = 1
        _fence()
        if hq[_I_CWAIT]:
            _eventfd_write(self._data_fd, 1)

    def _wait_space(self, deadline, peer_alive, peer_sentinel) -> bool:
        """Wait until the consumer releases something (head moves); False on timeout."""
        # Compare with the head seen when room ran out (refreshed by _room), not a fresh read: a
        # release in between already made room, and the consumer may never release again.
        seen = self._phead
        if self._spin(_I_HEAD, seen, self._pspin):
            self._pspin = min(self._pspin * 2, _SPIN_MAX_NS)
            return True
        self._pspin = max(self._pspin // 2, _SPIN_MIN_NS)
        return self._park(_I_PWAIT, _I_HEAD, seen, self._space_bell, deadline, peer_alive, peer_sentinel, False)

    # ---- consumer ---------------------------------------------------------------------------

    def readable(self) -> bool:
        """True when the producer has published something not yet read."""
        return self._hq[_I_TAIL] != self._cpos

    def read_available(self, max_bytes: int = 0) -> list[tuple[int, memoryview]]:
        """Everything published so far, as (kind, payload view), without waiting.

        Views point into the ring and stay valid until `release()`; use or copy them before.
        Chunked payloads come out whole (a private copy). Pad entries never show.
        `max_bytes` (0: no limit) stops at the first entry boundary past that much ring space, so
        a consumer that releases per slice lets the producer refill in parallel; slices of ~16 KiB
        also keep a busy consumer's views in cache (unbounded reads of a full 1 MiB ring cost up
        to twice as much per entry, bench/ring.py)."""
        pos = self._cpos
        tail = self._hq[_I_TAIL]
        if pos == tail:
            return []
        if max_bytes and tail - pos > max_bytes:
            tail = pos + max_bytes  # loop bound only: every entry starting below it is published
        out = []
        data, data8, unpack = self._data, self._data8, _unpack_entry
        # Walk by offset within one lap (no `& mask` per entry); entries never cross the end of
        # the data area, so a lap ends exactly at `cap` (a pad runs up to it).
        cap = self._cap
        off = pos & self._mask
        base = pos - off
        stop = tail - base
        partial = self._partial
        plain = MAX_KIND if partial is None else -1  # kinds taken as is (none while reassembling)
        while True:
            lap_stop = stop if stop < cap else cap
            while off < lap_stop:
                n, kind = unpack(data, off)
                if kind <= plain:
                    end = off + n
                    out.append((kind, data8[off:end]))  # 3.11 specialises list.append
                    off = (end + 15) & -8  # = off + entry size, as off is a multiple of 8
                elif kind == _PAD:
                    off = cap
                else:
                    partial = self._take_chunk(kind, data8[off : off + n], partial, out.append)
                    plain = MAX_KIND if partial is None else -1
                    off += (n + 15) & -8
            if stop <= cap:
                break
            base += cap  # on into the next lap
            stop -= cap
            off = 0
        self._partial = partial
        self._cpos = base + off
        if not out and self._chead == pos:
            # Only pads or chunks of an unfinished payload, and no views outstanding: hand the
            # space back now, or a producer waiting to send the rest of the payload would stall.
            self.release()
        return out

    def _take_chunk(self, kind: int, view: memoryview, partial: bytearray | None, append) -> bytearray | None:
        """Reassembly of chunked payloads (the rare path)."""
        if kind <= MAX_KIND:  # a whole entry while a chunked payload was open: its producer died
            self.orphaned += 1
            append((kind, view))
            return None
        if kind & _FIRST:
            if partial is not None:
                self.orphaned += 1
            partial = bytearray(view)
        elif partial is None:  # the start was consumed by a consumer before us: skip the rest
            self.orphaned += 1
            return None
        else:
            partial += view
        view.release()
        if kind & _MORE:
            return partial
        append((kind & MAX_KIND, memoryview(partial)))
        return None

    def release(self) -> None:
        """Hand the space of everything read so far back to the producer (publishes head)."""
        pos = self._cpos
        if pos != self._chead:
            self._chead = pos
            hq = self._hq
            hq[_I_HEAD] = pos
            if hq[_I_PWAIT]:
                _eventfd_write(self._space_fd, 1)

    def read(
        self,
        timeout: float | None = None,
        *,
        max_bytes: int = 0,
        peer_alive: PeerAlive | None = None,
        peer_sentinel: int | None = None,
    ) -> list[tuple[int, memoryview]]:
        """Like read_available(max_bytes), but waits for at least one payload; [] on timeout.

        Raises RingClosedError once the producer closed and all is read, PeerDiedError when the
        producer died with nothing left to read. Call release() when done with the views."""
        out = self.read_available(max_bytes)
        if out:
            return out
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if not self.wait_readable(None if deadline is None else max(0.0, deadline - time.monotonic()),
                                      peer_alive=peer_alive, peer_sentinel=peer_sentinel):
                return []
            out = self.read_available(max_bytes)
            if out:
                return out

    def wait_readable(
        self,
        timeout: float | None = None,
        *,
        peer_alive: PeerAlive | None = None,
        peer_sentinel: int | None = None,
    ) -> bool:
        """Block until something is published (True) or `timeout` passes (False)."""
        hq = self._hq
        pos = self._cpos
        if hq[_I_TAIL] != pos:
            return True
        if hq[_I_PCLOSED]:
            raise RingClosedError("the producer closed the ring")
        if self._spin(_I_TAIL, pos, self._cspin):
            self._cspin = min(self._cspin * 2, _SPIN_MAX_NS)
            return True
        self._cspin = max(self._cspin // 2, _SPIN_MIN_NS)
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._park(_I_CWAIT, _I_TAIL, pos, self._data_bell, deadline, peer_alive, peer_sentinel, True)

    async def wait_readable_async(self, timeout: float | None = None) -> bool:
        """Await data with `loop.add_reader` on the doorbell: True when readable, False on timeout."""
        hq = self._hq
        pos = self._cpos
        if hq[_I_TAIL] != pos:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        hq[_I_CWAIT] = 1
        _fence()
        try:
            slice_s = _RECHECK_S  # the same re-check timer as _park (see Parking)
            while hq[_I_TAIL] == pos:
                if hq[_I_PCLOSED]:
                    raise RingClosedError("the producer closed the ring")
                wait = slice_s
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    wait = min(wait, remaining)
                await self._data_bell.wait_async(wait)
                slice_s = _IDLE_RECHECK_S
            return True
        finally:
            hq[_I_CWAIT] = 0

    def fileno(self) -> int:
        """The data doorbell's fd (for callers that run their own selector)."""
        return self._data_fd

    # ---- waiting ----------------------------------------------------------------------------

    def _spin(self, index: int, seen: int, budget_ns: int) -> bool:
        """Poll a counter for up to budget_ns; True as soon as it differs from `seen`."""
        hq = self._hq
        end = _monotonic_ns() + budget_ns
        while True:
            for _ in range(16):
                if hq[index] != seen:
                    return True
            if _monotonic_ns() >= end:
                return False
            # Let a runnable peer have this core: on an oversubscribed machine the process we are
            # waiting for may be queued behind us (a no-op syscall when the core is otherwise idle).
            _sched_yield()

    def _park(self, flag, index, seen, bell: Doorbell, deadline, peer_alive, peer_sentinel, consumer) -> bool:
        """Set our waiting flag, fence, re-check, sleep on the doorbell until the counter moves."""
        if peer_alive is None and peer_sentinel is None:
            peer_alive, peer_sentinel = self._peer_alive, self._peer_sentinel
        hq = self._hq
        hq[flag] = 1
        _fence()  # our flag is visible to the other side before we re-read its counter
        try:
            slice_s = _RECHECK_S
            while hq[index] == seen:
                if consumer and hq[_I_PCLOSED]:
                    raise RingClosedError("the producer closed the ring")
                wait = slice_s
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    wait = min(wait, remaining)
                try:
                    rung = bell.wait(wait, sentinel=peer_sentinel, peer_alive=peer_alive)
                except PeerDiedError:
                    if hq[index] != seen:
                        return True  # it wrote (or read) before it died: let the caller see that
                    raise
                if not rung and slice_s == _RECHECK_S and hq[index] != seen and not bell.drain():
                    # Data came and nobody rang (a ring right after our timer is not a miss): the
                    # publish/flag race happened, and the re-check caught it.
                    self.late_wakeups += 1
                slice_s = _IDLE_RECHECK_S
            return True
        finally:
            hq[flag] = 0
