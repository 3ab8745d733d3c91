"""The one Settings model: every key, its type, bounds, default and description.

Also where mlx-manager keeps its files (everything lives under `home()` so that
`MLX_MANAGER_HOME` moves config, audit database, logs and pid files at once), and how the
config file is read, checked and written. Precedence: flag > environment > file > default.

    settings = load_settings({"server.port": port})     # raises SettingsError, never prints
    settings, origins = load_settings_with_origins()     # origins["timeouts.chat"] == "file"
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import json
import os
import re
import tempfile
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from mlx_manager.locking import flock_within

ENV_PREFIX = "MLX_MANAGER_"

# Keys a running daemon cannot change without a restart: the socket is already bound, and the
# supervisor reads its timings when it starts (`mlx-manager restart` applies them).
# The daemon reports these as `restart_needed` on reload; it may add others.
RESTART_KEYS = frozenset(
    {
        "server.blas",
        "server.host",
        "server.port",
        "supervisor.health_interval",
        "supervisor.hang_timeout",
        "supervisor.start_timeout",
        "supervisor.stop_timeout",
    }
)

_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?[smhd])+")


def parse_duration(value: Any) -> Any:
    """'90s', '15m', '2h', '1d', '1h30m' -> seconds; anything else is left for the number check."""
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if _DURATION.fullmatch(text):
            return sum(float(n) * _UNIT_SECONDS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smhd])", text))
    return value


# Every "seconds" key takes a plain number or a duration; NaN and infinity never pass.
Duration = Annotated[float, BeforeValidator(parse_duration), Field(allow_inf_nan=False)]
Seconds = Annotated[Duration, Field(ge=1, le=86400)]


class Section(BaseModel):
    # defer_build: the validators are built once, below, without pydantic plugins (see there).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, defer_build=True)


class ServerSettings(Section):
    host: str = Field("127.0.0.1", min_length=1, description="Address the daemon listens on (loopback unless told otherwise).")
    port: int = Field(10242, ge=1, le=65535, description="TCP port the daemon listens on.")
    drain_timeout: Duration = Field(
        30.0, ge=0, le=3600, description="Seconds in-flight requests may finish after a stop is asked for."
    )
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, le=1024**3, description="Largest request body accepted, in bytes."
    )
    queue_limit: int = Field(
        64, ge=1, le=100000, description="Most jobs waiting for the inference thread before new ones are refused."
    )
    max_batch_size: int = Field(
        32, ge=1, le=1024, description="Most sequences decoded together in one batch."
    )
    max_messages: int = Field(
        256, ge=1, le=100000, description="Most messages in one chat request; more is refused with 422."
    )
    rate_limit: int = Field(
        0, ge=0, le=1_000_000,
        description="Requests per minute one client may make to /v1 (by API key, else by address); 0 turns it off.",
    )
    blas: str = Field(
        "auto",
        min_length=1,
        description=(
            "Linux: the BLAS behind MLX's matrix products: 'auto' (an optimised OpenBLAS or MKL found on the"
            " machine, else MLX's bundled reference BLAS), 'bundled', or the path of a CBLAS library."
        ),
    )

    @field_validator("blas")
    @classmethod
    def blas_choice(cls, value: str) -> str:
        if value in ("auto", "bundled") or Path(value).expanduser().is_file():
            return value
        raise ValueError("must be 'auto', 'bundled' or the path of an existing library file")


class TimeoutSettings(Section):
    chat: Seconds = Field(900, description="Deadline for /v1/chat/completions, in seconds.")
    completions: Seconds = Field(600, description="Deadline for /v1/completions, in seconds.")
    embeddings: Seconds = Field(120, description="Deadline for /v1/embeddings, in seconds.")
    messages: Seconds = Field(900, description="Deadline for /v1/messages (Anthropic's API), in seconds.")
    responses: Seconds = Field(900, description="Deadline for /v1/responses (OpenAI's Responses API), in seconds.")


class ModelSettings(Section):
    allowed: list[str] = Field(
        default_factory=list,
        description="Models requests may load (folder paths or Hugging Face ids); empty allows any.",
    )
    max_loaded: int = Field(2, ge=1, le=64, description="Most models kept loaded at once (least recently used goes first).")
    keep_alive: Duration = Field(
        1800, ge=0, le=7 * 86400, description="Seconds an idle model stays loaded; 0 keeps it forever."
    )
    preload: list[str] = Field(default_factory=list, description="Models loaded when the daemon starts.")
    folders: list[str] = Field(
        default_factory=list,
        description="Folders of model folders (besides the Hugging Face cache) that `mlx-manager models list` shows.",
    )
    default_max_tokens: int = Field(
        512, ge=1, le=1_000_000, description="max_tokens used when a request gives none (never above models.max_tokens)."
    )
    max_tokens: int = Field(
        131072, ge=1, le=1_000_000, description="Largest max_tokens a request may ask for; more is refused with 422."
    )


class AuditSettings(Section):
    path: str = Field("", description="SQLite audit database; empty means audit.db under the home folder.")
    retention_days: int = Field(30, ge=1, le=36500, description="Days audit rows are kept before pruning.")
    prune_interval: Duration = Field(3600, ge=60, le=7 * 86400, description="Seconds between automatic prunes.")


class TelemetrySettings(Section):
    enabled: bool = Field(True, description="Turn Logfire / OpenTelemetry tracing on or off.")
    environment: str = Field("production", description="Environment name attached to traces.")
    console: bool = Field(False, description="Also print spans to the console.")
    otlp_endpoint: str = Field("", description="Send traces to this OTLP endpoint instead of (or as well as) Logfire.")


class LogSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Daemon log level.")
    file: str = Field("", description="Daemon log file; empty means logs/daemon.log under the home folder.")


# `mlx-manager keys add` makes 256-bit random keys, so one SHA-256 per key is as strong as a slow
# password hash here and cheap enough to check on every request.
KEY_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class ApiKey(Section):
    """One API key as the config file keeps it: never the key itself, only its SHA-256."""

    name: str = Field(pattern=KEY_NAME, description="Name that `mlx-manager keys` lists and revokes it by.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the key, in hex.")
    created: datetime = Field(description="When the key was made (UTC).")


class AuthSettings(Section):
    keys: list[ApiKey] = Field(
        default_factory=list,
        description="API keys /v1 requests must send as 'Authorization: Bearer KEY', stored hashed; "
        "managed by `mlx-manager keys`, never printed.",
        json_schema_extra={"secret": True},
    )
    keys_file: str = Field(
        "",
        description="File of more API keys in plain text, one per line (e.g. a mounted secret); "
        "the MLX_MANAGER_API_KEY variable adds one more.",
    )

    @field_validator("keys")
    @classmethod
    def unique_names(cls, keys: list[ApiKey]) -> list[ApiKey]:
        names = [key.name for key in keys]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"two keys are named {duplicates[0]!r}; names must be unique")
        return keys


class SupervisorSettings(Section):
    health_interval: Duration = Field(5, ge=0.1, le=3600, description="Seconds between the supervisor's /health probes.")
    hang_timeout: Duration = Field(
        60, ge=1, le=86400, description="Seconds without a /health answer before the supervisor kills and restarts the daemon."
    )
    start_timeout: Duration = Field(120, ge=1, le=86400, description="Seconds a new daemon has to become ready.")
    stop_timeout: Duration = Field(
        60, ge=1, le=86400, description="Seconds the supervisor waits for a graceful stop before it kills the daemon."
    )


class Settings(Section):
    server: ServerSettings = Field(default_factory=ServerSettings)
    timeouts: TimeoutSettings = Field(default_factory=TimeoutSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    log: LogSettings = Field(default_factory=LogSettings)
    supervisor: SupervisorSettings = Field(default_factory=SupervisorSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)

    def audit_path(self) -> Path:
        return Path(self.audit.path).expanduser() if self.audit.path else home() / "audit.db"

    def log_path(self) -> Path:
        return Path(self.log.file).expanduser() if self.log.file else home() / "logs" / "daemon.log"


def _build_models() -> None:
    """Build the models' validators with pydantic plugins switched off. Logfire registers a plugin
    that pydantic imports when it builds the first validator, which would pull logfire and
    OpenTelemetry (~0.3 s) into every `config` command. "__all__" skips plugins without caching
    that choice, so models built later (the daemon's) still get them."""
    previous = os.environ.get("PYDANTIC_DISABLE_PLUGINS")
    os.environ["PYDANTIC_DISABLE_PLUGINS"] = "__all__"
    try:
        for model in Section.__subclasses__():  # definition order: sections before Settings
            model.model_rebuild(force=True)
    finally:
        if previous is None:
            del os.environ["PYDANTIC_DISABLE_PLUGINS"]
        else:
            os.environ["PYDANTIC_DISABLE_PLUGINS"] = previous


_build_models()


def home() -> Path:
    """The folder that holds every file mlx-manager keeps."""
    env = os.environ.get(f"{ENV_PREFIX}HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_config_path

    return user_config_path("mlx-manager", appauthor=False)


def config_path() -> Path:
    return home() / "config.toml"


# --- what each key is ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyInfo:
    """One dotted key (`timeouts.chat`) as the CLI, the environment and error messages see it."""

    key: str
    section: str
    name: str
    description: str
    default: Any
    kind: Literal["duration", "int", "float", "bool", "str", "list", "choice"]
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    # Secret keys are never printed back (`config get/list` show a count) nor set with `config set`.
    secret: bool = False

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
            "int": f"a whole number{span}",
            "float": f"a number{span}",
            "bool": "true or false",
            "str": "text",
            "list": 'a comma-separated list or a JSON array like ["a", "b"]',
            "choice": "one of " + ", ".join(self.choices),
        }[self.kind]


@cache
def key_infos() -> dict[str, KeyInfo]:
    """Every settable key, in the order the model declares them."""
    infos = {}
    for section, section_field in Settings.model_fields.items():
        for name, field in section_field.annotation.model_fields.items():
            bounds = {a: getattr(m, a) for m in field.metadata for a in ("ge", "gt", "le", "lt") if hasattr(m, a)}
            low, high = bounds.get("ge", bounds.get("gt")), bounds.get("le", bounds.get("lt"))
            choices: tuple[str, ...] = ()
            if any(isinstance(m, BeforeValidator) and m.func is parse_duration for m in field.metadata):
                kind = "duration"
            elif typing.get_origin(field.annotation) is Literal:
                kind, choices = "choice", tuple(typing.get_args(field.annotation))
            elif typing.get_origin(field.annotation) is list:
                kind = "list"
            else:
                kind = {int: "int", float: "float", bool: "bool"}.get(field.annotation, "str")
            if kind == "bool":
                choices = ("true", "false")
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
                secret=bool((field.json_schema_extra or {}).get("secret")),
            )
    return infos


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
    """The key's description, or SettingsError naming the closest known key."""
    info = key_infos().get(key)
    if info is None:
        raise SettingsError(key=key, problem=_unknown_key_problem(key))
    return info


def _unknown_key_problem(key: str) -> str:
    sections = Settings.model_fields
    if key in sections:
        names = ", ".join(k for k in key_infos() if k.startswith(key + "."))
        return f"{key} is a section, not a key; its keys are {names}"
    guess = suggest_key(key)
    return f"unknown key {key}" + (f" (did you mean {guess}?)" if guess else "")


# --- errors -----------------------------------------------------------------------------------


class SettingsError(ValueError):
    """A setting that does not parse or validate: where it came from, which key, what is wrong."""

    def __init__(
        self, *, problem: str, key: str | None = None, file: Path | None = None,
        line: int | None = None, source: str | None = None,
    ) -> None:
        self.problem, self.key, self.file, self.line = problem, key, file, line
        self.source = source  # e.g. "MLX_MANAGER_TIMEOUTS__CHAT" or "--port", when not the file
        super().__init__(str(self))

    def __str__(self) -> str:
        where = str(self.file) if self.file else (self.source or "")
        if self.file and self.line:
            where += f":{self.line}"
        parts = [where] if where else []
        if self.key and self.key not in self.problem:
            parts.append(self.key)
        parts.append(self.problem)
        return ": ".join(parts)


def _problem(error: dict, info: KeyInfo | None) -> str:
    kind, given = error["type"], error.get("input")
    shown = json.dumps(given) if isinstance(given, str) else repr(given)
    if info is None:
        return error["msg"]
    if kind.endswith(("_parsing", "_type", "literal_error", "finite_number")) or kind.startswith(
        ("greater", "less")
    ):
        return f"{shown} is not valid; expected {info.expected()}"
    return f"{error['msg'].lower()} (expected {info.expected()})"


def _validation_error(exc: ValidationError, **where: Any) -> SettingsError:
    """The first pydantic error, said the way a user thinks of it (the dotted key and its type)."""
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc[:2])
    if error["type"] == "extra_forbidden":
        return SettingsError(key=key, problem=_unknown_key_problem(key), **where)
    if len(loc) == 1 and error["type"] in ("model_type", "dict_type"):
        return SettingsError(key=key, problem=f"{key} must be a table ([{key}]), not a single value", **where)
    return SettingsError(key=key, problem=_problem(error, key_infos().get(key)), **where)


# --- reading values ---------------------------------------------------------------------------


def parse_value(key: str, raw: Any, *, source: str | None = None) -> Any:
    """Check one value for one key and return it typed. Text (from the CLI or environment) is
    converted: lists as `a,b` or JSON, seconds as numbers or durations. Raises SettingsError."""
    info = key_info(key)
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


def read_config_text(path: Path | None = None) -> str:
    """The config file's text, or "" when there is none yet."""
    path = path or config_path()
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(file=path, problem=f"cannot read it ({exc})") from None


def _toml_data(text: str, path: Path) -> dict:
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


def parse_config_document(text: str, path: Path | None = None):
    """The text as a tomlkit document, which keeps comments and layout when written back."""
    import tomlkit

    _toml_data(text, path or config_path())
    return tomlkit.parse(text)


def check_config_text(text: str, path: Path | None = None) -> Settings:
    """The settings a config file's text holds on its own (no env, no flags), or SettingsError."""
    path = path or config_path()
    try:
        return Settings.model_validate(_toml_data(text, path))
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
    """Dotted keys whose value differs; the daemon splits these by RESTART_KEYS on reload."""
    before, after = flatten(old), flatten(new)
    return [key for key in after if before[key] != after[key]]


def reload_changes(old: Settings, new: Settings) -> tuple[list[str], list[str]]:
    """(applied, restart_needed) for the daemon's reload answer: the changed keys split by
    RESTART_KEYS. The daemon may move more keys to restart_needed if it cannot apply them."""
    changed = changed_keys(old, new)
    return [k for k in changed if k not in RESTART_KEYS], [k for k in changed if k in RESTART_KEYS]


# --- writing the file -------------------------------------------------------------------------


def set_in_document(document, key: str, value: Any) -> None:
    """Put a typed value into a tomlkit document, creating its [section] table if needed."""
    import tomlkit

    section, name = key.split(".", 1)
    if section not in document:
        document.add(section, tomlkit.table())
    document[section][name] = value


def unset_in_document(document, key: str) -> bool:
    """Remove a key from a tomlkit document; False when it was not there. Stray entries (an
    unknown key, or an unknown top-level table) can be removed too, so a bad file can be fixed."""
    section, _, name = key.partition(".")
    if not name:
        if section in Settings.model_fields or section not in document:
            return False
        del document[section]
        return True
    table = document.get(section)
    if table is None or not hasattr(table, "keys") or name not in table:
        return False
    del table[name]
    return True


def write_config_text(text: str, path: Path | None = None) -> Path:
    """Replace the config file atomically (temp file + rename), mode 0600, folder 0700.
    A symlinked config file (dotfile managers) is followed, so the link survives."""
    path = (path or config_path()).resolve()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # created 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# Seconds a command that changes the config file waits for another one to finish.
CONFIG_LOCK_TIMEOUT = 10.0


class ConfigBusyError(TimeoutError):
    """Another mlx-manager command held the config file's lock for longer than we would wait."""


@contextlib.contextmanager
def config_lock(path: Path | None = None, timeout: float | None = None) -> Iterator[Path]:
    """Hold an exclusive lock on `config.toml.lock` next to the config file (mode 0600, folder 0700)
    for a whole read-modify-write, so two commands changing the file at once cannot lose a change.
    Waits up to `timeout` seconds (CONFIG_LOCK_TIMEOUT by default), then raises ConfigBusyError;
    other OSErrors (an unwritable folder) propagate. The kernel drops the lock if the process dies."""
    path = path or config_path()
    lock_path = path.with_name(f"{path.name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by children (PEP 446)
    try:
        if not flock_within(fd, CONFIG_LOCK_TIMEOUT if timeout is None else timeout):
            raise ConfigBusyError(f"another mlx-manager command is changing {path}; try again")
        try:
            yield path
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
