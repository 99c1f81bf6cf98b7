"""The benchmark report: runs one bench in a child process (`python -m bench.report run NAME OUT
[ARGS...]`), reads `bench/results.json`, and turns every bench's numbers into rows of
(bench, what, ours, peer, ratio) for the summary table and the README.

Each bench's `main(argv) -> dict` keeps its own shape; the extractors below know the shapes of the
benches they name and fall back to every numeric field whose key mentions "ratio".
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

RESULTS = Path(__file__).resolve().parent / "results.json"

# (bench, metric, ours, peer, ratio, better): `ratio` > 1 means ours is better, `ours` and `peer`
# are display strings.
Row = tuple[str, str, str, str, float | None]


def run_child(name: str, out: str, argv: list[str]) -> int:
    """Child entry: import bench.<name>, run main(argv), write its dict as JSON to `out`."""
    import importlib

    module = importlib.import_module(f"bench.{name}")
    result = module.main(argv)
    Path(out).write_text(json.dumps(result, default=_jsonable, allow_nan=True))
    return 0


def _jsonable(obj: Any) -> Any:
    try:
        import msgspec

        return msgspec.to_builtins(obj)
    except Exception:  # noqa: BLE001 - last resort: a readable string
        return repr(obj)


def load(path: Path = RESULTS) -> dict[str, Any]:
    """The results file, or an empty report."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"benches": {}}


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _rows_sse(r: dict[str, Any]) -> Iterator[Row]:
    # The openai-chat wire shape only (the commonest); the other shapes stay in results.json.
    for case, row in (r.get("parsers") or {}).items():
        if not case.startswith("openai/"):
            continue
        ours = _get(row, "ours", "mb_per_s")
        for peer in ("httpx-sse", "openai-sdk"):
            p = row.get(peer)
            if isinstance(p, dict) and _num(ours):
                yield ("sse", f"SseParser {case} MB/s vs {peer}", f"{ours:.1f}", f"{p['mb_per_s']:.1f}", p.get("ratio"))
    pipe = r.get("pipeline")
    if isinstance(pipe, dict) and _num(pipe.get("ratio")):
        mb = pipe["bytes"] / 1e6
        yield ("sse", "collect() openai-chat MB/s vs httpx-sse + msgspec", f"{mb / pipe['ours_seconds']:.1f}",
               f"{mb / pipe['peer_seconds']:.1f}", pipe["ratio"])


def _rows_decoder(r: dict[str, Any]) -> Iterator[Row]:
    ns = r.get("ns_per_token") or {}
    base = ns.get("baseline")
    for name in ("decode_token", "decode_tokens16"):
        if _num(ns.get(name)) and _num(base):
            yield ("decoder", f"TokenDecoder.{name} ns/token vs bytes+strict decode", f"{ns[name]:.0f}", f"{base:.0f}",
                   base / ns[name])


def _rows_live(r: dict[str, Any]) -> Iterator[Row]:
    for cfg, rows in (r.get("results") or {}).items():
        ours = {c: v for c, v in rows.items() if c.startswith("ours") and "failed" not in v}
        if not ours:
            continue
        best_cpu = min(ours, key=lambda c: ours[c]["cpu_s_per_1k_events"])
        lat = {c: v for c, v in ours.items() if _num(v.get("latency_p99_ms"))}
        best_lat = min(lat, key=lambda c: lat[c]["latency_p99_ms"]) if lat else None
        for peer in ("openai-sdk", "aiohttp-loop"):
            p = rows.get(peer)
            if not isinstance(p, dict) or "failed" in p:
                continue
            o = ours[best_cpu]
            yield ("live", f"{cfg}: client CPU s/1k events, {best_cpu} vs {peer}", f"{o['cpu_s_per_1k_events']:.4f}",
                   f"{p['cpu_s_per_1k_events']:.4f}", p["cpu_s_per_1k_events"] / o["cpu_s_per_1k_events"])
            fastest = max(ours, key=lambda c: ours[c]["tokens_per_s"])
            f = ours[fastest]
            yield ("live", f"{cfg}: tokens/s, {fastest} vs {peer}", f"{f['tokens_per_s']:,.0f}", f"{p['tokens_per_s']:,.0f}",
                   f["tokens_per_s"] / p["tokens_per_s"] if p["tokens_per_s"] else None)
            if best_lat and _num(p.get("latency_p99_ms")):
                b = lat[best_lat]
                yield ("live", f"{cfg}: added latency p99 ms, {best_lat} vs {peer}", f"{b['latency_p99_ms']:.2f}",
                       f"{p['latency_p99_ms']:.2f}", p["latency_p99_ms"] / b["latency_p99_ms"])


def _rows_resume(r: dict[str, Any]) -> Iterator[Row]:
    retry = r.get("retry_ms", 10)
    for path in ("stream_request", "pool"):
        d = r.get(f"drops/{path}")
        if isinstance(d, dict) and _num(d.get("to_first_text_p99_ms")):
            yield ("resume", f"{path}: drop -> resumed text p99 ms ({d['exact']}/{d['drops']} exact) vs server retry",
                   f"{d['to_first_text_p99_ms']:.1f}", f"{retry}", None)
        s = r.get(f"stall/{path}")
        if isinstance(s, dict) and _num(s.get("after_s")):
            yield ("resume", f"{path}: stall ends ({s.get('kind')}) s after last text vs idle_timeout",
                   f"{s['after_s']:.3f}", f"{r.get('idle_timeout_s')}", None)


def _rows_ring(r: dict[str, Any]) -> Iterator[Row]:
    for case, d in (r.get("throughput") or {}).items():
        rows_ = d.get("rows") or {}
        # Our best variant (framed batches when measured) against each non-ring transport.
        best = "ring-framed" if "ring-framed" in rows_ else "ring"
        for key, ratio in (d.get("ratios") or {}).items():
            ours_name, _, peer = key.partition("/")
            if ours_name != best or peer.startswith("ring"):
                continue
            o, p = _get(rows_, ours_name, "msgs_per_s"), _get(rows_, peer, "msgs_per_s")
            if _num(o) and _num(p):
                yield ("ring", f"{case} msgs/s, {ours_name} vs {peer}", f"{o:,.0f}", f"{p:,.0f}", ratio)
    for t in ("ring",):
        lat = _get(r, "latency", t)
        peer = _get(r, "latency", "pipe")
        if isinstance(lat, dict) and isinstance(peer, dict) and _num(lat.get("p99_us")) and lat["p99_us"]:
            yield ("ring", "wake-up latency p99 us, ring vs pipe", f"{lat['p99_us']:.0f}", f"{peer['p99_us']:.0f}",
                   peer["p99_us"] / lat["p99_us"])


def _rows_memory(r: dict[str, Any]) -> Iterator[Row]:
    o, n = r.get("ours") or {}, r.get("naive") or {}
    if _num(o.get("ms_per_stream")) and _num(n.get("ms_per_stream")):
        yield ("memory", f"{r.get('streams')} streams x {r.get('tokens_per_stream')} tokens, ms/stream vs naive",
               f"{o['ms_per_stream']:.2f}", f"{n['ms_per_stream']:.2f}", n["ms_per_stream"] / o["ms_per_stream"])
    if _num(o.get("growth_after_warmup_mib")) and _num(n.get("growth_after_warmup_mib")):
        yield ("memory", "RSS growth after warm-up, MiB vs naive", f"{o['growth_after_warmup_mib']:+.2f}",
               f"{n['growth_after_warmup_mib']:+.2f}", None)


def _rows_e2e(r: dict[str, Any]) -> Iterator[Row]:
    for scen, row in (r.get("scenarios") or {}).items():
        for k in ("pool_K1", "pool_K2"):
            for peer in ("httpx_sse_msgspec", "collect"):
                if _num(row.get(k)) and _num(row.get(peer)):
                    yield ("e2e", f"{scen}: tokens/s, {k} vs {peer}", f"{row[k]:,.0f}", f"{row[peer]:,.0f}",
                           row[k] / row[peer])
    lat = r.get("latency") or {}
    if _num(lat.get("p99_ms")):
        yield ("e2e", f"astream read-to-caller p50/p99 ms at {lat.get('tokens_per_s', 0):,.0f} tok/s",
               f"{lat.get('p50_ms', 0):.2f}/{lat['p99_ms']:.2f}", "", None)
    if _num(lat.get("shm_bytes_per_worker")):
        yield ("e2e", "shared memory per worker, MiB", f"{lat['shm_bytes_per_worker'] / 2**20:.2f}", "", None)


def _rows_generic(name: str, r: Any, prefix: str = "") -> Iterator[Row]:
    """Every finite number under a key that mentions "ratio"."""
    if isinstance(r, dict):
        for k, v in r.items():
            key = f"{prefix}/{k}" if prefix else str(k)
            if "ratio" in str(k).lower() and _num(v):
                yield (name, key, "", "", float(v))
            else:
                yield from _rows_generic(name, v, key)


EXTRACTORS: dict[str, Callable[[dict[str, Any]], Iterator[Row]]] = {
    "sse": _rows_sse,
    "decoder": _rows_decoder,
    "live": _rows_live,
    "resume": _rows_resume,
    "ring": _rows_ring,
    "e2e": _rows_e2e,
    "memory": _rows_memory,
}


def rows(report: dict[str, Any]) -> list[Row]:
    """Summary rows of every bench in a report, in bench order."""
    out: list[Row] = []
    for name, entry in (report.get("benches") or {}).items():
        result = entry.get("result")
        if entry.get("status") != "ok" or not isinstance(result, dict):
            out.append((name, f"{entry.get('status', 'missing')}: {entry.get('error', '')}".strip(), "", "", None))
            continue
        extractor = EXTRACTORS.get(name)
        got = list(extractor(result)) if extractor else []
        if not got:
            got = list(_rows_generic(name, result))
        out.extend(got)
    return out


def text_table(report: dict[str, Any]) -> str:
    """The summary as fixed-width text (ratio > 1: ours better)."""
    lines = [f"{'bench':<9}{'what':<72}{'ours':>11}{'peer':>11}{'ratio':>8}"]
    for bench, what, ours, peer, ratio in rows(report):
        r = f"{ratio:.2f}x" if _num(ratio) else ""
        lines.append(f"{bench:<9}{what[:71]:<72}{ours:>11}{peer:>11}{r:>8}")
    return "\n".join(lines)


def markdown_table(report: dict[str, Any]) -> str:
    """The summary as a Markdown table for the README (ratio > 1: ours better)."""
    lines = ["| bench | what | streamring | peer | ratio |", "|---|---|---:|---:|---:|"]
    for bench, what, ours, peer, ratio in rows(report):
        r = f"{ratio:.2f}x" if _num(ratio) else ""
        lines.append(f"| {bench} | {what.replace('|', '/')} | {ours} | {peer} | {r} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "run":
        sys.exit(run_child(sys.argv[2], sys.argv[3], sys.argv[4:]))
    print(text_table(load()))
