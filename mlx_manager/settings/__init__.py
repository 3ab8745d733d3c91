"""Settings: every key, where its value comes from, and the config file that holds them.

    settings = load_settings({"server.port": port})     # raises SettingsError, never prints
    settings, origins = load_settings_with_origins()     # origins["timeouts.chat"] == "file"

- `schema`: the one pydantic Settings model (keys, types, bounds, defaults, descriptions, and the
  `RESTART` flag on keys the daemon reads only at start).
- `keys`: what each dotted key is (`key_infos`, "did you mean", `needs_restart`).
- `load`: precedence flag > environment > file > default, origins, and readable errors.
- `file`: the config file's text and TOML document, its atomic write and its lock.
- `paths`: `home()` and `config_path()`.

Importing this package is cheap: pydantic and the model are loaded the first time something needs
them (`Settings`, `key_infos()`, `load_settings()`...), so `mlx-manager --help`, `config path` and
`status` never pay for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlx_manager.settings.errors import SettingsError
from mlx_manager.settings.file import (
    ConfigBusyError,
    config_lock,
    parse_config_document,
    read_config_text,
    set_in_document,
    unset_in_document,
    write_config_text,
)
from mlx_manager.settings.keys import KeyInfo, entry_info, key_info, key_infos, needs_restart, sections, suggest_key
from mlx_manager.settings.load import (
    changed_keys,
    check_config_text,
    flatten,
    load_settings,
    load_settings_with_origins,
    parse_value,
    reload_changes,
)
from mlx_manager.settings.paths import ENV_PREFIX, config_path, home

if TYPE_CHECKING:
    from mlx_manager.settings.schema import KEY_NAME, Settings

_FROM_SCHEMA = ("KEY_NAME", "Settings")


def __getattr__(name: str) -> Any:
    """`Settings` and `KEY_NAME` are looked up in `schema` (which builds the model) on first use."""
    if name in _FROM_SCHEMA:
        from mlx_manager.settings import schema

        return getattr(schema, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ENV_PREFIX",
    "KEY_NAME",
    "ConfigBusyError",
    "KeyInfo",
    "Settings",
    "SettingsError",
    "changed_keys",
    "check_config_text",
    "config_lock",
    "config_path",
    "entry_info",
    "flatten",
    "home",
    "key_info",
    "key_infos",
    "load_settings",
    "load_settings_with_origins",
    "needs_restart",
    "parse_config_document",
    "parse_value",
    "read_config_text",
    "reload_changes",
    "sections",
    "set_in_document",
    "suggest_key",
    "unset_in_document",
    "write_config_text",
]
