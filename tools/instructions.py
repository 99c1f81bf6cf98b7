"""Instructions per event of our hot paths, counted by valgrind's callgrind: repeatable to a
fraction of a percent whatever else the machine is doing, where timings on the shared 2-core
machine drift by 15% from run to run. For judging a change to a hot path before (and besides)
timing it with `python -m bench`.

    python tools/instructions.py [--what worker session parser] [--events N] [--cache]

Each case runs twice under `valgrind --tool=callgrind`: once building its inputs only, once
building them and processing them; the difference over the number of events is the cost per
event (imports and set-up cancel out). `--cache` also simulates the first-level caches
(`--cache-sim=yes`, about twice as slow) and reports instruction (I1) and data (D1) misses per
event: a miss costs ~10-40 cycles, so a few hundred per event weigh as much as the instructions
themselves, and they are what a leaner footprint per event (fewer objects, less code) saves.
Cases:

- worker:  a pool worker's core (WorkerCore.on_records on decoded KIND_SSE_LIST entries), 1,000
           OpenAI chat streams, one event per read: the shape of bench.e2e (b).
- session: StreamSession.process_events in reads of 64 events: the shape of bench.e2e (a).
- http:    the ingest's read path of a live stream, 1,000 chunked responses, one event per read:
           our chunked decoding, the _Pusher, SSE parsing and the SseBatch encoding (fake
           transports: what the kernel and uvloop cost per read is not in it).
- parser:  SseParser.feed, one event per read.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = ("worker", "session", "http", "parser")
STREAMS = 1000  # worker case: streams read round-robin, one event each per round


def _events(n: int) -> list:
    from bench._data import make_stream
    from pipeline.sse import SseParser

    data = make_stream("openai", (n + 8) * 225, seed=1)
    events = [e for e in SseParser().feed(data) if e.data != b"[DONE]"]
    return events[1 : n + 1]  # the role chunk aside: one content token per event


def _worker_case(n: int) -> Callable[[], None]:
    import msgspec

    from pipeline import PipelineBuilder
    from workers.protocol import SseBatch, StreamOptions, join_batches, options_encoder, sse_list_decoder
    from workers.worker import WorkerCore

    rounds = max(1, n // STREAMS)
    events = _events(rounds)
    pipe = PipelineBuilder().provider("openai-chat").build()
    pipe.registry = None  # as in a pool worker
    core = WorkerCore(pipe, 1)
    options = msgspec.Raw(options_encoder.encode(StreamOptions(0, False, 0, "openai-chat")))

    class _Open:  # the fields WorkerCore.on_open reads
        def __init__(self, sid: int) -> None:
            self.stream_id, self.options, self.dialect = sid, options, "openai-chat"

    for sid in range(STREAMS):
        core.on_open(_Open(sid), 0)
    encode = msgspec.msgpack.Encoder().encode
    entries = []  # ~32 KiB KIND_SSE_LIST entries, as the ingest joins them
    for r in range(rounds):
        run, size = [], 0
        for sid in range(STREAMS):
            payload = encode(SseBatch(sid, r, 1000 + r, [events[r]], 225))
            if size + len(payload) > 32 * 1024:
                entries.append(join_batches(run))
                run, size = [], 0
            run.append(payload)
            size += len(payload)
        entries.append(join_batches(run))

    def process() -> None:
        for entry in entries:
            core.on_records(sse_list_decoder.decode(entry))
            core.outputs.clear()

    process.core = core  # type: ignore[attr-defined]  # for the harness's own test
    return process


def _session_case(n: int) -> Callable[[], None]:
    from pipeline import PipelineBuilder

    events = _events(n)
    reads = [events[i : i + 64] for i in range(0, len(events), 64)]
    session = PipelineBuilder().provider("openai-chat").build().open_stream(1, "openai-chat")

    def process() -> None:
        for i, read in enumerate(reads):
            session.process_events(read, 1000 + i, 16384)

    return process


def _http_case(n: int) -> Callable[[], None]:
    """1,000 HTTP responses in flight, one chunk (one event) per read, read the way the ingest
    reads them: SseResponseHandler.data_received (our chunked decoding) -> _Pusher._direct ->
    HttpStreamHandler._deliver (SSE parsing) -> a sink that encodes the SseBatch as the
    ingest's does. Fake transports: no sockets, no event loop turns."""
    import asyncio

    import msgspec

    from pipeline.chunked import SseResponseHandler
    from pipeline.http import HttpOptions, HttpStreamHandler, _Pusher
    from pipeline.sources import Request
    from pipeline.sse import SseParser
    from workers.protocol import SseBatch

    class _Transport:  # what the response protocol calls on its transport
        def is_closing(self) -> bool:
            return False

        def get_extra_info(self, name: str, default: object = None) -> object:
            return default

        def pause_reading(self) -> None:
            pass

        def resume_reading(self) -> None:
            pass

        def close(self) -> None:
            pass

    rounds = max(1, n // STREAMS)
    events = _events(rounds)
    chunks = [b"%x\r\ndata: %s\n\n\r\n" % (len(e.data) + 8, e.data) for e in events]
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    loop = asyncio.new_event_loop()
    encode = msgspec.msgpack.Encoder().encode
    sent: list[bytes] = []
    request = Request("http://127.0.0.1:1/v1/chat/completions", "POST", {}, b"{}", "openai-chat")
    protocols = []
    tasks: list[asyncio.Task] = []

    async def start() -> None:
        for sid in range(STREAMS):
            proto = SseResponseHandler(loop)
            proto.connection_made(_Transport())
            proto.set_response_params(read_until_eof=False, auto_decompress=True, read_timeout=None,
                                      read_bufsize=2**16, timeout_ceil_threshold=5,
                                      max_line_size=8190, max_field_size=8190)
            proto.data_received(head)
            seq = [0]

            def sink(evs: list, read_ns: int, nbytes: int, sid: int = sid, seq: list = seq) -> bool:
                sent.append(encode(SseBatch(sid, seq[0], read_ns, evs, nbytes)))
                seq[0] += 1
                return True

            handler = HttpStreamHandler(None, request, HttpOptions())  # type: ignore[arg-type]
            pusher = _Pusher(handler, proto.sr_payload, SseParser(), None, sink, loop)
            tasks.append(loop.create_task(pusher.run()))
            protocols.append(proto)
        await asyncio.sleep(0)  # each pusher now waits, installed as its connection's sink

    loop.run_until_complete(start())

    def process() -> None:
        for chunk in chunks:
            for proto in protocols:
                proto.data_received(chunk)

    def close() -> None:
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.close()

    process.sent = sent  # type: ignore[attr-defined]  # for the harness's own test
    process.close = close  # type: ignore[attr-defined]
    return process


def _parser_case(n: int) -> Callable[[], None]:
    from bench._data import make_stream, split_events
    from pipeline.sse import SseParser

    reads = split_events(make_stream("openai", (n + 8) * 225, seed=1))[:n]
    parser = SseParser()

    def process() -> None:
        feed = parser.feed
        for read in reads:
            feed(read)

    return process


def events_of(what: str, n: int) -> int:
    """How many events case `what` processes when asked for about `n`."""
    return max(1, n // STREAMS) * STREAMS if what in ("worker", "http") else n


def child(what: str, n: int, process: bool) -> None:
    """Build case `what`'s inputs and, when `process`, run it (the part callgrind counts)."""
    build = {"worker": _worker_case, "session": _session_case, "http": _http_case, "parser": _parser_case}[what]
    run = build(n)
    if process:
        run()
    close = getattr(run, "close", None)
    if close is not None:  # in both runs: its cost cancels out
        close()


def count(what: str, n: int, process: bool, cache: bool = False) -> dict[str, int]:
    """Events callgrind counts for one child run: `Ir` (instructions) and, with `cache`, `I1mr`
    and `D1mr`/`D1mw` (first-level instruction and data read/write misses)."""
    sim = ["--cache-sim=yes"] if cache else []
    cmd = ["valgrind", "--tool=callgrind", *sim, "--callgrind-out-file=/dev/null", sys.executable, __file__,
           "--child", what, str(n), "1" if process else "0"]
    # A fixed hash seed: str hashes (dict and set layouts) otherwise vary the count run to run.
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    names = re.search(r"Events\s*:\s*(.+)", proc.stderr)
    found = re.search(r"Collected\s*:\s*([\d ,]+)", proc.stderr)
    if proc.returncode != 0 or names is None or found is None:
        raise RuntimeError(f"valgrind failed for {what}: {proc.stderr[-2000:]}")
    return dict(zip(names.group(1).split(), (int(v.replace(",", "")) for v in found.group(1).split())))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", nargs="*", choices=CASES, default=list(CASES))
    ap.add_argument("--events", type=int, default=10_000, help="events per case (default 10,000)")
    ap.add_argument("--cache", action="store_true", help="also count first-level cache misses per event")
    ap.add_argument("--child", nargs=3, metavar=("CASE", "N", "PROCESS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        what, n, process = args.child
        child(what, int(n), process == "1")
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind not found (Debian: apt install valgrind)", file=sys.stderr)
        return 2
    for what in args.what:
        n = events_of(what, args.events)
        full, setup = count(what, args.events, True, args.cache), count(what, args.events, False, args.cache)
        per = {k: (full[k] - setup[k]) / n for k in full}
        line = f"{what:8s} {per['Ir']:10,.0f} instructions per event ({n:,} events)"
        if args.cache:
            line += f"; misses per event: I1 {per['I1mr']:,.0f}, D1 {per['D1mr'] + per['D1mw']:,.0f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
