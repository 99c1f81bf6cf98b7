"""`streamring run`: the requests of a JSONL file (or one --prompt) through the pool."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ..errors import ConfigurationError
from . import _endpoint as endpoint
from ._common import EXIT_OK, EXIT_STREAMS_FAILED, UsageError, check_positive, color_ok, finish_summary, log
from ._progress import Progress
from ._runner import resolve_in_process, run_streams


def load_requests(path: str, dialect: str, base_url: str, model: str | None, api_key: str | None,
                  headers: dict[str, str] | None) -> list[tuple[int, Any]]:
    """(source_index, Request) per non-blank line of a JSONL file; a bad line is a usage error
    naming it. `source_index` counts requests from 0 in file order."""
    from ..sources import Request

    out: list[tuple[int, Any]] = []
    seen: dict[str, int] = {}
    try:
        f = open(path, encoding="utf-8") if path != "-" else sys.stdin
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                body = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{where}: not valid JSON: {exc}") from None
            if not isinstance(body, dict):
                raise UsageError(f"{where}: a request line must be a JSON object")
            cid = body.pop("custom_id", None)
            if cid is not None:
                cid = str(cid)
                if cid in seen:
                    raise UsageError(f"{where}: custom_id {cid!r} already used on line {seen[cid]}")
                seen[cid] = lineno
            # --model fills the model only where the line names none.
            line_model = body.get("model") or model
            try:
                req = Request.from_body(dialect, base_url, body, model=line_model, api_key=api_key,
                                        custom_id=cid, headers=headers)
            except (ConfigurationError, ValueError, TypeError) as exc:
                raise UsageError(f"{where}: {exc}") from None
            out.append((len(out), req))
    return out


def cmd_run(args: argparse.Namespace) -> int:
    """`streamring run`: requests from a JSONL file (or one --prompt) through the pool."""
    from ..core import PipelineBuilder
    from ..results import OutcomeCounter, RowWriter, format_for, json_line, read_rows, result_row, resume_plan, summary_table

    if (args.requests is None) == (args.prompt is None):
        raise UsageError("give a REQUESTS.jsonl file or --prompt TEXT (one of them)")
    if args.resume and not args.output:
        raise UsageError("--resume needs -o FILE (the results of the earlier run)")
    check_positive(args, "concurrency", "workers", "ingest", "max_requests")
    if args.output and format_for(args.output, "") == "":
        raise UsageError(f"-o {args.output}: the file name must end in .jsonl, .csv or .json")
    base_url = endpoint.base_url(args)
    api_key = endpoint.api_key(args)
    headers = endpoint.headers(args)
    http_opts = endpoint.http_options(args)
    if args.prompt is not None:
        if endpoint.needs_model(args.provider) and not args.model:
            raise UsageError("--prompt needs --model")
        body = endpoint.prompt_body(args.provider, args.prompt, args.max_tokens)
        requests = [(0, endpoint.one_request(args.provider, base_url, body, model=args.model, key=api_key,
                                             extra_headers=headers))]
    else:
        requests = load_requests(args.requests, args.provider, base_url, args.model, api_key, headers)

    kept: list[dict[str, Any]] = []
    skipped = 0
    if args.resume:
        try:
            previous = read_rows(args.output)
        except (ValueError, OSError) as exc:
            raise UsageError(f"--resume: cannot read {args.output}: {exc}") from None
        keys = [req.custom_id if req.custom_id is not None else f"#{idx}" for idx, req in requests]
        run_now, kept, skipped = resume_plan(previous, keys, args.max_requests)
        requests = [requests[i] for i in run_now]
        if not args.quiet:
            log(f"--resume: {skipped} request(s) already succeeded in {args.output}; running {len(requests)}")
    elif args.max_requests is not None:
        requests = requests[: args.max_requests]

    try:
        pipe = PipelineBuilder().provider(args.provider).http(**http_opts).build()
    except ConfigurationError as exc:
        raise UsageError(str(exc)) from None
    in_process = resolve_in_process(args.in_process)

    indices = [idx for idx, _ in requests]
    sources = [req for _, req in requests]
    counter = OutcomeCounter()
    rows_to_stdout = not args.output and not args.json
    writer = RowWriter(args.output, initial=kept) if args.output else None
    progress = Progress.on_stderr(len(sources), args.quiet, counter)

    def on_result(result: Any) -> None:
        row = result_row(result, source_index=indices[result.source_index])
        counter.add(row)
        if writer is not None:
            writer.write(row)
        if rows_to_stdout:
            sys.stdout.write(json_line(row))
            sys.stdout.flush()

    started = time.time()
    try:
        metrics = run_streams(pipe, sources, workers=args.workers, ingest=args.ingest or 1,
                              concurrency=args.concurrency, in_process=in_process, progress=progress,
                              ray_address=args.ray, on_result=on_result)
    finally:
        progress.close()
        if writer is not None:
            writer.close()
    ended = time.time()
    summary = finish_summary(args, started=started, ended=ended, counts=counter, metrics=metrics,
                             extra={"skipped": skipped, "mode": "in-process" if in_process else "pool"})
    if not args.quiet:
        print(summary_table(summary, color=color_ok(sys.stderr)), file=sys.stderr, flush=True)
    return EXIT_OK if counter.failed == 0 else EXIT_STREAMS_FAILED
