"""Writing a file so no reader ever sees half of it, and the lock files that serialise writers.

Both create what they make under the home folder private: files 0600 in a 0700 folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from filelock import BaseFileLock


def write_atomic(path: Path, content: str | bytes | Callable[[Path], object], *, mode: int = 0o600) -> None:
    """Replace `path` with `content` at once (temp file, fsync, rename): a reader sees the old file
    or the new one, and a crash right after leaves the new one whole. `content` is text, bytes, or a
    function that writes the file whose path it is given (a library that saves by file name). The
    temp file keeps `path`'s suffix (some writers add their own otherwise). The folder is made 0700
    if it is missing; `mode` is for a new file, and the umask still applies (0o666 gives what `open`
    would)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{os.urandom(4).hex()}.tmp.{path.name}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            if isinstance(content, str):
                handle.write(content.encode("utf-8"))
            elif isinstance(content, bytes):
                handle.write(content)
            else:
                content(tmp)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def private_lock(path: Path, on_acquired: Callable[[int], None] | None = None) -> BaseFileLock:
    """An exclusive flock on `path` (made 0600, in a folder made 0700), polled every 50 ms while
    another holder keeps it; the kernel drops it when the holding process dies, however it dies.
    Not tied to a thread, and each call is a new lock: two holders in one process exclude each other.
    `on_acquired(fd)` may write to the file while it is held."""
    from filelock import FileLock  # only commands that change files pay for its import

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return FileLock(path, mode=0o600, thread_local=False, on_acquired=on_acquired)
