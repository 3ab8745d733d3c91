"""The supervisor's one state file (`supervisor.json`) and its lock (`supervisor.lock`).

The lock, an flock held for the supervisor's whole life, is the truth about whether a
supervisor runs: the kernel drops it when the process dies, however it dies, so a pid left in a
stale state file can never be mistaken for a live supervisor. The state file says what it is doing.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlx_manager.files import private_lock, write_atomic
from mlx_manager.runtime import alive
from mlx_manager.settings import home

if TYPE_CHECKING:
    from filelock import BaseFileLock

# What the supervisor is doing, as written in the state file's "state".
STARTING, RUNNING, RESTARTING, STOPPING, STOPPED, GIVEN_UP = (
    "starting",
    "running",
    "restarting",
    "stopping",
    "stopped",
    "given_up",
)


def state_file() -> Path:
    return home() / "supervisor.json"


def lock_file() -> Path:
    return home() / "supervisor.lock"


def supervisor_log() -> Path:
    """The supervisor's events and everything the daemon printed (tracebacks, startup errors)."""
    return home() / "logs" / "supervisor.log"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_state() -> dict[str, Any] | None:
    try:
        data = json.loads(state_file().read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_state(data: dict[str, Any]) -> None:
    """Replace the state file atomically: a reader never sees half of it."""
    write_atomic(state_file(), json.dumps({**data, "updated_at": now_iso()}, indent=2) + "\n")


def _write_pid(fd: int) -> None:
    # The pid in the lock file is for people (`cat supervisor.lock`); the lock itself decides.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


# Locks taken and not yet released: held until `release()` or the end of the process (like the
# flock they are), even when the `Lock` that took one is dropped; filelock would release on collection.
_HELD: set[BaseFileLock] = set()


class Lock:
    """The one-supervisor-per-home lock. `acquire` returns False while another process holds it."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or lock_file()
        self._lock: BaseFileLock | None = None

    def acquire(self, wait: float = 0.0) -> bool:
        """Try for up to `wait` seconds: a CLI probing the lock holds it for microseconds, so a
        supervisor that starts at that moment must not conclude another one runs."""
        from filelock import Timeout

        lock = private_lock(self.path, on_acquired=_write_pid)
        try:
            lock.acquire(timeout=wait)
        except Timeout:
            return False
        self._lock = lock
        _HELD.add(lock)
        return True

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            _HELD.discard(self._lock)
            self._lock = None


def supervisor_running() -> bool:
    """Whether a live process holds the lock (probed by taking it for an instant)."""
    lock = Lock()
    if not lock.path.exists():
        return False
    if lock.acquire():
        lock.release()
        return False
    return True


def lock_holder() -> int | None:
    """The pid of the running supervisor, from the lock it holds; None when none runs."""
    if not supervisor_running():
        return None
    try:
        return int(lock_file().read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def lock_if_free() -> Iterator[bool]:
    """Hold the lock while no supervisor runs, so the CLI can edit a dead supervisor's state safely."""
    lock = Lock()
    got = lock.acquire()
    try:
        yield got
    finally:
        if got:
            lock.release()


def process_started(pid: int) -> float | None:
    """The process's start time (epoch seconds), or None when it no longer exists. Stored next to
    a pid so a recycled pid (another program's) is never taken for ours."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` s for a process that need not be our child to end; False if it did not."""
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def same_process(pid: int | None, started: float | None) -> bool:
    """True when `pid` still names the process that started at `started`."""
    if not isinstance(pid, int) or pid <= 0 or started is None:
        return False
    actual = process_started(pid)
    return actual is not None and abs(actual - float(started)) < 1.0
