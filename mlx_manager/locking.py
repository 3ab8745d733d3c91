"""Waiting for an advisory file lock (flock) without blocking forever."""

from __future__ import annotations

import fcntl
import time


def flock_within(fd: int, seconds: float) -> bool:
    """Take an exclusive flock on `fd`, trying every 50 ms for up to `seconds`; False if it stayed taken.
    The kernel drops the lock when the holding process dies."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
