"""Shared test helpers: where the real provider captures live, and resource-leak checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# CI lays shared/ beside the clone; a developer's checkout has it at ../shared too.
PROVIDER_FIXTURES = Path(os.environ.get("STREAMRING_FIXTURES", REPO.parent / "shared" / "fixtures" / "providers"))


def provider_manifest() -> dict | None:
    """MANIFEST.json of the real captures, or None when the folder is absent."""
    path = PROVIDER_FIXTURES / "MANIFEST.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def capture_cases() -> list:
    """One pytest param per capture (id = its relative path); a single skipped param when absent."""
    manifest = provider_manifest()
    if manifest is None:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"real provider captures not found at {PROVIDER_FIXTURES} (../shared/fixtures/providers beside the clone)"))]
    return [pytest.param(name, id=name) for name in sorted(manifest["files"])]


def read_capture(name: str) -> bytes:
    """The exact bytes of one capture."""
    return (PROVIDER_FIXTURES / name).read_bytes()


def shm_entries() -> set[str]:
    """Names under /dev/shm that could be our segments (Python's own semaphores excluded)."""
    try:
        names = os.listdir("/dev/shm")
    except FileNotFoundError:
        return set()
    return {n for n in names if not n.startswith("sem.")}


def _owner_pid(name: str) -> int | None:
    # Our segments are named streamring-<owner pid>-...; other names have no known owner.
    parts = name.split("-")
    if len(parts) >= 3 and parts[0] == "streamring" and parts[1].isdigit():
        return int(parts[1])
    return None


def _ours_or_orphaned(name: str) -> bool:
    """A new entry is this test's leak when this process owns it or its owner is gone; a segment
    of another live process (a concurrent test run on a shared machine) is not ours."""
    pid = _owner_pid(name)
    if pid is None or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@pytest.fixture
def no_shm_leak():
    """Fails the test when it leaves new entries under /dev/shm."""
    before = shm_entries()
    yield
    leaked = {n for n in shm_entries() - before if _ours_or_orphaned(n)}
    assert not leaked, f"leaked shared-memory segments: {sorted(leaked)}"


def running(pid: int) -> bool:
    """True while `pid` is a live process (an exited but unreaped zombie is not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # gone, possibly between two looks
        return False
