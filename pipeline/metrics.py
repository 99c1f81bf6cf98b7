"""Stream metrics: per-stream counters and latencies, and a per-process registry that merges exactly.

`StreamMetrics` is fed by the per-stream logic with the monotonic time of each network read
(`read_ns`), never with a clock read of its own, so time to first token and inter-token latency
are measured from the read, wherever the tokens are processed. Its `snapshot()` is a msgspec
Struct that crosses processes with the StreamResult. `MetricsRegistry` folds finished streams'
snapshots into counters and HDR histograms (the `hdrhistogram` package); its snapshot encodes the
histograms, so registries of several processes merge without losing precision.

Cost: per read a few attribute updates and, for inter-token latency, one dict increment keyed by
the value rounded to the HDR bucket it falls in (3 significant figures), not an HDR record (about
1.4 us each in pure Python). The registry converts those buckets once per stream, exactly.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable
from typing import Any

import msgspec
from hdrh.histogram import HdrHistogram

from .tokens import Delta, Error, FunctionCall, Reasoning, Refusal, Text, ToolCall

__all__ = [
    "HISTOGRAM_METRICS",
    "MetricsRegistry",
    "MetricsSnapshot",
    "MetricSummary",
    "StreamMetrics",
    "StreamMetricsSnapshot",
]

# A gap between two reads longer than this counts as a stall: well above normal inter-token
# latency (20-100 ms) and read jitter, well below the usual idle timeouts (30-60 s).
DEFAULT_STALL_THRESHOLD_NS = 1_000_000_000

# HDR layout shared by the per-stream buckets and the registry's histograms: 3 significant figures
# (2048 sub-buckets: values under 2048 exact, above that the top 11 bits kept, error < 0.1%), and
# values up to one hour in ns. Larger values are clamped to the top (a stream is not an hour apart).
_SIG_FIGS = 3
_SUB_BITS = 11
# ITL samples a stream gathers (16 bytes each) before they are bucketed (StreamMetrics._fold).
_FOLD_SAMPLES = 4096
_HIGHEST = 3_600_000_000_000


def _bucket(v: int) -> int:
    """The lowest value of the HDR bucket holding `v` (same layout as HdrHistogram(1, _HIGHEST, 3))."""
    shift = v.bit_length() - _SUB_BITS
    return v if shift <= 0 else (v >> shift) << shift


def _bucket_high(low: int) -> int:
    """The highest value of the bucket whose lowest value is `low` (what HDR reports for a percentile)."""
    shift = low.bit_length() - _SUB_BITS
    return low if shift <= 0 else low + (1 << shift) - 1


def _ms(ns: int | None) -> float | None:
    return None if ns is None else ns / 1e6


class StreamMetricsSnapshot(msgspec.Struct, omit_defaults=True):
    """One stream's metrics, JSON-friendly (times in milliseconds; None when not measured).

    `ttft_ms` is from `start` to the first output token of any kind, `ttft_content_ms` to the first
    non-empty text; `itl_*` are per token, a read carrying n tokens counting its interval as n
    intervals of 1/n; `itl_histogram` maps HDR bucket (lowest value, ns) to count, so a registry
    in another process aggregates inter-token latency exactly.
    """

    tokens: int = 0
    chunks: int = 0
    bytes: int = 0
    errors: int = 0
    stalls: int = 0
    ttft_ms: float | None = None
    ttft_content_ms: float | None = None
    ttfb_ms: float | None = None
    e2e_ms: float | None = None
    tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    avg_chunk_bytes: float | None = None
    avg_tokens_per_chunk: float | None = None
    itl_mean_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p90_ms: float | None = None
    itl_p99_ms: float | None = None
    itl_min_ms: float | None = None
    itl_max_ms: float | None = None
    stall_ms: float = 0.0
    max_gap_ms: float | None = None
    error_kind: str | None = None
    itl_histogram: dict[int, int] | None = None


def _percentile_of_buckets(items: list[tuple[int, int]], total: int, pct: float) -> int:
    # HDR's rule: the first bucket whose cumulative count reaches round(pct% of total), at least 1.
    target = max(1, int(pct * total / 100 + 0.5))
    acc = 0
    for low, count in items:
        acc += count
        if acc >= target:
            return _bucket_high(low)
    return _bucket_high(items[-1][0])


class StreamMetrics:
    """Counters and latencies of one stream, fed with the read time of each chunk (sans-I/O)."""

    __slots__ = (
        "_clock_ns",
        "stall_threshold_ns",
        "start_ns",
        "end_ns",
        "first_read_ns",
        "last_read_ns",
        "chunks",
        "bytes",
        "tokens",
        "errors",
        "error_kind",
        "stalls",
        "stall_ns",
        "max_gap_ns",
        "first_token_ns",
        "first_content_ns",
        "last_token_ns",
        "first_read_tokens",
        "itl_count",
        "itl_sum_ns",
        "itl_min_ns",
        "itl_max_ns",
        "_itl",
        "_itl_per",
        "_itl_n",
    )

    def __init__(
        self,
        clock_ns: Callable[[], int] = time.monotonic_ns,
        stall_threshold_ns: int = DEFAULT_STALL_THRESHOLD_NS,
    ) -> None:
        self._clock_ns = clock_ns
        self.stall_threshold_ns = stall_threshold_ns
        self.start_ns: int | None = None
        self.end_ns: int | None = None
        self.first_read_ns: int | None = None
        self.last_read_ns: int | None = None
        self.chunks = 0
        self.bytes = 0
        self.tokens = 0
        self.errors = 0
        self.error_kind: str | None = None
        self.stalls = 0
        self.stall_ns = 0
        self.max_gap_ns: int | None = None
        self.first_token_ns: int | None = None
        self.first_content_ns: int | None = None
        self.last_token_ns: int | None = None
        self.first_read_tokens = 0
        self.itl_count = 0
        self.itl_sum_ns = 0
        self.itl_min_ns: int | None = None
        self.itl_max_ns: int | None = None
        self._itl: dict[int, int] = {}
        self._itl_per = array("q")  # ITL per read (ns) and its token count, not yet in _itl
        self._itl_n = array("q")

    @staticmethod
    def noop() -> "NoopStreamMetrics":
        """A stand-in with the same methods that records nothing (metrics off)."""
        return _NOOP

    def start(self, read_ns: int | None = None) -> None:
        """The request started (time to first token counts from here); default: the clock now."""
        self.start_ns = self._clock_ns() if read_ns is None else read_ns

    def finish(self, read_ns: int | None = None) -> None:
        """The stream ended (end-to-end time counts to here); default: the clock now."""
        self.end_ns = self._clock_ns() if read_ns is None else read_ns

    def on_chunk(self, nbytes: int, read_ns: int) -> None:
        """One read (or event batch) of `nbytes` arrived at monotonic `read_ns`."""
        self.chunks += 1
        self.bytes += nbytes
        last = self.last_read_ns
        if last is None:
            self.first_read_ns = read_ns
        else:
            gap = read_ns - last
            if self.max_gap_ns is None or gap > self.max_gap_ns:
                self.max_gap_ns = gap
            if gap > self.stall_threshold_ns:
                self.stalls += 1
                self.stall_ns += gap
        self.last_read_ns = read_ns

    def on_error(self, kind: str | None = None) -> None:
        """Count an error that did not arrive as an Error token."""
        self.errors += 1
        if kind is not None and self.error_kind is None:
            self.error_kind = kind

    def on_tokens(self, tokens: list[Any], read_ns: int) -> None:
        """The StreamTokens produced from the read at `read_ns`: counts output tokens (token ids
        when a Delta carries them, else one per output-carrying token) and their latencies."""
        n = 0
        content = False
        for tok in tokens:
            tt = type(tok)
            if tt is Delta:
                ids = tok.token_ids
                if ids:
                    n += len(ids)
                elif tok.content:
                    n += 1
                if tok.content:
                    content = True
            elif tt is Text:
                if tok.content:
                    n += 1
                    content = True
            elif tt is Reasoning or tt is Refusal:
                if tok.content:
                    n += 1
            elif tt is ToolCall or tt is FunctionCall:
                if tok.arguments or tok.name:
                    n += 1
            elif tt is Error:
                self.errors += 1
                if self.error_kind is None:
                    self.error_kind = tok.kind
        if content and self.first_content_ns is None:
            self.first_content_ns = read_ns
        if not n:
            return
        last = self.last_token_ns
        if last is None:
            # The first read's tokens have no inter-token interval: their wait is TTFT.
            self.first_token_ns = read_ns
            self.first_read_tokens = n
        else:
            interval = read_ns - last
            if interval < 0:
                interval = 0
            per = interval // n
            self.itl_count += n
            self.itl_sum_ns += interval
            if self.itl_max_ns is None or per > self.itl_max_ns:
                self.itl_max_ns = per
            if self.itl_min_ns is None or per < self.itl_min_ns:
                self.itl_min_ns = per
            # Bucketed later, in bulk (_fold): per read, two appends to flat arrays touch far
            # less memory than a dict that grows by a key for nearly every read (3 significant
            # figures), and this runs once per read on a pool worker's hot path.
            per_read = self._itl_per
            per_read.append(per)
            self._itl_n.append(n)
            if len(per_read) >= _FOLD_SAMPLES:
                self._fold()
        self.last_token_ns = read_ns
        self.tokens += n

    def _fold(self) -> None:
        """Move the ITL samples gathered per read into the bucket counts."""
        itl = self._itl
        get = itl.get
        bits = _SUB_BITS
        for per, n in zip(self._itl_per, self._itl_n):
            shift = per.bit_length() - bits
            key = per if shift <= 0 else (per >> shift) << shift
            itl[key] = get(key, 0) + n
        del self._itl_per[:], self._itl_n[:]

    def snapshot(self) -> StreamMetricsSnapshot:
        """The stream's metrics so far, as a JSON-friendly Struct."""
        if self._itl_per:
            self._fold()
        start = self.start_ns if self.start_ns is not None else self.first_read_ns
        end = self.end_ns if self.end_ns is not None else self.last_read_ns
        e2e = None if start is None or end is None else max(0, end - start)
        snap = StreamMetricsSnapshot(
            tokens=self.tokens,
            chunks=self.chunks,
            bytes=self.bytes,
            errors=self.errors,
            stalls=self.stalls,
            stall_ms=self.stall_ns / 1e6,
            error_kind=self.error_kind,
        )
        if start is not None:
            if self.first_token_ns is not None:
                snap.ttft_ms = (self.first_token_ns - start) / 1e6
            if self.first_content_ns is not None:
                snap.ttft_content_ms = (self.first_content_ns - start) / 1e6
            if self.first_read_ns is not None:
                snap.ttfb_ms = (self.first_read_ns - start) / 1e6
        if e2e is not None:
            snap.e2e_ms = e2e / 1e6
            if e2e > 0:
                snap.tokens_per_s = self.tokens * 1e9 / e2e
        if self.chunks:
            snap.avg_chunk_bytes = self.bytes / self.chunks
            snap.avg_tokens_per_chunk = self.tokens / self.chunks
        snap.max_gap_ms = _ms(self.max_gap_ns)
        if self.itl_count:
            snap.itl_mean_ms = self.itl_sum_ns / self.itl_count / 1e6
            if self.itl_sum_ns > 0:
                snap.decode_tokens_per_s = self.itl_count * 1e9 / self.itl_sum_ns
            items = sorted(self._itl.items())
            total = self.itl_count
            snap.itl_p50_ms = _percentile_of_buckets(items, total, 50.0) / 1e6
            snap.itl_p90_ms = _percentile_of_buckets(items, total, 90.0) / 1e6
            snap.itl_p99_ms = _percentile_of_buckets(items, total, 99.0) / 1e6
            snap.itl_min_ms = _ms(self.itl_min_ns)
            snap.itl_max_ms = _ms(self.itl_max_ns)
            snap.itl_histogram = dict(items)
        return snap


class NoopStreamMetrics:
    """StreamMetrics with metrics off: every method does nothing, `snapshot()` is None."""

    __slots__ = ()

    def start(self, read_ns: int | None = None) -> None:
        pass

    def finish(self, read_ns: int | None = None) -> None:
        pass

    def on_chunk(self, nbytes: int, read_ns: int) -> None:
        pass

    def on_tokens(self, tokens: list[Any], read_ns: int) -> None:
        pass

    def on_error(self, kind: str | None = None) -> None:
        pass

    def snapshot(self) -> None:
        return None


_NOOP = NoopStreamMetrics()


# --- per-process aggregation --------------------------------------------------------------------

# name -> (unit of the summary, divisor from the recorded integer to that unit).
# Times are recorded in ns; tokens/s in milli-tokens per second (HDR records integers).
HISTOGRAM_METRICS: dict[str, tuple[str, float]] = {
    "ttft": ("ms", 1e6),
    "ttft_content": ("ms", 1e6),
    "itl": ("ms", 1e6),
    "e2e": ("ms", 1e6),
    "tokens_per_s": ("tokens/s", 1e3),
}
_COUNTERS = ("streams", "tokens", "chunks", "bytes", "errors", "stalls", "failed_streams")


class HistogramData(msgspec.Struct):
    """One metric's distribution: exact count, sum, min and max, and the HDR histogram (encoded)."""

    count: int = 0
    sum: int = 0
    min: int | None = None
    max: int | None = None
    hdr: str | None = None


class MetricSummary(msgspec.Struct):
    """Summary of one metric, in `unit`."""

    unit: str
    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p95: float | None
    p99: float | None
    min: float | None
    max: float | None


class MetricsSnapshot(msgspec.Struct):
    """A registry's state: counters and encoded histograms; merges exactly with another."""

    counters: dict[str, int] = msgspec.field(default_factory=dict)
    errors_by_kind: dict[str, int] = msgspec.field(default_factory=dict)
    finish: dict[str, int] = msgspec.field(default_factory=dict)
    histograms: dict[str, HistogramData] = msgspec.field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per metric {unit, count, mean, p50, p90, p95, p99, min, max} (see MetricsRegistry)."""
        return MetricsRegistry.from_snapshot(self).summary()


class _Hist:
    """A registry histogram: HDR counts plus exact count, sum, min and max."""

    __slots__ = ("hdr", "pending", "count", "sum", "min", "max")

    def __init__(self) -> None:
        self.hdr: HdrHistogram | None = None  # made on first use: ~0.2 ms and 270 KB each
        # Bucket counts not yet in `hdr`: the package's record_value costs ~1.4 us in Python, so
        # per-stream buckets are summed here (a dict add) and recorded once per distinct bucket
        # when the histogram is read. Keys are HDR bucket lows, so the dict stays bounded.
        self.pending: dict[int, int] = {}
        self.count = 0
        self.sum = 0
        self.min: int | None = None
        self.max: int | None = None

    def _h(self) -> HdrHistogram:
        if self.hdr is None:
            self.hdr = HdrHistogram(1, _HIGHEST, _SIG_FIGS)
        return self.hdr

    def record(self, value: int, count: int = 1) -> None:
        if value < 0:
            value = 0
        self._h().record_value(min(value, _HIGHEST), count)
        self.count += count
        self.sum += value * count
        if self.min is None or value < self.min:
            self.min = value
        if self.max is None or value > self.max:
            self.max = value

    def record_buckets(self, buckets: dict[int, int], count: int, total: int, lo: int | None, hi: int | None) -> None:
        # Bucket keys are HDR lowest-equivalent values: recording them lands in the same bucket.
        pending = self.pending
        get = pending.get
        for low, c in buckets.items():
            pending[low] = get(low, 0) + c
        self.count += count
        self.sum += total
        if lo is not None and (self.min is None or lo < self.min):
            self.min = lo
        if hi is not None and (self.max is None or hi > self.max):
            self.max = hi

    def _flush(self) -> None:
        if self.pending:
            h = self._h()
            for low, c in self.pending.items():
                h.record_value(min(low, _HIGHEST), c)
            self.pending.clear()

    def merge(self, data: HistogramData) -> None:
        if not data.count:
            return  # NOTE: HdrHistogram.add of an empty histogram would reset our min to 0
        if data.hdr is not None:
            self._h().decode_and_add(data.hdr)
        self.count += data.count
        self.sum += data.sum
        if data.min is not None and (self.min is None or data.min < self.min):
            self.min = data.min
        if data.max is not None and (self.max is None or data.max > self.max):
            self.max = data.max

    def data(self) -> HistogramData:
        self._flush()
        hdr = None
        if self.hdr is not None and self.count:
            blob = self.hdr.encode()
            hdr = blob.decode("ascii") if isinstance(blob, bytes) else blob
        return HistogramData(self.count, self.sum, self.min, self.max, hdr)

    def summary(self, unit: str, div: float) -> dict[str, Any]:
        self._flush()
        if not self.count or self.hdr is None:
            return dict(unit=unit, count=0, mean=None, p50=None, p90=None, p95=None, p99=None, min=None, max=None)
        pct = self.hdr.get_percentile_to_value_dict([50.0, 90.0, 95.0, 99.0])
        return dict(
            unit=unit,
            count=self.count,
            mean=self.sum / self.count / div,
            p50=pct[50.0] / div,
            p90=pct[90.0] / div,
            p95=pct[95.0] / div,
            p99=pct[99.0] / div,
            min=None if self.min is None else self.min / div,
            max=None if self.max is None else self.max / div,
        )


def _ns(ms: float | None) -> int | None:
    return None if ms is None else int(round(ms * 1e6))


class MetricsRegistry:
    """Per-process aggregate of finished streams: counters and mergeable HDR histograms."""

    def __init__(self) -> None:
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self.errors_by_kind: dict[str, int] = {}
        self.finish: dict[str, int] = {}
        self._hists: dict[str, _Hist] = {name: _Hist() for name in HISTOGRAM_METRICS}

    def record(self, snapshot: StreamMetricsSnapshot | StreamMetrics | None, result: Any = None) -> None:
        """Fold one finished stream in (its snapshot, or the live StreamMetrics); `result`, a
        StreamResult, adds its outcome (finish, error kind) when given."""
        if snapshot is None:
            return
        if isinstance(snapshot, StreamMetrics):
            snapshot = snapshot.snapshot()
        s = snapshot
        c = self.counters
        c["streams"] += 1
        c["tokens"] += s.tokens
        c["chunks"] += s.chunks
        c["bytes"] += s.bytes
        c["errors"] += s.errors
        c["stalls"] += s.stalls
        kind = s.error_kind
        err = getattr(result, "error", None)
        if err is not None and kind is None:
            kind = getattr(err, "kind", None)
        if kind is not None or err is not None:
            c["failed_streams"] += 1
            k = kind or "unknown"
            self.errors_by_kind[k] = self.errors_by_kind.get(k, 0) + 1
        fin = getattr(result, "finish", None)
        if fin is not None:
            self.finish[fin] = self.finish.get(fin, 0) + 1
        h = self._hists
        for name, value in (("ttft", s.ttft_ms), ("ttft_content", s.ttft_content_ms), ("e2e", s.e2e_ms)):
            v = _ns(value)
            if v is not None:
                h[name].record(v)
        if s.tokens_per_s is not None:
            h["tokens_per_s"].record(int(round(s.tokens_per_s * 1000)))
        if s.itl_histogram:
            count = sum(s.itl_histogram.values())
            total = _ns(s.itl_mean_ms * count) if s.itl_mean_ms is not None else 0
            h["itl"].record_buckets(s.itl_histogram, count, total or 0, _ns(s.itl_min_ms), _ns(s.itl_max_ms))

    add = record

    def snapshot(self) -> MetricsSnapshot:
        """The registry's state as a Struct (send it to another process and `merge` it there)."""
        return MetricsSnapshot(
            counters=dict(self.counters),
            errors_by_kind=dict(self.errors_by_kind),
            finish=dict(self.finish),
            histograms={name: h.data() for name, h in self._hists.items()},
        )

    def merge(self, other: "MetricsSnapshot | MetricsRegistry") -> "MetricsRegistry":
        """Add another registry's counts and histograms to this one, exactly; returns self."""
        if isinstance(other, MetricsRegistry):
            other = other.snapshot()
        for k, v in other.counters.items():
            self.counters[k] = self.counters.get(k, 0) + v
        for k, v in other.errors_by_kind.items():
            self.errors_by_kind[k] = self.errors_by_kind.get(k, 0) + v
        for k, v in other.finish.items():
            self.finish[k] = self.finish.get(k, 0) + v
        for name, data in other.histograms.items():
            hist = self._hists.get(name)
            if hist is None:
                hist = self._hists[name] = _Hist()
            hist.merge(data)
        return self

    @classmethod
    def from_snapshot(cls, snapshot: MetricsSnapshot) -> "MetricsRegistry":
        """A registry holding what `snapshot` holds."""
        return cls().merge(snapshot)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per histogram metric {unit, count, mean, p50, p90, p95, p99, min, max}; mean, min and
        max are exact, percentiles to 3 significant figures (HDR)."""
        out: dict[str, dict[str, Any]] = {}
        for name, h in self._hists.items():
            unit, div = HISTOGRAM_METRICS.get(name, ("", 1.0))
            out[name] = h.summary(unit, div)
        return out

