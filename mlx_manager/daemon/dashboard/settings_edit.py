"""Settings as the dashboard shows and changes them: what `config list --show-origin` and
`config set` do, with the same functions, so a refused value reads exactly as the CLI says it
(without its "Error: " prefix) and leaves the file untouched.

Both functions read or write the config file: call them off the event loop.
"""

from __future__ import annotations

from typing import Any

from mlx_manager.daemon.problems import Problem, retry_after
from mlx_manager.settings import (
    ConfigBusyError,
    Settings,
    SettingsError,
    check_config_text,
    config_lock,
    config_path,
    flatten,
    key_infos,
    load_settings_with_origins,
    parse_config_document,
    parse_value,
    read_config_text,
    set_in_document,
    write_config_text,
)


def settings_view(running: Settings, flags: dict[str, Any]) -> dict[str, Any]:
    """Every key: the value the daemon runs with, the value its settings sources give now (they
    differ until a reload, or a restart for keys that need one), where that comes from, and
    whether the page may change it (live-applicable, not secret)."""
    try:
        configured, origins = load_settings_with_origins(flags)
        error = None
    except SettingsError as exc:  # the file is broken now: show what runs, and why
        configured, origins, error = running, {}, f"{exc}. Fix it with `mlx-manager config edit`."
    now, runs = flatten(configured), flatten(running)
    keys = []
    for key, info in key_infos().items():
        keys.append(
            {
                "key": key,
                "value": _hidden(now[key]) if info.secret else now[key],
                "running": _hidden(runs[key]) if info.secret else runs[key],
                "origin": origins.get(key, "unknown"),
                "env_var": info.env_var,
                "description": info.description,
                "expected": info.expected(),
                "kind": info.kind,
                "choices": list(info.choices),
                "restart": info.restart,
                "secret": info.secret,
                "editable": not (info.restart or info.secret),
            }
        )
    return {"path": str(config_path()), "error": error, "keys": keys}


def _hidden(value: Any) -> str:
    count = len(value) if isinstance(value, list) else int(bool(value))
    return f"(hidden: {count} key{'' if count == 1 else 's'})"


def write_setting(key: str, raw: str) -> Any:
    """`config set KEY RAW` without the reload: validate, then write under the config lock.
    Returns the typed value; raises a Problem saying what `config set` would (nothing written)."""
    info = key_infos().get(key)
    if info is not None and info.secret:
        raise Problem("validation_error", f"{key} cannot be set with `mlx-manager config`.", param="key")
    if info is not None and info.restart:
        detail = f"{key} takes effect only when the daemon starts; change it with `mlx-manager config set` and restart"
        raise Problem("validation_error", detail, param="key")
    try:
        typed = parse_value(key, raw)
    except SettingsError as error:
        raise Problem("validation_error", f"{error}.", param="value") from None
    path = config_path()
    try:
        with config_lock(path):
            text = read_config_text(path)
            check_config_text(text, path)
            document = parse_config_document(text, path)
            set_in_document(document, key, typed)
            write_config_text(document.as_string())
    except SettingsError as error:  # already broken before this change
        raise Problem("invalid_settings", f"{error}. Fix it with `mlx-manager config edit`.") from None
    except ConfigBusyError as error:
        raise Problem("overloaded", f"{error}.", headers=retry_after(1)) from None
    except OSError as error:
        raise Problem("internal_error", f"cannot write {path}: {error.strerror or error}") from None
    return typed


def override_note(key: str, origin: str) -> str | None:
    """Why the file's new value does not reach the daemon, when something above the file sets it."""
    if origin == "env":
        return f"{key_infos()[key].env_var} is set in the daemon's environment and overrides the file's value"
    if origin == "flag":
        return f"the daemon was started with a flag for {key}, which overrides the file's value"
    return None
