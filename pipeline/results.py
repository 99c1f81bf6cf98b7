"""Result files of a run: one row per request (JSONL, CSV or one JSON array) and a summary JSON.

A row is a plain dict built from a `StreamResult` (`result_row`), so the three formats hold the same
data: CSV flattens nested fields to dotted columns (`usage.output_tokens`, `error.kind`,
`timings.ttft_ms`) and keeps lists (`choices`, `tool_calls`) as JSON strings. `read_rows` reads any
of the three back into rows, which is what `streamring run --resume` needs.

The summary (`build_summary`) says what ran, where, when, with which arguments (secrets redacted)
and how it went: counts by outcome and per-metric distributions.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import socket
import sys
import tempfile
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgspec

from .sources import REDACTED, is_secret_header

__all__ = [
    "CSV_COLUMNS",
    "FORMATS",
    "METRIC_NAMES",
    "OutcomeCounter",
    "SCHEMA_VERSION",
    "RowWriter",
    "build_summary",
    "format_for",
    "json_line",
    "metrics_summary",
    "read_rows",
    "redact_args",
    "result_row",
    "resume_plan",
    "row_key",
    "row_tokens",
    "row_ok",
    "summary_table",
    "write_json",
]

# Bumped when a field of the summary or of a row changes meaning or is removed (adding is free).
SCHEMA_VERSION = 1

FORMATS = ("jsonl", "csv", "json")

# Summary metric name -> MetricsRegistry histogram name (pipeline/metrics.py HISTOGRAM_METRICS).
METRIC_NAMES: dict[str, str] = {
    "ttft_ms": "ttft",
    "ttft_content_ms": "ttft_content",
    "itl_ms": "itl",
    "e2e_ms": "e2e",
    "tokens_per_s": "tokens_per_s",
}

# The per-stream timings kept in a row, in this order (StreamMetricsSnapshot fields).
TIMING_FIELDS = (
    "ttft_ms",
    "ttft_content_ms",
    "ttfb_ms",
    "e2e_ms",
    "tokens_per_s",
    "itl_mean_ms",
    "itl_p50_ms",
    "itl_p90_ms",
    "itl_p99_ms",
    "itl_max_ms",
    "max_gap_ms",
    "tokens",
    "chunks",
    "bytes",
    "stalls",
)

_ERROR_FIELDS = ("kind", "message", "http_status", "retryable", "retry_after")
_USAGE_FIELDS = ("input_tokens", "output_tokens", "total_tokens", "estimated")
# Lists and free-form values: one JSON string per CSV cell.
_JSON_COLUMNS = ("choices", "tool_calls", "server_tools", "usage.extras")

# CSV columns in order; extra row fields (the demo's) follow them.
CSV_COLUMNS: tuple[str, ...] = (
    ("custom_id", "source_index", "text", "reasoning", "refusal", "finish_reason", "finish")
    + tuple(f"usage.{f}" for f in _USAGE_FIELDS)
    + ("usage.extras",)
    + tuple(f"error.{f}" for f in _ERROR_FIELDS)
    + ("choices", "tool_calls", "server_tools")
    + tuple(f"timings.{f}" for f in TIMING_FIELDS)
)
_CSV_COLUMN_SET = frozenset(CSV_COLUMNS)
# How a CSV cell is read back; columns not listed are strings ("" in an optional column is None).
_INT_COLUMNS = frozenset(
    ["source_index", "usage.input_tokens", "usage.output_tokens", "usage.total_tokens", "error.http_status",
     "timings.tokens", "timings.chunks", "timings.bytes", "timings.stalls"]
)
_BOOL_COLUMNS = frozenset(["usage.estimated", "error.retryable"])
_FLOAT_COLUMNS = frozenset([f"timings.{f}" for f in TIMING_FIELDS if f.endswith(("_ms", "_per_s"))] + ["error.retry_after"])
_STR_NOT_NONE = frozenset(["text"])


# --- rows -------------------------------------------------------------------------------------


def _timings(metrics: Any) -> dict[str, Any] | None:
    if metrics is None:
        return None
    if not isinstance(metrics, dict):
        metrics = msgspec.structs.asdict(metrics)
    return {f: metrics.get(f) for f in TIMING_FIELDS}


def result_row(result: Any, *, source_index: int | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One request's row from its StreamResult: text, choices, reasoning, tool calls, usage,
    finish, error (kind, message, http_status, retryable, retry_after) and that stream's timings.
    `source_index` overrides the result's (the line of the requests file); `extra` is appended."""
    err = result.error
    usage = result.usage
    row: dict[str, Any] = {
        "custom_id": result.custom_id,
        "source_index": result.source_index if source_index is None else source_index,
        "text": result.text,
        "choices": msgspec.to_builtins(result.choices),
        "reasoning": result.reasoning,
        "refusal": result.refusal,
        "tool_calls": msgspec.to_builtins(result.tool_calls),
        "server_tools": msgspec.to_builtins(result.server_tools),
        "usage": None if usage is None else {f: getattr(usage, f) for f in (*_USAGE_FIELDS, "extras")},
        "finish_reason": result.finish_reason,
        "finish": result.finish,
        "error": None if err is None else {f: getattr(err, f) for f in _ERROR_FIELDS},
        "timings": _timings(result.metrics),
    }
    if extra:
        row.update(extra)
    return row


def row_ok(row: Mapping[str, Any]) -> bool:
    """Whether a row records a successful stream (no error)."""
    err = row.get("error")
    return not err or not (err.get("kind") if isinstance(err, Mapping) else err)


def row_tokens(row: Mapping[str, Any]) -> int:
    """Output tokens of a row: the provider's count (usage) when it sent one, else the tokens
    the pipeline counted (one per text delta when the stream carries no token ids)."""
    usage = row.get("usage") or {}
    n = usage.get("output_tokens")
    if n is None:
        n = (row.get("timings") or {}).get("tokens")
    return int(n or 0)


def row_key(row: Mapping[str, Any]) -> str:
    """What identifies a request across runs: its `custom_id`, else `#<source_index>` (the line
    of the requests file, stable while the file is)."""
    cid = row.get("custom_id")
    return str(cid) if cid not in (None, "") else f"#{row.get('source_index')}"


def resume_plan(previous: Iterable[Mapping[str, Any]], keys: list[str], limit: int | None = None
                ) -> tuple[list[int], list[Mapping[str, Any]], int]:
    """What `--resume` does, given the rows of the earlier run(s) and the requests' keys (see
    `row_key`) in file order: the positions of the requests to run now (those without a
    successful row, at most `limit`), the earlier rows to keep (one per request: its successful
    row, or the failed row of a request not run now), and how many requests were skipped."""
    previous = list(previous)
    done = {row_key(r) for r in previous if row_ok(r)}
    todo = [i for i, k in enumerate(keys) if k not in done]
    skipped = len(keys) - len(todo)
    if limit is not None:
        todo = todo[:limit]
    rerun = {keys[i] for i in todo}
    kept: list[Mapping[str, Any]] = []
    seen: set[str] = set()
    for r in previous:
        k = row_key(r)
        if k in rerun or k in seen:
            continue
        if row_ok(r) or k not in done:
            seen.add(k)
            kept.append(r)
    return todo, kept, skipped


def _flatten(row: Mapping[str, Any]) -> dict[str, str]:
    """A row as CSV cells (None is an empty cell)."""
    out: dict[str, str] = {}

    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, dict)):
            return json.dumps(v, ensure_ascii=False, separators=(",", ":"))
        return str(v)

    for key, value in row.items():
        if key in ("usage", "error", "timings"):
            sub = value or {}
            for k, v in sub.items():
                out[f"{key}.{k}"] = cell(v)
        elif key in _CSV_COLUMN_SET:
            out[key] = cell(value)
        else:  # an extra field (the demo's): JSON, so it reads back with its type
            out[key] = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return out


def _unflatten(cells: Mapping[str, str]) -> dict[str, Any]:
    """The row a CSV line came from (types restored by column)."""
    row: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    for key, raw in cells.items():
        if key is None:  # more cells than columns: ignore them
            continue
        if raw is None or raw == "":
            value: Any = "" if key in _STR_NOT_NONE else None
        elif key in _JSON_COLUMNS:
            value = json.loads(raw)
        elif key in _INT_COLUMNS:
            value = int(raw)
        elif key in _FLOAT_COLUMNS:
            value = float(raw)
        elif key in _BOOL_COLUMNS:
            value = raw == "true"
        elif key in _CSV_COLUMN_SET:
            value = raw
        else:  # an extra column (the demo's), written as JSON
            try:
                value = json.loads(raw)
            except ValueError:  # written by hand or another tool
                value = raw
        head, dot, tail = key.partition(".")
        if dot and head in ("usage", "error", "timings"):
            groups.setdefault(head, {})[tail] = value
        else:
            row[key] = value
    for head in ("usage", "error", "timings"):
        sub = groups.get(head)
        # A group whose cells are all empty was None (no usage, no error, no metrics).
        row[head] = sub if sub and any(v is not None for v in sub.values()) else None
    return row


def format_for(path: str | os.PathLike[str], default: str = "jsonl") -> str:
    """The row format of a path by its suffix: jsonl, csv or json (anything else: `default`)."""
    suffix = Path(path).suffix.lower().lstrip(".")
    return {"jsonl": "jsonl", "ndjson": "jsonl", "csv": "csv", "json": "json"}.get(suffix, default)


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every row of a result file written by RowWriter (any format); [] when it does not exist.
    A torn last JSONL line (a run killed mid-write) is skipped."""
    p = Path(path)
    if not p.exists():
        return []
    fmt = format_for(p)
    text = p.read_text(encoding="utf-8")
    if fmt == "json":
        return list(json.loads(text)) if text.strip() else []
    if fmt == "csv":
        return [_unflatten(r) for r in csv.DictReader(io.StringIO(text, newline=""))]
    rows = []
    lines = text.split("\n")  # not splitlines(): U+2028 inside a string is not a line end
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if all(not rest.strip() for rest in lines[i + 1 :]):
                break  # the torn write of an interrupted run
            raise
    return rows


class RowWriter:
    """Writes rows to a result file as they arrive: JSONL and CSV line by line (flushed, so an
    interrupted run keeps what finished), JSON as one array written at `close()`.

    `initial` rows are written first (what `--resume` keeps from the previous file); the file is
    replaced atomically when it is (re)started, so a crash never leaves half an old file.
    """

    def __init__(self, path: str | os.PathLike[str], *, fmt: str | None = None,
                 initial: Iterable[Mapping[str, Any]] = (), extra_columns: Iterable[str] = ()) -> None:
        self.path = Path(path)
        self.fmt = fmt or format_for(self.path)
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown result format {self.fmt!r}; known: {', '.join(FORMATS)}")
        self.rows_written = 0
        self._rows: list[Mapping[str, Any]] = []  # JSON only
        self._columns = list(CSV_COLUMNS) + [c for c in extra_columns if c not in CSV_COLUMNS]
        self._file: Any = None
        self._csv: Any = None
        initial = list(initial)
        if self.fmt == "json":
            self._rows.extend(initial)
            return
        for row in initial:  # extra keys of kept rows (a demo's) stay columns
            for k in _flatten(row):
                if k not in self._columns:
                    self._columns.append(k)
        # Write the kept rows to a temporary file, then move it into place and append to it.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                if self.fmt == "csv":
                    w = csv.DictWriter(f, fieldnames=self._columns, extrasaction="ignore")
                    w.writeheader()
                    for row in initial:
                        w.writerow(_flatten(row))
                else:
                    for row in initial:
                        f.write(_json_line(row))
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self._file = self.path.open("a", encoding="utf-8", newline="")
        if self.fmt == "csv":
            self._csv = csv.DictWriter(self._file, fieldnames=self._columns, extrasaction="ignore")

    def write(self, row: Mapping[str, Any]) -> None:
        """Add one row (CSV: keys not among the columns are dropped; give them as extra_columns)."""
        self.rows_written += 1
        if self.fmt == "json":
            self._rows.append(row)
        elif self.fmt == "csv":
            self._csv.writerow(_flatten(row))
            self._file.flush()
        else:
            self._file.write(_json_line(row))
            self._file.flush()

    def close(self) -> None:
        """Finish the file (JSON: write the array now, atomically). Idempotent."""
        if self.fmt == "json":
            rows, self._rows = self._rows, []
            if rows or not self.path.exists() or self.rows_written == 0:
                write_json(self.path, rows)
            return
        f, self._file = self._file, None
        if f is not None:
            f.close()

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def json_line(value: Any) -> str:
    """`value` as one line of JSON (UTF-8 text kept, except U+2028 and U+2029, escaped: valid
    JSON either way, but `str.splitlines` and JavaScript readers treat them as line ends)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029") + "\n"


_json_line = json_line


def write_json(path: str | os.PathLike[str], value: Any) -> None:
    """Write `value` as indented JSON to `path`, atomically (temporary file, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f, ensure_ascii=False, indent=2)
            f.write("\n")
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --- the summary --------------------------------------------------------------------------------


def redact_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """The command's arguments with every secret value replaced: keys named like a credential
    (api_key, authorization, token, ...; `*_env` names of variables are kept, they are not
    secrets) and secret headers inside header maps or `Name: value` lists."""
    out: dict[str, Any] = {}
    for k, v in args.items():
        if callable(v):
            continue
        key = str(k)
        if is_secret_header(key) and not key.endswith("_env") and v is not None:
            out[key] = REDACTED
        elif isinstance(v, Mapping):
            out[key] = redact_args(v)
        elif isinstance(v, list):
            out[key] = [_redact_header_item(x) for x in v]
        elif isinstance(v, os.PathLike):
            out[key] = os.fspath(v)
        else:
            out[key] = v
    return out


def _redact_header_item(x: Any) -> Any:
    if isinstance(x, str) and ":" in x:
        name, _, _value = x.partition(":")
        if is_secret_header(name.strip()):
            return f"{name}: {REDACTED}"
    if isinstance(x, Mapping):
        return redact_args(x)
    return x


def metrics_summary(registry_summary: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per summary metric (ttft_ms, ttft_content_ms, itl_ms, e2e_ms, tokens_per_s) its
    {unit, count, mean, p50, p90, p95, p99, min, max}, from `MetricsRegistry.summary()`."""
    out: dict[str, dict[str, Any]] = {}
    keys = ("unit", "count", "mean", "p50", "p90", "p95", "p99", "min", "max")
    for name, source in METRIC_NAMES.items():
        m = registry_summary.get(source)
        if m is None:  # no stream measured it (or no stream ran)
            out[name] = {k: None for k in keys} | {"count": 0, "unit": "tokens/s" if name == "tokens_per_s" else "ms"}
        else:
            row = {k: m.get(k) for k in keys}
            # HDR percentiles are a bucket's upper edge (3 significant figures): keep them within
            # the exact min and max so a table never shows p99 above max.
            lo, hi = row["min"], row["max"]
            for p in ("p50", "p90", "p95", "p99"):
                v = row[p]
                if v is not None and hi is not None and v > hi:
                    row[p] = hi
                elif v is not None and lo is not None and v < lo:
                    row[p] = lo
            out[name] = row
    return out


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def host_info() -> dict[str, Any]:
    """Where the run happened: host name, OS, machine, CPUs, and the Python that ran it."""
    return {
        "host": {
            "hostname": socket.gethostname(),
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
        },
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
    }


class OutcomeCounter:
    """Counts rows by outcome as they are written (a run need not keep its rows in memory)."""

    def __init__(self) -> None:
        self.streams = 0
        self.succeeded = 0
        self.tokens = 0
        self.errors_by_kind: dict[str, int] = {}
        self.finish: dict[str, int] = {}

    @property
    def failed(self) -> int:
        """Streams that ended with an error."""
        return self.streams - self.succeeded

    def add(self, row: Mapping[str, Any]) -> None:
        """Count one row."""
        self.streams += 1
        if row_ok(row):
            self.succeeded += 1
        else:
            kind = str((row.get("error") or {}).get("kind") or "unknown")
            self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + 1
        fin = row.get("finish")
        if fin:
            self.finish[fin] = self.finish.get(fin, 0) + 1
        self.tokens += row_tokens(row)

    def as_dict(self) -> dict[str, Any]:
        """The summary's `counts`."""
        return {
            "streams": self.streams,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "errors_by_kind": dict(sorted(self.errors_by_kind.items())),
            "finish": dict(sorted(self.finish.items())),
        }


def build_summary(
    *,
    command: str,
    args: Mapping[str, Any],
    started: float,
    ended: float,
    counts: OutcomeCounter | Iterable[Mapping[str, Any]],
    registry_summary: Mapping[str, Mapping[str, Any]],
    tool_version: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary JSON of a run. `started`/`ended` are `time.time()` values; `counts` the rows of
    the streams run now (or their OutcomeCounter); `registry_summary` the merged metrics
    (`MetricsRegistry.summary()` / `pool.metrics().summary()`)."""
    if not isinstance(counts, OutcomeCounter):
        counter = OutcomeCounter()
        for row in counts:
            counter.add(row)
        counts = counter
    duration = max(ended - started, 0.0)
    summary: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "streamring", "version": tool_version},
        "command": command,
        "arguments": redact_args(args),
        "started_at": _iso(started),
        "ended_at": _iso(ended),
        "duration_s": round(duration, 6),
        **host_info(),
        "counts": counts.as_dict(),
        "tokens": counts.tokens,
        "tokens_per_s": (counts.tokens / duration) if duration > 0 else None,
        "metrics": metrics_summary(registry_summary),
    }
    if extra:
        summary.update(extra)
    return summary


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def summary_table(summary: Mapping[str, Any], *, color: bool = False) -> str:
    """The summary as a small text table for a terminal: streams, tokens, tokens/s, TTFT, ITL
    and the other metrics' percentiles, errors by kind (in red when `color`)."""
    c = summary["counts"]
    lines = [
        f"streams      {_fmt(c['streams'])}  (succeeded {_fmt(c['succeeded'])}, failed {_fmt(c['failed'])})",
        f"tokens       {_fmt(summary.get('tokens'))}",
        f"tokens/s     {_fmt(summary.get('tokens_per_s'), 0)}  (over {summary.get('duration_s', 0):.2f} s)",
        "",
        f"{'metric':<18}{'unit':>9}{'mean':>11}{'p50':>11}{'p90':>11}{'p99':>11}{'max':>11}",
    ]
    for name, m in summary["metrics"].items():
        digits = 0 if m.get("unit") == "tokens/s" else 2
        lines.append(
            f"{name:<18}{m.get('unit') or '':>9}"
            + "".join(f"{_fmt(m.get(k), digits):>11}" for k in ("mean", "p50", "p90", "p99", "max"))
        )
    kinds = c.get("errors_by_kind") or {}
    lines.append("")
    if kinds:
        text = ", ".join(f"{k}={v}" for k, v in kinds.items())
        lines.append("errors       " + (f"\x1b[31m{text}\x1b[0m" if color else text))
    else:
        lines.append("errors       none")
    return "\n".join(lines)
