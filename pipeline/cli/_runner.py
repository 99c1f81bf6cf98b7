"""Running a command's streams: through the pool (local, or one per Ray node) or in this process."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from typing import Any

from ._common import log
from ._progress import Progress


def default_workers() -> int:
    """Worker processes when --workers is not given: one core left for the ingest process."""
    return max(1, (os.cpu_count() or 2) - 1)


def _pool_supported() -> str | None:
    """None when the pool can run here, else why not."""
    from shm.ring import check_platform

    try:
        check_platform()
    except Exception as exc:  # UnsupportedPlatformError
        return str(exc)
    return None


def resolve_in_process(in_process: bool) -> bool:
    """Whether to run in this process: as asked (`--in-process`), or because the pool cannot run
    here (said on stderr)."""
    if not in_process:
        why = _pool_supported()
        if why is not None:
            log(f"the pool cannot run here ({why}); running in this process")
            return True
    return in_process


def run_streams(
    pipe: Any,
    sources: list[Any],
    *,
    workers: int | None,
    ingest: int,
    concurrency: int | None,
    in_process: bool,
    progress: Progress,
    on_result: Callable[[Any], None],
    ray_address: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Run `sources` through the pool (or in this process), calling `on_result` per finished
    stream (its `source_index` is the position in `sources`), then redrawing `progress`; returns
    the merged metrics summary."""

    if not sources:  # nothing to do (a --resume with every request done): start nothing
        return {}

    def counted() -> Iterator[Any]:
        for src in sources:
            progress.on_start()
            yield src

    def finished(result: Any) -> None:
        on_result(result)
        progress.refresh()

    if not in_process:
        opts: dict[str, Any] = {"workers": workers or default_workers(), "ingest": ingest}
        if concurrency:
            opts["concurrency"] = concurrency
        if ray_address:
            # One local pool per node; --workers is then per node (default: node CPUs - ingest).
            opts.update(backend="ray", address=ray_address, workers=workers)
        with pipe.pool(**opts) as pool:
            for result in pool.run(counted()):
                finished(result)
            return pool.metrics().summary()
    from workers.pool import DEFAULT_CONCURRENCY  # the pool's default, so both modes behave alike

    asyncio.run(_run_in_process(pipe, counted(), concurrency or DEFAULT_CONCURRENCY, finished))
    return pipe.registry.summary() if pipe.registry is not None else {}


async def _run_in_process(pipe: Any, sources: Iterator[Any], concurrency: int,
                          on_result: Callable[[Any], None]) -> None:
    """The in-process pipeline: `concurrency` streams at a time on one event loop."""
    import aiohttp

    from pipeline.chunked import sse_connector

    # The connector the pool's ingest uses too (limit=0: `concurrency` is the bound).
    async with aiohttp.ClientSession(connector=sse_connector(limit=0)) as http:

        async def one(i: int, src: Any) -> None:
            stream = pipe.stream_request(src, session=http, stream_id=i)
            result = await stream.collect()
            result.source_index = i
            on_result(result)

        pending: set[asyncio.Task] = set()

        async def reap() -> None:
            # Wait for one stream to end; a failure inside one (not a stream error) is raised.
            nonlocal pending
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()

        try:
            for i, src in enumerate(sources):
                if len(pending) >= concurrency:
                    await reap()
                pending.add(asyncio.ensure_future(one(i, src)))
            while pending:
                await reap()
        finally:
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
