"""Shared-memory segments: create (owner), attach (children), unlink on every exit path.

A segment is a file under /dev/shm opened with O_CREAT|O_EXCL and mode 0600, mapped with mmap.
We do not use `multiprocessing.shared_memory`: it registers every segment it opens with the
resource tracker, and on Python 3.11 an attaching child shares its parent's tracker, so the child's
registration (or its unregistration) would unlink or forget the creator's segment (cpython
gh-82300, issue 110778; 3.13 added `track=False`). Opening the file ourselves means no tracker is
involved at all, in the owner or in a child.

Names are unguessable and say who owns them: ``streamring-<pid>-<starttime>-<16 hex>``, where
`starttime` is the owner's start time from /proc/<pid>/stat, so a recycled pid is not mistaken for
a live owner.

Exit paths, and what unlinks the segment on each:

- `Segment.close()` / the context manager: normal exit and exceptions (SIGINT arrives as
  KeyboardInterrupt, so it unwinds the same way).
- an `atexit` hook unlinks what the owner created and never closed.
- the guardian: on the first `create()` the owner starts one tiny watcher process (a few lines of
  stdlib Python, its own session so a terminal's Ctrl-C does not reach it). The owner tells it each
  name before creating the file and after unlinking it; the guardian waits on a pidfd of the owner
  and on its pipe, and when the owner dies for any reason (SIGTERM, SIGKILL, a crash) it unlinks
  every name still registered, then exits. It also exits when the owner closes the pipe at exit.
- `cleanup_stale_segments()`: for the case where the guardian itself was killed (a SIGKILL to the
  whole process group), a later start removes segments whose owner is gone.

A child killed with SIGKILL leaves nothing behind: only the owner unlinks, and the kernel drops the
child's mapping.
"""

from __future__ import annotations

import atexit
import mmap
import os
import re
import secrets
import subprocess
import sys
import threading

SHM_DIR = "/dev/shm"
PREFIX = "streamring-"
_NAME_RE = re.compile(r"^streamring-(\d+)-(\d+)-([0-9a-f]{16})$")

# The guardian: stdlib only, so it starts in ~20 ms with -I -S and needs no import path.
_GUARDIAN_CODE = r"""
import os, select, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
# Detach from the owner (double fork): a supervisor that kills an owner's children (Ray does, by
# parent pid) must not take the guardian down with it. The owner learns our pid from stdout.
if os.fork() > 0:
    os._exit(0)
os.write(1, b"%d\n" % os.getpid())
os.close(1)
owner = int(sys.argv[1]); shm = sys.argv[2]
names = set(); buf = b""
try:
    pidfd = os.pidfd_open(owner)
except OSError:
    pidfd = None
poller = select.poll(); poller.register(0, select.POLLIN)
if pidfd is not None:
    poller.register(pidfd, select.POLLIN)
def take(data):
    global buf
    buf += data
    *lines, buf = buf.split(b"\n")
    for line in lines:
        name = line[1:].decode()
        if "/" in name or not name:
            continue
        if line[:1] == b"+":
            names.add(name)
        elif line[:1] == b"-":
            names.discard(name)
owner_dead = pidfd is None
while not owner_dead:
    for fd, ev in poller.poll():
        if fd == 0:
            data = os.read(0, 65536)
            if not data:
                owner_dead = True  # the owner closed the pipe (exit) or died
            take(data)
        else:
            owner_dead = True
# The owner is gone: take what is still in the pipe without waiting for writers that may linger.
os.set_blocking(0, False)
try:
    while True:
        data = os.read(0, 65536)
        if not data:
            break
        take(data)
except BlockingIOError:
    pass
for name in names:
    try:
        os.unlink(os.path.join(shm, name))
    except OSError:
        pass
"""


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat), or
    None when it does not exist or has exited (a zombie not yet reaped is not alive)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def _owner_alive(pid: int, start: int) -> bool:
    if start == 0:  # the owner could not read /proc at creation: fall back to the pid alone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return _start_time(pid) == start


class _Guardian:
    """The owner's watcher process (one per owner pid), fed names over a pipe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._pid = 0  # the owner pid the guardian watches (a forked child needs its own)
        self._gpid: int | None = None  # the guardian's own pid (it is not our child)

    def _ensure(self) -> subprocess.Popen:
        pid = os.getpid()
        if self._proc is None or self._pid != pid:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _GUARDIAN_CODE, str(pid), SHM_DIR],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                close_fds=True,
                start_new_session=True,  # out of the terminal's process group: Ctrl-C skips it
            )
            line = proc.stdout.readline()
            proc.stdout.close()
            proc.wait()  # the intermediate process of the double fork
            self._gpid = int(line) if line.strip() else None
            self._proc = proc
            self._pid = pid
        return self._proc

    def tell(self, line: str) -> None:
        with self._lock:
            proc = self._ensure()
            try:
                proc.stdin.write(line.encode() + b"\n")
                proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                # The guardian is gone (killed from outside): start a new one and tell it again.
                self._proc = None
                proc = self._ensure()
                proc.stdin.write(line.encode() + b"\n")
                proc.stdin.flush()

    def stop(self) -> None:
        """Close the pipe: the guardian unlinks whatever is still registered and exits."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None and self._pid == os.getpid():
                try:
                    proc.stdin.close()
                except OSError:
                    pass

    @property
    def pid(self) -> int | None:
        return self._gpid if self._proc is not None else None


_guardian = _Guardian()
_owned: dict[str, "Segment"] = {}  # segments this process created and has not unlinked
_owned_lock = threading.Lock()


def guardian_pid() -> int | None:
    """Pid of this process's guardian, if one was started (leak checks exclude it by pid)."""
    return _guardian.pid


def _at_exit() -> None:
    with _owned_lock:
        segs = list(_owned.values())
    for seg in segs:
        if seg._owner_pid == os.getpid():
            seg.unlink()
    _guardian.stop()


atexit.register(_at_exit)


class Segment:
    """One mapped shared-memory segment: `create()` in the owner, `attach(name)` in a child."""

    __slots__ = ("name", "size", "owner", "_mmap", "buf", "_owner_pid", "_unlinked", "_guarded", "__weakref__")

    def __init__(self, name: str, size: int, mm: mmap.mmap, owner: bool) -> None:
        self.name = name
        self.size = size
        self.owner = owner
        self._mmap = mm
        self.buf: memoryview | None = memoryview(mm)
        self._owner_pid = os.getpid() if owner else 0
        self._unlinked = not owner
        self._guarded = False  # registered with the guardian

    @classmethod
    def create(cls, size: int, *, guardian: bool = True) -> "Segment":
        """Create and map a new zero-filled segment of `size` bytes, mode 0600, unguessable name.

        `guardian=False` skips the watcher process (then only close/atexit/cleanup_stale_segments
        unlink it: a SIGKILLed owner leaks until the next cleanup)."""
        if size <= 0:
            raise ValueError("segment size must be positive")
        pid = os.getpid()
        name = f"{PREFIX}{pid}-{_start_time(pid) or 0}-{secrets.token_hex(8)}"
        if guardian:
            _guardian.tell("+" + name)  # before the file exists: a death in between leaks nothing
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # umask can only narrow it; make the mode exact anyway
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        seg = cls(name, size, mm, owner=True)
        seg._guarded = guardian
        with _owned_lock:
            _owned[name] = seg
        return seg

    @classmethod
    def attach(cls, name: str) -> "Segment":
        """Map an existing segment by name; nothing is registered anywhere (no resource tracker)."""
        if not _NAME_RE.match(name):
            raise ValueError(f"not a streamring segment name: {name!r}")
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(name, size, mm, owner=False)

    def unlink(self) -> None:
        """Remove the name (owner only; idempotent). Existing mappings stay valid until closed."""
        if self._unlinked or self._owner_pid != os.getpid():
            return  # attached, already unlinked, or a forked copy of the owner's object
        self._unlinked = True
        try:
            os.unlink(os.path.join(SHM_DIR, self.name))
        except FileNotFoundError:
            pass
        with _owned_lock:
            _owned.pop(self.name, None)
        if self._guarded:
            try:
                _guardian.tell("-" + self.name)
            except OSError:
                pass

    def close(self) -> None:
        """Unmap; the owner also unlinks. Views the caller still holds keep the mapping alive."""
        self.unlink()
        buf, self.buf = self.buf, None
        if buf is not None:
            buf.release()
            try:
                self._mmap.close()
            except BufferError:
                pass  # exported views remain; the mapping goes when the last one is collected

    def __enter__(self) -> "Segment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Segment({self.name!r}, size={self.size}, owner={self.owner})"


def cleanup_stale_segments() -> list[str]:
    """Unlink streamring segments whose owner process is gone; return their names."""
    removed = []
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return removed
    for name in names:
        m = _NAME_RE.match(name)
        if m is None or _owner_alive(int(m.group(1)), int(m.group(2))):
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed
