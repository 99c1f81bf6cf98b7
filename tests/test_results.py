"""Result files (pipeline/results.py): rows from StreamResults, the three formats and their
round trip, resume-style rewriting, secret redaction and the summary's metrics."""

from __future__ import annotations

import csv
import json
import os

import pytest

from pipeline import PipelineBuilder
from pipeline.metrics import MetricsRegistry, StreamMetricsSnapshot
from pipeline.results import (
    CSV_COLUMNS,
    OutcomeCounter,
    RowWriter,
    build_summary,
    format_for,
    metrics_summary,
    read_rows,
    redact_args,
    result_row,
    resume_plan,
    row_key,
    row_ok,
    row_tokens,
    summary_table,
)

# An OpenAI chat stream written by hand: text in two deltas, one tool call whose arguments arrive
# in two fragments, the finish, and the usage-only chunk.
_EVENTS = [
    {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hello"}, "finish_reason": None}]},
    {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": ', wörld "quoted"\nline2\u2028end'}, "finish_reason": None}]},
    {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": '}}]}, "finish_reason": None}]},
    {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}, "finish_reason": None}]},
    {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    {"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}},
]
TEXT = 'Hello, wörld "quoted"\nline2\u2028end'


def _sse(events: list[dict], done: bool = True) -> bytes:
    out = b"".join(b"data: " + json.dumps(e, ensure_ascii=False).encode() + b"\n\n" for e in events)
    return out + (b"data: [DONE]\n\n" if done else b"")


def _result(data: bytes, custom_id: str | None = "req-1"):
    result = PipelineBuilder().provider("openai-chat").build().collect([data])
    result.custom_id = custom_id
    return result


@pytest.fixture
def ok_row():
    return result_row(_result(_sse(_EVENTS)), source_index=4)


@pytest.fixture
def failed_row():
    # The body stops after the text: no finish, so the stream is truncated.
    return result_row(_result(_sse(_EVENTS[:2], done=False), custom_id=None), source_index=5)


def test_row_of_a_complete_stream_carries_what_the_stream_said(ok_row):
    assert ok_row["custom_id"] == "req-1"
    assert ok_row["source_index"] == 4
    assert ok_row["text"] == TEXT
    assert ok_row["choices"][0]["text"] == TEXT
    assert ok_row["tool_calls"][0]["id"] == "call_1"
    assert ok_row["tool_calls"][0]["name"] == "get_weather"
    assert ok_row["tool_calls"][0]["arguments"] == {"city": "Paris"}
    assert ok_row["usage"]["input_tokens"] == 7
    assert ok_row["usage"]["output_tokens"] == 9
    assert ok_row["usage"]["total_tokens"] == 16
    assert ok_row["finish_reason"] == "tool_calls"
    assert ok_row["finish"] == "tool_calls"
    assert ok_row["error"] is None
    assert row_ok(ok_row)
    assert set(ok_row["timings"]) >= {"ttft_ms", "e2e_ms", "tokens_per_s", "itl_p50_ms", "tokens"}
    json.dumps(ok_row)  # plain JSON data all the way down


def test_row_of_a_truncated_stream_has_the_error_and_keeps_the_text(failed_row):
    assert failed_row["text"] == TEXT
    assert failed_row["error"]["kind"] == "truncated"
    assert failed_row["error"]["retryable"] is True
    assert set(failed_row["error"]) == {"kind", "message", "http_status", "retryable", "retry_after"}
    assert not row_ok(failed_row)


def test_row_key_is_custom_id_else_the_source_index(ok_row, failed_row):
    assert row_key(ok_row) == "req-1"
    assert row_key(failed_row) == "#5"


def test_row_tokens_prefers_the_provider_usage(ok_row, failed_row):
    assert row_tokens(ok_row) == 9
    # No usage: the pipeline's own count (one per text delta here).
    assert row_tokens(failed_row) == 2


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "json"])
def test_rows_round_trip_through_every_format(tmp_path, ok_row, failed_row, suffix):
    path = tmp_path / f"rows.{suffix}"
    with RowWriter(path) as w:
        w.write(ok_row)
        w.write(failed_row)
    assert read_rows(path) == [ok_row, failed_row]


def test_jsonl_is_one_line_per_row_and_json_one_array(tmp_path, ok_row, failed_row):
    with RowWriter(tmp_path / "r.jsonl") as w:
        w.write(ok_row)
        w.write(failed_row)
    # One line per row for every reader: U+2028 in the text is escaped, not a raw line separator.
    lines = (tmp_path / "r.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["source_index"] for x in lines] == [4, 5]
    assert json.loads(lines[0])["text"] == TEXT
    with RowWriter(tmp_path / "r.json") as w:
        w.write(ok_row)
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8")) == [ok_row]


def test_csv_flattens_nested_fields_to_dotted_columns(tmp_path, ok_row, failed_row):
    path = tmp_path / "r.csv"
    with RowWriter(path) as w:
        w.write(ok_row)
        w.write(failed_row)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    assert rows[0]["text"] == TEXT  # newline and quotes survive CSV quoting
    assert rows[0]["usage.output_tokens"] == "9"
    assert rows[0]["error.kind"] == ""
    assert json.loads(rows[0]["tool_calls"])[0]["arguments"] == {"city": "Paris"}
    assert rows[1]["error.kind"] == "truncated"
    assert rows[1]["custom_id"] == ""


def test_extra_fields_become_csv_columns_and_read_back_typed(tmp_path, ok_row):
    row = dict(ok_row, dialect="openai-chat", as_expected=True, fault=None, request={"max_tokens": 3})
    path = tmp_path / "r.csv"
    with RowWriter(path, extra_columns=["dialect", "as_expected", "fault", "request"]) as w:
        w.write(row)
    assert read_rows(path) == [row]


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "json"])
def test_initial_rows_are_kept_and_new_rows_follow(tmp_path, ok_row, failed_row, suffix):
    path = tmp_path / f"r.{suffix}"
    path.write_text("stale content that must go\n", encoding="utf-8")
    with RowWriter(path, initial=[ok_row]) as w:
        w.write(failed_row)
    assert read_rows(path) == [ok_row, failed_row]
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary file left behind


def test_jsonl_rows_are_on_disk_before_close(tmp_path, ok_row):
    path = tmp_path / "r.jsonl"
    w = RowWriter(path)
    w.write(ok_row)
    assert read_rows(path) == [ok_row]  # an interrupted run keeps what finished
    w.close()


def test_a_torn_last_jsonl_line_is_skipped_but_a_torn_middle_line_is_an_error(tmp_path, ok_row):
    path = tmp_path / "r.jsonl"
    good = json.dumps(ok_row)
    path.write_text(good + "\n" + good[: len(good) // 2], encoding="utf-8")
    assert read_rows(path) == [ok_row]
    path.write_text(good[:10] + "\n" + good + "\n", encoding="utf-8")
    with pytest.raises(ValueError):
        read_rows(path)


def test_missing_result_file_reads_as_no_rows(tmp_path):
    assert read_rows(tmp_path / "absent.jsonl") == []


def test_format_is_chosen_by_suffix():
    assert format_for("a.jsonl") == "jsonl"
    assert format_for("a.NDJSON") == "jsonl"
    assert format_for("a.csv") == "csv"
    assert format_for("a.json") == "json"
    assert format_for("a.txt", "") == ""


def test_secrets_are_redacted_from_arguments():
    args = {
        "api_key": "sk-live-123",
        "api_key_env": "MY_KEY",  # a variable's name is not a secret
        "authorization": "Bearer abc",
        "header": ["Authorization: Bearer abc", "x-api-key: k1", "x-trace: 7"],
        "nested": {"token": "t0k", "model": "m"},
        "model": "gpt",
        "func": print,  # argparse's handler: not an argument
    }
    out = redact_args(args)
    dumped = json.dumps(out)
    for secret in ("sk-live-123", "Bearer abc", "k1", "t0k"):
        assert secret not in dumped
    assert out["api_key_env"] == "MY_KEY"
    assert out["header"][2] == "x-trace: 7"
    assert out["nested"]["model"] == "m"
    assert out["model"] == "gpt"
    assert "func" not in out


def test_metrics_summary_maps_registry_names_to_summary_names():
    reg = MetricsRegistry()
    # Two streams with known times: the exact mean, min and max are known in advance.
    reg.record(StreamMetricsSnapshot(tokens=4, ttft_ms=10.0, ttft_content_ms=12.0, e2e_ms=100.0, tokens_per_s=40.0))
    reg.record(StreamMetricsSnapshot(tokens=6, ttft_ms=30.0, ttft_content_ms=32.0, e2e_ms=300.0, tokens_per_s=20.0))
    m = metrics_summary(reg.summary())
    assert set(m) == {"ttft_ms", "ttft_content_ms", "itl_ms", "e2e_ms", "tokens_per_s"}
    for v in m.values():
        assert set(v) == {"unit", "count", "mean", "p50", "p90", "p95", "p99", "min", "max"}
    assert m["ttft_ms"]["unit"] == "ms"
    assert m["ttft_ms"]["mean"] == pytest.approx(20.0)
    assert (m["ttft_ms"]["min"], m["ttft_ms"]["max"]) == pytest.approx((10.0, 30.0))
    assert m["e2e_ms"]["mean"] == pytest.approx(200.0)
    assert m["ttft_content_ms"]["min"] == pytest.approx(12.0)
    assert m["tokens_per_s"]["unit"] == "tokens/s"
    assert m["tokens_per_s"]["mean"] == pytest.approx(30.0)
    assert m["itl_ms"]["count"] == 0 and m["itl_ms"]["mean"] is None
    for v in m.values():
        if v["count"]:
            assert v["min"] <= v["p50"] <= v["p90"] <= v["p95"] <= v["p99"] <= v["max"]


def test_percentiles_never_exceed_the_exact_max():
    reg = MetricsRegistry()
    # 535.32 ms lies inside an HDR bucket whose upper edge is above it.
    reg.record(StreamMetricsSnapshot(tokens=1, ttft_ms=535.32, e2e_ms=535.32))
    m = metrics_summary(reg.summary())
    assert m["ttft_ms"]["p50"] == m["ttft_ms"]["p99"] == m["ttft_ms"]["max"] == pytest.approx(535.32)


def test_summary_has_the_documented_fields(ok_row, failed_row):
    summary = build_summary(
        command="run",
        args={"provider": "openai-chat", "api_key": "sk-x"},
        started=1_700_000_000.0,
        ended=1_700_000_002.0,
        counts=[ok_row, failed_row],
        registry_summary=MetricsRegistry().summary(),
        tool_version="9.9.9",
    )
    assert summary["schema_version"] == 1
    assert summary["tool"] == {"name": "streamring", "version": "9.9.9"}
    assert summary["arguments"]["api_key"] == "[REDACTED]"
    assert summary["started_at"] == "2023-11-14T22:13:20.000Z"
    assert summary["ended_at"] == "2023-11-14T22:13:22.000Z"
    assert summary["duration_s"] == 2.0
    assert {"hostname", "platform", "machine", "cpu_count"} <= set(summary["host"])
    assert {"version", "implementation"} <= set(summary["python"])
    assert summary["counts"] == {
        "streams": 2,
        "succeeded": 1,
        "failed": 1,
        "errors_by_kind": {"truncated": 1},
        "finish": {"error": 1, "tool_calls": 1},
    }
    assert summary["tokens"] == 9 + 2
    assert summary["tokens_per_s"] == pytest.approx(11 / 2.0)
    json.dumps(summary)


def test_outcome_counter_counts_by_error_kind():
    c = OutcomeCounter()
    for kind in (None, "http", "http", "truncated", None):
        c.add({"error": None if kind is None else {"kind": kind}, "usage": {"output_tokens": 3}})
    assert (c.streams, c.succeeded, c.failed, c.tokens) == (5, 2, 3, 15)
    assert c.as_dict()["errors_by_kind"] == {"http": 2, "truncated": 1}


def test_summary_table_shows_counts_metrics_and_errors(ok_row, failed_row):
    summary = build_summary(command="run", args={}, started=0.0, ended=1.0, counts=[ok_row, failed_row],
                            registry_summary={}, tool_version="0")
    plain = summary_table(summary)
    assert "streams      2  (succeeded 1, failed 1)" in plain
    for name in ("ttft_ms", "itl_ms", "e2e_ms", "tokens_per_s"):
        assert name in plain
    assert "truncated=1" in plain
    assert "\x1b[" not in plain
    assert "\x1b[31m" in summary_table(summary, color=True)


def _r(key: str, ok: bool, tag: str = "") -> dict:
    return {"custom_id": key, "source_index": 0, "error": None if ok else {"kind": "http"}, "tag": tag}


def test_resume_runs_only_requests_without_a_successful_row():
    previous = [_r("a", True), _r("b", False), _r("c", True), _r("d", False)]
    todo, kept, skipped = resume_plan(previous, ["a", "b", "c", "d", "e"])
    assert todo == [1, 3, 4]  # b and d failed, e never ran
    assert skipped == 2
    assert [r["custom_id"] for r in kept] == ["a", "c"]  # b's and d's rows are replaced


def test_resume_with_a_limit_keeps_the_failed_rows_it_does_not_rerun():
    previous = [_r("a", False), _r("b", False), _r("c", False)]
    todo, kept, skipped = resume_plan(previous, ["a", "b", "c"], limit=1)
    assert todo == [0]
    assert skipped == 0
    assert [r["custom_id"] for r in kept] == ["b", "c"]


def test_resume_keeps_one_row_per_request_and_prefers_the_success():
    # An earlier resume appended a success after a failure; a row of a request no longer in
    # the file stays.
    previous = [_r("a", False, "old"), _r("a", True, "new"), _r("a", True, "dup"), _r("gone", True)]
    todo, kept, skipped = resume_plan(previous, ["a"])
    assert (todo, skipped) == ([], 1)
    assert [(r["custom_id"], r["tag"]) for r in kept] == [("a", "new"), ("gone", "")]


def test_resume_matches_rows_without_custom_id_by_position():
    previous = [{"custom_id": None, "source_index": 0, "error": None}, {"custom_id": None, "source_index": 1, "error": {"kind": "http"}}]
    todo, kept, skipped = resume_plan(previous, ["#0", "#1"])
    assert (todo, skipped, len(kept)) == ([1], 1, 1)
