"""Files a running daemon leaves under the home folder so the CLI can find it and talk to it.

- `daemon.json`: pid, host, port, url, version and start time of the running daemon (removed on exit).
- `admin.token`: the admin credential (mode 0600) the CLI sends to the daemon's admin endpoints.

Every file here, like the config, the audit database and the logs, is created 0600 in a 0700 folder.
"""

from __future__ import annotations

import json
import secrets
import stat
from pathlib import Path

from mlx_manager.files import write_atomic
from mlx_manager.settings import home


def daemon_file() -> Path:
    return home() / "daemon.json"


def admin_token_file() -> Path:
    return home() / "admin.token"


def ensure_home() -> Path:
    folder = home()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


# A shorter token in the file (empty, truncated) is not a credential: the daemon makes a new one.
MIN_ADMIN_TOKEN_LENGTH = 32


def admin_token(create: bool = False) -> str | None:
    """The admin credential; `create=True` (the daemon) makes one if none exists, and makes sure
    only its owner can read the file."""
    path = admin_token_file()
    if path.exists():
        token = path.read_text().strip()
        if not create:
            return token
        if len(token) >= MIN_ADMIN_TOKEN_LENGTH:
            if stat.S_IMODE(path.stat().st_mode) & 0o077:  # others could read it: no secret any more
                path.chmod(0o600)
            return token
    if not create:
        return None
    token = secrets.token_urlsafe(32)
    write_atomic(path, token + "\n")
    return token


def read_daemon_info() -> dict | None:
    """The running daemon's record, or None when no daemon (or only a dead one's leftovers) is there."""
    path = daemon_file()
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    pid = info.get("pid")
    if not isinstance(pid, int) or not alive(pid):
        return None
    return info


def alive(pid: int) -> bool:
    """Running, and not a zombie (`kill -0` succeeds on a zombie that nobody reaped yet)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
