"""The config file itself: read its text, edit it as a TOML document that keeps comments and layout,
write it back atomically, and lock it around a whole read-modify-write."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlx_manager.files import private_lock, write_atomic
from mlx_manager.settings.errors import SettingsError
from mlx_manager.settings.keys import entry_info, sections
from mlx_manager.settings.paths import config_path

if TYPE_CHECKING:
    from tomlkit import TOMLDocument


def read_config_text(path: Path | None = None) -> str:
    """The config file's text, or "" when there is none yet."""
    path = path or config_path()
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(file=path, problem=f"cannot read it ({exc})") from None


def toml_data(text: str, path: Path) -> dict[str, Any]:
    """Plain data from TOML text; tomllib's messages are clearer than tomlkit's, so it judges syntax."""
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        at = re.search(r" \(at line (\d+), column \d+\)$", message)
        line = int(at.group(1)) if at else max(1, len(text.splitlines()))  # "(at end of document)"
        problem = re.sub(r" \(at (line \d+, column \d+|end of document)\)$", "", message)
        raise SettingsError(file=path, line=line, problem=f"TOML syntax error: {problem}") from None


def parse_config_document(text: str, path: Path | None = None) -> TOMLDocument:
    """The text as a tomlkit document, which keeps comments and layout when written back."""
    import tomlkit

    toml_data(text, path or config_path())
    return tomlkit.parse(text)


def set_in_document(document: TOMLDocument, key: str, value: Any) -> None:
    """Put a typed value into a tomlkit document, creating its [section] table if needed."""
    import tomlkit

    section, name = key.split(".", 1)
    if section not in document:
        document.add(section, tomlkit.table())
    entry = entry_info(key)
    if entry is not None:  # `models.aliases.fast`: the entry in the [models.aliases] table
        if entry.name not in document[section]:
            document[section][entry.name] = tomlkit.table()
        document[section][entry.name][entry.entry] = value
        return
    document[section][name] = value


def unset_in_document(document: TOMLDocument, key: str) -> bool:
    """Remove a key from a tomlkit document; False when it was not there. Stray entries (an
    unknown key, or an unknown top-level table) can be removed too, so a bad file can be fixed."""
    section, _, name = key.partition(".")
    if not name:
        if section in sections() or section not in document:
            return False
        del document[section]
        return True
    table = document.get(section)
    entry = entry_info(key)
    if entry is not None and table is not None and hasattr(table, "keys") and entry.name in table:
        mapping = table[entry.name]
        if not hasattr(mapping, "keys") or entry.entry not in mapping:
            return False
        del mapping[entry.entry]
        if not mapping:
            del table[entry.name]
        return True
    if table is None or not hasattr(table, "keys") or name not in table:
        return False
    del table[name]
    if not table and "#" not in table.as_string():
        del document[section]  # no `[timeouts]` left behind with nothing in it (a commented one stays)
    return True


def write_config_text(text: str, path: Path | None = None) -> Path:
    """Replace the config file atomically, mode 0600, folder 0700. A symlinked config file
    (dotfile managers) is followed, so the link survives."""
    path = (path or config_path()).resolve()
    write_atomic(path, text)
    return path


# Seconds a command that changes the config file waits for another one to finish.
CONFIG_LOCK_TIMEOUT = 10.0


class ConfigBusyError(TimeoutError):
    """Another mlx-manager command held the config file's lock for longer than we would wait."""


@contextlib.contextmanager
def config_lock(
    path: Path | None = None, timeout: float | None = None, on_wait: Callable[[], None] | None = None
) -> Iterator[Path]:
    """Hold an exclusive lock on `config.toml.lock` next to the config file (mode 0600, folder 0700)
    for a whole read-modify-write, so two commands changing the file at once cannot lose a change.
    Waits up to `timeout` seconds (CONFIG_LOCK_TIMEOUT by default), then raises ConfigBusyError;
    other OSErrors (an unwritable folder) propagate. The kernel drops the lock if the process dies.
    `on_wait()` is called once if the lock is busy at first, before waiting (to tell a person why)."""
    from filelock import Timeout

    path = path or config_path()
    lock = private_lock(path.with_name(f"{path.name}.lock"))
    try:
        try:
            lock.acquire(blocking=False)
        except Timeout:
            if on_wait is not None:
                on_wait()
            lock.acquire(timeout=CONFIG_LOCK_TIMEOUT if timeout is None else timeout)
    except Timeout:
        raise ConfigBusyError(f"another mlx-manager command is changing {path}; try again") from None
    try:
        yield path
    finally:
        lock.release()
