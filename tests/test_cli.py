"""The `streamring` command line, driven as a user drives it: `python -m pipeline ...` in a
subprocess (cwd the repository, PYTHONPATH set), its exit code, stdout and the files it writes,
checked against the mock provider's own account of what it sent."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

from conftest import REPO, provider_manifest, read_capture
from pipeline.testing import MockProviderProcess, expected_stream, expected_text

# What the mock's fault table promises (pipeline/testing.py FAULTS), restated here as the oracle.
FAULT_KIND = {"500": "http", "malformed": "malformed", "disconnect": "truncated", "error": "provider", "truncate": "truncated"}
CLEAN_FAULTS = {"keepalive", "crlf", "bytewise", "drop"}
SECRET = "sk-test-SECRET-0123456789"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "OPENAI_API_KEY", "ANTHROPIC_API_KEY")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m pipeline ARGS` as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=REPO,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )


@pytest.fixture(scope="module")
def mock():
    with MockProviderProcess(seed=7) as m:
        yield m


def _requests_served(mock) -> int:
    return len(mock.streams())


def _chat_line(i: int, fault: str | None = None, **extra) -> dict:
    mock_opts = {"seed": 500 + i}
    if fault:
        mock_opts["fault"] = fault
    return {"custom_id": f"req-{i:04d}", "model": "mock-model", "max_tokens": 4 + i % 13,
            "messages": [{"role": "user", "content": f"question {i}"}], "mock": mock_opts, **extra}


def _clean_text(line: dict, dialect: str = "openai-chat") -> str:
    body = {k: v for k, v in line.items() if k != "custom_id"}
    body["mock"] = {k: v for k, v in body["mock"].items() if k != "fault"}
    return expected_text(dialect, body["mock"]["seed"], body)


def _write_jsonl(path: Path, lines: list[dict]) -> None:
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")


def _read_jsonl(path: Path) -> list[dict]:
    # Lines end with LF only (str.splitlines would also split at U+2028 inside a string).
    return [json.loads(x) for x in path.read_text(encoding="utf-8").split("\n") if x.strip()]


# --- help, version, usage errors --------------------------------------------------------------


def test_version():
    p = cli("--version")
    assert p.returncode == 0
    assert p.stdout.strip() == "streamring 0.1.0"


@pytest.mark.parametrize("command", [[], ["run"], ["mock"]])
def test_help(command):
    p = cli(*command, "--help")
    assert p.returncode == 0, p.stderr
    assert "usage:" in p.stdout


@pytest.mark.parametrize("command", ["demo", "run", "replay", "verify", "record"])
def test_help_everywhere_in_process(command, capsys):
    from pipeline.cli import main

    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: streamring {command}")


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required"),
        (["frobnicate"], "invalid choice"),
        (["run", "--provider", "openai-chat"], "REQUESTS.jsonl file or --prompt"),
        (["run", "x.jsonl", "--provider", "no-such-dialect"], "invalid choice"),
        (["run", "missing.jsonl", "--provider", "openai-chat", "--base-url", "http://127.0.0.1:9/v1"], "No such file"),
        (["run", "--prompt", "hi", "--provider", "openai-chat", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--resume"], "--resume needs -o"),
        (["run", "--prompt", "hi", "--provider", "tgi-generate"], "--base-url is required"),
        (["run", "--prompt", "hi", "--provider", "openai-chat", "--model", "m", "--retries", "-1"], "retries"),
        (["run", "--prompt", "hi", "--provider", "openai-chat", "--model", "m", "-o", "rows.txt"], ".jsonl, .csv or .json"),
        (["run", "--prompt", "hi", "--provider", "openai-chat", "--model", "m", "--api-key-env", "STREAMRING_NO_SUCH_VAR"], "not set"),
        (["demo", "--streams", "0"], "--streams"),
        (["replay", "no-such-file.sse"], "no such file"),
        (["record", "--provider", "openai-chat", "--base-url", "http://127.0.0.1:9/v1", "-o", "x.sse"], "--prompt TEXT or --body"),
    ],
)
def test_usage_errors_exit_2(argv, message, capsys, monkeypatch, tmp_path):
    # In this process (each fails before any stream starts); test_usage_error_in_a_subprocess
    # checks the same path end to end.
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STREAMRING_NO_SUCH_VAR", raising=False)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""


def test_usage_error_in_a_subprocess():
    p = cli("run", "--provider", "openai-chat")
    assert p.returncode == 2
    assert "give a REQUESTS.jsonl file or --prompt TEXT" in p.stderr
    assert p.stdout == ""


def test_a_bad_request_line_is_a_usage_error_naming_the_line(tmp_path):
    reqs = tmp_path / "r.jsonl"
    reqs.write_text('{"messages": []}\n\n{"messages": [\n', encoding="utf-8")
    p = cli("run", str(reqs), "--provider", "openai-chat", "--base-url", "http://127.0.0.1:9/v1")
    assert p.returncode == 2
    assert f"{reqs}:3: not valid JSON" in p.stderr


def test_a_duplicate_custom_id_is_a_usage_error(tmp_path):
    reqs = tmp_path / "r.jsonl"
    _write_jsonl(reqs, [{"custom_id": "a", "messages": []}, {"custom_id": "a", "messages": []}])
    p = cli("run", str(reqs), "--provider", "openai-chat", "--base-url", "http://127.0.0.1:9/v1")
    assert p.returncode == 2
    assert "custom_id 'a' already used on line 1" in p.stderr


def test_a_run_that_cannot_write_its_results_exits_1(tmp_path, mock):
    reqs = tmp_path / "r.jsonl"
    _write_jsonl(reqs, [_chat_line(0)])
    p = cli("run", str(reqs), "--provider", "openai-chat", "--base-url", mock.base_url("openai-chat"),
            "-o", "/dev/null/rows.jsonl", "--in-process")
    assert p.returncode == 1
    assert "streamring run:" in p.stderr


# --- demo -------------------------------------------------------------------------------------


def _processes_with_marker(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("STREAMRING_TEST_MARK") == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def test_demo_outcomes_match_the_mock_and_nothing_is_left_behind(tmp_path):
    out, summary_path = tmp_path / "demo.jsonl", tmp_path / "summary.json"
    marker = uuid.uuid4().hex
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "demo", "--streams", "120", "--out", str(out), "--summary", str(summary_path)],
        cwd=REPO, env=_env(STREAMRING_TEST_MARK=marker), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    t0 = time.monotonic()
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout + stderr
    assert time.monotonic() - t0 < 60  # generous liveness bound; it takes a few seconds

    # Nothing left: no process of the run (mock, pool, forkserver, resource tracker), no segment.
    deadline = time.monotonic() + 10
    while _processes_with_marker(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_with_marker(marker) == []
    assert [n for n in os.listdir("/dev/shm") if n.startswith(f"streamring-{proc.pid}-")] == []

    rows = _read_jsonl(out)
    assert len(rows) == 120
    assert len({r["custom_id"] for r in rows}) == 120
    dialects = {r["dialect"] for r in rows}
    assert dialects == {"openai-chat", "openai-responses", "anthropic", "gemini", "tgi-generate", "openai-completions"}
    assert any(r["tool_calls"] for r in rows)
    assert any(r["reasoning"] for r in rows)
    faults = {r["fault"] for r in rows if r["fault"]}
    assert {"500", "malformed", "disconnect"} <= faults
    for r in rows:
        fault = r["fault"]
        if fault in FAULT_KIND:
            assert r["error"] is not None and r["error"]["kind"] == FAULT_KIND[fault], r
            if fault == "500":
                assert r["error"]["http_status"] == 500
            continue
        assert fault is None or fault in CLEAN_FAULTS
        assert r["error"] is None, r
        # What the mock sends for that request body, computed without the server or the pipeline.
        exp = expected_stream(r["dialect"], r["request"])
        assert r["text"] == exp.text
        if exp.tool_calls:
            assert [(t["name"], t["arguments"]) for t in r["tool_calls"]] == [(t.name, t.arguments) for t in exp.tool_calls]
        if exp.reasoning:
            assert r["reasoning"] == exp.reasoning

    summary = json.loads(summary_path.read_text())
    assert summary["schema_version"] == 1
    assert summary["command"] == "demo"
    n_failing = sum(1 for r in rows if r["fault"] in FAULT_KIND)
    assert summary["counts"]["streams"] == 120
    assert summary["counts"]["failed"] == n_failing
    assert sum(summary["counts"]["errors_by_kind"].values()) == n_failing
    assert set(summary["metrics"]) == {"ttft_ms", "ttft_content_ms", "itl_ms", "e2e_ms", "tokens_per_s"}
    assert summary["metrics"]["ttft_ms"]["count"] > 100
    assert summary["metrics"]["ttft_ms"]["p50"] > 0
    assert summary["demo"]["unexpected"] == []
    # The table on stdout, and no progress line when stderr is not a terminal.
    assert "ttft_ms" in stdout and "itl_ms" in stdout and "streams      120" in stdout
    assert "\r" not in stderr


def test_demo_interrupted_stops_everything(tmp_path):
    out = tmp_path / "demo.jsonl"
    marker = uuid.uuid4().hex
    # Slow streams (20 tokens/s each), so the run is in full flow when Ctrl-C arrives.
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "demo", "--streams", "400", "--tps", "20", "--out", str(out)],
        cwd=REPO, env=_env(STREAMRING_TEST_MARK=marker), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not out.exists() and time.monotonic() < deadline:  # the pool starts once the file is open
            time.sleep(0.05)
        time.sleep(1.5)
        assert proc.poll() is None
        assert [n for n in os.listdir("/dev/shm") if n.startswith(f"streamring-{proc.pid}-")]
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    deadline = time.monotonic() + 10
    while _processes_with_marker(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_with_marker(marker) == []
    assert [n for n in os.listdir("/dev/shm") if n.startswith(f"streamring-{proc.pid}-")] == []


# --- run --------------------------------------------------------------------------------------


def test_run_1000_requests_then_resume_reruns_only_the_failed(tmp_path, mock):
    n = 1000
    fault_cycle = ["500", "malformed", "disconnect"]
    faulted = {i: fault_cycle[k % 3] for k, i in enumerate(range(7, n, 40))}
    lines = [_chat_line(i, faulted.get(i)) for i in range(n)]
    reqs, out, summary_path = tmp_path / "reqs.jsonl", tmp_path / "rows.jsonl", tmp_path / "summary.json"
    _write_jsonl(reqs, lines)

    before = _requests_served(mock)
    p = cli("run", str(reqs), "--provider", "openai-chat", "--base-url", mock.base_url("openai-chat"),
            "--retries", "0", "--concurrency", "128", "-o", str(out), "--summary", str(summary_path))
    assert p.returncode == 3, p.stderr
    assert _requests_served(mock) - before == n

    rows = _read_jsonl(out)
    assert len(rows) == n
    by_id = {r["custom_id"]: r for r in rows}
    assert len(by_id) == n
    for i, line in enumerate(lines):
        r = by_id[line["custom_id"]]
        assert r["source_index"] == i
        if i in faulted:
            assert r["error"]["kind"] == FAULT_KIND[faulted[i]], r
        else:
            assert r["error"] is None, r
            assert r["text"] == _clean_text(line)
            assert r["usage"]["output_tokens"] == line["max_tokens"]
    summary = json.loads(summary_path.read_text())
    assert summary["counts"]["streams"] == n
    assert summary["counts"]["failed"] == len(faulted)
    assert summary["counts"]["errors_by_kind"] == {
        "http": sum(f == "500" for f in faulted.values()),
        "malformed": sum(f == "malformed" for f in faulted.values()),
        "truncated": sum(f == "disconnect" for f in faulted.values()),
    }
    assert summary["metrics"]["ttft_ms"]["count"] >= n - len(faulted)
    assert summary["arguments"]["provider"] == "openai-chat"

    # The same requests without faults: only the failed ones are sent again.
    _write_jsonl(reqs, [_chat_line(i) for i in range(n)])
    before = _requests_served(mock)
    p = cli("run", str(reqs), "--provider", "openai-chat", "--base-url", mock.base_url("openai-chat"),
            "--retries", "0", "-o", str(out), "--resume", "--summary", str(summary_path))
    assert p.returncode == 0, p.stderr
    assert _requests_served(mock) - before == len(faulted)
    rows = _read_jsonl(out)
    assert len(rows) == n
    assert sorted(r["custom_id"] for r in rows) == sorted(x["custom_id"] for x in lines)
    assert all(r["error"] is None for r in rows)
    by_id = {r["custom_id"]: r for r in rows}
    for i in faulted:
        assert by_id[lines[i]["custom_id"]]["text"] == _clean_text(lines[i])
    summary = json.loads(summary_path.read_text())
    assert summary["counts"]["streams"] == len(faulted)
    assert summary["skipped"] == n - len(faulted)


def test_run_csv_resume_in_process(tmp_path, mock):
    lines = [_chat_line(i, "500" if i % 4 == 0 else None) for i in range(20)]
    for line in lines[::3]:
        del line["custom_id"]  # resume falls back to the line's position
    reqs, out = tmp_path / "reqs.jsonl", tmp_path / "rows.csv"
    _write_jsonl(reqs, lines)
    p = cli("run", str(reqs), "--provider", "openai-chat", "--base-url", mock.base_url("openai-chat"),
            "--retries", "0", "-o", str(out), "--in-process", "--quiet")
    assert p.returncode == 3, p.stderr
    assert p.stderr == ""  # --quiet

    import csv

    with out.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20
    by_index = {int(r["source_index"]): r for r in rows}
    for i, line in enumerate(lines):
        r = by_index[i]
        assert r["custom_id"] == line.get("custom_id", "")
        if i % 4 == 0:
            assert (r["error.kind"], r["error.http_status"]) == ("http", "500")
        else:
            assert r["error.kind"] == ""
            assert r["text"] == _clean_text(line)

    clean = [_chat_line(i) for i in range(20)]
    for line in clean[::3]:
        del line["custom_id"]
    _write_jsonl(reqs, clean)
    before = _requests_served(mock)
    p = cli("run", str(reqs), "--provider", "openai-chat", "--base-url", mock.base_url("openai-chat"),
            "-o", str(out), "--resume", "--in-process", "--quiet")
    assert p.returncode == 0, p.stderr
    assert _requests_served(mock) - before == 5
    with out.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["source_index"]) for r in rows) == list(range(20))
    assert all(r["error.kind"] == "" for r in rows)


def test_run_json_output_is_one_array_and_max_requests_limits(tmp_path, mock):
    lines = [_chat_line(i) for i in range(12)]
    reqs, out = tmp_path / "reqs.jsonl", tmp_path / "rows.json"
    _write_jsonl(reqs, lines)
    p = cli("run", str(reqs), "--provider", "openai-chat", "--base-url", mock.base_url("openai-chat"),
            "--max-requests", "5", "-o", str(out), "--workers", "1", "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and len(rows) == 5
    assert sorted(r["source_index"] for r in rows) == [0, 1, 2, 3, 4]
    summary = json.loads(p.stdout)  # --json: the summary is what stdout carries
    assert summary["counts"]["streams"] == 5


def test_run_prompt_prints_the_row_on_stdout(mock):
    # The mock takes its seed from a header; the prompt body's max tokens fixes the length.
    p = cli("run", "--prompt", "Hello there", "--provider", "anthropic", "--base-url", mock.base_url("anthropic"),
            "--model", "mock-claude", "--max-tokens", "20", "--header", "x-mock-seed: 5", "--quiet", "--in-process")
    assert p.returncode == 0, p.stderr
    rows = [json.loads(x) for x in p.stdout.splitlines()]
    assert len(rows) == 1
    body = {"model": "mock-claude", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 20}
    assert rows[0]["text"] == expected_text("anthropic", 5, body)
    assert rows[0]["finish_reason"] == "end_turn"
    assert rows[0]["usage"]["output_tokens"] == 20


def test_run_against_a_dead_endpoint_records_each_failure_and_exits_3(tmp_path):
    reqs, out = tmp_path / "reqs.jsonl", tmp_path / "rows.jsonl"
    _write_jsonl(reqs, [_chat_line(i) for i in range(3)])
    # Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
    p = cli("run", str(reqs), "--provider", "openai-chat", "--base-url", "http://127.0.0.1:9/v1",
            "--retries", "0", "-o", str(out), "--in-process", "--quiet")
    assert p.returncode == 3
    rows = _read_jsonl(out)
    assert [r["error"]["kind"] for r in rows] == ["connect"] * 3


def test_api_keys_never_reach_output(tmp_path, mock):
    reqs, out, summary_path = tmp_path / "reqs.jsonl", tmp_path / "rows.jsonl", tmp_path / "s.json"
    _write_jsonl(reqs, [_chat_line(0), _chat_line(1, "500")])
    p = cli("run", str(reqs), "--provider", "openai-chat", "--base-url", mock.base_url("openai-chat"),
            "--api-key-env", "MY_TEST_KEY", "--header", f"x-api-key: {SECRET}", "--retries", "0",
            "-o", str(out), "--summary", str(summary_path), "--json", "--in-process",
            env=_env(MY_TEST_KEY=SECRET, OPENAI_API_KEY=SECRET))
    assert p.returncode == 3
    for text in (p.stdout, p.stderr, out.read_text(), summary_path.read_text()):
        assert SECRET not in text
    summary = json.loads(summary_path.read_text())
    assert summary["arguments"]["api_key_env"] == "MY_TEST_KEY"
    assert summary["arguments"]["header"] == ["x-api-key: [REDACTED]"]


def test_progress_on_a_terminal_honours_no_color(tmp_path, mock):
    reqs = tmp_path / "reqs.jsonl"
    _write_jsonl(reqs, [_chat_line(i, "500" if i == 3 else None) for i in range(20)])
    args = [sys.executable, "-m", "pipeline", "run", str(reqs), "--provider", "openai-chat",
            "--base-url", mock.base_url("openai-chat"), "--retries", "0", "--in-process", "-o", str(tmp_path / "o.jsonl")]

    def stderr_on_tty(env):
        master, slave = pty.openpty()
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=slave)
        os.close(slave)
        chunks = []
        while True:
            r, _, _ = select.select([master], [], [], 60)
            if not r:
                break
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        os.close(master)
        assert proc.wait(60) == 3
        return b"".join(chunks)

    colored = stderr_on_tty(_env())
    assert b"\rstreams " in colored
    assert b"streams 20/20" in colored
    assert b"\x1b[31m" in colored  # errors in red on a terminal
    plain = stderr_on_tty(_env(NO_COLOR="1"))
    assert b"streams 20/20" in plain
    assert b"\x1b[" not in plain


# --- recordings: record, replay, verify -------------------------------------------------------


def _record(mock, tmp_path: Path, body: dict, name: str, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / name
    p = cli("record", "--provider", "openai-chat", "--base-url", mock.base_url("openai-chat"), "--model", "mock-model",
            "--body", json.dumps(body), "-o", str(out), *extra)
    return p, out


def test_record_replay_verify_round_trip(tmp_path, mock):
    body = {"messages": [{"role": "user", "content": "record me"}], "max_tokens": 30, "mock": {"seed": 3, "tokens_per_event": 2}}
    p, sse = _record(mock, tmp_path, body, "chat.sse")
    assert p.returncode == 0, p.stderr
    text = expected_text("openai-chat", 3, body)
    row = json.loads(p.stdout)
    assert row["text"] == text
    # The bytes as the mock sent them: their text digest matches the mock's log of the stream.
    data = sse.read_bytes()
    assert data.rstrip().endswith(b"data: [DONE]")
    timing = [json.loads(x) for x in sse.with_suffix(".timing").read_text().splitlines()]
    assert timing[-1]["offset"] == len(data)
    assert [t["offset"] for t in timing] == sorted(t["offset"] for t in timing)

    p = cli("replay", str(sse))  # dialect guessed from the bytes
    assert p.returncode == 0, p.stderr
    out = [json.loads(x) for x in p.stdout.splitlines()]
    tokens, result = out[:-1], out[-1]["result"]
    assert "".join(t["content"] for t in tokens if t["type"] == "Delta") == text
    assert tokens[-1]["type"] == "Done"
    assert result["text"] == text and result["error"] is None

    p = cli("verify", str(sse))
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["consistent"] is True
    assert report["runs"] == {"split_at_offset": len(data) - 1, "one_byte_reads": 1, "random_splits": 1000}
    assert report["result"]["ok"] is True


def test_record_a_cut_stream_keeps_the_bytes_and_exits_3(tmp_path, mock):
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 40, "mock": {"seed": 4}}
    p, sse = _record(mock, tmp_path, body, "cut.sse", "--header", "x-mock-fault: disconnect")
    assert p.returncode == 3, p.stderr
    row = json.loads(p.stdout)
    assert row["error"]["kind"] == "truncated"
    assert expected_text("openai-chat", 4, body).startswith(row["text"])
    assert sse.stat().st_size > 0
    p = cli("replay", str(sse), "--no-tokens")
    assert p.returncode == 3
    assert json.loads(p.stdout)["result"]["error"]["kind"] == "truncated"


def test_record_an_http_error_saves_nothing_and_exits_1(tmp_path, mock):
    body = {"messages": [{"role": "user", "content": "x"}], "mock": {"seed": 4}}
    p, sse = _record(mock, tmp_path, body, "err.sse", "--header", "x-mock-fault: 500")
    assert p.returncode == 1
    assert "HTTP 500" in p.stderr
    assert not sse.exists()


def test_verify_reports_a_split_dependent_pipeline(tmp_path, monkeypatch, capsys):
    from pipeline import cli as cli_mod
    from pipeline.cli import recordings  # where verify_recording looks _run_chunks up

    sse = tmp_path / "s.sse"
    events = [json.dumps({"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]})
              for w in ("one", " two", " three")]
    events.append(json.dumps({"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    sse.write_bytes(b"".join(f"data: {e}\n\n".encode() for e in events) + b"data: [DONE]\n\n")
    real = recordings._run_chunks

    def lossy(pipe, chunks):
        # A bug that only shows when a read is split: the first byte of every later read is lost.
        chunks = list(chunks)
        return real(pipe, chunks[:1] + [c[1:] for c in chunks[1:]])

    monkeypatch.setattr(recordings, "_run_chunks", lossy)
    assert cli_mod.main(["verify", str(sse), "--splits", "20", "--quiet"]) == 3
    report = json.loads(capsys.readouterr().out)
    assert report["consistent"] is False
    assert report["mismatches"]
    monkeypatch.setattr(recordings, "_run_chunks", real)
    assert cli_mod.main(["verify", str(sse), "--splits", "20", "--quiet"]) == 0


_MANIFEST = provider_manifest()


def _one_capture_per_dialect() -> list:
    if _MANIFEST is None:
        return [pytest.param(None, marks=pytest.mark.skip(reason="real provider captures not found (../shared/fixtures/providers)"))]
    picked: dict[str, str] = {}
    for name, info in sorted(_MANIFEST["files"].items()):
        if info.get("outcome") == "complete" and "text" in info.get("expect", {}) and info["dialect"] != "sse-generic":
            picked.setdefault(info["dialect"], name)
    return [pytest.param(name, id=name) for name in picked.values()]


@pytest.mark.parametrize("name", _one_capture_per_dialect())
def test_replay_of_a_real_capture_gives_the_manifest_text(name):
    from conftest import PROVIDER_FIXTURES

    info = _MANIFEST["files"][name]
    p = cli("replay", str(PROVIDER_FIXTURES / name), "--no-tokens")
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)["result"]
    assert result["text"] == info["expect"]["text"]


def test_dialect_guessing_matches_every_capture():
    from pipeline.cli import guess_dialect

    if _MANIFEST is None:
        pytest.skip("real provider captures not found (../shared/fixtures/providers)")
    for name, info in _MANIFEST["files"].items():
        want = None if info["dialect"] == "sse-generic" else info["dialect"]
        assert guess_dialect(read_capture(name)) == want, name


# --- delegated commands -----------------------------------------------------------------------


def test_mock_command_serves_until_terminated():
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "mock", "--port", "0", "--seed", "3"], cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = json.loads(proc.stdout.readline())
        with urllib.request.urlopen(f"http://127.0.0.1:{ready['port']}/mock/health", timeout=10) as r:
            health = json.loads(r.read())
        assert health == {"ok": True, "port": ready["port"], "seed": 3}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_soak_command_delegates_or_says_it_is_missing():
    p = cli("soak", "--help")
    if (REPO / "pipeline" / "soak.py").exists():
        assert p.returncode == 0, p.stderr
        assert "usage:" in p.stdout
    else:
        assert p.returncode == 1
        assert "streamring soak: not available" in p.stderr


# --- README -------------------------------------------------------------------------------------


def _readme_python_blocks() -> list:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return [pytest.param(b, id=f"block{i}") for i, b in enumerate(blocks)] or [pytest.param(None, marks=pytest.mark.skip(reason="no python blocks"))]


@pytest.mark.parametrize("code", _readme_python_blocks())
def test_readme_python_examples_run(tmp_path, code):
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def test_readme_keeps_the_quick_start_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "python -m pip install . && streamring demo\n" in quick
    assert 'python -m pip install -e ".[test]" && python -m pytest\n' in quick
