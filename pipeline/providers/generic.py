"""`sse-generic`: any event stream that is not an LLM dialect (an MCP server, a custom feed).

Each event passes through as a RawEvent. Completion rule (fixtures MANIFEST): judged on framing
only: complete when the body ended on an event boundary (the parser discarded no unfinished
tail), so close(discarded_tail=True) is truncated and close() is Done(finish_reason=None).
"""

from __future__ import annotations

import msgspec

from ..sse import SseEvent
from ..tokens import RawEvent, StreamToken
from .base import Adapter, HttpRequestSpec

__all__ = ["API_KEY_ENV", "GenericSseAdapter", "build_request"]

API_KEY_ENV: tuple[str, ...] = ()


class GenericSseAdapter(Adapter):
    """`sse-generic`: every event becomes a RawEvent; no JSON is read."""

    dialect = "sse-generic"

    def feed(self, events: list[SseEvent]) -> list[StreamToken]:
        """One RawEvent per event (a loop with no JSON: this dialect only frames)."""
        if self.finished:
            return []
        return [RawEvent(ev.event, bytes(ev.data), ev.id) for ev in events]

    def _on_close(self, out: list[StreamToken]) -> None:
        self._done(out, None, "stop")


def build_request(base_url: str, *, model: str | None, body: dict, api_key: str | None,
                  extra_headers: dict | None = None) -> HttpRequestSpec:
    """GET base_url (the full URL of the stream), or POST the body as JSON when there is one."""
    headers = {"accept": "text/event-stream", "cache-control": "no-cache"}
    if api_key is not None:
        headers["authorization"] = f"Bearer {api_key}"
    payload = b""
    method = "GET"
    if body:
        headers["content-type"] = "application/json"
        payload = msgspec.json.encode(body)
        method = "POST"
    if extra_headers:
        headers.update({str(k): str(v) for k, v in extra_headers.items()})
    return HttpRequestSpec(method, base_url, headers, payload)
