"""What each dotted key (`timeouts.chat`) is, as the CLI, the environment and error messages see it:
its description, default, kind and bounds, whether it is secret or needs a restart, and the known
key closest to a mistyped one."""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Literal

from mlx_manager.settings.errors import SettingsError
from mlx_manager.settings.paths import ENV_PREFIX

if TYPE_CHECKING:
    from pydantic import BaseModel


@dataclass(frozen=True)
class KeyInfo:
    """One dotted key (`timeouts.chat`) as the CLI, the environment and error messages see it."""

    key: str
    section: str
    name: str
    description: str
    default: Any
    kind: Literal["duration", "size", "int", "float", "bool", "str", "list", "tables", "choice", "map"]
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    # Secret keys are never printed back (`config get/list` show a count) nor set with `config set`.
    secret: bool = False
    # A running daemon reports a change of this key as `restart_needed`, never as applied.
    restart: bool = False
    # What a value looks like, when the kind alone does not say it (a list of tables).
    example: str = ""
    # One entry of a map key: `models.aliases.fast` is entry "fast" of `models.aliases`.
    entry: str | None = None

    @property
    def base(self) -> str:
        """The setting itself: the key without its entry."""
        return f"{self.section}.{self.name}"

    @property
    def env_var(self) -> str:
        return f"{ENV_PREFIX}{self.section.upper()}__{self.name.upper()}"

    def expected(self) -> str:
        """What a valid value looks like, for error messages and help."""
        if self.secret:
            return "entries made by `mlx-manager keys add NAME`"
        span = ""
        if self.low is not None and self.high is not None:
            span = f" from {plain(self.low)} to {plain(self.high)}"
        return {
            "duration": f"seconds{span}, or a duration like 90s, 15m, 2h",
            "size": f"bytes{span}, or a size like 512MiB, 2GiB",
            "int": f"a whole number{span}",
            "float": f"a number{span}",
            "bool": "true or false",
            "str": "text",
            "list": 'a comma-separated list or a JSON array like ["a", "b"]',
            "tables": self.example or "a JSON array of tables",
            "choice": "one of " + ", ".join(self.choices),
            "map": f'a JSON object like {{"name": "value"}}, or one entry set as {self.key}.NAME',
        }[self.kind]


_KINDS: dict[Any, str] = {int: "int", float: "float", bool: "bool"}


@cache
def key_infos() -> dict[str, KeyInfo]:
    """Every settable key, in the order the model declares them."""
    from pydantic import BaseModel, BeforeValidator

    from mlx_manager.settings.schema import Settings, parse_duration, parse_size  # the first call builds the model

    infos = {}
    for section, section_field in Settings.model_fields.items():
        model = typing.cast("type[BaseModel]", section_field.annotation)  # every section is a model
        for name, field in model.model_fields.items():
            bounds = {a: getattr(m, a) for m in field.metadata for a in ("ge", "gt", "le", "lt") if hasattr(m, a)}
            low, high = bounds.get("ge", bounds.get("gt")), bounds.get("le", bounds.get("lt"))
            choices: tuple[str, ...] = ()
            kind: Any
            if any(isinstance(m, BeforeValidator) and m.func is parse_duration for m in field.metadata):
                kind = "duration"
            elif any(isinstance(m, BeforeValidator) and m.func is parse_size for m in field.metadata):
                kind = "size"
            elif typing.get_origin(field.annotation) is Literal:
                kind, choices = "choice", tuple(typing.get_args(field.annotation))
            elif typing.get_origin(field.annotation) is list:
                item = (typing.get_args(field.annotation) or (None,))[0]
                kind = "tables" if isinstance(item, type) and issubclass(item, BaseModel) else "list"
            elif typing.get_origin(field.annotation) is dict:
                kind = "map"
            else:
                kind = _KINDS.get(field.annotation, "str")
            if kind == "bool":
                choices = ("true", "false")
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            infos[f"{section}.{name}"] = KeyInfo(
                key=f"{section}.{name}",
                section=section,
                name=name,
                description=field.description or "",
                default=plain(field.get_default(call_default_factory=True)),
                kind=kind,
                low=low,
                high=high,
                choices=choices,
                secret=bool(extra.get("secret")),
                restart=bool(extra.get("restart")),
                example=str(extra.get("expected", "")),
            )
    return infos


@cache
def sections() -> tuple[str, ...]:
    """The [section] tables a config file may hold, in declaration order."""
    return tuple(dict.fromkeys(info.section for info in key_infos().values()))


def needs_restart(key: str) -> bool:
    """The one rule: a change of this key takes effect only when the daemon starts again."""
    return key_info(key).restart


def plain(value: Any) -> Any:
    """900.0 -> 900, so values print and store the way people write them."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def suggest_key(key: str) -> str | None:
    """The known key closest to a mistyped one, for "did you mean"."""
    keys = list(key_infos())
    match = difflib.get_close_matches(key.lower(), keys, n=1, cutoff=0.6)
    if not match:  # `chat` alone, or `timeout.chat`: compare the last part too
        names = {info.name: k for k, info in key_infos().items()}
        last = key.lower().rsplit(".", 1)[-1]
        match = [names[m] for m in difflib.get_close_matches(last, list(names), n=1, cutoff=0.8)]
    return match[0] if match else None


def key_info(key: str) -> KeyInfo:
    """The key's description (or that of one entry of a map key, `models.aliases.NAME`), or
    SettingsError naming the closest known key."""
    info = key_infos().get(key)
    if info is None:
        info = entry_info(key)
    if info is None:
        raise SettingsError(key=key, problem=unknown_key_problem(key))
    return info


def entry_info(key: str) -> KeyInfo | None:
    """`section.name.entry` where `section.name` is a map key: that entry, as a text key."""
    section, _, rest = key.partition(".")
    name, _, entry = rest.partition(".")
    parent = key_infos().get(f"{section}.{name}")
    if parent is None or parent.kind != "map" or not entry:
        return None
    return KeyInfo(
        key=key,
        section=section,
        name=name,
        description=f"entry {entry!r} of {parent.key}",
        default=None,
        kind="str",
        secret=parent.secret,
        restart=parent.restart,
        entry=entry,
    )


def unknown_key_problem(key: str) -> str:
    if key in sections():
        names = ", ".join(k for k in key_infos() if k.startswith(key + "."))
        return f"{key} is a section, not a key; its keys are {names}"
    guess = suggest_key(key)
    return f"unknown key {key}" + (f" (did you mean {guess}?)" if guess else "")
