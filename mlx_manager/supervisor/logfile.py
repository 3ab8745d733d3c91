"""Read the end of a log file, and follow it as it grows and rotates (like `tail -n N -F`)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

BLOCK = 64 * 1024


def tail(path: Path, lines: int, *, start: int = 0) -> list[str]:
    """The last `lines` lines of the file (from byte `start` on), read from the end: logs grow big."""
    if lines <= 0:
        return []
    try:
        with open(path, "rb") as handle:
            end = handle.seek(0, os.SEEK_END)
            position, data = end, b""
            while position > start and data.count(b"\n") <= lines:
                step = min(BLOCK, position - start)
                position -= step
                handle.seek(position)
                data = handle.read(step) + data
    except FileNotFoundError:
        return []
    text = data.decode("utf-8", errors="replace")
    return text.splitlines()[-lines:]


def follow(path: Path, poll: float = 0.2) -> Iterator[str]:
    """Yield lines appended to the file from now on, forever. A rotation (the file replaced or
    truncated) is noticed and the new file is read from its start."""
    handle = _open(path, at_end=True)
    pending = b""
    while True:
        if handle is None:  # no file yet: it is new when it shows up, so read it whole
            time.sleep(poll)
            handle = _open(path, at_end=False)
            continue
        chunk = handle.read()
        if chunk:
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                yield line.decode("utf-8", errors="replace")
            continue
        try:
            current = os.stat(path)
            rotated = current.st_ino != os.fstat(handle.fileno()).st_ino or current.st_size < handle.tell()
        except FileNotFoundError:
            rotated = False  # between the rename and the new file: keep the old one a moment longer
        if rotated:
            handle.close()
            handle = _open(path, at_end=False)
            continue
        time.sleep(poll)


def _open(path: Path, *, at_end: bool):
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return None
    if at_end:
        handle.seek(0, os.SEEK_END)
    return handle
