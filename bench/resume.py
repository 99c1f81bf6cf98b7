"""Benchmark: resuming dropped streams with Last-Event-ID, and ending silent ones on idle_timeout.

Drops: the mock (its own process) sends `retry: 10` and event ids, then closes each stream
abruptly inside an event; the client reconnects with `Last-Event-ID` and the mock continues after
that id. Over N drops (default 100), through `stream_request` in this process and through the
pool (`astream`), it reports the time from the drop (the mock closing the socket) to the resumed
request reaching the mock and to the client holding the first resumed text (p50/p99), and checks
that no text was lost or repeated: the client's text against the mock's seeded expected text and
digest, and the text tokens the mock logged on both connections against the expected count.

Stalls: a stream that goes silent mid-body ends with `idle_timeout`; reported is how long after its
last text the error came, against the configured timeout, and whether the client still holds a
socket to the mock afterwards (psutil net_connections of the reading process).

The peer is the configured wait itself: the mock asks for a 10 ms reconnection time, so a
client can do no better than ~10 ms plus one request round trip.

    python -m bench.resume [--quick] [--drops N] [--idle S]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil

from bench.live import MESSAGES, MODEL, LiveMock, quantile

DIALECT = "openai-chat"
RETRY_MS = 10  # what the mock's drop fault asks for (`retry: 10`)
# The mock keeps 64 streams resumable; more drops in flight than that would make it answer 410.
MAX_IN_FLIGHT = 32


# Paced as a model generates (the drop strikes a live stream): unpaced, 32 streams at once would
# keep the mock's one process busy and time its backlog instead of the client's reconnect.
DROP_TPS = 200.0


def drop_options(seed: int, key: str, tokens: int = 80) -> dict[str, Any]:
    return {"tokens": tokens, "seed": seed, "key": key, "fault": "drop", "tps": DROP_TPS, "jitter": 0.5}


def drop_requests(base_url: str, n: int, tag: str, tokens: int = 80) -> list[Any]:
    """n openai-chat requests the mock drops mid-way (event ids, `retry: 10`)."""
    from pipeline.sources import Request

    return [Request.openai_chat(model=MODEL, messages=MESSAGES, base_url=base_url, api_key="x",
                                mock=drop_options(i, f"{tag}-{i}", tokens)) for i in range(n)]


def expected_text(seed: int, tokens: int = 80) -> tuple[str, int]:
    """The mock's text and text-token count for a clean stream of this seed."""
    from pipeline.testing import expected_stream

    body = {"model": MODEL, "messages": MESSAGES, "stream": True, "mock": {"tokens": tokens, "seed": seed}}
    exp = expected_stream(DIALECT, body)
    return exp.text, exp.text_tokens


def _check_drop(mock: LiveMock, key: str, seed: int, text: str, arrivals: list[int], tokens: int) -> dict[str, Any]:
    """One dropped stream's outcome: exactness and resume timings (ns), from both sides' logs."""
    want, want_tokens = expected_text(seed, tokens)
    child = mock.stream_log(key)  # the key's latest log: the resumed request
    parent = mock.stream_log(child.resumed_from) if child is not None and child.resumed_from else None
    out: dict[str, Any] = {
        "exact": text == want and hashlib.sha256(text.encode()).hexdigest() == hashlib.sha256(want.encode()).hexdigest(),
        "resumed": parent is not None,
        "tokens_logged": (child.text_tokens if child else 0) + (parent.text_tokens if parent else 0),
        "tokens_expected": want_tokens,
    }
    if parent is not None and parent.ended_ns is not None:
        drop = parent.ended_ns
        out["to_request_ns"] = child.started_ns - drop
        # The client's first text sent on the new connection: text of the old one still reaches
        # the caller a little after the drop, but always before the mock sent anything again.
        first_sent = child.event_times_ns[0] if child.event_times_ns else child.started_ns
        after = [t for t in arrivals if t >= first_sent]
        if after:
            out["to_first_text_ns"] = after[0] - drop
            out["sent_to_text_ns"] = after[0] - first_sent
    return out


async def _drops_in_process(mock: LiveMock, n: int, tokens: int) -> list[dict[str, Any]]:
    import aiohttp

    from pipeline import PipelineBuilder

    pipe = PipelineBuilder().provider(DIALECT).http(total_timeout=60).build()
    requests = drop_requests(mock.base_url(), n, f"inproc-{time.monotonic_ns()}", tokens)
    sem = asyncio.Semaphore(MAX_IN_FLIGHT)
    texts: list[str] = [""] * n
    arrivals: list[list[int]] = [[] for _ in range(n)]
    clock = time.monotonic_ns

    async def one(i: int, session: aiohttp.ClientSession) -> None:
        async with sem:
            stream = pipe.stream_request(requests[i], session=session)
            async for tok in stream:
                if getattr(tok, "content", None) and type(tok).__name__ == "Delta":
                    arrivals[i].append(clock())
            texts[i] = stream.result.text if stream.result is not None else ""

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(i, session) for i in range(n)))
    return [_check_drop(mock, _key(r), i, texts[i], arrivals[i], tokens) for i, r in enumerate(requests)]


def _drops_pool(mock: LiveMock, n: int, tokens: int) -> list[dict[str, Any]]:
    from pipeline import PipelineBuilder
    from pipeline.tokens import Delta

    pipe = PipelineBuilder().provider(DIALECT).http(total_timeout=60).build()
    requests = drop_requests(mock.base_url(), n, f"pool-{time.monotonic_ns()}", tokens)
    parts: list[list[str]] = [[] for _ in range(n)]
    arrivals: list[list[int]] = [[] for _ in range(n)]
    clock = time.monotonic_ns

    async def consume(pool: Any) -> None:
        async for i, toks in pool.astream(requests):
            now = clock()
            for tok in toks:
                if type(tok) is Delta and tok.index == 0 and tok.content:
                    parts[i].append(tok.content)
                    arrivals[i].append(now)

    with pipe.pool(workers=1, ingest=1, concurrency=MAX_IN_FLIGHT) as pool:
        asyncio.run(consume(pool))
    return [_check_drop(mock, _key(r), i, "".join(parts[i]), arrivals[i], tokens) for i, r in enumerate(requests)]


def _key(request: Any) -> str:
    import json

    return json.loads(request.body)["mock"]["key"]


def summarize_drops(rows: list[dict[str, Any]]) -> dict[str, Any]:
    to_req = [r["to_request_ns"] / 1e6 for r in rows if "to_request_ns" in r]
    to_text = [r["to_first_text_ns"] / 1e6 for r in rows if "to_first_text_ns" in r]
    sent_text = [r["sent_to_text_ns"] / 1e6 for r in rows if "sent_to_text_ns" in r]
    return {
        "drops": len(rows),
        "resumed": sum(r["resumed"] for r in rows),
        "exact": sum(r["exact"] for r in rows),
        "tokens_match": sum(r["tokens_logged"] == r["tokens_expected"] for r in rows),
        "to_request_p50_ms": quantile(to_req, 0.5),
        "to_request_p99_ms": quantile(to_req, 0.99),
        "to_first_text_p50_ms": quantile(to_text, 0.5),
        "to_first_text_p99_ms": quantile(to_text, 0.99),
        # Of which the mock's pacing gap and the client's read: resumed event sent -> client has it.
        "sent_to_text_p50_ms": quantile(sent_text, 0.5),
        "sent_to_text_p99_ms": quantile(sent_text, 0.99),
    }


# --- stalls ------------------------------------------------------------------------------------


def _client_sockets(pids: list[int], port: int) -> int:
    """Sockets these processes hold to the mock's port (any state)."""
    n = 0
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        n += sum(1 for c in conns if c.raddr and c.raddr.port == port)
    return n


def _stall_request(mock: LiveMock, key: str, stall_s: float) -> Any:
    from pipeline.sources import Request

    return Request.openai_chat(model=MODEL, messages=MESSAGES, base_url=mock.base_url(), api_key="x",
                               mock={"tokens": 40, "seed": 3, "key": key, "fault": f"stall:{stall_s}"})


async def _stall_in_process(mock: LiveMock, idle: float) -> dict[str, Any]:
    import aiohttp

    from pipeline import PipelineBuilder
    from pipeline.tokens import Delta, Error

    pipe = PipelineBuilder().provider(DIALECT).http(idle_timeout=idle, retries=0).build()
    last = err_at = 0
    kind = None
    async with aiohttp.ClientSession() as session:
        stream = pipe.stream_request(_stall_request(mock, f"stall-{time.monotonic_ns()}", idle * 10), session=session)
        async for tok in stream:
            if type(tok) is Delta:
                last = time.monotonic_ns()
            elif type(tok) is Error:
                err_at, kind = time.monotonic_ns(), tok.kind
        sockets = await _settle_sockets([psutil.Process().pid], mock.port)
    return {"kind": kind, "after_s": (err_at - last) / 1e9 if err_at and last else None, "sockets_after": sockets}


def _stall_pool(mock: LiveMock, idle: float) -> dict[str, Any]:
    from pipeline import PipelineBuilder
    from pipeline.tokens import Delta, Error

    pipe = PipelineBuilder().provider(DIALECT).http(idle_timeout=idle, retries=0).build()
    out: dict[str, Any] = {}

    async def consume(pool: Any) -> None:
        last = 0
        async for _, toks in pool.astream([_stall_request(mock, f"pstall-{time.monotonic_ns()}", idle * 10)]):
            now = time.monotonic_ns()
            for tok in toks:
                if type(tok) is Delta:
                    last = now
                elif type(tok) is Error:
                    out["kind"] = tok.kind
                    out["after_s"] = (now - last) / 1e9 if last else None
        out["sockets_after"] = await _settle_sockets(pool.ingest_pids, mock.port)

    with pipe.pool(workers=1, ingest=1) as pool:
        asyncio.run(consume(pool))
    return out


async def _settle_sockets(pids: list[int], port: int, within: float = 2.0) -> int:
    """Sockets still held to `port` after giving a just-closed transport `within` s to go."""
    deadline = time.monotonic() + within
    while True:
        n = _client_sockets(pids, port)
        if n == 0 or time.monotonic() >= deadline:
            return n
        await asyncio.sleep(0.02)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the numbers, return them (for `python -m bench`)."""
    ap = argparse.ArgumentParser(prog="python -m bench.resume", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="20 drops")
    ap.add_argument("--drops", type=int, default=None, help="dropped streams per path (default 100)")
    ap.add_argument("--idle", type=float, default=0.5, help="idle_timeout of the stall case, seconds (default 0.5)")
    args = ap.parse_args(argv)
    n = args.drops or (20 if args.quick else 100)
    tokens = 80
    results: dict[str, Any] = {"retry_ms": RETRY_MS, "idle_timeout_s": args.idle}
    with LiveMock() as mock:
        for path, fn in (("stream_request", lambda: asyncio.run(_drops_in_process(mock, n, tokens))),
                         ("pool", lambda: _drops_pool(mock, n, tokens))):
            try:
                results[f"drops/{path}"] = summarize_drops(fn())
            except Exception as exc:  # noqa: BLE001 - report, carry on with the rest
                results[f"drops/{path}"] = {"failed": f"{type(exc).__name__}: {exc}"}
        for path, fn in (("stream_request", lambda: asyncio.run(_stall_in_process(mock, args.idle))),
                         ("pool", lambda: _stall_pool(mock, args.idle))):
            try:
                results[f"stall/{path}"] = fn()
            except Exception as exc:  # noqa: BLE001
                results[f"stall/{path}"] = {"failed": f"{type(exc).__name__}: {exc}"}
    print(f"Resume after a drop (mock asks retry: {RETRY_MS} ms), {n} drops per path, "
          f"{MAX_IN_FLIGHT} streams in flight at {DROP_TPS:.0f} tokens/s")
    print(f"{'path':<16}{'resumed':>9}{'exact':>7}{'tokens ok':>10}{'drop->request p50/p99 ms':>27}{'drop->text p50/p99 ms':>24}{'sent->text p50/p99':>21}")
    for path in ("stream_request", "pool"):
        r = results[f"drops/{path}"]
        if "failed" in r:
            print(f"{path:<16} failed: {r['failed']}")
            continue
        print(f"{path:<16}{r['resumed']:>5}/{r['drops']:<3}{r['exact']:>5}{r['tokens_match']:>9}"
              f"{r['to_request_p50_ms']:>16.1f} / {r['to_request_p99_ms']:<8.1f}"
              f"{r['to_first_text_p50_ms']:>13.1f} / {r['to_first_text_p99_ms']:<8.1f}"
              f"{r['sent_to_text_p50_ms']:>10.1f} / {r['sent_to_text_p99_ms']:<8.1f}")
    print(f"Stall with idle_timeout={args.idle}s")
    for path in ("stream_request", "pool"):
        r = results[f"stall/{path}"]
        if "failed" in r:
            print(f"{path:<16} failed: {r['failed']}")
            continue
        after = r.get("after_s")
        ratio = after / args.idle if after else float("nan")
        r["ratio_to_timeout"] = ratio
        print(f"{path:<16}ended {r.get('kind')} {after if after is not None else float('nan'):.3f} s after the last text "
              f"({ratio:.2f}x the timeout); sockets to the mock afterwards: {r.get('sockets_after')}")
    return results


if __name__ == "__main__":
    main()
