"""Processes a test starts: started as a user's terminal starts them, and always reaped.

    def test_x(children):
        follower = children.start([...], ctrl_c=True, stdout=subprocess.PIPE)
        ...
        follower.send_signal(signal.SIGINT)   # Ctrl-C, even when pytest itself runs in the background

Whatever is still running when the test ends, passed or failed, is killed and waited for.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

# Puts SIGINT back to its default, then becomes the command: exec keeps a default disposition.
_RESTORE_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])"
)


def ctrl_c_able(command: Sequence[str]) -> list[str]:
    """`command`, run with SIGINT at its default disposition, as a shell at a terminal runs it.

    A test run started in the background from a script (`pytest &`) has SIGINT ignored, and
    children inherit that, so Ctrl-C would do nothing to them. Keeping an inherited "ignore" is
    right for the programs (whoever started them asked for it, and Python does the same), so a
    test that presses Ctrl-C starts the program the way a user's terminal does."""
    return [sys.executable, "-c", _RESTORE_SIGINT, *command]


class Children:
    """The processes one test started."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, command: Sequence[str], *, ctrl_c: bool = False, **popen: Any) -> subprocess.Popen:
        """subprocess.Popen(command, **popen); `ctrl_c=True` when the test will send it SIGINT."""
        process = subprocess.Popen(ctrl_c_able(command) if ctrl_c else list(command), **popen)
        self.started.append(process)
        return process

    def reap(self) -> None:
        """Kill what still runs and wait for every process, so none outlives its test."""
        for process in self.started:
            if process.poll() is None:
                process.kill()
        for process in self.started:
            process.wait(60)


def open_file(pid: int, path: Path) -> Any:
    """How process `pid` has `path` open (psutil's popenfile), or None (not open, or no such process)."""
    path = path.resolve()
    try:
        return next((f for f in psutil.Process(pid).open_files() if Path(f.path) == path), None)
    except psutil.NoSuchProcess:
        return None


def reading_at_end(pid: int, path: Path) -> bool:
    """Process `pid` has `path` open and has read (or seeked) to its end, so it will see every
    line appended from now on. Linux tells the file position; elsewhere "open" is all we see."""
    size = path.stat().st_size
    opened = open_file(pid, path)
    return opened is not None and getattr(opened, "position", size) >= size


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a process the test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
