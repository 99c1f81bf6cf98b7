"""tools/instructions.py: its cases really run the hot paths they claim to count (the valgrind
counting itself is exercised by running the tool; see its docstring)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("instructions_tool", ROOT / "tools" / "instructions.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)


def test_the_worker_case_delivers_every_read_to_every_stream_in_order():
    process = tool._worker_case(3000)
    process()
    core = process.core
    assert len(core.streams) == tool.STREAMS
    # Each stream took its three reads in sequence (a dropped or out-of-order batch would not count).
    assert {st.next_seq for st in core.streams.values()} == {3}
    assert tool.events_of("worker", 3000) == 3000


def test_the_http_case_reads_every_chunk_of_every_response_in_order():
    import msgspec

    from workers.protocol import SseBatch

    process = tool._http_case(3000)
    try:
        process()
    finally:
        process.close()
    batches = [msgspec.msgpack.decode(p, type=SseBatch) for p in process.sent]
    assert len(batches) == 3000 == tool.events_of("http", 3000)
    seqs: dict[int, list[int]] = {}
    for b in batches:
        seqs.setdefault(b.stream_id, []).append(b.seq)
        assert len(b.events) == 1 and b.events[0].data.startswith(b'{"id"')
    assert len(seqs) == tool.STREAMS and all(s == [0, 1, 2] for s in seqs.values())
    # The same three events in every stream: what the chunks carried, parsed back out.
    assert len({(b.seq, b.events[0].data) for b in batches}) == 3


def test_every_case_builds_and_runs():
    for what in tool.CASES:
        tool.child(what, 1000, True)
        tool.child(what, 1000, False)
