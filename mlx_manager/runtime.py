"""Files a running daemon leaves under the home folder so the CLI can find it and talk to it.

- `daemon.json`: pid, host, port, url, version and start time of the running daemon (removed on exit).
- `admin.token`: the admin credential (mode 0600) the CLI sends to the daemon's admin endpoints.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from mlx_manager.settings import home


def daemon_file() -> Path:
    return home() / "daemon.json"


def admin_token_file() -> Path:
    return home() / "admin.token"


def ensure_home() -> Path:
    folder = home()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def admin_token(create: bool = False) -> str | None:
    """The admin credential; `create=True` (the daemon) makes one if none exists."""
    path = admin_token_file()
    if path.exists():
        return path.read_text().strip()
    if not create:
        return None
    token = secrets.token_urlsafe(32)
    write_private(path, token + "\n")
    return token


def read_daemon_info() -> dict | None:
    """The running daemon's record, or None when no daemon (or only a dead one's leftovers) is there."""
    path = daemon_file()
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    pid = info.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return None
    return info


def _alive(pid: int) -> bool:
    """Running, and not a zombie (`kill -0` succeeds on a zombie that nobody reaped yet)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
