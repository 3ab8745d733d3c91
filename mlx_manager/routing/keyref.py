"""API keys of backends, given by reference: `env:NAME` or the path of a file that holds the key.

The config file (and `config list`) only ever holds the reference; the key is read when the daemon
starts or reloads and lives in the backend's HTTP client, nowhere else.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlx_manager.settings import SettingsError

SETTING = "routing.backends"


def resolve_key(reference: str, backend: str) -> str:
    """The key a reference names ("" for none). SettingsError when it cannot be read: a daemon
    must not start (or reload) with a backend it cannot authenticate to."""
    if not reference:
        return ""
    if reference.startswith("env:"):
        value = os.environ.get(reference[4:], "").strip()
        if not value:
            problem = f"backend {backend!r}: its api_key {reference} names an unset variable"
            raise SettingsError(key=SETTING, problem=problem)
        return _checked(value, backend, reference)
    path = Path(reference).expanduser()
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        problem = f"backend {backend!r}: cannot read its api_key file {path} ({reason})"
        raise SettingsError(key=SETTING, problem=problem) from None
    return _checked(text, backend, str(path))


def _checked(key: str, backend: str, source: str) -> str:
    if not key or any(ch.isspace() for ch in key):
        raise SettingsError(key=SETTING, problem=f"backend {backend!r}: {source} must hold one key, without spaces")
    return key
