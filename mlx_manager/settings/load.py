"""Settings from flag > environment > file > default, where each value came from, and pydantic's
errors said the way a user thinks of them (the file and line, the dotted key, what is expected)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlx_manager.settings.errors import SettingsError
from mlx_manager.settings.file import read_config_text, toml_data
from mlx_manager.settings.keys import (
    KeyInfo,
    key_info,
    key_infos,
    needs_restart,
    plain,
    suggest_key,
    unknown_key_problem,
)
from mlx_manager.settings.paths import ENV_PREFIX, config_path

if TYPE_CHECKING:
    from pydantic import ValidationError
    from pydantic_core import ErrorDetails

    from mlx_manager.settings.schema import Settings


def _problem(error: ErrorDetails, info: KeyInfo | None) -> str:
    kind, given = error["type"], error.get("input")
    shown = json.dumps(given) if isinstance(given, str) else repr(given)
    if info is None:
        return error["msg"]
    if kind.endswith(("_parsing", "_type", "literal_error", "finite_number")) or kind.startswith(("greater", "less")):
        return f"{shown} is not valid; expected {info.expected()}"
    return f"{error['msg'].lower()} (expected {info.expected()})"


def _validation_error(exc: ValidationError, **where: Any) -> SettingsError:
    """The first pydantic error, said the way a user thinks of it (the dotted key and its type)."""
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc[:2])
    info = key_infos().get(key)
    if info is not None and info.kind == "map" and len(loc) > 2:  # one entry's name or value
        entry = loc[2]
        if loc[-1] == "[key]":
            problem = f"{entry!r} is not a valid name: use letters, digits and . _ : + - (no slash, no space)"
        else:
            problem = f"the value of {entry!r} is not valid: {error['msg'].lower()}"
        return SettingsError(key=key, problem=problem, **where)
    if error["type"] == "extra_forbidden":
        return SettingsError(key=key, problem=unknown_key_problem(key), **where)
    if len(loc) == 1 and error["type"] in ("model_type", "dict_type"):
        return SettingsError(key=key, problem=f"{key} must be a table ([{key}]), not a single value", **where)
    return SettingsError(key=key, problem=_problem(error, key_infos().get(key)), **where)


def parse_value(key: str, raw: Any, *, source: str | None = None) -> Any:
    """Check one value for one key and return it typed. Text (from the CLI or environment) is
    converted: lists as `a,b` or JSON, seconds as numbers or durations. Raises SettingsError."""
    from pydantic import ValidationError

    from mlx_manager.settings.schema import Settings

    info = key_info(key)
    if info.entry is not None:  # one entry of a map: checked as that map with this entry alone
        try:
            settings = Settings.model_validate({info.section: {info.name: {info.entry: raw}}})
        except ValidationError as exc:
            raise _validation_error(exc, source=source) from None
        return getattr(getattr(settings, info.section), info.name)[info.entry]
    if isinstance(raw, str) and info.kind == "map":
        try:
            raw = json.loads(raw)
        except ValueError:
            problem = f"{raw!r} is not valid; expected {info.expected()}"
            raise SettingsError(key=key, source=source, problem=problem) from None
    if isinstance(raw, str) and info.kind == "list":
        text = raw.strip()
        if text.startswith("["):
            try:
                raw = json.loads(text)
            except ValueError:
                problem = f"{text!r} is not a JSON array; expected {info.expected()}"
                raise SettingsError(key=key, source=source, problem=problem) from None
        else:
            raw = [item.strip() for item in text.split(",") if item.strip()]
    try:  # validated as part of a whole Settings, so errors carry the (section, name) location
        settings = Settings.model_validate({info.section: {info.name: raw}})
    except ValidationError as exc:
        raise _validation_error(exc, source=source) from None
    return plain(getattr(getattr(settings, info.section), info.name))


def check_config_text(text: str, path: Path | None = None) -> Settings:
    """The settings a config file's text holds on its own (no env, no flags), or SettingsError."""
    from pydantic import ValidationError

    from mlx_manager.settings.schema import Settings

    path = path or config_path()
    try:
        return Settings.model_validate(toml_data(text, path))
    except ValidationError as exc:
        error = _validation_error(exc, file=path)
        error.line = _line_of(text, error.key or "")
        raise error from None


def _line_of(text: str, key: str) -> int | None:
    """Best-effort line of `key` in a TOML text, so an error points at it."""
    section, _, name = key.partition(".")
    current = ""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        header = re.fullmatch(r"\[\s*([^\[\]]+?)\s*\]\s*(#.*)?", stripped)
        if header:
            current = header.group(1)
            if current == section and not name:
                return number
            continue
        if name and current == section and re.match(rf"{re.escape(name)}\s*=", stripped):
            return number
        if current == "" and re.match(rf"{re.escape(section)}(\.{re.escape(name)})?\s*=", stripped):
            return number
    return None


def _env_values() -> dict[str, tuple[str, Any]]:
    """key -> (variable name, typed value) for every MLX_MANAGER_<SECTION>__<KEY> variable."""
    values = {}
    for var, raw in sorted(os.environ.items()):
        if not var.startswith(ENV_PREFIX) or "__" not in var:
            continue
        section, name = var[len(ENV_PREFIX) :].lower().split("__", 1)
        key = f"{section}.{name}"
        if key not in key_infos():
            guess = suggest_key(key)
            hint = f" (did you mean {key_infos()[guess].env_var}?)" if guess else ""
            raise SettingsError(source=var, key=key, problem=f"no setting {key} for this variable{hint}")
        values[key] = (var, parse_value(key, raw, source=var))
    return values


def load_settings_with_origins(overrides: Mapping[str, Any] | None = None) -> tuple[Settings, dict[str, str]]:
    """Settings from flag > environment > file > default, and where each key's value came from
    ("flag", "env", "file" or "default"). `overrides` maps dotted keys to flag values; None is
    "not given". Raises SettingsError naming the file, variable or flag at fault."""
    from mlx_manager.settings.schema import Settings

    path = config_path()
    file_settings = check_config_text(read_config_text(path), path)
    file_keys = {
        f"{section}.{name}"
        for section in file_settings.model_fields_set
        for name in getattr(file_settings, section).model_fields_set
    }
    data = file_settings.model_dump()
    origins = {key: ("file" if key in file_keys else "default") for key in key_infos()}
    layers = [(key, value, "env") for key, (_, value) in _env_values().items()]
    for key, value in (overrides or {}).items():
        if value is not None:
            flag = "--" + key.rsplit(".", 1)[-1].replace("_", "-")
            layers.append((key, parse_value(key, value, source=flag), "flag"))
    for key, value, origin in layers:
        section, name = key.split(".", 1)
        data[section][name] = value
        origins[key] = origin
    return Settings.model_validate(data), origins


def load_settings(overrides: Mapping[str, Any] | None = None) -> Settings:
    """Defaults, overlaid by the config file, the environment, then `overrides` (flags).
    The daemon calls this at start and on reload; it raises SettingsError, never prints."""
    return load_settings_with_origins(overrides)[0]


def flatten(settings: Settings) -> dict[str, Any]:
    """{"timeouts.chat": 900, ...} for every key, in declaration order."""
    dumped = settings.model_dump(mode="json")
    return {key: plain(dumped[info.section][info.name]) for key, info in key_infos().items()}


def changed_keys(old: Settings, new: Settings) -> list[str]:
    """Dotted keys whose value differs, in declaration order."""
    before, after = flatten(old), flatten(new)
    return [key for key in after if before[key] != after[key]]


def reload_changes(old: Settings, new: Settings) -> tuple[list[str], list[str]]:
    """(applied, restart_needed): the changed keys split by `needs_restart`, as the daemon's reload
    answer reports them."""
    changed = changed_keys(old, new)
    return [k for k in changed if not needs_restart(k)], [k for k in changed if needs_restart(k)]
