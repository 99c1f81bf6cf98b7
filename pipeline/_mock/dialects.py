"""How each dialect frames a plan on the wire, as the real captures show it.

`render(plan)` gives the stream's events (payload bytes and event names, no framing yet);
`frame()` turns one into bytes with the dialect's line ends. Each renderer copies the shape of
the captures in fixtures/providers: OpenAI's `"usage":null` chunks and usage-only last chunk,
Anthropic's padded JSON and `ping`s, Gemini's `": "` JSON and CRLF, TGI's `data:{` without a
space, the Responses API's named events with `sequence_number`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from dataclasses import dataclass
from typing import Any, Callable

import msgspec

from .content import StreamPlan, finish_reason_for

__all__ = ["DIALECT_FRAMING", "WireEvent", "frame", "inband_error", "render", "http_error_body"]

_enc = msgspec.json.Encoder()


def _j(obj: Any) -> bytes:
    return _enc.encode(obj)


def _j_gemini(obj: Any) -> bytes:
    # Gemini writes `": "` after keys and no space after commas.
    return json.dumps(obj, ensure_ascii=False, separators=(",", ": ")).encode("utf-8")


class _Template:
    """JSON with holes, for the events a stream sends by the thousand: the object is encoded once
    with placeholder strings, and each event only encodes its own values (about 10x cheaper)."""

    __slots__ = ("_parts",)

    def __init__(self, obj: Any, holes: int, dumps: Callable[[Any], bytes] = _j) -> None:
        data = dumps(obj)
        parts = []
        for i in range(holes):
            head, sep, data = data.partition(dumps(_hole(i)))
            if not sep:
                raise ValueError(f"hole {i} is not in the template (holes must appear in order)")
            parts.append(head)
        parts.append(data)
        self._parts = parts

    def fill(self, *values: bytes) -> bytes:
        """The event's JSON with each hole replaced by an already encoded value, in order."""
        p = self._parts
        out = [p[0]]
        for v, tail in zip(values, p[1:]):
            out.append(v)
            out.append(tail)
        return b"".join(out)


def _hole(i: int) -> str:
    return f"\x00hole{i}\x00"


_H0, _H1, _H2, _H3 = (_hole(i) for i in range(4))


def _int(n: int) -> bytes:
    return str(n).encode()


@dataclass(slots=True)
class WireEvent:
    """One event before framing. `text0`/`ntok0` are the choice-0 text it carries (for the stream
    log's digest); `ntok` is every token it carries (for pacing); `content` marks the events a
    fault position (`fault_at`) counts."""

    data: bytes
    event: str | None = None
    text0: str = ""
    ntok0: int = 0
    ntok: int = 0
    content: bool = False
    comment: bytes | None = None
    retry: int | None = None


# dialect -> (line end, separator after "data:")
DIALECT_FRAMING: dict[str, tuple[bytes, bytes]] = {
    "openai-chat": (b"\n", b" "),
    "openai-completions": (b"\n", b" "),
    "openai-responses": (b"\n", b" "),
    "anthropic": (b"\n", b" "),
    "gemini": (b"\r\n", b" "),
    "tgi-generate": (b"\n", b""),
}


def frame(ev: WireEvent, eol: bytes, sep: bytes, event_id: str | None = None) -> bytes:
    """The bytes of one event: optional `id:`, `event:`, one `data:` line, then a blank line."""
    if ev.comment is not None:
        return b":" + ev.comment + eol + eol
    if ev.retry is not None:
        return b"retry:" + sep + str(ev.retry).encode() + eol + eol
    parts = []
    if event_id is not None:
        parts.append(b"id:" + sep + event_id.encode() + eol)
    if ev.event is not None:
        parts.append(b"event:" + sep + ev.event.encode() + eol)
    parts.append(b"data:" + sep + ev.data + eol + eol)
    return b"".join(parts)


def _round_robin(lists: list[list[WireEvent]]) -> list[WireEvent]:
    # Choices interleave step by step, as in the n=3 capture.
    if len(lists) == 1:
        return lists[0]
    return [e for step in itertools.zip_longest(*lists) for e in step if e is not None]


# --- OpenAI Chat Completions ----------------------------------------------------------------


def _openai_chat(plan: StreamPlan) -> list[WireEvent]:
    base = {
        "id": plan.ids["chat"],
        "object": "chat.completion.chunk",
        "created": plan.created,
        "model": plan.model,
        "system_fingerprint": "fp_mock",
    }
    fr = finish_reason_for(plan.dialect, plan.finish)

    def chunk(ci: int, delta: dict, finish: str | None = None) -> bytes:
        d = dict(base)
        d["choices"] = [{"index": ci, "delta": delta, "logprobs": None, "finish_reason": finish}]
        if plan.include_usage:
            d["usage"] = None
        return _j(d)

    def template(ci: int, delta: dict) -> _Template:
        return _Template(json.loads(chunk(ci, delta)), 1)

    lists = []
    for c in plan.choices:
        evs: list[WireEvent] = []
        first = {"role": "assistant", "content": "" if c.text or not c.tools else None, "refusal": None}
        evs.append(WireEvent(chunk(c.index, first)))
        tpl = template(c.index, {"content": None, "reasoning_content": _H0})
        for p in c.reasoning:
            evs.append(WireEvent(tpl.fill(_j(p.text)), ntok=len(p.ids), content=True))
        tpl = template(c.index, {"content": _H0})
        for p in c.text:
            n = len(p.ids)
            t0, n0 = (p.text, n) if c.index == 0 else ("", 0)
            evs.append(WireEvent(tpl.fill(_j(p.text)), text0=t0, ntok0=n0, ntok=n, content=True))
        for k, t in enumerate(c.tools):
            head = {"index": k, "id": t.id, "type": "function", "function": {"name": t.name, "arguments": ""}}
            evs.append(WireEvent(chunk(c.index, {"tool_calls": [head]})))
            tpl = template(c.index, {"tool_calls": [{"index": k, "function": {"arguments": _H0}}]})
            for p in t.pieces:
                evs.append(WireEvent(tpl.fill(_j(p.text)), ntok=len(p.ids), content=True))
        evs.append(WireEvent(chunk(c.index, {}, fr)))
        lists.append(evs)
    out = _round_robin(lists)
    if plan.include_usage:
        d = dict(base)
        d["choices"] = []
        d["usage"] = {
            "prompt_tokens": plan.input_tokens,
            "completion_tokens": plan.output_tokens,
            "total_tokens": plan.input_tokens + plan.output_tokens,
            "completion_tokens_details": {"reasoning_tokens": plan.reasoning_tokens},
        }
        out.append(WireEvent(_j(d)))
    out.append(WireEvent(b"[DONE]"))
    return out


# --- OpenAI legacy Completions --------------------------------------------------------------


def _openai_completions(plan: StreamPlan) -> list[WireEvent]:
    fr = finish_reason_for(plan.dialect, plan.finish)

    def chunk(ci: int, text: str, finish: str | None) -> bytes:
        d: dict[str, Any] = {
            "id": plan.ids["cmpl"],
            "object": "text_completion",
            "created": plan.created,
            "choices": [{"text": text, "index": ci, "logprobs": None, "finish_reason": finish}],
            "model": plan.model,
        }
        if plan.include_usage:
            d["usage"] = None
        return _j(d)

    lists = []
    for c in plan.choices:
        evs: list[WireEvent] = []
        pieces = c.text or []
        tpl = _Template(json.loads(chunk(c.index, _H0, None)), 1)
        for i, p in enumerate(pieces):
            n = len(p.ids)
            last = i == len(pieces) - 1
            t0, n0 = (p.text, n) if c.index == 0 else ("", 0)
            data = chunk(c.index, p.text, fr) if last else tpl.fill(_j(p.text))
            evs.append(WireEvent(data, text0=t0, ntok0=n0, ntok=n, content=True))
        if not pieces:
            evs.append(WireEvent(chunk(c.index, "", fr)))
        lists.append(evs)
    out = _round_robin(lists)
    if plan.include_usage:
        out.append(
            WireEvent(
                _j(
                    {
                        "id": plan.ids["cmpl"],
                        "object": "text_completion",
                        "created": plan.created,
                        "model": plan.model,
                        "usage": {
                            "prompt_tokens": plan.input_tokens,
                            "completion_tokens": plan.output_tokens,
                            "total_tokens": plan.input_tokens + plan.output_tokens,
                        },
                        "choices": [],
                    }
                )
            )
        )
    out.append(WireEvent(b"[DONE]"))
    return out


# --- Anthropic Messages ---------------------------------------------------------------------


def _anthropic(plan: StreamPlan) -> list[WireEvent]:
    rng = random.Random(f"{plan.seed}:pad")
    c = plan.choices[0]
    out: list[WireEvent] = []

    def pad(data: bytes) -> bytes:
        # The API pads the JSON with a run of 1-15 spaces inside the object before its last brace.
        return data[:-1] + b" " * rng.randint(1, 15) + b"}"

    def ev(name: str, obj: dict, **kw: Any) -> WireEvent:
        return WireEvent(pad(_j(obj)), name, **kw)

    def delta_template(kind: str, field: str) -> _Template:
        return _Template({"type": "content_block_delta", "index": index, "delta": {"type": kind, field: _H0}}, 1)

    def ping() -> WireEvent:
        return WireEvent(b'{"type": "ping"}', "ping")

    def maybe_ping() -> None:
        if rng.random() < 0.03:
            out.append(ping())

    usage0 = {
        "input_tokens": plan.input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 1,
        "service_tier": "standard",
    }
    message = {
        "model": plan.model,
        "id": plan.ids["msg"],
        "type": "message",
        "role": "assistant",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage0,
    }
    out.append(ev("message_start", {"type": "message_start", "message": message}))
    index = 0
    pinged = False

    def start(block: dict) -> None:
        nonlocal pinged
        out.append(ev("content_block_start", {"type": "content_block_start", "index": index, "content_block": block}))
        if not pinged:
            out.append(ping())
            pinged = True

    def stop() -> None:
        nonlocal index
        out.append(ev("content_block_stop", {"type": "content_block_stop", "index": index}))
        index += 1

    if c.reasoning:
        start({"type": "thinking", "thinking": "", "signature": ""})
        tpl = delta_template("thinking_delta", "thinking")
        for p in c.reasoning:
            out.append(WireEvent(pad(tpl.fill(_j(p.text))), "content_block_delta", ntok=len(p.ids), content=True))
            maybe_ping()
        sig = {"type": "signature_delta", "signature": c.signature}
        out.append(ev("content_block_delta", {"type": "content_block_delta", "index": index, "delta": sig}))
        stop()
    if c.text or not c.tools:
        start({"type": "text", "text": ""})
        tpl = delta_template("text_delta", "text")
        for p in c.text:
            n = len(p.ids)
            out.append(WireEvent(pad(tpl.fill(_j(p.text))), "content_block_delta", text0=p.text, ntok0=n, ntok=n, content=True))
            maybe_ping()
        stop()
    for t in c.tools:
        start({"type": "tool_use", "id": t.id, "name": t.name, "input": {}})
        first = {"type": "input_json_delta", "partial_json": ""}
        out.append(ev("content_block_delta", {"type": "content_block_delta", "index": index, "delta": first}))
        tpl = delta_template("input_json_delta", "partial_json")
        for p in t.pieces:
            out.append(WireEvent(pad(tpl.fill(_j(p.text))), "content_block_delta", ntok=len(p.ids), content=True))
        stop()
    final_usage = {
        "input_tokens": plan.input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": plan.output_tokens,
    }
    stop_reason = finish_reason_for(plan.dialect, plan.finish)
    out.append(ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None}, "usage": final_usage}))
    out.append(ev("message_stop", {"type": "message_stop"}))
    return out


# --- Gemini streamGenerateContent?alt=sse ---------------------------------------------------


def _gemini(plan: StreamPlan) -> list[WireEvent]:
    c = plan.choices[0]
    fr = finish_reason_for(plan.dialect, plan.finish)
    thoughts = 0
    cand = 0
    steps: list[tuple[list[dict], int, str, int]] = []  # parts, ntok, text0, ntok0
    for p in c.reasoning:
        steps.append(([{"text": p.text, "thought": True}], len(p.ids), "", 0))
    for p in c.text:
        steps.append(([{"text": p.text}], len(p.ids), p.text, len(p.ids)))
    if c.tools:
        parts = [{"functionCall": {"name": t.name, "args": t.arguments}} for t in c.tools]
        steps.append((parts, sum(t.ntokens for t in c.tools), "", 0))
    last_is_text = bool(steps) and not c.tools and "thought" not in steps[-1][0][0]
    if not last_is_text:
        steps.append(([{"text": ""}], 0, "", 0))
    out: list[WireEvent] = []
    n_reason = len(c.reasoning)
    with_thoughts = bool(plan.reasoning_tokens)

    def obj(parts: list, cand: Any, total: Any, thoughts: Any, finish: bool) -> dict:
        cand_obj: dict[str, Any] = {"content": {"parts": parts, "role": "model"}}
        if finish:
            cand_obj["finishReason"] = fr
        cand_obj["index"] = 0
        usage: dict[str, Any] = {
            "promptTokenCount": plan.input_tokens,
            "candidatesTokenCount": cand,
            "totalTokenCount": total,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": plan.input_tokens}],
        }
        if with_thoughts:
            usage["thoughtsTokenCount"] = thoughts
        return {"candidates": [cand_obj], "usageMetadata": usage, "modelVersion": plan.model, "responseId": plan.ids["gemini"]}

    holes = 4 if with_thoughts else 3
    templates = {
        thought: _Template(obj([{"text": _H0, "thought": True} if thought else {"text": _H0}], _H1, _H2, _H3, False), holes, _j_gemini)
        for thought in (False, True)
    }
    for i, (parts, ntok, text0, ntok0) in enumerate(steps):
        if i < n_reason:
            thoughts += ntok
        else:
            cand += ntok
        total = plan.input_tokens + cand + thoughts
        last = i == len(steps) - 1
        if last or "text" not in parts[0]:
            data = _j_gemini(obj(parts, cand, total, thoughts, last))
        else:
            values = [_j_gemini(parts[0]["text"]), _int(cand), _int(total), _int(thoughts)]
            data = templates["thought" in parts[0]].fill(*values[:holes])
        out.append(WireEvent(data, text0=text0, ntok0=ntok0, ntok=ntok, content=ntok > 0))
    return out


# --- TGI /generate_stream -------------------------------------------------------------------


def _tgi(plan: StreamPlan) -> list[WireEvent]:
    c = plan.choices[0]
    rng = random.Random(f"{plan.seed}:logprob")
    fr = finish_reason_for(plan.dialect, plan.finish)
    full = "".join(p.text for p in c.text)
    total = c.text_tokens
    out: list[WireEvent] = []
    tpl = _Template({"index": _H0, "token": {"id": _H1, "text": _H2, "logprob": _H3, "special": False}, "generated_text": None, "details": None}, 4)
    k = 0
    for pi, p in enumerate(c.text):
        # One event per token; a character split over several tokens comes whole with its last
        # token and the tokens before it carry "" (as TGI's incremental detokenizer does).
        # The oversized fault's one huge piece goes in one event.
        ids = p.ids[:1] if pi == plan.oversize_event else p.ids
        for j, tid in enumerate(ids):
            k += 1
            last_of_piece = j == len(ids) - 1
            text = p.text if last_of_piece else ""
            logprob = -round(rng.random() * 2, 7)
            n0 = len(p.ids) if last_of_piece else 0
            if pi == len(c.text) - 1 and last_of_piece:
                # The last event adds the whole text and the details.
                last_obj = {
                    "index": k,
                    "token": {"id": tid, "text": text, "logprob": logprob, "special": False},
                    "generated_text": full,
                    "details": {"finish_reason": fr, "generated_tokens": total, "seed": None, "input_length": plan.input_tokens},
                }
                data = _j(last_obj)
            else:
                data = tpl.fill(_int(k), _int(tid), _j(text), _j(logprob))
            out.append(WireEvent(data, text0=text, ntok0=n0, ntok=1, content=last_of_piece))
    return out


# --- OpenAI Responses -----------------------------------------------------------------------


def _openai_responses(plan: StreamPlan) -> list[WireEvent]:
    c = plan.choices[0]
    seq = 0
    out: list[WireEvent] = []

    def ev(obj: dict, **kw: Any) -> WireEvent:
        nonlocal seq
        full = {"type": obj["type"], "sequence_number": seq}
        full.update({k: v for k, v in obj.items() if k != "type"})
        seq += 1
        w = WireEvent(_j(full), obj["type"], **kw)
        out.append(w)
        return w

    def template(obj: dict) -> tuple[str, _Template]:
        full = {"type": obj["type"], "sequence_number": _H0}
        full.update({k: v for k, v in obj.items() if k != "type"})
        return obj["type"], _Template(full, 2)

    def delta(tpl: tuple[str, _Template], text: str, **kw: Any) -> None:
        nonlocal seq
        out.append(WireEvent(tpl[1].fill(_int(seq), _j(text)), tpl[0], **kw))
        seq += 1

    def response(status: str, output: list, usage: dict | None, incomplete: dict | None = None) -> dict:
        return {
            "id": plan.ids["resp"],
            "object": "response",
            "created_at": plan.created,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": None,
            "max_output_tokens": None,
            "model": plan.model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": True,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            "metadata": {},
        }

    ev({"type": "response.created", "response": response("in_progress", [], None)})
    ev({"type": "response.in_progress", "response": response("in_progress", [], None)})
    output: list[dict] = []
    oi = 0
    if c.reasoning:
        rs = plan.ids["rs"]
        ev({"type": "response.output_item.added", "output_index": oi, "item": {"id": rs, "type": "reasoning", "summary": []}})
        ev({"type": "response.reasoning_summary_part.added", "item_id": rs, "output_index": oi, "summary_index": 0, "part": {"type": "summary_text", "text": ""}})
        tpl = template({"type": "response.reasoning_summary_text.delta", "item_id": rs, "output_index": oi, "summary_index": 0, "delta": _H1})
        for p in c.reasoning:
            delta(tpl, p.text, ntok=len(p.ids), content=True)
        rtext = "".join(p.text for p in c.reasoning)
        ev({"type": "response.reasoning_summary_text.done", "item_id": rs, "output_index": oi, "summary_index": 0, "text": rtext})
        part = {"type": "summary_text", "text": rtext}
        ev({"type": "response.reasoning_summary_part.done", "item_id": rs, "output_index": oi, "summary_index": 0, "part": part})
        item = {"id": rs, "type": "reasoning", "summary": [part]}
        ev({"type": "response.output_item.done", "output_index": oi, "item": item})
        output.append(item)
        oi += 1
    if c.text or not c.tools:
        mid = plan.ids["msgitem"]
        ev({"type": "response.output_item.added", "output_index": oi, "item": {"id": mid, "type": "message", "status": "in_progress", "content": [], "role": "assistant"}})
        ev({"type": "response.content_part.added", "item_id": mid, "output_index": oi, "content_index": 0, "part": {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}})
        tpl = template({"type": "response.output_text.delta", "item_id": mid, "output_index": oi, "content_index": 0, "delta": _H1, "logprobs": []})
        for p in c.text:
            n = len(p.ids)
            delta(tpl, p.text, text0=p.text, ntok0=n, ntok=n, content=True)
        text = "".join(p.text for p in c.text)
        ev({"type": "response.output_text.done", "item_id": mid, "output_index": oi, "content_index": 0, "text": text, "logprobs": []})
        part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
        ev({"type": "response.content_part.done", "item_id": mid, "output_index": oi, "content_index": 0, "part": part})
        item = {"id": mid, "type": "message", "status": "completed", "content": [part], "role": "assistant"}
        ev({"type": "response.output_item.done", "output_index": oi, "item": item})
        output.append(item)
        oi += 1
    for t in c.tools:
        fc = "fc_" + hashlib.sha256(f"{plan.seed}:{t.id}".encode()).hexdigest()[:48]
        added = {"id": fc, "type": "function_call", "status": "in_progress", "arguments": "", "call_id": t.id, "name": t.name}
        ev({"type": "response.output_item.added", "output_index": oi, "item": added})
        tpl = template({"type": "response.function_call_arguments.delta", "item_id": fc, "output_index": oi, "delta": _H1})
        for p in t.pieces:
            delta(tpl, p.text, ntok=len(p.ids), content=True)
        ev({"type": "response.function_call_arguments.done", "item_id": fc, "output_index": oi, "arguments": t.arguments_json})
        item = dict(added, status="completed", arguments=t.arguments_json)
        ev({"type": "response.output_item.done", "output_index": oi, "item": item})
        output.append(item)
        oi += 1
    usage = {
        "input_tokens": plan.input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": plan.output_tokens,
        "output_tokens_details": {"reasoning_tokens": plan.reasoning_tokens},
        "total_tokens": plan.input_tokens + plan.output_tokens,
    }
    if plan.finish == "length":
        ev({"type": "response.incomplete", "response": response("incomplete", output, usage, {"reason": "max_output_tokens"})})
    else:
        ev({"type": "response.completed", "response": response("completed", output, usage)})
    return out


_RENDERERS: dict[str, Callable[[StreamPlan], list[WireEvent]]] = {
    "openai-chat": _openai_chat,
    "openai-completions": _openai_completions,
    "anthropic": _anthropic,
    "gemini": _gemini,
    "tgi-generate": _tgi,
    "openai-responses": _openai_responses,
}


def render(plan: StreamPlan) -> list[WireEvent]:
    """The unframed events of a clean stream of this plan."""
    return _RENDERERS[plan.dialect](plan)


# --- errors ---------------------------------------------------------------------------------

_HTTP_ERRORS = {
    429: ("rate_limit_exceeded", "rate_limit_error", "RESOURCE_EXHAUSTED", "Rate limit reached (mock)."),
    500: ("server_error", "api_error", "INTERNAL", "The server had an error processing your request (mock)."),
    503: ("server_error", "overloaded_error", "UNAVAILABLE", "The service is temporarily unavailable (mock)."),
}


def http_error_body(dialect: str, status: int) -> bytes:
    """The JSON body each API sends with an HTTP error status."""
    otype, atype, gstatus, message = _HTTP_ERRORS.get(status, ("server_error", "api_error", "UNKNOWN", f"HTTP {status} (mock)."))
    if dialect == "anthropic":
        return _j({"type": "error", "error": {"type": atype, "message": message}})
    if dialect == "gemini":
        return _j_gemini({"error": {"code": status, "message": message, "status": gstatus}})
    if dialect == "tgi-generate":
        return _j({"error": message, "error_type": "overloaded" if status in (429, 503) else "generation"})
    return _j({"error": {"message": message, "type": otype if status != 429 else "requests", "param": None, "code": otype}})


def inband_error(plan: StreamPlan, events: list[WireEvent]) -> list[WireEvent]:
    """The dialect's in-band error event(s) that end a stream after `events`."""
    d = plan.dialect
    msg = "The server had an error while processing your request (mock)."
    if d in ("openai-chat", "openai-completions"):
        return [WireEvent(_j({"error": {"message": msg, "type": "server_error", "param": None, "code": "server_error"}}))]
    if d == "anthropic":
        return [WireEvent(_j({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}), "error")]
    if d == "gemini":
        return [WireEvent(_j_gemini({"error": {"code": 503, "message": "The model is overloaded. Please try again later.", "status": "UNAVAILABLE"}}))]
    if d == "tgi-generate":
        return [WireEvent(_j({"error": "Request failed during generation: Server error: mock failure", "error_type": "generation"}))]
    # openai-responses: `error`, then `response.failed`, with sequence numbers going on.
    seq = sum(1 for e in events if e.comment is None and e.retry is None)
    err = {"type": "error", "sequence_number": seq, "error": {"type": "server_error", "code": "server_error", "message": msg, "param": None}}
    failed_resp = {
        "id": plan.ids["resp"],
        "object": "response",
        "created_at": plan.created,
        "status": "failed",
        "error": {"code": "server_error", "message": msg},
        "incomplete_details": None,
        "model": plan.model,
        "output": [],
        "usage": None,
    }
    failed = {"type": "response.failed", "sequence_number": seq + 1, "response": failed_resp}
    return [WireEvent(_j(err), "error"), WireEvent(_j(failed), "response.failed")]
