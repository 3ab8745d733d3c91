"""The supervisor's one state file (`supervisor.json`) and its lock (`supervisor.lock`).

The lock, an fcntl lock held for the supervisor's whole life, is the truth about whether a
supervisor runs: the kernel drops it when the process dies, however it dies, so a pid left in a
stale state file can never be mistaken for a live supervisor. The state file says what it is doing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlx_manager.locking import flock_within
from mlx_manager.runtime import alive
from mlx_manager.settings import home

# What the supervisor is doing, as written in the state file's "state".
STARTING, RUNNING, RESTARTING, STOPPING, STOPPED, GIVEN_UP = (
    "starting", "running", "restarting", "stopping", "stopped", "given_up"
)


def state_file() -> Path:
    return home() / "supervisor.json"


def lock_file() -> Path:
    return home() / "supervisor.lock"


def supervisor_log() -> Path:
    """The supervisor's events and everything the daemon printed (tracebacks, startup errors)."""
    return home() / "logs" / "supervisor.log"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_state() -> dict[str, Any] | None:
    try:
        data = json.loads(state_file().read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_state(data: dict[str, Any]) -> None:
    """Replace the state file atomically (temp file + rename): a reader never sees half of it."""
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({**data, "updated_at": now_iso()}, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)


class Lock:
    """The one-supervisor-per-home lock. `acquire` returns False while another process holds it."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or lock_file()
        self._fd: int | None = None

    def acquire(self, wait: float = 0.0) -> bool:
        """Try for up to `wait` seconds: a CLI probing the lock holds it for microseconds, so a
        supervisor that starts at that moment must not conclude another one runs."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by children (PEP 446)
        if not flock_within(fd, wait):
            os.close(fd)
            return False
        self._fd = fd
        # The pid in the lock file is for people (`cat supervisor.lock`); the lock itself decides.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


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
