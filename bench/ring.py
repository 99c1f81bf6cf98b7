"""Ring vs multiprocessing.Queue, multiprocessing.Pipe and faster-fifo, one producer process and
one consumer process (forkserver), in one run.

    python -m bench.ring [--quick] [--repeat N] [--json PATH]

Throughput (messages/s, MB/s of payload) for 64 B and 256 B payloads, one per call and in batches
of 64, first as raw bytes, then as the same msgspec records (an EventBatch with one event whose data
is the payload) encoded and decoded by every transport. Every consumer touches every byte it gets:
raw payloads are checksummed (zlib.crc32), records fully decoded.

Single: every producer sends one message per call. The ring's consumer reads with its own API,
`read_available(max_bytes=16 KiB)`, which returns what is published, up to 16 KiB of ring space
(many entries per call when the consumer is behind, one when it keeps up); the peers' receive
calls return one message each. "ring-1by1" is the same ring with a consumer that takes exactly
one entry per call (`read_available(1)`), for a like-for-like per-call comparison.

Batches of 64: "ring" writes 64 entries and publishes once (`write_batch`), and its consumer
walks them entry by entry. Transports without their own batching get the 64 messages as one
message framed the cheapest way each has (Queue: a list, pickled in C; Pipe: one msgpack array;
faster-fifo: put_many/get_many). "ring-framed" puts that same msgpack array in one ring entry, so
ring-framed vs Pipe compares the transports with identical framing work. For many small records
the framed form is the ring's batch API (the pool's EventBatch is exactly that: one entry holding
many events); per-entry batches suit a few larger records published together.

Then: wake-up latency of a parked consumer (p50/p99/p99.9, ring vs Pipe), and CPU use of a ring's
consumer and producer parked with no traffic (psutil cpu_times over a few seconds).
Prints ratios ring/peer; the timing is the producer's first send to the consumer's last receive.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import zlib

import msgspec
import psutil

from shm.records import KIND_EVENTS, Event, EventBatch, RecordCodec
from shm.ring import Ring

try:
    from faster_fifo import Queue as FastQueue
except ImportError:  # optional peer
    FastQueue = None

BATCH = 64
SIZES = (64, 256)
RING_CAPACITY = 1 << 20  # a busy ring; the pool's default is 256 KiB
# The ring consumer reads up to this much ring space per call (`read_available(max_bytes)`) and
# releases it before reading on, so the producer refills in parallel and a call's views and
# tuples stay in cache. Unbounded reads of a full 1 MiB ring (~14,500 64 B entries, ~3.5 MB of
# views) cost up to twice as much per entry, and the producer waits out each one.
RING_READ_BYTES = 16 * 1024
# Messages per case, chosen so each case runs for roughly half a second on 2 cores.
COUNTS = {"single": {"ring": 600_000, "ring-1by1": 400_000, "pipe": 200_000, "fifo": 200_000, "queue": 60_000},
          "batch": {"ring": 1_500_000, "ring-framed": 3_000_000, "pipe": 3_000_000, "fifo": 1_500_000, "queue": 1_500_000}}


def _record(size: int) -> EventBatch:
    return EventBatch(7, 0, time.monotonic_ns(), [Event("message", None, os.urandom(size))])


# ---- consumer side (child process) -------------------------------------------------------------


def _consume(transport: str, endpoint, n: int, phase: str, mode: str, ready, result) -> None:
    """Receive n messages, touching every byte of each (crc32 of raw bytes, or a full decode).

    One specialised loop per case, so no transport pays for branches the others skip."""
    raw = phase == "raw"
    crc = zlib.crc32
    rec_dec = msgspec.msgpack.Decoder(EventBatch).decode
    list_dec = msgspec.msgpack.Decoder(list[bytes] if raw else list[EventBatch]).decode
    count = check = 0
    if transport.startswith("ring"):
        ring = Ring.attach(endpoint)
        ready.put(1)
        # The ring's own API: take what is there, wait only when nothing is.
        read, release, wait = ring.read_available, ring.release, ring.wait_readable
        max_bytes = 1 if transport == "ring-1by1" else RING_READ_BYTES  # 1: one entry per call
        while count < n:
            out = read(max_bytes)
            if not out:
                if not wait(60):
                    break
                continue
            if transport == "ring-framed":
                for _, view in out:
                    items = list_dec(view)
                    count += len(items)
                    if raw:
                        for m in items:
                            check += crc(m)
                    else:
                        for m in items:
                            check += len(m.events[0].data)
                    del items
            elif raw:
                for _, view in out:
                    check += crc(view)
                count += len(out)
            else:
                for _, view in out:
                    check += len(rec_dec(view).events[0].data)
                count += len(out)
            del out, view
            release()
        ring.close()
    elif transport == "pipe":
        ready.put(1)
        recv = endpoint.recv_bytes
        if mode == "batch":
            while count < n:
                items = list_dec(recv())
                count += len(items)
                if raw:
                    for m in items:
                        check += crc(m)
                else:
                    for m in items:
                        check += len(m.events[0].data)
        elif raw:
            while count < n:
                check += crc(recv())
                count += 1
        else:
            while count < n:
                check += len(rec_dec(recv()).events[0].data)
                count += 1
    elif transport == "queue":
        ready.put(1)
        get = endpoint.get
        if mode == "batch":
            while count < n:
                msgs = get()
                for m in msgs:
                    check += crc(m) if raw else len(rec_dec(m).events[0].data)
                count += len(msgs)
        elif raw:
            while count < n:
                check += crc(get())
                count += 1
        else:
            while count < n:
                check += len(rec_dec(get()).events[0].data)
                count += 1
    elif transport == "fifo":
        ready.put(1)
        if mode == "batch":
            get_many = endpoint.get_many
            while count < n:
                msgs = get_many(timeout=60, max_messages_to_get=BATCH * 16)
                for m in msgs:
                    check += crc(m) if raw else len(rec_dec(m).events[0].data)
                count += len(msgs)
        else:
            get = endpoint.get
            while count < n:
                m = get(timeout=60)
                check += crc(m) if raw else len(rec_dec(m).events[0].data)
                count += 1
    result.put((time.perf_counter(), count))


# ---- producer side (this process) --------------------------------------------------------------


def _produce(transport: str, endpoint, n: int, phase: str, mode: str, size: int) -> float:
    """Send n messages; return the start time."""
    payload = os.urandom(size)
    rec = _record(size)
    enc = msgspec.msgpack.Encoder()
    encode = enc.encode
    codec = RecordCodec()
    batches = n // BATCH
    t0 = time.perf_counter()
    if transport in ("ring", "ring-1by1"):
        ring = endpoint
        if mode == "single":
            tw, w = ring.try_write, ring.write
            if phase == "raw":
                for _ in range(n):
                    if not tw(1, payload):
                        w(1, payload)
            else:
                cenc = codec.encode
                for _ in range(n):
                    kind, buf = cenc(rec)
                    if not tw(kind, buf):
                        w(kind, buf)
        else:
            wb = ring.write_batch
            if phase == "raw":
                items = [(1, payload)] * BATCH
                for _ in range(batches):
                    wb(items)
            else:
                eb = codec.encode_bytes
                for _ in range(batches):
                    wb([eb(rec) for _ in range(BATCH)])
    elif transport == "ring-framed":
        ring = endpoint
        lst = [payload] * BATCH if phase == "raw" else [rec] * BATCH
        tw, w = ring.try_write, ring.write
        buf = bytearray(64)
        for _ in range(batches):
            enc.encode_into(lst, buf)
            if not tw(KIND_EVENTS, buf):
                w(KIND_EVENTS, buf)
    elif transport == "pipe":
        send = endpoint.send_bytes
        if mode == "single":
            if phase == "raw":
                for _ in range(n):
                    send(payload)
            else:
                # Into a reused buffer, as the ring's codec.encode does (send_bytes copies it).
                buf, encode_into = bytearray(64), enc.encode_into
                for _ in range(n):
                    encode_into(rec, buf)
                    send(buf)
        else:
            lst = [payload] * BATCH if phase == "raw" else [rec] * BATCH
            for _ in range(batches):
                send(encode(lst))
    elif transport == "queue":
        put = endpoint.put
        if mode == "single":
            for _ in range(n):
                put(payload if phase == "raw" else encode(rec))
        else:
            for _ in range(batches):
                put([payload] * BATCH if phase == "raw" else [encode(rec) for _ in range(BATCH)])
    elif transport == "fifo":
        if mode == "single":
            put = endpoint.put
            for _ in range(n):
                put(payload if phase == "raw" else encode(rec), timeout=60)
        else:
            put_many = endpoint.put_many
            for _ in range(batches):
                put_many([payload] * BATCH if phase == "raw" else [encode(rec) for _ in range(BATCH)], timeout=60)
    return t0


def _throughput(ctx, transport: str, phase: str, mode: str, size: int, n: int) -> dict:
    if mode == "batch":
        n = n // BATCH * BATCH
    ready, result = ctx.Queue(), ctx.Queue()
    cleanup = []
    if transport.startswith("ring"):
        ring = Ring.create(RING_CAPACITY)
        producer_end, child_end = ring, ring.handle()
        cleanup.append(ring.close)
    elif transport == "pipe":
        r, w = ctx.Pipe(duplex=False)
        producer_end, child_end = w, r
        cleanup += [r.close, w.close]
    elif transport == "queue":
        q = ctx.Queue()
        producer_end = child_end = q
        cleanup.append(q.close)
    else:
        q = FastQueue(max_size_bytes=4 * 1024 * 1024)
        producer_end = child_end = q
    p = ctx.Process(target=_consume, args=(transport, child_end, n, phase, mode, ready, result))
    p.start()
    try:
        ready.get(timeout=60)
        if transport.startswith("ring"):
            producer_end.set_peer(sentinel=p.sentinel)
        t0 = _produce(transport, producer_end, n, phase, mode, size)
        t_end, count = result.get(timeout=120)
        p.join(30)
    finally:
        if p.is_alive():
            p.kill()
            p.join()
        p.close()
        for f in cleanup:
            f()
        ready.close()
        result.close()
    seconds = t_end - t0
    return {"messages": count, "seconds": seconds, "msgs_per_s": count / seconds, "mb_per_s": count * size / seconds / 1e6}


# ---- wake-up latency and idle CPU --------------------------------------------------------------


def _latency_consumer(transport: str, endpoint, n: int, ready, result) -> None:
    lat = []
    if transport == "ring":
        ring = Ring.attach(endpoint)
        ready.put(1)
        while len(lat) < n:
            out = ring.read(timeout=30)
            now = time.perf_counter_ns()
            for _, v in out:
                lat.append(now - int.from_bytes(v, "little"))
            del out, v
            ring.release()
        late = ring.late_wakeups
        ring.close()
    else:
        ready.put(1)
        late = 0
        while len(lat) < n:
            data = endpoint.recv_bytes()
            lat.append(time.perf_counter_ns() - int.from_bytes(data, "little"))
    result.put((lat, late))


def _latency(ctx, transport: str, n: int) -> dict:
    ready, result = ctx.Queue(), ctx.Queue()
    if transport == "ring":
        ring = Ring.create(1 << 16)
        child_end = ring.handle()
    else:
        r, w = ctx.Pipe(duplex=False)
        child_end = r
    p = ctx.Process(target=_latency_consumer, args=(transport, child_end, n, ready, result))
    p.start()
    try:
        ready.get(timeout=60)
        time.sleep(0.05)
        for i in range(n):
            # 1-3 ms apart: far longer than the consumer's spin, so every message finds it parked.
            time.sleep(0.001 + (i % 5) * 0.0005)
            stamp = time.perf_counter_ns().to_bytes(8, "little")
            if transport == "ring":
                ring.write(1, stamp)
            else:
                w.send_bytes(stamp)
        lat, late = result.get(timeout=60)
        p.join(30)
    finally:
        if p.is_alive():
            p.kill()
            p.join()
        p.close()
        if transport == "ring":
            ring.close()
        else:
            r.close()
            w.close()
    lat.sort()

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] / 1000

    return {"samples": len(lat), "p50_us": pct(0.50), "p99_us": pct(0.99), "p999_us": pct(0.999), "late_wakeups": late}


def _idle_consumer(handle) -> None:
    ring = Ring.attach(handle)
    try:
        ring.read(timeout=120)
    finally:
        ring.close()


def _idle_producer(handle) -> None:
    ring = Ring.attach(handle)
    try:
        while ring.try_write(1, b"x" * 1000):
            pass
        ring.write(1, b"x" * 1000, timeout=120)  # full, nobody reads: parks
    finally:
        ring.close()


def _idle_cpu(ctx, side: str, seconds: float) -> float:
    """Percent of one core used by a ring side parked with no traffic."""
    ring = Ring.create(1 << 16)
    target = _idle_consumer if side == "consumer" else _idle_producer
    p = ctx.Process(target=target, args=(ring.handle(),))
    p.start()
    try:
        proc = psutil.Process(p.pid)
        time.sleep(0.5)  # past start-up and the spin
        c0 = proc.cpu_times()
        t0 = time.monotonic()
        time.sleep(seconds)
        c1 = proc.cpu_times()
        elapsed = time.monotonic() - t0
        # A side that died (or returned) would read as 0% CPU: only a live, parked one counts.
        if not p.is_alive() or proc.status() == psutil.STATUS_ZOMBIE:
            raise RuntimeError(f"the parked ring {side} exited during the idle measurement (exit code {p.exitcode})")
    finally:
        p.kill()
        p.join()
        p.close()
        ring.close()
    used = (c1.user - c0.user) + (c1.system - c0.system)
    return 100.0 * used / elapsed


# ---- driver ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table and ratios, return the numbers."""
    ap = argparse.ArgumentParser(prog="python -m bench.ring", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer messages and samples (a smoke run)")
    ap.add_argument("--repeat", type=int, default=1, help="run each case N times and keep the median")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    ctx = mp.get_context("forkserver")
    scale = 0.1 if args.quick else 1.0
    transports = ["ring", "pipe", "fifo", "queue"] if FastQueue is not None else ["ring", "pipe", "queue"]
    results: dict = {"throughput": {}, "latency": {}, "idle_cpu_percent": {}}

    print(f"bench.ring: python {sys.version.split()[0]}, {os.cpu_count()} cores, forkserver, "
          f"ring capacity {RING_CAPACITY // 1024} KiB, batch {BATCH}, repeat {args.repeat}")
    print(f"{'case':<26}{'transport':<13}{'msgs/s':>12}{'MB/s':>9}   ratios ring/peer")
    for phase in ("raw", "msgspec"):
        for mode in ("single", "batch"):
            for size in SIZES:
                case = f"{phase} {mode} {size}B"
                names = (["ring", "ring-framed"] if mode == "batch" else ["ring", "ring-1by1"]) + transports[1:]
                runs: dict[str, list[dict]] = {t: [] for t in names}
                # Interleaved repeats: on a shared machine, load drifts; each transport sees the same.
                for _ in range(args.repeat):
                    for t in names:
                        n = max(BATCH * 10, int(COUNTS[mode][t] * scale))
                        runs[t].append(_throughput(ctx, t, phase, mode, size, n))
                rows = {
                    t: {
                        "msgs_per_s": statistics.median(r["msgs_per_s"] for r in rs),
                        "mb_per_s": statistics.median(r["mb_per_s"] for r in rs),
                    }
                    for t, rs in runs.items()
                }
                ring_rate = rows["ring"]["msgs_per_s"]
                ratios = {f"ring/{t}": ring_rate / rows[t]["msgs_per_s"] for t in rows if t != "ring"}
                second = "ring-framed" if mode == "batch" else "ring-1by1"
                ratios.update({f"{second}/{t}": rows[second]["msgs_per_s"] / rows[t]["msgs_per_s"]
                               for t in rows if not t.startswith("ring")})
                results["throughput"][case] = {"rows": rows, "ratios": ratios}
                for t, row in rows.items():
                    print(f"{case:<26}{t:<13}{row['msgs_per_s']:>12,.0f}{row['mb_per_s']:>9.1f}")
                print(f"{'':<26}" + "  ".join(f"{k} {v:.1f}x" for k, v in ratios.items()))

    samples = 300 if args.quick else 2000
    for t in ("ring", "pipe"):
        results["latency"][t] = lat = _latency(ctx, t, samples)
        print(f"wake-up latency, parked consumer, {t:<5}: p50 {lat['p50_us']:.0f} us  p99 {lat['p99_us']:.0f} us  "
              f"p99.9 {lat['p999_us']:.0f} us  ({lat['samples']} samples"
              + (f", {lat['late_wakeups']} caught by the 1 ms re-check)" if t == "ring" else ")"))
    seconds = 1.0 if args.quick else 3.0
    for side in ("consumer", "producer"):
        results["idle_cpu_percent"][side] = pct = _idle_cpu(ctx, side, seconds)
        print(f"idle CPU, ring {side} parked with no traffic: {pct:.2f}% of a core over {seconds:.0f} s")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
