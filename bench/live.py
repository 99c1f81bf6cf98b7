"""Benchmark: live HTTP streams from the mock provider (its own process) on loopback.

For 100 and 1,000 concurrent openai-chat streams paced at 50 tokens/s each (jittered) and for
1,000 unpaced streams, one token per event, it measures per client:

- tokens/s delivered (text tokens of streams whose text came out exact, over the run's wall time);
- client CPU seconds per 1,000 events: every client process (caller, ingest, workers) from psutil
  `cpu_times` before and after, so a pool cannot look cheap by moving work into its children;
- client-added latency: when the caller got a piece of text minus when the mock sent the event
  that carried it (the mock logs a monotonic send time per event: one clock on this machine),
  p50 and p99 over a sample of streams.

Clients: the pool (`pool.run` and `pool.astream`, I = 1 and 2 ingest processes, one worker),
the official openai SDK's async streaming client, and a single-process aiohttp loop written the
way vLLM's benchmark client reads streams (`async for line in response.content`, strip `data: `,
`json.loads`). On a 2-core machine the mock competes for the cores, so its CPU is reported too.

    python -m bench.live [--quick] [--runs N] [--only CLIENT ...] [--py-spy DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgspec
import psutil

DIALECT = "openai-chat"
MODEL = "mock-model"
MESSAGES = [{"role": "user", "content": "Tell me a story"}]
JITTER = 0.5  # each gap uniform in [0.5, 1.5] x the mean: streams drift apart, as real ones do
LATENCY_SAMPLE = 200  # streams per run whose per-event latency is computed (logs fetched)
CLIENTS = ("ours-run-I1", "ours-run-I2", "ours-astream-I1", "ours-astream-I2", "openai-sdk", "aiohttp-loop")
# Extra pool(...) options from the command line (--linger-ms).
POOL_OPTIONS: dict[str, Any] = {}
# The mock's listen backlog for 1,000 simultaneous connects (see LiveMock).
MOCK_BACKLOG = 4096


@dataclass(frozen=True)
class Config:
    """One load shape: how many concurrent streams, their pacing and length."""

    name: str
    streams: int
    tps: float | None  # tokens/s per stream; None: as fast as the mock can
    tokens: int  # text tokens per stream


def configs(quick: bool) -> list[Config]:
    """Full run: each config takes ~5-10 s per client on an idle 2-core machine. Quick: a smoke run."""
    if quick:
        return [Config("paced-100", 100, 50.0, 60), Config("paced-1000", 1000, 50.0, 40),
                Config("unpaced-1000", 1000, None, 20)]
    # 1,000 streams at 50 tokens/s ask for 50,000 events/s: the mock (~25 us of CPU per event,
    # a third of it the kernel's loopback send) and any client (the aiohttp loop ~26 us) need
    # more than the 2 cores together, so streams run behind their pace and are kept shorter.
    return [Config("paced-100", 100, 50.0, 250), Config("paced-1000", 1000, 50.0, 100),
            Config("unpaced-1000", 1000, None, 60)]


# --- the mock in its own process -------------------------------------------------------------


def _mock_child(conn: Any, seed: int, backlog: int) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # MockProviderServer listens with aiohttp's default backlog of 128: 1,000 clients connecting
    # at once overflow it, and the dropped SYNs are retried after 1, 3, 7, 15 s, which would turn
    # a throughput benchmark into a measure of TCP's retransmission timer. Raised here, in this
    # benchmark's own mock process only (the mock takes no backlog option yet).
    from aiohttp import web

    original = web.TCPSite.__init__

    def init(self: Any, *args: Any, backlog: int = backlog, **kwargs: Any) -> None:
        original(self, *args, backlog=backlog, **kwargs)

    web.TCPSite.__init__ = init  # type: ignore[method-assign]
    from pipeline.testing import serve

    serve(0, seed, on_ready=lambda port: conn.send(port))


class LiveMock:
    """The mock provider in a spawned child process (with a listen backlog fit for 1,000
    simultaneous connects); `with LiveMock() as mock:`."""

    def __init__(self, seed: int = 7, backlog: int = MOCK_BACKLOG) -> None:
        self.seed = seed
        self.backlog = backlog
        self.proc: Any = None
        self.port = 0

    def __enter__(self) -> "LiveMock":
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_mock_child, args=(child, self.seed, self.backlog), name="bench-mock", daemon=True)
        self.proc.start()
        child.close()
        try:
            if not parent.poll(60):
                raise TimeoutError("the mock did not start within 60 s")
            self.port = parent.recv()
        except BaseException:
            self.__exit__()
            raise
        finally:
            parent.close()
        return self

    def __exit__(self, *exc: object) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        proc.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    def stream_log(self, key: str) -> Any:
        """One stream's StreamLog by key (None when the mock no longer has it)."""
        from pipeline.testing import StreamLog

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/mock/streams/{key}", timeout=30) as r:
                return msgspec.json.decode(r.read(), type=StreamLog)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise


# --- what each stream should carry ------------------------------------------------------------


@dataclass
class Expected:
    """Per stream of a config: its text, text tokens, wire events, and per content event the
    end offset of its text in the stream's text and its index among the wire events."""

    texts: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    events: list[int] = field(default_factory=list)
    ends: list[list[int]] = field(default_factory=list)
    content_index: list[list[int]] = field(default_factory=list)


def mock_options(cfg: Config, seed: int, key: str | None = None) -> dict[str, Any]:
    opts: dict[str, Any] = {"tokens": cfg.tokens, "seed": seed}
    if cfg.tps:
        opts.update(tps=cfg.tps, jitter=JITTER)
    if key is not None:
        opts["key"] = key
    return opts


def body_for(cfg: Config, seed: int, key: str | None = None) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, "stream": True, "mock": mock_options(cfg, seed, key)}


def expected_for(cfg: Config, seeds: list[int]) -> Expected:
    """What the mock sends for each seed, from its seeded plan (no server needed)."""
    from pipeline._mock.content import build_plan, parse_options
    from pipeline._mock.dialects import render

    exp = Expected()
    for seed in seeds:
        body = body_for(cfg, seed)
        plan = build_plan(DIALECT, body, parse_options(body, {}), seed)
        events = render(plan)
        pieces = plan.choices[0].text
        ends, acc = [], 0
        for p in pieces:
            acc += len(p.text)
            ends.append(acc)
        exp.texts.append("".join(p.text for p in pieces))
        exp.tokens.append(plan.choices[0].text_tokens)
        exp.events.append(len(events))
        exp.ends.append(ends)
        exp.content_index.append([i for i, e in enumerate(events) if e.content])
    return exp


# --- measuring ---------------------------------------------------------------------------------


def cpu_seconds(pids: list[int]) -> float:
    """user + system CPU seconds of these processes (not their children)."""
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


class Recorder:
    """What a client saw: per stream its text pieces; for sampled streams, (arrival ns, text
    length so far) at each piece."""

    def __init__(self, n: int, sample: set[int]) -> None:
        self.parts: list[list[str]] = [[] for _ in range(n)]
        self.lengths = [0] * n
        self.sample = sample
        self.arrivals: dict[int, list[tuple[int, int]]] = {i: [] for i in sample}
        self.errors: list[str] = []

    def piece(self, i: int, text: str, now: int) -> None:
        self.parts[i].append(text)
        self.lengths[i] += len(text)
        if i in self.sample:
            self.arrivals[i].append((now, self.lengths[i]))


def added_latency(arrivals: list[tuple[int, int]], ends: list[int], indices: list[int], sent: list[int]) -> list[int]:
    """Per content event: the time the caller had its text minus the time the mock sent it (ns).
    Matching by text offset, so a client that merges pieces is measured fairly."""
    out: list[int] = []
    j = 0
    n = len(arrivals)
    for end, idx in zip(ends, indices):
        while j < n and arrivals[j][1] < end:
            j += 1
        if j == n or idx >= len(sent):
            break
        out.append(arrivals[j][0] - sent[idx])
    return out


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(round(q * (len(values) - 1)))))
    return values[k]


# --- the clients -------------------------------------------------------------------------------


def _run_loop(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


async def _aiohttp_loop(mock: LiveMock, cfg: Config, seeds: list[int], keys: list[str], rec: Recorder) -> None:
    """vLLM benchmark_serving's way: one session, per request `async for line in response.content`,
    strip `data: `, json.loads, take choices[0].delta.content."""
    import aiohttp

    clock = time.monotonic_ns

    async def one(i: int, session: aiohttp.ClientSession) -> None:
        async with session.post(mock.url(), json=body_for(cfg, seeds[i], keys[i])) as response:
            if response.status != 200:
                rec.errors.append(f"HTTP {response.status}")
                return
            async for chunk_bytes in response.content:
                chunk_bytes = chunk_bytes.strip()
                if not chunk_bytes:
                    continue
                chunk = chunk_bytes.decode("utf-8").removeprefix("data: ")
                if chunk == "[DONE]":
                    continue
                data = json.loads(chunk)
                if choices := data.get("choices"):
                    content = choices[0]["delta"].get("content")
                    if content:
                        rec.piece(i, content, clock())

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        results = await asyncio.gather(*(one(i, session) for i in range(len(seeds))), return_exceptions=True)
    rec.errors += [repr(r) for r in results if isinstance(r, BaseException)]


async def _openai_sdk(mock: LiveMock, cfg: Config, seeds: list[int], keys: list[str], rec: Recorder) -> None:
    import httpx
    import openai

    clock = time.monotonic_ns
    limits = httpx.Limits(max_connections=cfg.streams + 16, max_keepalive_connections=cfg.streams + 16)
    http = openai.DefaultAsyncHttpxClient(limits=limits)
    client = openai.AsyncOpenAI(base_url=mock.base_url(), api_key="x", max_retries=0, http_client=http, timeout=600.0)

    async def one(i: int) -> None:
        stream = await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, extra_body={"mock": mock_options(cfg, seeds[i], keys[i])})
        async for chunk in stream:
            if chunk.choices:
                content = chunk.choices[0].delta.content
                if content:
                    rec.piece(i, content, clock())

    async with client:
        results = await asyncio.gather(*(one(i) for i in range(len(seeds))), return_exceptions=True)
    rec.errors += [repr(r) for r in results if isinstance(r, BaseException)]


def _requests(mock: LiveMock, cfg: Config, seeds: list[int], keys: list[str]) -> list[Any]:
    from pipeline.sources import Request

    return [Request.openai_chat(model=MODEL, messages=MESSAGES, base_url=mock.base_url(), api_key="x",
                                mock=mock_options(cfg, s, k)) for s, k in zip(seeds, keys)]


def _pool_client(mode: str, ingest: int, mock: LiveMock, cfg: Config, seeds: list[int], keys: list[str],
                 rec: Recorder, measure: Callable[[list[int]], Any], profile: Path | None) -> Any:
    """Run the pool's `run` or `astream` over the streams; measure() brackets the run with the
    pool's pids (processes started and warmed up before it)."""
    from pipeline import PipelineBuilder
    from pipeline.tokens import Delta, Error

    pipe = PipelineBuilder().provider(DIALECT).build()
    sources = _requests(mock, cfg, seeds, keys)
    warm = _requests(mock, Config("warm", 2, None, 4), [1, 2], [f"{keys[0]}-warm{i}" for i in range(2)])
    clock = time.monotonic_ns
    with pipe.pool(workers=1, ingest=ingest, concurrency=max(cfg.streams, 2), **POOL_OPTIONS) as pool:
        list(pool.run(warm))  # children imported, code paths warm, before the CPU snapshot
        pids = [psutil.Process().pid, *pool.ingest_pids, *pool.worker_pids]
        measure.roles = {"caller": pids[:1], "ingest": list(pool.ingest_pids), "workers": list(pool.worker_pids)}  # type: ignore[attr-defined]
        spies = [] if profile is None else [
            _start_py_spy(pool.ingest_pids[0], profile),
            _start_py_spy(pool.worker_pids[0], profile.with_name(profile.name.replace("ingest-", "worker-", 1))),
        ]
        try:
            with measure(pids):
                if mode == "run":
                    for r in pool.run(sources):
                        if r.error is not None:
                            rec.errors.append(f"{r.error.kind}: {r.error.message}")
                        rec.piece(r.source_index, r.text, clock())
                else:
                    async def consume() -> None:
                        async for i, tokens in pool.astream(sources):
                            now = clock()
                            for tok in tokens:
                                if type(tok) is Delta:
                                    if tok.index == 0 and tok.content:
                                        rec.piece(i, tok.content, now)
                                elif type(tok) is Error:
                                    rec.errors.append(f"{tok.kind}: {tok.message}")

                    _run_loop(consume())
        finally:
            for spy in spies:
                if spy is not None:
                    _stop_py_spy(spy)


def _start_py_spy(pid: int, out: Path) -> subprocess.Popen | None:
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--format", "raw", "--rate", "250",
                                 "--nonblocking", "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except FileNotFoundError:
        print("py-spy not found: no profile", file=sys.stderr)
        return None


def _stop_py_spy(proc: subprocess.Popen) -> None:
    import signal

    proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class _Measure:
    """Context manager recording wall time and the CPU of `pids` and of the mock."""

    def __init__(self, mock_pid: int) -> None:
        self.mock_pid = mock_pid
        self.wall = self.cpu = self.mock_cpu = 0.0
        self._pids: list[int] = []
        self.roles: dict[str, list[int]] = {}  # CPU split by process role (the pool's caller, ingest, workers)
        self.split: dict[str, float] = {}

    def __call__(self, pids: list[int]) -> "_Measure":
        self._pids = pids
        return self

    def __enter__(self) -> "_Measure":
        self._split0 = {role: cpu_seconds(pids) for role, pids in self.roles.items()}
        self._c0 = cpu_seconds(self._pids)
        self._m0 = cpu_seconds([self.mock_pid])
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._t0
        self.cpu = cpu_seconds(self._pids) - self._c0
        self.mock_cpu = cpu_seconds([self.mock_pid]) - self._m0
        self.split = {role: cpu_seconds(pids) - self._split0[role] for role, pids in self.roles.items()}


def run_client(name: str, mock: LiveMock, cfg: Config, exp: Expected, seeds: list[int], tag: str,
               profile_dir: Path | None) -> dict[str, Any]:
    """One client over one config; its numbers."""
    n = cfg.streams
    keys = [f"{tag}-{i}" for i in range(n)]
    step = max(1, n // LATENCY_SAMPLE)
    sample = set(range(0, n, step))
    rec = Recorder(n, sample)
    meas = _Measure(mock.pid)
    me = [psutil.Process().pid]
    profile = profile_dir / f"ingest-{name}-{cfg.name}.txt" if profile_dir is not None and name.startswith("ours") else None
    if name.startswith("ours-"):
        _, mode, i = name.split("-")
        _pool_client(mode, int(i[1:]), mock, cfg, seeds, keys, rec, meas, profile)
    else:
        fn = {"openai-sdk": _openai_sdk, "aiohttp-loop": _aiohttp_loop}[name]

        async def warm_then_run() -> None:
            wcfg = Config("warm", 2, None, 4)
            await fn(mock, wcfg, [1, 2], [f"{tag}-warm{i}" for i in range(2)], Recorder(2, set()))
            with meas(me):
                await fn(mock, cfg, seeds, keys, rec)

        _run_loop(warm_then_run())
    texts = ["".join(p) for p in rec.parts]
    exact = [i for i in range(n) if texts[i] == exp.texts[i]]
    tokens = sum(exp.tokens[i] for i in exact)
    events = sum(exp.events)
    lat: list[int] = []
    if not name.startswith("ours-run"):  # run() hands over whole results, not tokens
        for i in sorted(sample):
            log = mock.stream_log(keys[i])
            if log is None or i not in exact:
                continue
            lat += added_latency(rec.arrivals[i], exp.ends[i], exp.content_index[i], log.event_times_ns)
    row: dict[str, Any] = {
        "streams": n,
        "exact": len(exact),
        "errors": rec.errors[:5],
        "wall_s": meas.wall,
        "tokens_per_s": tokens / meas.wall if meas.wall else 0.0,
        "events": events,
        "client_cpu_s": meas.cpu,
        "cpu_s_per_1k_events": meas.cpu / (events / 1000) if events else float("nan"),
        "mock_cpu_s": meas.mock_cpu,
        "cpu_split_s_per_1k_events": {k: v / (events / 1000) for k, v in meas.split.items()} if events else {},
        "latency_samples": len(lat),
        "latency_p50_ms": quantile(lat, 0.50) / 1e6 if lat else None,
        "latency_p99_ms": quantile(lat, 0.99) / 1e6 if lat else None,
    }
    if profile is not None:
        row["py_spy_profile"] = str(profile)
    return row


# --- the table ---------------------------------------------------------------------------------


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None or v != v else format(v, spec)


def print_table(results: dict[str, dict[str, Any]], out: Callable[[str], None] = print) -> None:
    out(f"{'config':<14}{'client':<17}{'tok/s':>9}{'cpu s/1k ev':>12}{'lat p50 ms':>11}{'p99 ms':>8}"
        f"{'exact':>7}{'wall s':>8}{'mock cpu':>9}")
    for cfg, rows in results.items():
        for client, r in rows.items():
            if "failed" in r:
                out(f"{cfg:<14}{client:<17} failed: {r['failed']}")
                continue
            out(f"{cfg:<14}{client:<17}{r['tokens_per_s']:>9,.0f}{r['cpu_s_per_1k_events']:>12.4f}"
                f"{_fmt(r['latency_p50_ms'], '.2f'):>11}{_fmt(r['latency_p99_ms'], '.2f'):>8}"
                f"{r['exact']:>4}/{r['streams']:<4}{r['wall_s']:>6.1f}{r['mock_cpu_s']:>9.1f}")


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per config: peer CPU per event / ours (best of our clients), so > 1 means we are cheaper."""
    out: dict[str, dict[str, float]] = {}
    for cfg, rows in results.items():
        ours = [r["cpu_s_per_1k_events"] for c, r in rows.items() if c.startswith("ours") and "failed" not in r]
        if not ours:
            continue
        best = min(ours)
        out[cfg] = {f"cpu {peer}/ours": rows[peer]["cpu_s_per_1k_events"] / best
                    for peer in ("openai-sdk", "aiohttp-loop") if peer in rows and "failed" not in rows[peer]}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, return the numbers (for `python -m bench`)."""
    ap = argparse.ArgumentParser(prog="python -m bench.live", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short streams (a ~30 s smoke run)")
    ap.add_argument("--runs", type=int, default=1, help="runs per cell; the table shows medians (default 1)")
    ap.add_argument("--only", nargs="*", choices=CLIENTS, default=None, help="clients to run (default all)")
    ap.add_argument("--configs", nargs="*", default=None, help="configs to run by name (default all)")
    ap.add_argument("--linger-ms", type=float, default=None,
                    help="the pool's linger_ms (default: the pool's own; 0 turns lingering off)")
    ap.add_argument("--py-spy", metavar="DIR", type=Path, default=None,
                    help="record a py-spy profile of the (first) ingest process of each pool run into DIR")
    args = ap.parse_args(argv)
    if args.linger_ms is not None:
        POOL_OPTIONS["linger_ms"] = args.linger_ms
    clients = args.only or list(CLIENTS)
    if args.quick and args.only is None:
        clients = ["ours-run-I1", "ours-astream-I1", "openai-sdk", "aiohttp-loop"]
    cfgs = [c for c in configs(args.quick) if args.configs is None or c.name in args.configs]
    results: dict[str, dict[str, Any]] = {}
    with LiveMock() as mock:
        for ci, cfg in enumerate(cfgs):
            seeds = [ci * 100_000 + i for i in range(cfg.streams)]
            exp = expected_for(cfg, seeds)
            rows: dict[str, Any] = {}
            # Clients take turns run by run (A B A B ...), so the machine's drift over the
            # minutes of a config falls on every client alike, not on whichever ran last.
            runs_of: dict[str, list[dict[str, Any]]] = {c: [] for c in clients}
            for run in range(args.runs):
                for client in clients:
                    runs = runs_of[client]
                    if runs and "failed" in runs[-1]:
                        continue
                    tag = f"{cfg.name}-{client}-{run}"
                    try:
                        runs.append(run_client(client, mock, cfg, exp, seeds, tag, args.py_spy))
                    except Exception as exc:  # noqa: BLE001 - one client failing must not hide the rest
                        runs.append({"failed": f"{type(exc).__name__}: {exc}"})
            for client in clients:
                rows[client] = _median_row(runs_of[client])
                r = rows[client]
                print(f"  {cfg.name} {client}: " + (r["failed"] if "failed" in r else
                      f"{r['tokens_per_s']:,.0f} tok/s, {r['cpu_s_per_1k_events']:.4f} cpu s/1k ev, "
                      f"p99 {_fmt(r['latency_p99_ms'], '.2f')} ms, exact {r['exact']}/{r['streams']}"
                      + ("".join(f", {k} {v:.4f}" for k, v in r.get("cpu_split_s_per_1k_events", {}).items()))), flush=True)
            results[cfg.name] = rows
    print()
    print(f"Live HTTP, mock in its own process on loopback, openai-chat, 1 token/event, jitter {JITTER}; "
          f"pool workers=1; medians of {args.runs} run(s)")
    print_table(results)
    rat = ratios(results)
    for cfg, r in rat.items():
        print(f"{cfg}: " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items()))
    return {"runs": args.runs, "quick": args.quick, "results": results, "ratios": rat}


def _median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "failed" not in r]
    if not ok:
        return runs[-1]
    if len(ok) == 1:
        return ok[0]
    row = dict(ok[0])
    for k, v in ok[0].items():
        if isinstance(v, float):
            vals = [r[k] for r in ok if r.get(k) is not None]
            row[k] = statistics.median(vals) if vals else None
    return row


if __name__ == "__main__":
    main()
