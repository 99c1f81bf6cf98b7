"""Recorded streams: the exact bytes of a response body and, optionally, where each socket read
ended and when, so a stream replays byte for byte and read for read, in real time or faster.

On disk a recording is `NAME.sse` (the bytes) plus an optional `NAME.timing` sidecar of JSON
lines, one per read: `{"offset": <byte offset after this read>, "t_ns": <monotonic ns of the read,
relative to the first read>}`. Replay needs no network and no clock unless paced.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import os
import re
import time
import weakref
from pathlib import Path
from typing import AsyncIterator, Iterator, Literal, Union

__all__ = [
    "DEFAULT_READ_SIZE",
    "ReadSize",
    "Recording",
    "RecordingWriter",
    "aiter_replay",
    "iter_replay_chunks",
    "split_events",
    "timing_path",
]

# 16 KiB: a typical socket read of a busy stream (aiohttp's default chunk is 64 KiB; most
# provider events are a few hundred bytes, so this still carries many events per read).
DEFAULT_READ_SIZE = 16384

ReadSize = Union[int, Literal["event", "recorded"]]
PathLike = Union[str, "os.PathLike[str]"]

# A blank line ends an event: a line end (CRLF, lone CR or LF) right after another line end.
# https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
# A CR followed by LF is one line end, so a lone CR must not be followed by LF.
_EOL = rb"(?:\r\n|\r(?!\n)|\n)"
_BLANK_LINE = re.compile(_EOL + _EOL)


def timing_path(path: PathLike) -> Path:
    """The `.timing` sidecar path of a recording path (`x.sse` -> `x.timing`)."""
    p = Path(path)
    return p.with_suffix(".timing") if p.suffix == ".sse" else p.with_name(p.name + ".timing")


class Recording:
    """One recorded body: `data` (the bytes) and `reads`, a list of `(end_offset, t_ns)` per read
    with `t_ns` relative to the first read (empty when no timing was recorded)."""

    __slots__ = ("data", "reads", "__weakref__")

    def __init__(self, data: bytes, reads: list[tuple[int, int]] | None = None) -> None:
        self.data = bytes(data)
        self.reads: list[tuple[int, int]] = list(reads or [])
        prev = 0
        for off, _t in self.reads:
            if off < prev or off > len(self.data):
                raise ValueError(f"read offsets must grow within the data: {off} after {prev} (len {len(self.data)})")
            prev = off
        if self.reads and self.reads[-1][0] != len(self.data):
            raise ValueError(f"the last read ends at {self.reads[-1][0]}, the data at {len(self.data)}")

    @classmethod
    def load(cls, path: PathLike) -> "Recording":
        """Read `path` and its `.timing` sidecar when there is one."""
        data = Path(path).read_bytes()
        reads: list[tuple[int, int]] = []
        tp = timing_path(path)
        if tp.is_file():
            with tp.open("r", encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        row = json.loads(line)
                        reads.append((int(row["offset"]), int(row["t_ns"])))
        return cls(data, reads)

    @classmethod
    def save(cls, path: PathLike, data: bytes, reads: list[tuple[int, int]] | None = None) -> "Recording":
        """Write `data` to `path` and, when `reads` is given, the `.timing` sidecar."""
        rec = cls(data, reads)
        rec.write(path)
        return rec

    def write(self, path: PathLike) -> None:
        """Write this recording to `path` (and its sidecar when it has reads)."""
        Path(path).write_bytes(self.data)
        tp = timing_path(path)
        if self.reads:
            tp.write_text("".join(json.dumps({"offset": o, "t_ns": t}) + "\n" for o, t in self.reads), encoding="utf-8")
        elif tp.exists():
            tp.unlink()

    @property
    def duration_ns(self) -> int:
        """Time from the first read to the last, 0 without timing."""
        return self.reads[-1][1] if self.reads else 0

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"Recording({len(self.data)} bytes, {len(self.reads)} reads)"


class RecordingCache:
    """Loads recordings by path, sharing one Recording among the users of an unchanged file
    while any of them holds it (a load test replays a few files over thousands of streams, and
    each copy would otherwise live as long as its stream)."""

    # Dead entries are swept when the table grows past this many.
    _SWEEP = 1024

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, weakref.ref]] = {}

    def load(self, path: PathLike) -> Recording:
        """`Recording.load(path)`, or the copy a live user already has of the same unchanged
        file (and sidecar)."""
        key = (_stat_key(path), _stat_key(timing_path(path)))
        name = os.fspath(path)
        cached = self._entries.get(name)
        recording = cached[1]() if cached is not None and cached[0] == key else None
        if recording is None:
            recording = Recording.load(path)
            if len(self._entries) >= self._SWEEP:
                self._entries = {p: e for p, e in self._entries.items() if e[1]() is not None}
            self._entries[name] = (key, weakref.ref(recording))
        return recording


def _stat_key(path: PathLike) -> tuple[int, int] | None:
    """What tells a changed file from an unchanged one: (mtime ns, size), None when absent."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return (info.st_mtime_ns, info.st_size)


class RecordingWriter:
    """Records a body as it is read: `append(chunk, t_ns)` per read, then `close()`. Bytes go to
    `path` as they arrive; the sidecar gets one line per read. A context manager."""

    def __init__(self, path: PathLike, *, timing: bool = True) -> None:
        self.path = Path(path)
        self._data = self.path.open("wb")
        self._timing = timing_path(self.path).open("w", encoding="utf-8") if timing else None
        self._offset = 0
        self._t0: int | None = None

    @property
    def offset(self) -> int:
        """Bytes recorded so far."""
        return self._offset

    def append(self, chunk: bytes, t_ns: int | None = None) -> None:
        """Record one read: its bytes and its monotonic time (`time.monotonic_ns()` when None)."""
        if t_ns is None:
            t_ns = time.monotonic_ns()
        if self._t0 is None:
            self._t0 = t_ns
        self._data.write(chunk)
        self._offset += len(chunk)
        if self._timing is not None:
            self._timing.write(f'{{"offset": {self._offset}, "t_ns": {t_ns - self._t0}}}\n')

    def close(self) -> None:
        """Flush and close both files (idempotent)."""
        for f in (self._data, self._timing):
            if f is not None and not f.closed:
                f.close()

    def __enter__(self) -> "RecordingWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def split_events(data: bytes) -> list[int]:
    """End offsets of the events in `data`: just after each blank line (LF, CRLF or CR line ends),
    plus the end of the data when bytes follow the last blank line."""
    ends = [m.end() for m in _BLANK_LINE.finditer(data)]
    if not ends or ends[-1] != len(data):
        ends.append(len(data))
    return ends if data else []


def _boundaries(recording: Recording, read_size: ReadSize) -> list[int]:
    data = recording.data
    if read_size == "event":
        return split_events(data)
    if read_size == "recorded":
        return [o for o, _ in recording.reads] if recording.reads else split_events(data)
    if not isinstance(read_size, int) or read_size < 1:
        raise ValueError(f"read_size must be a positive int, 'event' or 'recorded', not {read_size!r}")
    return list(range(read_size, len(data), read_size)) + ([len(data)] if data else [])


def iter_replay_chunks(recording: Recording, read_size: ReadSize = DEFAULT_READ_SIZE) -> Iterator[bytes]:
    """The recorded bytes as reads: fixed-size slices, one per event (split after each blank
    line), or the recorded read boundaries (events when there is no timing)."""
    data = recording.data
    start = 0
    for end in _boundaries(recording, read_size):
        if end > start:
            yield data[start:end]
            start = end


async def aiter_replay(recording: Recording, read_size: ReadSize = DEFAULT_READ_SIZE, pace: float | None = None) -> AsyncIterator[bytes]:
    """`iter_replay_chunks` for asyncio. With `pace` p, each chunk arrives when the recorded read
    holding its last byte did, divided by p (2.0 is twice as fast); None or 0 does not sleep."""
    data = recording.data
    offsets = [o for o, _ in recording.reads]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    start = 0
    for end in _boundaries(recording, read_size):
        if end <= start:
            continue
        if pace and offsets:
            i = min(bisect.bisect_left(offsets, end), len(offsets) - 1)
            due = t0 + recording.reads[i][1] / 1e9 / pace
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        yield data[start:end]
        start = end
