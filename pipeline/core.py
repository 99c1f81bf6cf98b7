"""The in-process pipeline: PipelineBuilder, StreamingPipeline and the per-stream StreamSession.

A StreamSession is the one implementation of per-stream logic (SSE framing, dialect adapter,
token decoder, transformer chain, accumulator, metrics). The in-process entry points drive it
directly; the pool's workers drive the same class from ring records (DESIGN.md section 1).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Any

from .backpressure import BackpressureController, bounded_read_ahead
from .errors import ConfigurationError, StreamError
from .metrics import MetricsRegistry, StreamMetrics
from .providers import DIALECTS, get_adapter
from .sse import SseEvent, SseParser
from .tokens import Delta, Done, Error, StreamResult, StreamToken, Usage
from .transformers import Emit, PASS, StreamTransformer, TokenAccumulator, TransformerChain

# Why 16 MiB: the largest single events seen in practice are inline images and long tool
# arguments of a few MiB; anything beyond that is far more likely a broken or hostile stream.
DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024


class DecoderOptions:
    """How token ids in a stream are turned back into text (only when the encoding is known)."""

    __slots__ = ("encoding", "special", "tail")

    def __init__(self, encoding: str, special: str = "keep", tail: str = "replace") -> None:
        self.encoding = encoding
        self.special = special
        self.tail = tail


class _UsageEstimator(StreamTransformer):
    """Adds a Usage(estimated=True) with output tokens counted from the text when the provider
    reported no output count by the end of a stream."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._parts: list[str] = []
        self._reported = False

    def fresh(self) -> "_UsageEstimator":
        return _UsageEstimator(self.encoding)

    def transform(self, token: StreamToken):  # type: ignore[override]
        tt = type(token)
        if tt is Delta:
            self._parts.append(token.content)  # type: ignore[union-attr]
        elif tt is Usage:
            if token.output_tokens is not None:  # type: ignore[union-attr]
                self._reported = True
        elif tt is Done and not self._reported:
            from .decoder import TokenCounter

            counter = TokenCounter(self.encoding)
            n = counter.count("".join(self._parts))
            return Emit([Usage(output_tokens=n, estimated=True), token])
        return PASS


def _adapter_error(exc: Exception) -> Error:
    """The Error token for an exception out of an adapter: its own typed error, or `malformed`
    for bad input the adapter did not anticipate (this stream only, either way)."""
    if isinstance(exc, StreamError):
        return Error.from_exception(exc)
    return Error.of("malformed", f"{type(exc).__name__}: {exc}")


class StreamSession:
    """One stream's state: bytes or parsed events in, StreamTokens out, a StreamResult at the end."""

    __slots__ = (
        "stream_id",
        "dialect",
        "_clock_ns",
        "_parser",
        "_max_event_bytes",
        "_adapter",
        "_decoder",
        "_chain",
        "_accumulator",
        "_metrics",
        "_registry",
        "finished",
        "result",
    )

    def __init__(self, pipeline: "StreamingPipeline", stream_id: int = 0, dialect: str | None = None,
                 start_ns: int | None = None) -> None:
        self.stream_id = stream_id
        self.dialect = dialect or pipeline.dialect
        self._clock_ns = pipeline.clock_ns
        # Made at the first process_chunk: a pool worker gets parsed events and never needs one
        # (thousands of sessions at once; each parser is two objects per stream).
        self._parser: SseParser | None = None
        self._max_event_bytes = pipeline.max_event_bytes
        self._adapter = get_adapter(self.dialect)()
        self._decoder = None
        if pipeline.decoder_options is not None:
            from .decoder import TokenDecoder

            opts = pipeline.decoder_options
            self._decoder = TokenDecoder(opts.encoding, special=opts.special, tail=opts.tail)
        self._accumulator = TokenAccumulator()
        chain = [t.fresh() for t in pipeline.transformers]
        if pipeline.estimate_usage_encoding is not None:
            chain.append(_UsageEstimator(pipeline.estimate_usage_encoding))
        chain.append(self._accumulator)
        # A transformer that raises fails its stream at that token (TransformerChain(contain=True)).
        self._chain = TransformerChain(chain, contain=True)
        self._registry = pipeline.registry
        if pipeline.metrics_enabled:
            self._metrics = StreamMetrics(clock_ns=pipeline.clock_ns)
        else:
            self._metrics = StreamMetrics.noop()
        self._metrics.start(self._clock_ns() if start_ns is None else start_ns)
        self.finished = False
        self.result: StreamResult | None = None

    @property
    def stop_requested(self) -> bool:
        """True when a transformer ended the stream early: the source should stop reading."""
        return self._chain.stop_requested

    def process_chunk(self, data: bytes | bytearray | memoryview, read_ns: int | None = None) -> list[StreamToken]:
        """Feed one read of the response body; returns the tokens it completed."""
        if self.finished:
            return []
        if read_ns is None:
            read_ns = self._clock_ns()
        self._metrics.on_chunk(len(data), read_ns)
        parser = self._parser
        if parser is None:
            parser = self._parser = SseParser(max_event_bytes=self._max_event_bytes)
        try:
            events = parser.feed(data)
        except StreamError as exc:
            received = exc.received if isinstance(exc.received, list) else []
            return self._run(received, read_ns, Error.from_exception(exc))
        return self._run(events, read_ns, None)

    def process_events(self, events: list[SseEvent], read_ns: int, nbytes: int | None = None) -> list[StreamToken]:
        """Feed events already parsed from the framing (what a pool worker receives)."""
        return process_event_batches([(self, events, read_ns, nbytes)])[0]

    def fail(self, error: Error, read_ns: int | None = None) -> list[StreamToken]:
        """End the stream with an error from outside the bytes (HTTP status, timeout, cancel)."""
        if self.finished:
            return []
        return self._run([], self._clock_ns() if read_ns is None else read_ns, error)

    def close(self, read_ns: int | None = None, discarded_tail: bool | None = None) -> list[StreamToken]:
        """End of input: flush the parser, apply the dialect's completion rule, flush every
        transformer, and build the result. `discarded_tail` is given by callers that parsed the
        framing themselves (a pool worker); otherwise the session's own parser tells."""
        if self.finished:
            return []
        if read_ns is None:
            read_ns = self._clock_ns()
        parser = self._parser
        tail_events = parser.close() if parser is not None else []
        if discarded_tail is None:
            discarded_tail = parser is not None and parser.discarded_tail
        tokens = self._adapter_feed(tail_events) if tail_events else []
        if not self._adapter.finished:
            try:
                tokens += self._adapter.close(discarded_tail)
            except Exception as exc:  # an adapter bug must still end only this stream
                tokens.append(Error.of("malformed", f"{type(exc).__name__}: {exc}"))
        out = self._after_adapter(tokens, read_ns)
        if not self.finished:
            # Defensive: an adapter whose close() produced no terminal token.
            out += self._after_adapter([Error.of("truncated", "stream ended without a terminal event")], read_ns)
        return out

    # --- internals ---------------------------------------------------------------------------

    def _adapter_feed(self, events: list[SseEvent]) -> list[StreamToken]:
        try:
            return self._adapter.feed(events)
        except Exception as exc:
            return [_adapter_error(exc)]

    def _run(self, events: list[SseEvent], read_ns: int, error: Error | None) -> list[StreamToken]:
        tokens = self._adapter_feed(events) if events else []
        if error is not None and not self._adapter.finished:
            tokens.append(error)
        return self._after_adapter(tokens, read_ns)

    def _after_adapter(self, tokens: list[StreamToken], read_ns: int) -> list[StreamToken]:
        if not tokens:
            return tokens
        return self._transform(self._count(tokens, read_ns), read_ns)

    def _count(self, tokens: list[StreamToken], read_ns: int) -> list[StreamToken]:
        """Token ids decoded to text (when configured), then counted by the metrics."""
        if self._decoder is not None:
            tokens = self._decode_ids(tokens)
        # Metrics count what the provider sent, before transformers hold back or split text.
        self._metrics.on_tokens(tokens, read_ns)
        return tokens

    def _transform(self, tokens: list[StreamToken], read_ns: int) -> list[StreamToken]:
        """The transformer chain; the result is built when the stream ends."""
        try:
            out = self._chain.process(tokens)
        except Exception as exc:  # a failing user transformer ends only this stream
            err = Error.of("filtered", f"transformer failed: {type(exc).__name__}: {exc}")
            self._chain.ended = True
            self._accumulator.observe_batch([err])
            out = [err]
        if self._chain.ended:
            self._finalize(read_ns)
        return out

    def _decode_ids(self, tokens: list[StreamToken]) -> list[StreamToken]:
        decoder = self._decoder
        out: list[StreamToken] = []
        for tok in tokens:
            tt = type(tok)
            if tt is Delta and tok.token_ids:  # type: ignore[union-attr]
                try:
                    text = decoder.decode_tokens(tok.token_ids)  # type: ignore[union-attr]
                except StreamError as exc:
                    out.append(Error.from_exception(exc))
                    break
                out.append(Delta(text, tok.index, tok.logprobs, tok.token_ids))  # type: ignore[union-attr]
            elif tt is Done or tt is Error:
                try:
                    tail = decoder.flush()
                except StreamError as exc:
                    out.append(Error.from_exception(exc))
                    break
                if tail:
                    out.append(Delta(tail, 0))
                out.append(tok)
            else:
                out.append(tok)
        return out

    def _finalize(self, read_ns: int) -> None:
        self.finished = True
        self._metrics.finish(read_ns)
        snapshot = self._metrics.snapshot()
        result = self._accumulator.build_result(metrics=snapshot)
        result.stream_id = self.stream_id
        self.result = result
        if self._registry is not None and snapshot is not None:
            self._registry.record(snapshot, result)
        # Drop per-stream state now: a pool keeps thousands of sessions alive at once.
        self._parser = None
        self._decoder = None


def process_event_batches(
    batches: list[tuple[StreamSession, list[SseEvent], int, int | None]],
) -> list[list[StreamToken]]:
    """`session.process_events(events, read_ns, nbytes)` for each item, done stage by stage
    across the items: every adapter first, then the metrics, then the transformers. Each session
    sees exactly the calls `process_events` makes, in the same order; a session may appear at
    most once. Returns each item's tokens.

    Why: a pool worker with many streams gets one read per stream per pass, and the whole path
    for one read (JSON decoding, adapter, metrics, transformers) is more code and data than the
    first-level caches hold. Running one stage over every read of a pass keeps that stage's code
    hot: `tools/instructions.py --cache` counts half the cache misses per event this way."""
    out: list[list[StreamToken]] = []
    add = out.append
    for session, events, read_ns, nbytes in batches:
        if session.finished:
            add([])
            continue
        if nbytes is None:
            nbytes = sum(len(e.data) for e in events)
        session._metrics.on_chunk(nbytes, read_ns)
        if not events:
            add([])
            continue
        try:
            add(session._adapter.feed(events))
        except Exception as exc:
            add([_adapter_error(exc)])
    for i, tokens in enumerate(out):
        if tokens:
            item = batches[i]
            out[i] = item[0]._count(tokens, item[2])
    for i, tokens in enumerate(out):
        if tokens:
            item = batches[i]
            out[i] = item[0]._transform(tokens, item[2])
    return out


class TokenStream:
    """Async iterator of one stream's tokens; `result` is set once it is exhausted."""

    def __init__(self, pipeline: "StreamingPipeline", chunks: AsyncIterable[bytes] | Iterable[bytes]) -> None:
        self._pipeline = pipeline
        self._chunks = chunks
        self.result: StreamResult | None = None

    def __aiter__(self) -> AsyncIterator[StreamToken]:
        return self._run()

    async def _run(self) -> AsyncIterator[StreamToken]:
        session = self._pipeline.open_stream()
        clock = self._pipeline.clock_ns
        chunks = self._chunks
        # An async source is read directly, so closing the reader closes it (its finally runs).
        source = chunks if hasattr(chunks, "__aiter__") else _as_async(chunks)
        controller = self._pipeline.new_backpressure()
        reader = bounded_read_ahead(source, controller)
        try:
            async for chunk in reader:
                for tok in session.process_chunk(chunk, clock()):
                    yield tok
                if session.finished:
                    break
            for tok in session.close(clock()):
                yield tok
        finally:
            await reader.aclose()
        self.result = session.result


async def _as_async(chunks: AsyncIterable[bytes] | Iterable[bytes]) -> AsyncIterator[bytes]:
    if hasattr(chunks, "__aiter__"):
        async for c in chunks:  # type: ignore[union-attr]
            yield c
    else:
        for c in chunks:  # type: ignore[union-attr]
            yield c


class StreamingPipeline:
    """A built, reusable pipeline configuration: dialect, transformer templates, limits, metrics.

    Holds no per-stream state; `open_stream()` makes a fresh StreamSession per stream.
    """

    def __init__(
        self,
        *,
        dialect: str,
        transformers: list[StreamTransformer],
        metrics_enabled: bool = True,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        decoder_options: DecoderOptions | None = None,
        estimate_usage_encoding: str | None = None,
        backpressure: dict[str, Any] | None = None,
        http_options: dict[str, Any] | None = None,
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.dialect = dialect
        self.transformers = list(transformers)
        self.metrics_enabled = metrics_enabled
        self.max_event_bytes = max_event_bytes
        self.decoder_options = decoder_options
        self.estimate_usage_encoding = estimate_usage_encoding
        self.backpressure = dict(backpressure or {})
        self.http_options = dict(http_options or {})
        self.clock_ns = clock_ns
        # Per-process aggregate of finished streams' metrics (merged across processes by the pool).
        self.registry: MetricsRegistry | None = MetricsRegistry() if metrics_enabled else None

    def __getstate__(self) -> dict[str, Any]:
        # Crosses to pool children once, at start: configuration only, a fresh registry there.
        state = self.__dict__.copy()
        state["registry"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.registry = MetricsRegistry() if self.metrics_enabled else None

    def open_stream(self, stream_id: int = 0, dialect: str | None = None, start_ns: int | None = None) -> StreamSession:
        """A new per-stream session (bytes or events in, tokens out)."""
        return StreamSession(self, stream_id, dialect, start_ns)

    def new_backpressure(self) -> BackpressureController:
        """A fresh controller with this pipeline's backpressure settings."""
        return BackpressureController(**self.backpressure)

    def collect(self, chunks: Iterable[bytes]) -> StreamResult:
        """Run a whole stream given as an iterable of reads; returns its StreamResult."""
        session = self.open_stream()
        clock = self.clock_ns
        for chunk in chunks:
            session.process_chunk(chunk, clock())
            if session.finished:
                break
        session.close(clock())
        assert session.result is not None
        return session.result

    async def acollect(self, chunks: AsyncIterable[bytes] | Iterable[bytes]) -> StreamResult:
        """`collect` for an async iterable of reads."""
        stream = self.process_stream(chunks)
        async for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    def process_stream(self, chunks: AsyncIterable[bytes] | Iterable[bytes]) -> TokenStream:
        """Async iterator of tokens over reads; reads ahead in its own task, bounded by a
        BackpressureController, so a slow consumer stops the reads instead of growing memory."""
        return TokenStream(self, chunks)

    def stream_request(self, request: Any, **options: Any) -> Any:
        """Async iterator of tokens for one HTTP streaming request (or a Replay), in this
        process; `.result` once exhausted. Options: `session=`, `limiter=`, `stream_id=`."""
        from .http import stream_request

        return stream_request(self, request, **options)

    def metrics(self) -> Any:
        """This process's merged metrics of finished streams (None when metrics are off)."""
        return None if self.registry is None else self.registry.snapshot()

    def pool(self, workers: int | None = None, ingest: int = 1, *, backend: str = "local", **options: Any) -> Any:
        """A multiprocess pool running this pipeline (a context manager). `backend="ray"` runs
        one pool per node of a Ray cluster (`address=...`; needs the `streamring[ray]` extra)."""
        if backend == "ray":
            from workers.ray_backend import RayPool

            return RayPool(self, workers=workers, ingest=ingest, **options)
        if backend != "local":
            raise ConfigurationError(f"unknown pool backend {backend!r}; use 'local' or 'ray'")
        from workers.pool import Pool

        return Pool(self, workers=workers, ingest=ingest, **options)


class PipelineBuilder:
    """Fluent construction of a StreamingPipeline."""

    def __init__(self) -> None:
        self._dialect = "openai-chat"
        self._transformers: list[StreamTransformer] = []
        self._metrics = True
        self._max_event_bytes = DEFAULT_MAX_EVENT_BYTES
        self._decoder: DecoderOptions | None = None
        self._estimate: str | None = None
        self._backpressure: dict[str, Any] = {}
        self._http: dict[str, Any] = {}
        self._clock_ns: Callable[[], int] = time.monotonic_ns

    def provider(self, name: str) -> "PipelineBuilder":
        """The wire dialect of the streams (see `pipeline.providers.DIALECTS`)."""
        if name not in DIALECTS:
            raise ConfigurationError(f"unknown dialect {name!r}; known: {', '.join(DIALECTS)}")
        self._dialect = name
        return self

    def add_transformer(self, transformer: StreamTransformer) -> "PipelineBuilder":
        """Append a transformer template (copied fresh for each stream)."""
        if not isinstance(transformer, StreamTransformer):
            raise ConfigurationError(f"{transformer!r} is not a StreamTransformer")
        self._transformers.append(transformer)
        return self

    def enable_metrics(self, on: bool = True) -> "PipelineBuilder":
        """Metrics are on by default; off swaps in a no-op that costs nothing."""
        self._metrics = on
        return self

    def with_backpressure(self, **settings: Any) -> "PipelineBuilder":
        """Settings of the BackpressureController (min_buffer, max_buffer, target_delay, ...)."""
        BackpressureController(**settings)  # validate now, not in a worker
        self._backpressure = settings
        return self

    def max_event_bytes(self, limit: int) -> "PipelineBuilder":
        """Largest event or line accepted before the stream fails with `too_large`."""
        if limit <= 0:
            raise ConfigurationError("max_event_bytes must be positive")
        self._max_event_bytes = limit
        return self

    def decode_token_ids(self, encoding: str = "cl100k_base", *, special: str = "keep", tail: str = "replace") -> "PipelineBuilder":
        """Rebuild text from the token ids a stream carries, with this (offline) tiktoken encoding.
        Only for streams whose ids belong to that encoding; otherwise the provider's text stays."""
        self._decoder = DecoderOptions(encoding, special, tail)
        return self

    def estimate_usage(self, encoding: str = "cl100k_base") -> "PipelineBuilder":
        """Count output tokens from the text when a provider reports no usage (marked estimated)."""
        self._estimate = encoding
        return self

    def http(self, **options: Any) -> "PipelineBuilder":
        """HTTP options for `stream_request` and the pool (timeouts, retries, limits)."""
        self._http.update(options)
        return self

    def clock(self, clock_ns: Callable[[], int]) -> "PipelineBuilder":
        """Inject the monotonic nanosecond clock (tests)."""
        self._clock_ns = clock_ns
        return self

    def build(self) -> StreamingPipeline:
        """The pipeline; a TokenAccumulator is always appended so every stream has a result."""
        if self._decoder is not None:
            from .decoder import TokenDecoder

            TokenDecoder(self._decoder.encoding)  # fail here, not per stream, on a bad encoding
        return StreamingPipeline(
            dialect=self._dialect,
            transformers=self._transformers,
            metrics_enabled=self._metrics,
            max_event_bytes=self._max_event_bytes,
            decoder_options=self._decoder,
            estimate_usage_encoding=self._estimate,
            backpressure=self._backpressure,
            http_options=self._http,
            clock_ns=self._clock_ns,
        )
