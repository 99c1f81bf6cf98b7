"""The mock provider in its own process (`MockProviderProcess`) and from the shell (`serve`,
`main_mock`, behind `streamring mock`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import signal
import sys
import urllib.request
from pathlib import Path
from typing import Any, Callable, Mapping

import msgspec

from .server import MockProviderServer, StreamLog, _base_url, _endpoint

__all__ = ["MockProviderProcess", "main_mock", "serve"]


async def _serve_async(
    port: int,
    seed: int,
    replay_dir: str | Path | None,
    host: str,
    fault_rates: Mapping[str, float] | None,
    on_ready: Callable[[int], None] | None,
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread, or not Unix
            pass
    async with MockProviderServer(seed=seed, host=host, port=port, fault_rates=fault_rates, replay_dir=replay_dir) as mock:
        if on_ready is not None:
            on_ready(mock.port)
        await stop.wait()


def serve(
    port: int = 8000,
    seed: int = 0,
    replay_dir: str | Path | None = None,
    *,
    host: str = "127.0.0.1",
    fault_rates: Mapping[str, float] | None = None,
    on_ready: Callable[[int], None] | None = None,
) -> None:
    """Run the mock in this process until SIGINT or SIGTERM (port 0 picks a free one and
    `on_ready(port)` tells it)."""
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # uvloop is optional off Linux
        runner = asyncio.run
    runner(_serve_async(port, seed, replay_dir, host, fault_rates, on_ready))


def _child_main(conn: Any, kwargs: dict[str, Any]) -> None:
    # The parent's SIGINT (Ctrl-C in a terminal reaches the whole group) must not kill the child
    # before the parent stops it in order; the parent always sends SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        serve(on_ready=lambda port: conn.send(("ready", port)), **kwargs)
    except BaseException as exc:  # report start-up failures to the parent instead of hanging it
        try:
            conn.send(("error", repr(exc)))
        except Exception:
            pass
        raise
    finally:
        conn.close()


class MockProviderProcess:
    """The mock provider in a child process, usable from sync code: `with MockProviderProcess(seed=1)
    as mock: mock.base_url("anthropic")`. Leaving stops and joins the child."""

    def __init__(
        self,
        *,
        seed: int = 0,
        port: int = 0,
        host: str = "127.0.0.1",
        replay_dir: str | Path | None = None,
        fault_rates: Mapping[str, float] | None = None,
        start_method: str = "spawn",
        start_timeout: float = 60.0,
    ) -> None:
        if start_method == "fork":
            raise ValueError("fork is not allowed (DESIGN.md section 6): use spawn or forkserver")
        self._kwargs = dict(
            port=port,
            seed=seed,
            replay_dir=str(replay_dir) if replay_dir is not None else None,
            host=host,
            fault_rates=dict(fault_rates) if fault_rates else None,
        )
        self.host = host
        self._ctx = mp.get_context(start_method)
        self._timeout = start_timeout
        self._proc: Any = None
        self._port: int | None = None

    def start(self) -> "MockProviderProcess":
        """Start the child and wait until it listens."""
        parent, child = self._ctx.Pipe(duplex=False)
        self._proc = self._ctx.Process(target=_child_main, args=(child, self._kwargs), name="streamring-mock", daemon=True)
        try:
            self._proc.start()
            child.close()
            if not parent.poll(self._timeout):
                raise TimeoutError(f"the mock process did not listen within {self._timeout} s")
            try:
                kind, value = parent.recv()
            except EOFError:
                self._proc.join(5)
                raise RuntimeError(f"the mock process exited before listening (exit code {self._proc.exitcode})") from None
            if kind != "ready":
                raise RuntimeError(f"the mock process failed to start: {value}")
            self._port = int(value)
        except BaseException:
            self.stop()
            raise
        finally:
            parent.close()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the child (SIGTERM, then SIGKILL after `timeout`) and join it (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.pid is None:  # never started
            return
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout)
        else:
            proc.join(timeout)
        proc.close()

    def __enter__(self) -> "MockProviderProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        """The child's pid while it runs."""
        return self._proc.pid if self._proc is not None else None

    @property
    def port(self) -> int:
        """The port the child listens on."""
        if self._port is None:
            raise RuntimeError("the mock process is not started")
        return self._port

    def base_url(self, dialect: str = "openai-chat") -> str:
        """The base URL as the official SDK of `dialect` takes it."""
        return _base_url(self.host, self.port, dialect)

    def url(self, dialect: str, model: str = "mock-model") -> str:
        """The full streaming endpoint of `dialect`."""
        return _endpoint(self.host, self.port, dialect, model)

    def _get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://{self.host}:{self.port}{path}", timeout=10) as r:
            return r.read()

    def streams(self) -> list[StreamLog]:
        """Every stream's log, from the child (GET /mock/streams)."""
        return msgspec.json.decode(self._get("/mock/streams"), type=list[StreamLog])

    def stream_log(self, request_id_or_key: str) -> StreamLog | None:
        """One stream's log by request id or stream key."""
        try:
            return msgspec.json.decode(self._get(f"/mock/streams/{request_id_or_key}"), type=StreamLog)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise


def _rate(text: str) -> tuple[str, float]:
    name, sep, p = text.rpartition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=P, got {text!r}")
    return name, float(p)


def main_mock(argv: list[str] | None = None) -> int:
    """`streamring mock` (the CLI delegates here): run the mock provider until Ctrl-C."""
    ap = argparse.ArgumentParser(prog="streamring mock", description="Run the mock LLM provider on loopback.")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on (0: a free one; default 8000)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ap.add_argument("--seed", type=int, default=0, help="server seed for streams that name none (default 0)")
    ap.add_argument("--replay", metavar="DIR", default=None, help="serve recordings from DIR (x-mock-replay: NAME or GET /replay/NAME)")
    ap.add_argument("--fault-rate", metavar="NAME=P", type=_rate, action="append", default=[], help="inject fault NAME into a fraction P of requests (repeatable)")
    args = ap.parse_args(argv)
    if args.replay is not None and not Path(args.replay).is_dir():
        ap.error(f"--replay {args.replay}: not a directory")

    def ready(port: int) -> None:
        print(json.dumps({"listening": f"http://{args.host}:{port}", "port": port, "seed": args.seed}), flush=True)

    try:
        serve(args.port, args.seed, args.replay, host=args.host, fault_rates=dict(args.fault_rate) or None, on_ready=ready)
    except OSError as exc:
        print(f"streamring mock: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
