"""`streamring soak` (pipeline/soak.py): a million tokens through the pool with every stream's
text and token count checked against what its source sent, and proof that each of the soak's
checks really fails the run when the thing it guards is broken."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.soak import DropOneToken, SoakConfig, build_replay_stream, main_soak, run_soak

REPO = Path(__file__).resolve().parents[1]
MILLION = 1_000_000


def soak(*args: str, timeout: float = 120) -> tuple[int, dict, str]:
    """Run `python -m pipeline.soak ... --json` in a fresh process: (exit code, report, stderr).
    A fresh process keeps the caller's RSS and descriptors free of pytest's own."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.soak", "--json", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"no JSON report (exit {proc.returncode}); stderr:\n{proc.stderr[-4000:]}")
    return proc.returncode, report, proc.stderr


def assert_clean_million(rc: int, report: dict, stderr: str) -> None:
    assert rc == 0, f"{report['failures']}\n{stderr[-3000:]}"
    assert report["ok"] and report["failures"] == []
    assert report["tokens"]["delivered"] >= MILLION
    streams = report["streams"]
    # Every stream came back and its digest matched what the source sent.
    assert streams["completed"] > 0
    assert streams["verified"] == streams["completed"]
    assert streams["digest_mismatches"] == streams["token_mismatches"] == streams["missing"] == 0
    assert streams["errors"] == {}
    config = report["config"]
    for p in report["processes"]:
        # Every process was sampled at the warm-up point and at the end, and stayed in its bound.
        assert p["rss_growth_mb"] is not None, p
        bound = config["mock_rss_growth_mb"] if p["role"] == "mock" else config["rss_growth_mb"]
        assert p["rss_growth_mb"] <= bound, p
    assert report["caller_fds"]["leaked"] == {}
    assert report["shm"]["leaked"] == []
    assert report["shm"]["peak"] > 0  # the pool's rings were seen while it ran
    assert report["respawns"] == 0


def test_a_million_mock_tokens_pass_through_the_pool_unchanged() -> None:
    rc, report, stderr = soak("--tokens", str(MILLION), "--source", "mock")
    assert_clean_million(rc, report, stderr)
    roles = {p["role"] for p in report["processes"]}
    assert {"caller", "mock", "ingest-0", "worker-0"} <= roles
    # Progress lines on stderr: the start, the warm-up point and the end at least.
    lines = [ln for ln in stderr.splitlines() if ln.startswith("soak ")]
    assert any("[start]" in ln for ln in lines) and any("[warm]" in ln for ln in lines)
    assert any("[end]" in ln and f"{MILLION:,}/{MILLION:,}" in ln for ln in lines)


def test_a_million_replayed_tokens_pass_through_the_pool_unchanged(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    rc, report, stderr = soak("--tokens", str(MILLION), "--source", "replay", "--streams", "32", "--report", str(out))
    assert_clean_million(rc, report, stderr)
    assert "mock" not in {p["role"] for p in report["processes"]}
    assert json.loads(out.read_text(encoding="utf-8"))["tokens"] == report["tokens"]


# --- each check fails the run when what it guards is broken -----------------------------------------

SMALL = ("--tokens", "40000", "--stream-tokens", "1000:3000", "--quiet")


@pytest.mark.parametrize("source", ["mock", "replay"])
def test_a_dropped_token_fails_the_digest_check(source: str) -> None:
    rc, report, _ = soak(*SMALL, "--source", source, "--inject-fault", "drop-token")
    assert rc == 1 and not report["ok"]
    streams = report["streams"]
    # Every stream lost one delta: every digest differs, and nothing else is wrong.
    assert streams["completed"] > 0
    assert streams["digest_mismatches"] == streams["completed"]
    assert streams["verified"] == 0 and streams["token_mismatches"] == 0
    assert len(report["failures"]) == 1 and "text differs" in report["failures"][0]


def test_a_wrong_token_count_fails_the_count_check() -> None:
    rc, report, _ = soak(*SMALL, "--source", "replay", "--inject-fault", "bad-usage")
    assert rc == 1
    streams = report["streams"]
    assert streams["token_mismatches"] == streams["completed"] > 0
    assert streams["digest_mismatches"] == 0  # the text itself was intact
    assert len(report["failures"]) == 1 and "token counts differ" in report["failures"][0]


def test_rss_growth_past_the_bound_fails_and_within_it_passes() -> None:
    # The fault makes the caller allocate 48 MiB after warm-up.
    rc, report, _ = soak(*SMALL, "--source", "replay", "--inject-fault", "grow-rss", "--rss-growth-mb", "32")
    assert rc == 1
    assert len(report["failures"]) == 1 and report["failures"][0].startswith("caller")
    assert "RSS grew" in report["failures"][0]
    caller = next(p for p in report["processes"] if p["role"] == "caller")
    assert caller["rss_growth_mb"] >= 40
    rc, report, _ = soak(*SMALL, "--source", "replay", "--inject-fault", "grow-rss", "--rss-growth-mb", "200")
    assert rc == 0, report["failures"]


@pytest.mark.parametrize(("fault", "message", "field"), [
    ("leak-fd", "leaked 1 descriptors", "caller_fds"),
    ("leak-shm", "segments left behind", "shm"),
])
def test_a_leaked_descriptor_or_segment_fails_the_run(fault: str, message: str, field: str) -> None:
    rc, report, _ = soak(*SMALL, "--source", "replay", "--inject-fault", fault)
    assert rc == 1
    assert len(report["failures"]) == 1 and message in report["failures"][0]
    assert len(report[field]["leaked"]) == 1
    assert report["streams"]["verified"] == report["streams"]["completed"] > 0


def test_a_hung_worker_fails_the_run_instead_of_hanging_it() -> None:
    rc, report, _ = soak(*SMALL, "--source", "replay", "--inject-fault", "hang", "--stall-timeout", "2", timeout=60)
    assert rc == 1
    assert report["failures"] == ["stalled: no stream finished for 2 s"]
    assert report["shm"]["leaked"] == [] and report["caller_fds"]["leaked"] == {}


def test_user_transformers_hook_runs_in_the_workers() -> None:
    # In this process: the testing hook of run_soak adds transformers to the soaked pipeline.
    # (Leaks are checked by the soak itself, counting only this process's segments: conftest's
    # no_shm_leak sees every pool on a shared machine.)
    lines: list[str] = []
    cfg = SoakConfig(tokens=20_000, source="replay", min_stream_tokens=1000, max_stream_tokens=2000, streams=8)
    report = run_soak(cfg, transformers=[DropOneToken()], emit=lines.append)
    assert not report["ok"]
    assert report["streams"]["digest_mismatches"] == report["streams"]["completed"] > 0
    assert len(report["failures"]) == 1
    assert report["shm"]["leaked"] == [] and report["caller_fds"]["leaked"] == {}
    assert any("[end]" in ln for ln in lines)


# --- the replay source's streams ------------------------------------------------------------------


def _content_events(body: bytes) -> tuple[list[str], dict]:
    pieces: list[str] = []
    usage: dict = {}
    events = body.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    for ev in events[:-2]:
        assert ev.startswith(b"data: ")
        chunk = json.loads(ev[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk["choices"]:
            content = choice["delta"].get("content")
            if content:
                pieces.append(content)
    return pieces, usage


@pytest.mark.parametrize("seed", range(6))
def test_replay_streams_carry_the_digest_and_count_they_claim(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 3000)
    body, digest, count = build_replay_stream(rng, n, 16)
    pieces, usage = _content_events(body)
    text = "".join(pieces)
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == digest
    assert usage["completion_tokens"] == count
    assert n <= count <= n + 4  # only a character's remaining tokens are added
    # 16 tokens per event, a few more where 16 would end inside a character, fewer in the last.
    assert count / (16 + 3) <= len(pieces) <= -(-count // 16)


def test_replay_streams_mix_scripts_and_emoji() -> None:
    body, _, _ = build_replay_stream(random.Random(7), 3000, 16)
    text = "".join(_content_events(body)[0])
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text)  # CJK
    assert any(ord(ch) >= 0x1F300 for ch in text)  # emoji
    assert "\u200d" in text and "\u2028" in text  # ZWJ sequences, and a JSON/JS line separator


def test_bad_arguments_exit_with_usage_error() -> None:
    with pytest.raises(SystemExit) as info:
        main_soak(["--stream-tokens", "500:100"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main_soak(["--source", "carrier-pigeon"])
    assert info.value.code == 2
