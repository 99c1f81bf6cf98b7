"""SseParser against the WHATWG event-stream rules, a literal reference, httpx-sse and real captures.

Spec: https://html.spec.whatwg.org/multipage/server-sent-events.html#parsing-an-event-stream
Expected values come from the spec's text (worked out by hand below), from `reference_parse` (a
line-for-line transcription of the spec's algorithm over text decoded by a transcription of the
Encoding Standard's UTF-8 decoder, sharing no code with the parser), from httpx-sse, and from the
captures' PROVENANCE.md.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import random
import re
import sys
import time
import types

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import PROVIDER_FIXTURES, capture_cases, read_capture
from pipeline.errors import StreamError, TooLargeError
from pipeline.sse import DEFAULT_MAX_EVENT_BYTES, SseEvent, SseParser

BOM = b"\xef\xbb\xbf"


# -- helpers ---------------------------------------------------------------------------------------


def ev(data: bytes | str, event: str = "message", id: str | None = None, retry: int | None = None) -> SseEvent:
    return SseEvent(event, data.encode() if isinstance(data, str) else data, id, retry)


def parse(stream: bytes, reads: list[bytes] | None = None, **kw) -> tuple[list[SseEvent], SseParser]:
    """Events of the whole stream fed as `reads` (default: one read), then close()."""
    parser = SseParser(**kw)
    events: list[SseEvent] = []
    for read in [stream] if reads is None else reads:
        events += parser.feed(read)
    events += parser.close()
    return events, parser


def cut(stream: bytes, points) -> list[bytes]:
    points = sorted({p for p in points if 0 < p < len(stream)})
    edges = [0, *points, len(stream)]
    return [stream[a:b] for a, b in zip(edges, edges[1:])]


def one_byte_reads(stream: bytes) -> list[bytes]:
    return [stream[i : i + 1] for i in range(len(stream))]


def random_reads(stream: bytes, seed: int, max_size: int) -> list[bytes]:
    rng = random.Random(seed)
    reads, i = [], 0
    while i < len(stream):
        n = rng.randint(1, max_size)
        reads.append(stream[i : i + n])
        i += n
    return reads


def as_tuples(events: list[SseEvent]) -> list[tuple]:
    return [(e.event, e.text, e.id, e.retry) for e in events]


# -- an independent reference: the spec's algorithms transcribed literally --------------------------


def whatwg_utf8_decode(data: bytes) -> str:
    """Encoding Standard "UTF-8 decode": drop one leading BOM, then the UTF-8 decoder with
    replacement (https://encoding.spec.whatwg.org/#utf-8-decoder)."""
    if data.startswith(BOM):
        data = data[3:]
    out: list[str] = []
    code_point = needed = seen = 0
    lower, upper = 0x80, 0xBF
    i = 0
    while i < len(data):
        byte = data[i]
        if needed == 0:
            if byte <= 0x7F:
                out.append(chr(byte))
            elif 0xC2 <= byte <= 0xDF:
                needed, code_point = 1, byte & 0x1F
            elif 0xE0 <= byte <= 0xEF:
                lower = 0xA0 if byte == 0xE0 else lower
                upper = 0x9F if byte == 0xED else upper
                needed, code_point = 2, byte & 0xF
            elif 0xF0 <= byte <= 0xF4:
                lower = 0x90 if byte == 0xF0 else lower
                upper = 0x8F if byte == 0xF4 else upper
                needed, code_point = 3, byte & 0x7
            else:
                out.append("\ufffd")
            i += 1
            continue
        if not lower <= byte <= upper:
            code_point = needed = seen = 0
            lower, upper = 0x80, 0xBF
            out.append("\ufffd")
            continue  # the byte is processed again ("restore byte to ioQueue")
        lower, upper = 0x80, 0xBF
        code_point = (code_point << 6) | (byte & 0x3F)
        seen += 1
        i += 1
        if seen == needed:
            out.append(chr(code_point))
            code_point = needed = seen = 0
    if needed:
        out.append("\ufffd")
    return "".join(out)


def reference_parse(stream: bytes) -> tuple[list[tuple], str | None, int | None, bool, str | None]:
    """The spec's "interpreting an event stream" over the decoded text of a whole stream.
    Returns (events as (type, data, lastEventId, reconnection time), last event ID string,
    reconnection time, whether the input ended inside an event)."""
    text = whatwg_utf8_decode(stream)
    events: list[tuple] = []
    data_buffer = event_type = ""
    id_buffer: str | None = None
    last_event_id: str | None = None
    retry: int | None = None
    pending_fields = False
    pos = 0
    while True:
        match = re.compile(r"[\r\n]").search(text, pos)
        if match is None:
            break
        end = match.start()
        line = text[pos:end]
        pos = end + 2 if text[end : end + 2] == "\r\n" else end + 1
        if line == "":
            last_event_id = id_buffer
            pending_fields = False
            if data_buffer == "":
                event_type = ""
                continue
            if data_buffer.endswith("\n"):
                data_buffer = data_buffer[:-1]
            events.append((event_type or "message", data_buffer, last_event_id, retry))
            data_buffer = event_type = ""
            continue
        if line.startswith(":"):
            continue
        pending_fields = True
        if ":" in line:
            field, value = line.split(":", 1)
            if value.startswith(" "):
                value = value[1:]
        else:
            field, value = line, ""
        if field == "event":
            event_type = value
        elif field == "data":
            data_buffer += value + "\n"
        elif field == "id":
            if "\0" not in value:
                id_buffer = value
        elif field == "retry":
            if value and all(c in "0123456789" for c in value):
                retry = int(value)
    return events, last_event_id, retry, pending_fields or pos < len(text), id_buffer


def test_reference_decoder_agrees_with_hand_worked_encoding_standard_examples():
    # Worked from the Encoding Standard's decoder steps, not from any implementation.
    assert whatwg_utf8_decode(b"\xf0\x80\x80") == "\ufffd" * 3  # F0 needs 90..BF next
    assert whatwg_utf8_decode(b"\xed\xa0\x80") == "\ufffd" * 3  # surrogates are not scalar values
    assert whatwg_utf8_decode(b"\xf0\x9f\x98\n") == "\ufffd\n"  # one U+FFFD for a cut sequence
    assert whatwg_utf8_decode(BOM + BOM + b"a") == "\ufeffa"  # only one BOM dropped


# -- httpx-sse, loaded without httpx (its package __init__ imports httpx; its decoders do not) -----


@functools.lru_cache(maxsize=1)
def _httpx_sse_decoders():
    try:
        from httpx_sse._decoders import SSEDecoder, SSELineDecoder

        return SSELineDecoder, SSEDecoder
    except ImportError:
        spec = importlib.util.find_spec("httpx_sse")
        if spec is None or not spec.submodule_search_locations:
            pytest.skip("httpx-sse is not installed")
        ours = [n for n in sys.modules if n == "httpx_sse" or n.startswith("httpx_sse.")]
        saved = {n: sys.modules.pop(n) for n in ours}
        package = types.ModuleType("httpx_sse")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["httpx_sse"] = package
        try:
            module = importlib.import_module("httpx_sse._decoders")
        finally:
            # Leave sys.modules as found: other tests must not see this bare package.
            for name in [n for n in sys.modules if n == "httpx_sse" or n.startswith("httpx_sse.")]:
                del sys.modules[name]
            sys.modules.update(saved)
        return module.SSELineDecoder, module.SSEDecoder


def httpx_sse_parse(reads: list[bytes]) -> list[tuple]:
    """httpx-sse as `EventSource.iter_sse` drives it: httpx's incremental UTF-8 text decoding of each
    read, its SSELineDecoder, then SSEDecoder.decode per line."""
    import codecs

    SSELineDecoder, SSEDecoder = _httpx_sse_decoders()
    text_decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    lines, decoder = SSELineDecoder(), SSEDecoder()
    out = []
    texts = [text_decoder.decode(r) for r in reads] + [text_decoder.decode(b"", True)]
    all_lines = [line for t in texts if t for line in lines.decode(t)] + lines.flush()
    had_data = False
    for line in all_lines:
        line = line.rstrip("\n")
        if line == "data" or line.startswith("data:"):
            had_data = True
        sse = decoder.decode(line)
        if sse is not None:
            # httpx-sse also dispatches a block without data when it set event, id or retry; the
            # spec does not (no data, no event): that known deviation is left out of the comparison.
            if had_data:
                out.append((sse.event, sse.data, sse.id))
        if not line:
            had_data = False
    return out


# -- line ends ---------------------------------------------------------------------------------------


def test_lf_ends_lines():
    assert parse(b"data: a\n\ndata: b\n\n")[0] == [ev("a"), ev("b")]


def test_cr_ends_lines():
    assert parse(b"data: a\r\rdata: b\r\r")[0] == [ev("a"), ev("b")]


def test_crlf_ends_lines():
    assert parse(b"data: a\r\n\r\ndata: b\r\n\r\n")[0] == [ev("a"), ev("b")]


def test_line_ends_mix_in_one_stream():
    assert parse(b"data: a\r\ndata: b\rdata: c\n\r\n")[0] == [ev("a\nb\nc")]


def test_cr_then_lf_is_one_line_end_not_a_blank_line():
    assert parse(b"data: a\r\ndata: b\r\n\n")[0] == [ev("a\nb")]


def test_cr_ending_a_read_dispatches_without_waiting_for_the_next_read():
    parser = SseParser()
    assert parser.feed(b"data: a\r\n\r") == [ev("a")]


def test_lf_starting_the_next_read_completes_the_crlf():
    parser = SseParser()
    assert parser.feed(b"data: a\r") == []
    # This LF finishes "\r\n"; were it a blank line, "a" would be dispatched on its own.
    assert parser.feed(b"\ndata: b\r") == []
    assert parser.feed(b"\n\r\n") == [ev("a\nb")]


def test_empty_read_between_cr_and_lf_keeps_them_one_line_end():
    parser = SseParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"") == []
    assert parser.feed(b"\ndata: b\n\n") == [ev("a\nb")]


def test_lf_after_a_cr_read_is_only_skipped_once():
    parser = SseParser()
    parser.feed(b"data: a\r")
    assert parser.feed(b"\n\n") == [ev("a")]


def test_lines_split_on_bytes_never_on_unicode_line_separators():
    seps = ["\u2028", "\u2029", "\u0085", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"]
    stream = ("data: " + "|".join(f"a{s}b" for s in seps) + "\n\n").encode()
    assert parse(stream)[0] == [ev("|".join(f"a{s}b" for s in seps))]


# -- byte order mark ----------------------------------------------------------------------------------


def test_bom_at_start_is_dropped():
    assert parse(BOM + b"data: a\n\n")[0] == [ev("a")]


def test_bom_split_over_reads_is_dropped():
    assert parse(BOM + b"data: a\n\n", reads=[b"\xef", b"\xbb", b"\xbfdata: a\n\n"])[0] == [ev("a")]


def test_only_one_bom_is_dropped():
    # The second BOM belongs to the field name, which is then not "data".
    assert parse(BOM + BOM + b"data: a\n\ndata: b\n\n")[0] == [ev("b")]


def test_bom_after_the_start_is_not_dropped():
    parser = SseParser()
    assert parser.feed(b"data: a\n\n") == [ev("a")]
    assert parser.feed(BOM + b"data: b\n\n") == []


def test_partial_bom_prefix_is_ordinary_bytes():
    # EF BB then "d": not a BOM, so the first field name is U+FFFD + "data" and is ignored.
    assert parse(b"\xef\xbbdata: a\n\ndata: b\n\n")[0] == [ev("b")]


# -- fields ---------------------------------------------------------------------------------------------


def test_comment_lines_are_ignored():
    assert parse(b": hello\ndata: a\n: world\n\n")[0] == [ev("a")]


def test_line_without_colon_is_a_field_with_empty_value():
    assert parse(b"data\n\n")[0] == [ev("")]
    assert parse(b"data\ndata\n\n")[0] == [ev("\n")]


def test_exactly_one_leading_space_is_removed_from_a_value():
    assert parse(b"data:  a\n\n")[0] == [ev(" a")]
    assert parse(b"data:a\n\n")[0] == [ev("a")]
    assert parse(b"event:  x\ndata: a\n\n")[0] == [ev("a", event=" x")]


def test_value_keeps_later_colons():
    assert parse(b'data: {"a": 1}\n\n')[0] == [ev('{"a": 1}')]


def test_data_lines_are_joined_with_lf_and_the_last_lf_removed():
    assert parse(b"data: a\ndata: b\ndata: c\n\n")[0] == [ev("a\nb\nc")]


def test_empty_data_line_dispatches_an_event_with_empty_data():
    assert parse(b"data:\n\n")[0] == [ev("")]


def test_no_dispatch_without_data_but_event_type_is_reset():
    assert parse(b"event: a\n\ndata: x\n\n")[0] == [ev("x")]


def test_event_field_sets_the_type():
    assert parse(b"event: delta\ndata: x\n\n")[0] == [ev("x", event="delta")]


def test_empty_event_field_means_message():
    assert parse(b"event:\ndata: x\n\n")[0] == [ev("x")]


def test_event_type_does_not_carry_over_to_the_next_event():
    assert parse(b"event: a\ndata: x\n\ndata: y\n\n")[0] == [ev("x", event="a"), ev("y")]


def test_field_names_are_case_sensitive():
    assert parse(b"Data: a\nDATA: b\nEvent: e\ndata: c\n\n")[0] == [ev("c")]


def test_unknown_fields_are_ignored():
    assert parse(b"foo: bar\ndata: a\nbaz\n\n")[0] == [ev("a")]


# -- id and retry -------------------------------------------------------------------------------------


def test_id_is_carried_by_later_events_and_readable():
    events, parser = parse(b"id: 1\ndata: a\n\ndata: b\n\n")
    assert events == [ev("a", id="1"), ev("b", id="1")]
    assert parser.last_event_id == "1"


def test_last_event_id_is_none_until_an_id_is_set():
    events, parser = parse(b"data: a\n\n")
    assert events == [ev("a", id=None)]
    assert parser.last_event_id is None


def test_id_containing_nul_is_ignored():
    events, parser = parse(b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n")
    assert events == [ev("a", id="1"), ev("b", id="1")]
    assert parser.last_event_id == "1"


def test_empty_id_sets_the_last_event_id_to_empty_string():
    events, parser = parse(b"id: 1\ndata: a\n\nid\ndata: b\n\nid:\ndata: c\n\n")
    assert [e.id for e in events] == ["1", "", ""]
    assert parser.last_event_id == ""


def test_an_accepted_id_is_the_last_event_id_at_once():
    parser = SseParser()
    assert parser.feed(b"id: 7\n") == []
    assert parser.last_event_id == "7"  # accepted: the spec's last event ID buffer


def test_id_without_data_becomes_the_id_to_resume_from_at_the_blank_line():
    parser = SseParser()
    assert parser.feed(b"id: 7\n") == []
    assert parser.resume_event_id is None  # not yet the spec's last event ID string
    assert parser.feed(b"\n") == []
    assert parser.resume_event_id == "7"
    assert parser.feed(b"data: x\n\n") == [ev("x", id="7")]


def test_id_of_a_cut_off_event_is_accepted_but_never_the_id_to_resume_from():
    parser = SseParser()
    parser.feed(b"id: 1\ndata: a\n\nid: 2\ndata: b\n")
    parser.close()
    assert parser.last_event_id == "2"
    assert parser.resume_event_id == "1"


def test_parser_seeded_for_a_reconnection_carries_id_and_retry():
    parser = SseParser(last_event_id="41", retry=3000)
    assert (parser.last_event_id, parser.resume_event_id, parser.retry) == ("41", "41", 3000)
    assert parser.feed(b"data: a\n\nid: 42\ndata: b\n\n") == [ev("a", id="41", retry=3000), ev("b", id="42", retry=3000)]


def test_retry_with_ascii_digits_sets_the_reconnection_time():
    events, parser = parse(b"retry: 1500\ndata: a\n\ndata: b\n\n")
    assert events == [ev("a", retry=1500), ev("b", retry=1500)]
    assert parser.retry == 1500


def test_retry_takes_effect_at_once_without_a_blank_line():
    parser = SseParser()
    parser.feed(b"retry: 250\n")
    assert parser.retry == 250


@pytest.mark.parametrize(
    "value",
    [b"", b" ", b"12a", b"-1", b"+5", b"1.5", b" 1", b"1 ", b"1_000", "\u0661\u0662".encode(), b"\xef\xbc\x91", b"0x10"],
)
def test_retry_other_than_ascii_digits_is_ignored(value):
    events, parser = parse(b"retry: 10\n\nretry:" + b" " + value + b"\ndata: a\n\n")
    assert events == [ev("a", retry=10)]
    assert parser.retry == 10


def test_retry_keeps_leading_zeros_value():
    assert parse(b"retry: 007\n\n")[1].retry == 7


def test_retry_with_very_many_digits_is_exact():
    digits = "9" * 5000  # beyond Python's default int-from-str limit
    assert parse(b"retry: " + digits.encode() + b"\n\n")[1].retry == 10**5000 - 1


# -- text --------------------------------------------------------------------------------------------


def test_data_is_bytes_and_text_decodes_utf8():
    (event,), _ = parse("data: héllo 中文 😀\n\n".encode())
    assert event.data == "héllo 中文 😀".encode()
    assert event.text == "héllo 中文 😀"


def test_malformed_utf8_becomes_replacement_characters_like_the_spec_decoder():
    # \xff: 1 U+FFFD; \xe4\xb8 cut by "b": 1; \xed\xa0\x80 (a surrogate): 3; \xf0\x9f\x98 at line end: 1.
    (event,), _ = parse(b"data: a\xffb\xe4\xb8b\xed\xa0\x80\ndata: \xf0\x9f\x98\n\n")
    assert event.text == "a\ufffdb\ufffdb\ufffd\ufffd\ufffd\n\ufffd"


def test_malformed_utf8_in_event_name_and_id():
    (event,), _ = parse(b"event: e\xff\nid: i\xc3\ndata: x\n\n")
    assert (event.event, event.id) == ("e\ufffd", "i\ufffd")


def test_multibyte_character_split_over_reads():
    stream = "data: 中😀\n\n".encode()
    assert parse(stream, reads=one_byte_reads(stream))[0] == [ev("中😀")]


# -- end of input --------------------------------------------------------------------------------------


def test_unterminated_event_is_discarded_on_close():
    events, parser = parse(b"data: a\n\ndata: b\n")
    assert events == [ev("a")]
    assert parser.discarded_tail is True


def test_partial_last_line_is_discarded_on_close():
    events, parser = parse(b"data: a\n\ndata: b")
    assert events == [ev("a")]
    assert parser.discarded_tail is True


def test_stream_ending_on_an_event_boundary_discards_nothing():
    assert parse(b"data: a\n\n")[1].discarded_tail is False


def test_trailing_comment_lines_are_not_a_discarded_event():
    assert parse(b"data: a\n\n: keep-alive\n")[1].discarded_tail is False


def test_trailing_id_field_without_blank_line_is_a_discarded_tail():
    assert parse(b"data: a\n\nid: 3\n")[1].discarded_tail is True


def test_close_returns_no_events():
    parser = SseParser()
    parser.feed(b"data: a\n")
    assert parser.close() == []


def test_feed_after_close_raises():
    parser = SseParser()
    parser.close()
    with pytest.raises(RuntimeError):
        parser.feed(b"data: a\n\n")


# -- API ---------------------------------------------------------------------------------------------


def test_feed_accepts_bytes_bytearray_and_memoryview():
    parser = SseParser()
    assert parser.feed(bytearray(b"data: a\n\n")) == [ev("a")]
    assert parser.feed(memoryview(b"xxdata: b\n\n")[2:]) == [ev("b")]
    assert parser.feed(b"data: c\n\n") == [ev("c")]


def test_sse_event_is_a_struct_with_fields_in_order_and_defaults():
    assert [f.name for f in msgspec.structs.fields(SseEvent)] == ["event", "data", "id", "retry"]
    assert SseEvent.__struct_config__.gc is False
    assert SseEvent() == SseEvent("message", b"", None, None)


def test_many_events_in_one_read_are_all_returned_in_order():
    stream = b"".join(b"data: %d\n\n" % i for i in range(100))
    assert parse(stream)[0] == [ev(str(i)) for i in range(100)]


def test_event_data_pairs_in_one_read():
    stream = b"event: a\ndata: 1\n\nevent: b\ndata: 2\n\nevent:\ndata: 3\n\n"
    assert parse(stream)[0] == [ev("1", event="a"), ev("2", event="b"), ev("3")]


def test_id_and_retry_set_between_bulk_events_are_carried_by_later_ones():
    stream = b"data: a\n\nid: 5\nretry: 9\ndata: b\n\ndata: c\n\nevent: e\ndata: d\n\n"
    expected = [ev("a"), ev("b", id="5", retry=9), ev("c", id="5", retry=9), ev("d", event="e", id="5", retry=9)]
    assert parse(stream)[0] == expected
    chunks = [b"data: a\n\n", b"id: 5\nretry: 9\ndata: b\n\n", b"data: c\n\n", b"event: e\ndata: d\n\n"]
    assert parse(stream, reads=chunks)[0] == expected


def test_reads_of_whole_events_after_the_first_read():
    reads = [b"data: a\n\n", b"data: b\ndata: c\n\n", b"event: e\ndata: d\ndata: f\n\n", b"data: g\n\n"]
    expected = [ev("a"), ev("b\nc"), ev("d\nf", event="e"), ev("g")]
    assert parse(b"".join(reads), reads=reads)[0] == expected


def test_blank_lines_between_events_dispatch_nothing():
    assert parse(b"\n\n\ndata: a\n\n\n\n\ndata: b\n\n\n")[0] == [ev("a"), ev("b")]


# -- the size limit ----------------------------------------------------------------------------------


def run_until_too_large(stream: bytes, reads: list[bytes], limit: int) -> tuple[list[SseEvent], int, int, TooLargeError]:
    """Feed until TooLargeError; return all events got (incl. the error's), the raising read's
    [start, end) offsets in the stream, and the error."""
    parser = SseParser(max_event_bytes=limit)
    events: list[SseEvent] = []
    offset = 0
    for read in reads:
        try:
            events += parser.feed(read)
        except TooLargeError as exc:
            return events + exc.received, offset, offset + len(read), exc
        offset += len(read)
    raise AssertionError("no TooLargeError")


def _splits(stream: bytes) -> list[list[bytes]]:
    return [[stream], one_byte_reads(stream)] + [random_reads(stream, seed, 9) for seed in range(8)] + [
        random_reads(stream, seed, 200) for seed in range(4)
    ]


@pytest.mark.parametrize("terminator", [b"\n", b"\r\n", b"\r", b""])
def test_line_beyond_limit_raises_at_the_same_point_however_split(terminator):
    limit = 64
    prefix = b"data: first\n\n"
    stream = prefix + b": " + b"c" * 70 + terminator + b"\ndata: never\n\n"
    crossing = len(prefix) + limit  # the line's 65th byte
    for reads in _splits(stream):
        events, start, end, exc = run_until_too_large(stream, reads, limit)
        assert events == [ev("first")]
        assert start <= crossing < end
        assert exc.kind == "too_large"


def test_data_beyond_limit_raises_at_the_line_end_that_crosses_it_however_split():
    limit = 64
    prefix = b"data: ok\r\n\r\n"
    # Joined data: 30, then 30+1+30 = 61, then 61+1+10 = 72 > 64 at the third line's end.
    body = b"data: " + b"a" * 30 + b"\ndata: " + b"b" * 30 + b"\ndata: " + b"c" * 10
    stream = prefix + body + b"\n\ndata: never\n\n"
    crossing = len(prefix) + len(body)
    for reads in _splits(stream):
        events, start, end, _ = run_until_too_large(stream, reads, limit)
        assert events == [ev("ok")]
        assert start <= crossing < end


def test_lfs_joining_data_lines_count_toward_the_limit():
    # 32 + 1 + 32 = 65 bytes of data > 64, though the values alone are 64.
    stream = b"data:" + b"a" * 32 + b"\ndata:" + b"b" * 32 + b"\n\n"
    for reads in _splits(stream):
        with pytest.raises(TooLargeError):
            parse(stream, reads=reads, max_event_bytes=64)


def test_too_large_error_carries_the_events_its_read_completed():
    parser = SseParser(max_event_bytes=16)
    with pytest.raises(TooLargeError) as info:
        parser.feed(b"data: a\n\nevent: e\ndata: b\n\ndata: " + b"x" * 20 + b"\n\ndata: c\n\n")
    assert info.value.received == [ev("a"), ev("b", event="e")]
    assert isinstance(info.value, StreamError) and info.value.retryable is False


def test_unterminated_line_beyond_limit_raises_before_its_end_arrives():
    parser = SseParser(max_event_bytes=100)
    parser.feed(b"data: " + b"x" * 94)  # exactly 100 bytes: allowed
    with pytest.raises(TooLargeError):
        parser.feed(b"x")


def test_parser_refuses_input_after_too_large():
    parser = SseParser(max_event_bytes=8)
    with pytest.raises(TooLargeError):
        parser.feed(b"data: 123456789\n\n")
    with pytest.raises(TooLargeError) as info:
        parser.feed(b"data: a\n\n")
    assert info.value.received == []


def test_data_and_line_of_exactly_the_limit_are_accepted():
    limit = 64
    one_line = b"data:" + b"x" * 59  # a 64-byte line
    joined = b"data:" + b"a" * 31 + b"\ndata:" + b"b" * 32  # 31 + 1 + 32 = 64 bytes of data
    for stream in (one_line + b"\n\n", joined + b"\n\n"):
        for reads in _splits(stream):
            events, _ = parse(stream, reads=reads, max_event_bytes=limit)
            assert len(events) == 1


def test_default_limit_is_16_mib():
    assert SseParser().max_event_bytes == DEFAULT_MAX_EVENT_BYTES == 16 * 1024 * 1024


def test_bulk_read_larger_than_limit_still_parses_small_events():
    stream = b"".join(b"data: %05d\n\n" % i for i in range(100))
    assert len(parse(stream, max_event_bytes=32)[0]) == 100


# -- linear time -------------------------------------------------------------------------------------


def _time_big_event(size: int, line: int, ending: bytes) -> float:
    """Seconds to parse one event of `size` data bytes in lines of `line` bytes, in 1 KiB reads."""
    body = b"x" * (line - 6)
    lines = size // line
    stream = (b"data: " + body + ending) * lines + ending
    reads = [stream[i : i + 1024] for i in range(0, len(stream), 1024)]
    parser = SseParser(max_event_bytes=32 * 1024 * 1024)
    t0 = time.perf_counter()
    events = []
    for read in reads:
        events += parser.feed(read)
    elapsed = time.perf_counter() - t0
    assert len(events) == 1 and len(events[0].data) == lines * (line - 6) + lines - 1
    return elapsed


@pytest.mark.parametrize(
    "line,ending",
    [(16 * 1024 * 1024, b"\n"), (16 * 1024 * 1024, b"\r"), (100, b"\n"), (100, b"\r\n")],
    ids=["one-line-lf", "one-line-cr", "short-lines-lf", "short-lines-crlf"],
)
def test_16_mib_event_in_1_kib_reads_parses_in_linear_time(line, ending):
    big = 16 * 1024 * 1024
    small = big // 4
    t_big = min(_time_big_event(big, min(line, big), ending) for _ in range(2))
    t_small = min(_time_big_event(small, min(line, small), ending) for _ in range(2))
    # Rescanning or re-copying the pending event would take minutes here, and be ~16x not ~4x.
    assert t_big < 5.0
    assert t_big < 8 * t_small + 0.25


# -- property tests ------------------------------------------------------------------------------------

_VALUE_PIECES = [
    b"x", b"hello", b" ", b"  ", b":", b'{"a": [1, 2]}', b"[DONE]", b"data: ", b"1", b"42",
    "é".encode(), "中文".encode(), "😀".encode(), "\u2028".encode(), "\u0085".encode(),
    b"\xff", b"\xc3", b"\xe4\xb8", b"\xf0\x9f\x98", b"\xed\xa0\x80", b"\xc0\xaf", BOM, b"\x00", b"\x0b", b"\x0c",
]
values = st.lists(st.sampled_from(_VALUE_PIECES), max_size=4).map(b"".join)
_NAMES = [b"data", b"data", b"data", b"event", b"id", b"retry", b"Data", b"EVENT", b"foo", b"", b"dat", b"data "]
_SEPARATORS = [b": ", b": ", b":", b":  ", b""]
_RETRIES = [b"0", b"10", b"1500", b"007", b"", b"12a", b"-1", b"+5", b" 1 ", "\u0661".encode(), b"99999999999999999999"]
LINE_ENDS = [b"\n", b"\r", b"\r\n"]

field_lines = st.builds(lambda n, s, v: n + s + v, st.sampled_from(_NAMES), st.sampled_from(_SEPARATORS), values)
retry_lines = st.sampled_from(_RETRIES).map(lambda v: b"retry:" + v)
comment_lines = values.map(lambda v: b":" + v)
any_line = st.one_of(field_lines, field_lines, retry_lines, comment_lines, st.just(b""))


@st.composite
def line_soup(draw) -> bytes:
    """Any lines with any line ends, an optional BOM, and an optional unterminated tail."""
    lines = draw(st.lists(st.tuples(any_line, st.sampled_from(LINE_ENDS)), max_size=12))
    head = draw(st.sampled_from([b"", b"", BOM, b"\xef\xbb"]))
    tail = draw(st.sampled_from([b"", b"", b"data: tail", b":c", b"\xef"]))
    return head + b"".join(a + b for a, b in lines) + tail


@st.composite
def provider_like(draw, require_data: bool = False, allow_bom: bool = True) -> bytes:
    """Blocks of the shapes providers send (one data line, event + data pairs) mixed with the rest,
    so the bulk fast paths and their fall-backs are both exercised."""
    ending_mode = draw(st.sampled_from(["lf", "lf", "crlf", "cr", "mixed"]))

    def end() -> bytes:
        if ending_mode == "mixed":
            return draw(st.sampled_from(LINE_ENDS))
        return {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r"}[ending_mode]

    blocks = []
    for _ in range(draw(st.integers(0, 10))):
        kind = draw(st.sampled_from(["data", "data", "pair", "pair", "other"]))
        if kind == "data":
            lines = [draw(st.sampled_from([b"data: ", b"data:"])) + draw(values)]
        elif kind == "pair":
            lines = [b"event: " + draw(values), b"data: " + draw(values)]
        else:
            lines = draw(st.lists(st.one_of(field_lines, retry_lines, comment_lines), max_size=4))
            if require_data:
                lines.insert(draw(st.integers(0, len(lines))), b"data: " + draw(values))
        blocks.append(b"".join(line + end() for line in lines) + end())
    if not require_data:
        blocks.insert(draw(st.integers(0, len(blocks))), draw(st.sampled_from([b"", b"\n", b"\r\n\r\n"])))
    head = draw(st.sampled_from([b"", BOM])) if allow_bom else b""
    tail = draw(st.sampled_from([b"", b"data: cut", b"event: x\r"]))
    return head + b"".join(blocks) + tail


streams = st.one_of(line_soup(), provider_like())


def _draw_reads(data, stream: bytes) -> list[bytes]:
    """Reads cut anywhere, or only just after line ends (so reads often start on an event
    boundary and hold whole events, as servers flush them)."""
    if data.draw(st.booleans(), label="cut at line ends"):
        ends = [m.end() for m in re.finditer(rb"[\r\n]", stream)]
        if ends:
            return cut(stream, data.draw(st.lists(st.sampled_from(ends), unique=True), label="cuts"))
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=12), label="cuts")
    reads = cut(stream, points)
    for i in data.draw(st.lists(st.integers(0, len(reads)), max_size=2), label="empty reads"):
        reads.insert(i, b"")
    return reads


def _outcome(stream: bytes, reads: list[bytes] | None = None) -> tuple:
    events, parser = parse(stream, reads=reads)
    return events, parser.last_event_id, parser.resume_event_id, parser.retry, parser.discarded_tail


PROPERTY = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(stream=streams, data=st.data())
def test_any_split_gives_the_same_events_as_one_read(stream, data):
    whole = _outcome(stream)
    assert _outcome(stream, _draw_reads(data, stream)) == whole
    assert _outcome(stream, one_byte_reads(stream)) == whole


@PROPERTY
@given(stream=streams, data=st.data())
def test_events_match_the_spec_reference(stream, data):
    expected, last_id, retry, tail, id_buffer = reference_parse(stream)
    events, parser = parse(stream, reads=_draw_reads(data, stream))
    assert as_tuples(events) == expected
    assert (parser.resume_event_id, parser.retry, parser.discarded_tail) == (last_id, retry, tail)
    assert parser.last_event_id == id_buffer


def _limited_outcome(stream: bytes, reads: list[bytes], limit: int) -> tuple:
    """("ok", events, tail) or ("too_large", events before the error, (start, end) of its read)."""
    parser = SseParser(max_event_bytes=limit)
    events: list[SseEvent] = []
    offset = 0
    for read in reads:
        try:
            events += parser.feed(read)
        except TooLargeError as exc:
            return "too_large", events + exc.received, (offset, offset + len(read))
        offset += len(read)
    parser.close()
    return "ok", events, parser.discarded_tail


@PROPERTY
@given(stream=streams, limit=st.integers(1, 40), data=st.data())
def test_size_limit_hits_at_the_same_byte_however_split(stream, limit, data):
    exact = _limited_outcome(stream, one_byte_reads(stream), limit)
    split = _limited_outcome(stream, _draw_reads(data, stream), limit)
    assert split[:2] == exact[:2]
    if exact[0] == "too_large":
        crossing = exact[2][0]  # with one-byte reads the raising read is the crossing byte
        assert split[2][0] <= crossing < split[2][1]
    else:
        assert split[2] == exact[2]


# httpx-sse deviates from the spec in ways the comparison avoids (documented here, not hidden):
# - it dispatches at a blank line with no data when an event type, an id or a retry is pending,
#   so every compared block carries a data line and blank lines only end blocks;
# - its `retry` is per event (reset after each) and accepts int() syntax ("+5", " 1 ", "١"),
#   so retry is not compared;
# - it does not drop a BOM (httpx's text decoding keeps U+FEFF), so streams do not start with one;
# - its id is "" where none was set (ours is None).
@PROPERTY
@given(stream=provider_like(require_data=True, allow_bom=False), data=st.data())
def test_events_match_httpx_sse_where_it_follows_the_spec(stream, data):
    assume(not stream.startswith(BOM))
    reads = _draw_reads(data, stream)
    events, _ = parse(stream, reads=reads)
    assert [(e.event, e.text, e.id or "") for e in events] == httpx_sse_parse(reads)


# -- real provider captures ---------------------------------------------------------------------------


def _provenance_counts() -> dict[str, tuple[int, int]]:
    """`file -> (bytes, events)` from the tables of PROVENANCE.md."""
    text = (PROVIDER_FIXTURES / "PROVENANCE.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([^`]+\.sse)` \|.*\| (\d+) / (\d+) \|[^|]*\|$", text, flags=re.M)
    return {name: (int(size), int(count)) for name, size, count in rows}


def _data_lines(stream: bytes) -> int:
    """Lines whose field name is `data` (each capture has one data line per event)."""
    lines = re.split(rb"\r\n|\r|\n", stream[3:] if stream.startswith(BOM) else stream)
    return sum(1 for line in lines if line == b"data" or line.startswith(b"data:"))


@pytest.mark.parametrize("name", capture_cases())
def test_capture_parses_to_the_same_events_whole_bytewise_and_in_random_reads(name):
    stream = read_capture(name)
    whole, parser = parse(stream)
    assert parser.discarded_tail is False
    assert parse(stream, reads=one_byte_reads(stream))[0] == whole
    for seed in range(3):
        assert parse(stream, reads=random_reads(stream, seed, 64))[0] == whole
        assert parse(stream, reads=random_reads(stream, seed, 4096))[0] == whole


@pytest.mark.parametrize("name", capture_cases())
def test_capture_event_count_matches_provenance_and_its_data_lines(name):
    stream = read_capture(name)
    events, _ = parse(stream)
    size, count = _provenance_counts()[name]
    assert len(stream) == size
    assert len(events) == count == _data_lines(stream)


@pytest.mark.parametrize("name", capture_cases())
def test_capture_data_is_json_or_done(name):
    for event in parse(read_capture(name))[0]:
        if event.data != b"[DONE]":
            json.loads(event.data)


@pytest.mark.parametrize("name", capture_cases())
def test_capture_matches_httpx_sse(name):
    stream = read_capture(name)
    events, _ = parse(stream)
    reads = random_reads(stream, 7, 512)
    assert [(e.event, e.text, e.id or "") for e in events] == httpx_sse_parse(reads)
