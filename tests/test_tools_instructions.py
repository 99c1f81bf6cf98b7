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


def test_every_case_builds_and_runs():
    for what in tool.CASES:
        tool.child(what, 1000, True)
        tool.child(what, 1000, False)
