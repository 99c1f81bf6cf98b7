"""Segments: mode, names, no resource tracker, and unlinked on every exit path (shm/segment.py).

The exit paths run in subprocesses. Each check counts the entries under /dev/shm that carry the
owner's pid in their name, before and after, so segments made by other processes on the machine
do not disturb the count.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shm import segment as segmod
from shm.segment import Segment, cleanup_stale_segments

REPO = Path(__file__).resolve().parents[1]
SHM = "/dev/shm"


def entries_of(pid: int) -> set[str]:
    """Entries under /dev/shm whose name says `pid` owns them."""
    return {n for n in os.listdir(SHM) if n.startswith(f"streamring-{pid}-")}


def wait_until(cond, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


# An owner process: creates two segments, prints their names and its guardian's pid, then does
# what argv[1] says.
OWNER = r"""
import os, sys, time
from shm.segment import Segment, guardian_pid
mode = sys.argv[1]
a = Segment.create(8192)
b = Segment.create(4096)
a.buf[:5] = b"hello"
print(a.name, b.name, guardian_pid(), flush=True)
if mode == "close":
    a.close(); b.close()
elif mode == "exit":
    pass  # normal exit without close(): atexit unlinks
elif mode == "raise":
    raise RuntimeError("boom")
elif mode == "wait":
    sys.stdin.readline()  # until the test sends a signal (or a line)
elif mode == "child-killed":
    import multiprocessing as mp
    ctx = mp.get_context("forkserver")
    q = ctx.Process(target=__import__("test_shm_segment").attach_and_sleep, args=(a.name,))
    q.start()
    print(q.pid, flush=True)
    sys.stdin.readline()  # the test kills q, then tells us to go on
    q.join()
    a.close(); b.close()
"""


def attach_and_sleep(name: str) -> None:
    """Child body: attach the segment and sleep until killed."""
    seg = Segment.attach(name)
    assert bytes(seg.buf[:5]) == b"hello"
    time.sleep(60)


def start_owner(mode: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    return subprocess.Popen(
        [sys.executable, "-c", OWNER, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )


def read_names(proc: subprocess.Popen) -> tuple[list[str], int]:
    line = proc.stdout.readline().split()
    assert len(line) == 3, proc.stderr.read()
    return line[:2], int(line[2])


def test_create_makes_mode_0600_unguessable_named_zeroed_segment():
    with Segment.create(10000, guardian=False) as seg:
        st = os.stat(os.path.join(SHM, seg.name))
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_size == 10000
        assert seg.name.startswith(f"streamring-{os.getpid()}-")
        assert len(seg.name.rsplit("-", 1)[1]) == 16  # 64 random bits
        assert bytes(seg.buf[:10000]) == bytes(10000)
        other = Segment.create(100, guardian=False)
        assert other.name != seg.name
        other.close()
    assert not os.path.exists(os.path.join(SHM, seg.name))


def test_mode_is_0600_even_with_a_permissive_umask():
    old = os.umask(0)
    try:
        seg = Segment.create(4096, guardian=False)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(os.path.join(SHM, seg.name)).st_mode) == 0o600
    finally:
        seg.close()


def test_attach_shares_memory_and_does_not_unlink():
    seg = Segment.create(4096, guardian=False)
    try:
        other = Segment.attach(seg.name)
        other.buf[100:103] = b"abc"
        assert bytes(seg.buf[100:103]) == b"abc"
        other.close()
        assert os.path.exists(os.path.join(SHM, seg.name))  # only the owner unlinks
    finally:
        seg.close()
    assert not os.path.exists(os.path.join(SHM, seg.name))


def test_attach_refuses_names_that_are_not_ours():
    with pytest.raises(ValueError):
        Segment.attach("../etc/passwd")
    with pytest.raises(ValueError):
        Segment.attach("psm_deadbeef")


def _attach_in_child(name: str) -> None:
    seg = Segment.attach(name)
    seg.buf[0] = 42
    seg.close()


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_child_attach_registers_nothing_with_the_resource_tracker(method):
    # With multiprocessing.shared_memory on 3.11, a child that attaches registers the segment with
    # the shared resource tracker, which then unlinks (or forgets) the creator's segment.
    seg = Segment.create(4096, guardian=False)
    try:
        p = mp.get_context(method).Process(target=_attach_in_child, args=(seg.name,))
        p.start()
        p.join(30)
        assert p.exitcode == 0
        assert seg.buf[0] == 42
        time.sleep(0.2)  # give a tracker the chance to do the wrong thing
        assert os.path.exists(os.path.join(SHM, seg.name))
    finally:
        seg.close()
    assert not os.path.exists(os.path.join(SHM, seg.name))


@pytest.mark.parametrize("mode", ["close", "exit", "raise"])
def test_owner_exit_paths_unlink(mode):
    proc = start_owner(mode)
    names, _ = read_names(proc)
    proc.wait(30)
    assert proc.returncode == (1 if mode == "raise" else 0), proc.stderr.read()
    assert wait_until(lambda: not entries_of(proc.pid)), entries_of(proc.pid)
    assert not any(os.path.exists(os.path.join(SHM, n)) for n in names)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_owner_killed_by_signal_leaves_nothing(sig):
    proc = start_owner("wait")
    names, gpid = read_names(proc)
    assert entries_of(proc.pid) == set(names)
    proc.send_signal(sig)
    proc.wait(30)
    # SIGINT unwinds through KeyboardInterrupt; SIGTERM and SIGKILL leave it to the guardian.
    assert wait_until(lambda: not entries_of(proc.pid)), entries_of(proc.pid)
    assert wait_until(lambda: not _alive(gpid)), "the guardian outlived its owner"
    proc.stdin.close()
    proc.stdout.close()
    proc.stderr.close()


def test_child_killed_with_sigkill_leaves_nothing():
    proc = start_owner("child-killed")
    names, _ = read_names(proc)
    child_pid = int(proc.stdout.readline())
    # The child attached: wait until it has the mapping, then kill it.
    assert wait_until(lambda: _maps(child_pid, names[0]))
    os.kill(child_pid, signal.SIGKILL)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    proc.wait(30)
    assert proc.returncode == 0, proc.stderr.read()
    assert wait_until(lambda: not entries_of(proc.pid)), entries_of(proc.pid)
    proc.stdin.close()
    proc.stdout.close()
    proc.stderr.close()


def test_cleanup_stale_segments_removes_what_a_dead_owner_and_guardian_left():
    proc = start_owner("wait")
    names, gpid = read_names(proc)
    os.kill(gpid, signal.SIGKILL)  # the guardian goes first, so nobody is left to clean up
    assert wait_until(lambda: not _alive(gpid))
    proc.kill()
    proc.wait(30)
    assert entries_of(proc.pid) == set(names)
    mine = Segment.create(4096, guardian=False)  # a live owner's segment must survive
    try:
        removed = cleanup_stale_segments()
        assert set(names) <= set(removed)
        assert mine.name not in removed
        assert not entries_of(proc.pid)
        assert os.path.exists(os.path.join(SHM, mine.name))
    finally:
        mine.close()
        proc.stdin.close()
        proc.stdout.close()
        proc.stderr.close()


def test_stale_check_tells_a_recycled_pid_from_the_owner():
    # Same pid, different start time: the owner is gone even though the pid is alive.
    start = segmod._start_time(os.getpid())
    assert segmod._owner_alive(os.getpid(), start)
    assert not segmod._owner_alive(os.getpid(), start + 1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def _maps(pid: int, name: str) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return name in f.read()
    except FileNotFoundError:
        return False


def test_guardian_is_not_a_child_of_the_owner_and_survives_its_children_being_killed():
    # Supervisors such as Ray kill a dead worker's children by parent pid; the guardian must not
    # be among them, or the segments it should unlink would leak.
    code = r"""
import os, signal, sys, time
import psutil
from shm.segment import Segment, guardian_pid
seg = Segment.create(4096)
g = guardian_pid()
kids = {p.pid for p in psutil.Process().children(recursive=True)}
print(seg.name, g, g in kids, flush=True)
for pid in kids:
    os.kill(pid, signal.SIGKILL)
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                          cwd=str(Path(__file__).resolve().parents[1]))
    name, gpid, is_child = proc.stdout.split()
    assert is_child == "False"
    deadline = time.monotonic() + 10
    while (Path("/dev/shm") / name).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (Path("/dev/shm") / name).exists(), "the guardian did not unlink the killed owner's segment"
