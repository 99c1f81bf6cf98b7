"""The mock's faults: names, arguments, and the typed outcome a client should see for each.

A fault is chosen per request (`x-mock-fault: name[:arg]` or body `mock.fault`) or drawn from
seeded rates over a run (`MockProviderServer(fault_rates={"disconnect": 0.01}, seed=...)`).
`FAULTS` documents each one; the tests in tests/test_mock_faults.py pin the outcomes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Mapping

from .content import DEFAULT_OVERSIZE_BYTES, MockOptions, StreamPlan
from .dialects import WireEvent, inband_error

__all__ = ["EOLS", "FAULTS", "BodyPlan", "Fault", "FaultPicker", "parse_fault", "shape_body"]

EOLS = {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r"}
_KEEPALIVE = b" keep-alive"

# name -> (argument, what the server does, what a client using the pipeline's adapters gets).
FAULTS: dict[str, tuple[str, str, str]] = {
    "disconnect": ("N bytes (default: half the body)", "closes the connection abruptly after N body bytes", "Error(kind='truncated')"),
    "truncate": ("content event E (default: the middle)", "ends the body cleanly after event E, before the dialect's end", "Error(kind='truncated')"),
    "stall": ("T seconds (default 5)", "stops sending for T seconds before content event E, then goes on", "Error(kind='idle_timeout') from a client whose idle timeout < T; else the clean result"),
    "429": ("Retry-After seconds (default 1)", "HTTP 429 with Retry-After and the dialect's JSON error body", "Error(kind='rate_limited', http_status=429, retry_after=...)"),
    "500": ("", "HTTP 500 with the dialect's JSON error body", "Error(kind='http', http_status=500, retryable=True)"),
    "503": ("Retry-After seconds (optional)", "HTTP 503 with the dialect's JSON error body", "Error(kind='http', http_status=503, retryable=True)"),
    "malformed": ("", "replaces content event E's JSON with its first half", "Error(kind='malformed')"),
    "error": ("", "sends the dialect's in-band error event after E content events and ends", "Error(kind='provider') with the text before it kept"),
    "keepalive": ("", "sends `: keep-alive` comment lines before the first and between events", "the clean result"),
    "crlf": ("", "ends every line with CRLF", "the clean result"),
    "cr": ("", "ends every line with a lone CR", "the clean result"),
    "lf": ("", "ends every line with LF (Gemini's own is CRLF)", "the clean result"),
    "bytewise": ("", "writes the body one byte per write", "the clean result"),
    "oversized": ("bytes (default 4 MiB + 4 KiB)", "makes content event E one huge delta (part of the expected text)", "Error(kind='too_large') when the client's event limit is smaller, else the clean result"),
    "ids": ("", "sends `id: <request-id>.<n>` on every event and keeps them for resumes", "the clean result"),
    "drop": ("content event E (default: the middle)", "sends `retry: 10` first and ids, then closes abruptly inside the event after E; a request with Last-Event-ID continues after that id", "the clean result after one reconnect with Last-Event-ID, no text lost or repeated"),
    "slow_headers": ("T seconds (default 1)", "waits T seconds before the response headers", "the clean result (or a connect/headers timeout shorter than T)"),
}
_ALIASES = {
    "rate_limited": "429",
    "rate_limit": "429",
    "inband_error": "error",
    "in_band_error": "error",
    "keep_alive": "keepalive",
    "1byte": "bytewise",
    "one_byte": "bytewise",
    "resume": "drop",
    "slow-headers": "slow_headers",
    "event_ids": "ids",
}


def _size(text: str) -> int:
    t = text.strip().lower()
    for suffix, mult in (("kib", 1024), ("mib", 1024 * 1024), ("k", 1024), ("m", 1024 * 1024)):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(t)


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault: its canonical name and optional argument string."""

    name: str
    arg: str | None = None

    def __str__(self) -> str:
        return self.name if self.arg is None else f"{self.name}:{self.arg}"

    def number(self, default: float) -> float:
        """The argument as a number, or `default`."""
        return default if self.arg in (None, "") else float(self.arg)  # type: ignore[arg-type]

    def oversize_bytes(self) -> int | None:
        """Size of the oversized delta when this is the oversized fault."""
        if self.name != "oversized":
            return None
        return DEFAULT_OVERSIZE_BYTES if self.arg in (None, "") else _size(self.arg)  # type: ignore[arg-type]

    @property
    def http_status(self) -> int | None:
        """The status of an HTTP-error fault, else None."""
        return int(self.name) if self.name in ("429", "500", "503") else None


def parse_fault(spec: str) -> Fault:
    """`name[:arg]` to a Fault; raises ValueError for an unknown name."""
    name, _, arg = spec.strip().partition(":")
    name = name.strip().lower()
    name = _ALIASES.get(name, name)
    if name not in FAULTS:
        raise ValueError(f"unknown mock fault {spec!r}; known: {', '.join(FAULTS)}")
    return Fault(name, arg.strip() or None if arg else None)


class FaultPicker:
    """Draws a fault (or none) per request from seeded rates, so a run's faults repeat exactly
    for the same seed and request order. Keys may carry an argument (`"stall:2"`)."""

    def __init__(self, rates: Mapping[str, float] | None, seed: int) -> None:
        self._table = [(parse_fault(k), float(p)) for k, p in (rates or {}).items() if p > 0]
        total = sum(p for _, p in self._table)
        if total > 1.0 + 1e-9:
            raise ValueError(f"fault rates add up to {total} > 1")
        self._rng = random.Random(f"faults:{seed}")

    def pick(self) -> Fault | None:
        """The fault for the next request, or None."""
        if not self._table:
            return None
        u = self._rng.random()
        acc = 0.0
        for fault, p in self._table:
            acc += p
            if u < acc:
                return fault
        return None


@dataclass(slots=True)
class BodyPlan:
    """A stream's events after its fault, and how the server sends them."""

    events: list[WireEvent]
    eol: bytes
    event_ids: bool = False
    bytewise: bool = False
    stall_before: int | None = None  # event index to stall before
    stall_s: float = 0.0
    truncated: bool = False  # ends cleanly before the dialect's end
    cut_at_byte: int | None = None  # close abruptly after this many bytes (-1: half the body)
    cut_inside: int | None = None  # close abruptly halfway through this event


def content_index(events: list[WireEvent], at: int | None) -> int:
    """The list index of content event number `at` (default: the middle one)."""
    content = [i for i, e in enumerate(events) if e.content]
    if not content:
        return len(events) // 2
    k = len(content) // 2 if at is None else min(max(0, int(at)), len(content) - 1)
    return content[k]


def shape_body(fault: Fault | None, events: list[WireEvent], plan: StreamPlan, opts: MockOptions, eol: bytes) -> BodyPlan:
    """Apply a body fault to a clean stream's events (HTTP-status and slow-header faults happen
    before the body and leave it as it is)."""
    out = BodyPlan(list(events), eol)
    if fault is None:
        return out
    name = fault.name
    evs = out.events
    if name in EOLS:
        out.eol = EOLS[name]
    elif name == "malformed":
        i = content_index(evs, opts.fault_at)
        e = evs[i]
        # The first half of a JSON object never parses; no text of it counts as sent.
        evs[i] = WireEvent(e.data[: len(e.data) // 2], e.event, ntok=e.ntok, content=True)
    elif name == "error":
        i = content_index(evs, opts.fault_at)
        del evs[i:]
        evs += inband_error(plan, evs)
    elif name == "keepalive":
        out.events = []
        for i, e in enumerate(evs):
            if i % 2 == 0:
                out.events.append(WireEvent(b"", comment=_KEEPALIVE))
            out.events.append(e)
    elif name == "bytewise":
        out.bytewise = True
    elif name == "stall":
        out.stall_before = content_index(evs, opts.fault_at)
        out.stall_s = fault.number(5.0)
    elif name == "truncate":
        at = opts.fault_at if fault.arg is None else int(fault.number(0))
        del evs[content_index(evs, at) + 1 :]
        out.truncated = True
    elif name == "ids":
        out.event_ids = True
    elif name == "drop":
        at = opts.fault_at if fault.arg is None else int(fault.number(0))
        # A small explicit reconnection time first, then ids; the cut falls inside the event
        # after content event `at` (+1 for the retry event put in front).
        out.cut_inside = content_index(evs, at) + 2
        evs.insert(0, WireEvent(b"", retry=10))
        out.event_ids = True
    elif name == "disconnect":
        out.cut_at_byte = int(fault.number(-1))
    return out
