"""Run every benchmark (or the ones named), each in its own process with a timeout, print one
table of ratios against the peers measured in the same run, and write `bench/results.json`.

    python -m bench                 # all: sse decoder ring e2e live resume memory
    python -m bench --quick         # each bench's smoke run
    python -m bench sse decoder     # a subset (merged into an existing results.json)

A bench that fails, times out or does not exist yet is reported as such; the rest still run.
Refresh the README's table afterwards with `python tools/update_readme_perf.py`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import RESULTS, load, text_table

ROOT = Path(__file__).resolve().parents[1]
BENCHES = ("sse", "decoder", "ring", "e2e", "live", "resume", "memory")
# Seconds before a bench is stopped (full run; quick runs get a third). Live and memory run
# thousands of streams over loopback on a possibly busy machine.
TIMEOUTS = {"sse": 600, "decoder": 300, "ring": 600, "e2e": 900, "live": 900, "resume": 300, "memory": 900}


def _machine() -> dict[str, Any]:
    try:
        import psutil

        freq = psutil.cpu_freq()
        mhz = round(freq.max or freq.current) if freq else None
    except Exception:  # noqa: BLE001 - informative only
        mhz = None
    return {"cpus": os.cpu_count(), "mhz": mhz, "python": platform.python_version(),
            "platform": platform.platform(), "machine": platform.machine()}


def run_one(name: str, quick: bool, timeout: float) -> dict[str, Any]:
    """Run bench `name` in a child process; its status, wall seconds and result dict."""
    if not (ROOT / "bench" / f"{name}.py").exists():
        return {"status": "missing", "error": f"bench/{name}.py does not exist"}
    fd, out = tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".json")
    os.close(fd)
    argv = [sys.executable, "-m", "bench.report", "run", name, out] + (["--quick"] if quick else [])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    t0 = time.monotonic()
    # Its own session: on a timeout the whole group (its pools, mock servers) is stopped.
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, start_new_session=True)
    try:
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            return {"status": "timeout", "seconds": time.monotonic() - t0, "error": f"stopped after {timeout:.0f} s"}
        except KeyboardInterrupt:
            _stop_group(proc)
            raise
        seconds = time.monotonic() - t0
        if code != 0:
            return {"status": "failed", "seconds": seconds, "error": f"exit code {code}"}
        try:
            result = json.loads(Path(out).read_text())
        except (OSError, ValueError) as exc:
            return {"status": "failed", "seconds": seconds, "error": f"no result: {exc}"}
        return {"status": "ok", "seconds": seconds, "result": result}
    finally:
        Path(out).unlink(missing_ok=True)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group (it started it), then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benches; print the summary; write and return the report."""
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("benches", nargs="*", metavar="BENCH", help=f"which to run (default all: {' '.join(BENCHES)})")
    ap.add_argument("--quick", action="store_true", help="each bench's --quick smoke run")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per bench (default: per bench)")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results file (default {RESULTS.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    unknown = [b for b in args.benches if b not in BENCHES]
    if unknown:
        ap.error(f"unknown bench(es) {', '.join(unknown)}; known: {', '.join(BENCHES)}")
    names = args.benches or list(BENCHES)
    # A subset updates its entries in the existing report; a full run starts a new one.
    report = load(args.out) if args.benches else {"benches": {}}
    report.setdefault("benches", {})
    report["machine"] = _machine()
    for name in names:
        timeout = args.timeout or (TIMEOUTS[name] / 3 if args.quick else TIMEOUTS[name])
        print(f"=== bench {name}{' (quick)' if args.quick else ''} ===", flush=True)
        entry = run_one(name, args.quick, timeout)
        entry["quick"] = args.quick
        entry["when"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        report["benches"][name] = entry
        if entry["status"] != "ok":
            print(f"--- bench {name}: {entry['status']}: {entry.get('error', '')}", flush=True)
    report["benches"] = {n: report["benches"][n] for n in BENCHES if n in report["benches"]}
    report["generated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    args.out.write_text(json.dumps(report, indent=1, allow_nan=True))
    print()
    print("Summary (ratio > 1: streamring better; peers measured in the same run)")
    print(text_table(report))
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
