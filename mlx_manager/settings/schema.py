"""The one Settings model: every key, its type, bounds, default and description.

A key the daemon reads only when it starts carries `json_schema_extra=RESTART`: that flag is the one
rule for "a change needs a restart" (`settings.keys.needs_restart`). Importing this module defines
and builds the models (several tens of ms), so the package loads it only when something needs it.
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic.json_schema import JsonDict

from mlx_manager.settings.paths import home

# A running daemon cannot apply these without a restart: the socket is already bound, the
# supervisor reads its timings when it starts, and the log file, the audit database, telemetry
# exporters and the preload list are opened or read once at start (`mlx-manager restart` applies them).
RESTART: JsonDict = {"restart": True}
# Never printed back (`config get/list` show a count) nor set with `config set`.
SECRET: JsonDict = {"secret": True}
# Validation context of settings put together whole (file, environment, flags): checks that need
# every key at once (the names routes use) run only then, not on one value set alone.
WHOLE = "whole"

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

_UNIT_BYTES = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")


def parse_size(value: Any) -> Any:
    """'512MiB', '2GiB', '1.5GB', '750M' -> bytes; anything else is left for the number check."""
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip().lower())
        if match and match.group(2) in _UNIT_BYTES:
            return int(float(match.group(1)) * _UNIT_BYTES[match.group(2)])
    return value


# Every "bytes" key takes a whole number or a size with its unit (KiB, MiB, GiB; KB, MB, GB).
Size = Annotated[int, BeforeValidator(parse_size)]

# A model alias: no slash (clients such as openai-agents read `a/b` as provider/model), no space.
AliasName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,99}$")]


def default_cache_bytes() -> int:
    """An eighth of this machine's memory, at most 8 GiB: what one model's prompt cache may hold."""
    import psutil

    return min(psutil.virtual_memory().total // 8, 8 * 1024**3)


class Section(BaseModel):
    # defer_build: the validators are built once, below, without pydantic plugins (see there).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, defer_build=True)


class ServerSettings(Section):
    host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="Address the daemon listens on (loopback unless told otherwise).",
        json_schema_extra=RESTART,
    )
    port: int = Field(10242, ge=1, le=65535, description="TCP port the daemon listens on.", json_schema_extra=RESTART)
    drain_timeout: Duration = Field(
        30.0, ge=0, le=3600, description="Seconds in-flight requests may finish after a stop is asked for."
    )
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, le=1024**3, description="Largest request body accepted, in bytes."
    )
    queue_limit: int = Field(
        64, ge=1, le=100000, description="Most jobs waiting for the inference thread before new ones are refused."
    )
    max_batch_size: int = Field(32, ge=1, le=1024, description="Most sequences decoded together in one batch.")
    max_messages: int = Field(
        256, ge=1, le=100000, description="Most messages in one chat request; more is refused with 422."
    )
    rate_limit: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="Requests per minute one client may make to /v1 (by API key, else by address); 0 turns it off.",
    )
    blas: str = Field(
        "auto",
        min_length=1,
        description=(
            "Linux: the BLAS behind MLX's matrix products: 'auto' (an optimised OpenBLAS or MKL found on the"
            " machine, else MLX's bundled reference BLAS), 'bundled', or the path of a CBLAS library."
        ),
        json_schema_extra=RESTART,
    )

    prefill_chunk: int = Field(
        512,
        ge=16,
        le=65536,
        description="Prompt tokens read per step; running streams decode between chunks,"
        " and a cancelled prompt stops within one.",
    )
    max_connections: int = Field(
        1000,
        ge=16,
        le=1_000_000,
        json_schema_extra=RESTART,
        description="Most client connections open at once (at most half the open-file limit): past it the one idle"
        " longest is closed for a new one; with none idle, new ones get 503 (/health and /ready still answer).",
    )
    idle_timeout: Duration = Field(
        5,
        ge=0.5,
        le=3600,
        json_schema_extra=RESTART,
        description="Seconds a connection may stay open without sending a request before it is closed.",
    )
    read_timeout: Duration = Field(
        30,
        ge=1,
        le=3600,
        json_schema_extra=RESTART,
        description="Seconds a client has to send a whole request, headers and body (from connecting or from its"
        " last answer); a slower one (slowloris) is closed.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names clients may reach the daemon by, besides loopback names, IP addresses and"
        " server.host; other Host headers get 421 (a guard against DNS rebinding). '*.example.com' takes"
        " subdomains; '*' turns the check off.",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        json_schema_extra=RESTART,
        description="Web origins (https://app.example.com) whose pages may call the API from a browser (CORS);"
        " empty: none.",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        json_schema_extra=RESTART,
        description="Addresses or networks of reverse proxies whose X-Forwarded-For and X-Forwarded-Proto are"
        " believed (client address for the rate limit and the logs); empty: those headers are ignored.",
    )
    docs: bool = Field(
        False,
        json_schema_extra=RESTART,
        description="Serve interactive API docs at /docs (Swagger UI, which the browser loads from a CDN).",
    )

    @field_validator("allowed_hosts")
    @classmethod
    def host_names(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            if host != "*" and not _HOST_PATTERN.fullmatch(host):
                raise ValueError(f"{host!r} is not a host name (like api.example.com or *.example.com)")
        return [host.lower().rstrip(".") for host in hosts]

    @field_validator("cors_origins")
    @classmethod
    def web_origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and not _ORIGIN_PATTERN.fullmatch(origin):
                raise ValueError(f"{origin!r} is not a web origin (scheme://host[:port], no path)")
        return [origin.rstrip("/") for origin in origins]

    @field_validator("trusted_proxies")
    @classmethod
    def proxy_addresses(cls, addresses: list[str]) -> list[str]:
        return _networks(addresses, allow_any=True)

    @field_validator("blas")
    @classmethod
    def blas_choice(cls, value: str) -> str:
        if value in ("auto", "bundled") or Path(value).expanduser().is_file():
            return value
        raise ValueError("must be 'auto', 'bundled' or the path of an existing library file")


_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?"
_HOST_PATTERN = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})*\.?")
_ORIGIN_PATTERN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+/?")


def _networks(values: list[str], *, allow_any: bool = False) -> list[str]:
    """Each value an IP address or network (10.0.0.0/8); '*' too when `allow_any`."""
    import ipaddress

    for value in values:
        if allow_any and value == "*":
            continue
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or network (like 10.0.0.5 or 10.0.0.0/8)") from None
    return values


class TimeoutSettings(Section):
    chat: Seconds = Field(900, description="Deadline for /v1/chat/completions, in seconds.")
    completions: Seconds = Field(600, description="Deadline for /v1/completions, in seconds.")
    embeddings: Seconds = Field(120, description="Deadline for /v1/embeddings, in seconds.")
    messages: Seconds = Field(900, description="Deadline for /v1/messages (Anthropic's API), in seconds.")
    responses: Seconds = Field(900, description="Deadline for /v1/responses (OpenAI's Responses API), in seconds.")


class ModelSettings(Section):
    allowed: list[str] = Field(
        default_factory=list,
        description="Models requests may load (folder paths or Hugging Face ids); empty: any in the Hugging Face"
        " cache or models.folders.",
    )
    allow_any_path: bool = Field(
        False,
        description="Let a request load a model from any folder on this machine by its path; off, folders load"
        " only from models.folders, models.allowed, models.preload and `--model`.",
    )
    max_loaded: int = Field(
        2,
        ge=1,
        le=64,
        description="Most models kept loaded at once (least recently used idle one goes first; when all are busy,"
        " a request for another model gets 503 with Retry-After).",
    )
    keep_alive: Duration = Field(
        1800, ge=0, le=7 * 86400, description="Seconds an idle model stays loaded; 0 keeps it forever."
    )
    preload: list[str] = Field(
        default_factory=list, description="Models loaded when the daemon starts.", json_schema_extra=RESTART
    )
    folders: list[str] = Field(
        default_factory=list,
        description="Folders of model folders (besides the Hugging Face cache): `mlx-manager models list` shows them"
        " and requests may load them by path.",
    )
    aliases: dict[AliasName, Annotated[str, Field(min_length=1)]] = Field(
        default_factory=dict,
        description=(
            "Short model ids clients may send instead of a path or Hugging Face id (name -> model); each allowed or"
            " preloaded model also gets its folder or repo name as one when that name is unique."
        ),
    )
    default: str = Field(
        "",
        max_length=1024,
        description="The model a request that names none gets (a folder path, a Hugging Face id or an alias);"
        " empty: the one loaded model, when only one is (of the kind the endpoint serves).",
    )
    default_max_tokens: int = Field(
        512,
        ge=1,
        le=1_000_000,
        description="max_tokens used when a request gives none (never above models.max_tokens).",
    )
    max_tokens: int = Field(
        131072, ge=1, le=1_000_000, description="Largest max_tokens a request may ask for; more is refused with 422."
    )


class CacheSettings(Section):
    max_bytes: Size = Field(
        default_factory=default_cache_bytes,
        ge=0,
        le=1024**4,
        description="Memory each loaded model's prompt cache may hold (e.g. 2GiB); 0 turns the prompt cache off."
        " Default: an eighth of this machine's memory, at most 8 GiB.",
        json_schema_extra={"default_shown": "1/8 of memory, <= 8GiB"},
    )
    max_entries: int = Field(64, ge=0, le=100_000, description="Most prompt-cache entries kept per model.")
    disk: bool = Field(
        False,
        description="Keep prompt-cache entries on disk too (under the home folder, files 0600), so a restarted"
        " daemon resumes known conversations fast. They are KV state computed from prompt text.",
        json_schema_extra=RESTART,
    )
    disk_max_bytes: Size = Field(
        10 * 1024**3,
        ge=0,
        le=1024**5,
        description="Most disk the prompt cache's files may take (e.g. 20GiB).",
        json_schema_extra=RESTART,
    )


class AuditSettings(Section):
    path: str = Field(
        "", description="SQLite audit database; empty means audit.db under the home folder.", json_schema_extra=RESTART
    )
    retention_days: int = Field(30, ge=1, le=36500, description="Days audit rows are kept before pruning.")
    prune_interval: Duration = Field(3600, ge=60, le=7 * 86400, description="Seconds between automatic prunes.")
    durability: Literal["acknowledged", "batched"] = Field(
        "acknowledged",
        description="'acknowledged': an answer's last byte waits for its audit row's commit (requests share"
        " commits), so a crash of the daemon (even kill -9) loses no row of an answered request. 'batched':"
        " nothing waits, and a crash loses the rows of the last flush window (up to 100 ms).",
    )
    fsync: bool = Field(
        False,
        description="Sync every audit commit to the disk, so committed rows survive an OS crash or a power loss"
        " too. Off: a commit reaches the OS, which keeps it across any crash of the daemon (kill -9"
        " included); an OS crash or a power loss can lose the rows of the last seconds (up to about 30 s on"
        " Linux). On: each commit waits for an fsync (a few ms, more on a slow disk), which under"
        " 'acknowledged' is added to the end of every answer.",
        json_schema_extra=RESTART,
    )


class TelemetrySettings(Section):
    enabled: bool = Field(
        True, description="Turn Logfire / OpenTelemetry tracing on or off.", json_schema_extra=RESTART
    )
    environment: str = Field(
        "production", description="Environment name attached to traces.", json_schema_extra=RESTART
    )
    console: bool = Field(False, description="Also print spans to the console.", json_schema_extra=RESTART)
    otlp_endpoint: str = Field(
        "",
        description="Send traces to this OTLP endpoint instead of (or as well as) Logfire.",
        json_schema_extra=RESTART,
    )


class LogSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Daemon log level.")
    file: str = Field(
        "", description="Daemon log file; empty means logs/daemon.log under the home folder.", json_schema_extra=RESTART
    )


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
        json_schema_extra=SECRET,
    )
    keys_file: str = Field(
        "",
        description="File of more API keys in plain text, one per line (e.g. a mounted secret); "
        "the MLX_MANAGER_API_KEY variable adds one more.",
    )
    required: bool = Field(
        False,
        description="true: /v1 needs a key even when none is configured (refused until one is added). "
        "`keys revoke` of the last key sets it, so revoking never reopens the API; set it to false to serve "
        "loopback clients without a key again. A network address always needs a key.",
    )

    open_endpoints: list[Literal["/ready", "/metrics", "/docs", "/openapi.json"]] = Field(
        default_factory=list,
        description="Of /ready, /metrics, /docs and /openapi.json (they show model paths and traffic), those that"
        " answer without a key while the API needs one. Otherwise they take an API key, or the admin token from"
        " this machine.",
    )
    probe_clients: list[str] = Field(
        default_factory=list,
        description="Client addresses or networks (10.0.0.5, 10.0.0.0/8) that may read /ready and /metrics"
        " without a key: a Prometheus scraper, a load balancer's probe.",
    )

    @field_validator("probe_clients")
    @classmethod
    def probe_addresses(cls, addresses: list[str]) -> list[str]:
        return _networks(addresses)

    @field_validator("keys")
    @classmethod
    def unique_names(cls, keys: list[ApiKey]) -> list[ApiKey]:
        names = [key.name for key in keys]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"two keys are named {duplicates[0]!r}; names must be unique")
        return keys


class SupervisorSettings(Section):
    health_interval: Duration = Field(
        5, ge=0.1, le=3600, description="Seconds between the supervisor's /health probes.", json_schema_extra=RESTART
    )
    hang_timeout: Duration = Field(
        60,
        ge=1,
        le=86400,
        json_schema_extra=RESTART,
        description="Seconds without a /health answer before the supervisor kills and restarts the daemon.",
    )
    start_timeout: Duration = Field(
        120, ge=1, le=86400, description="Seconds a new daemon has to become ready.", json_schema_extra=RESTART
    )
    stop_timeout: Duration = Field(
        60,
        ge=1,
        le=86400,
        json_schema_extra=RESTART,
        description="Seconds the supervisor (and `stop`) wait for a graceful stop before the daemon is killed;"
        " never less than server.drain_timeout + 30 s, so requests the drain ends still get their answer and row.",
    )


# Upstream backends: names that routes, groups and the audit log use. `local` is the engine here.
BACKEND_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
LOCAL_BACKEND = "local"
# An API key is named, never written: `env:NAME` (a variable of the daemon's environment) or the
# path of a file that holds it (absolute, or from ~).
KEY_REFERENCE = re.compile(r"env:[A-Za-z_][A-Za-z0-9_]*|/.+|~.*")
KEY_REFERENCE_FORMS = "env:NAME (a variable of the daemon's environment) or the path of a file that holds it"


class BackendEntry(Section):
    """One upstream server as the config file keeps it: `[[routing.backends]]`, its key only by reference."""

    name: str = Field(pattern=BACKEND_NAME, description="Name that routes, groups and the audit log use.")
    type: Literal["openai", "anthropic"] = Field(
        description="'openai' for any OpenAI-compatible server (another mlx-manager, mlx_lm.server, vLLM, OpenAI),"
        " 'anthropic' for Anthropic's Messages API."
    )
    base_url: str = Field(
        description="The URL its SDK takes: http://mac2.local:10242/v1 (openai), https://api.anthropic.com (anthropic)."
    )
    api_key: str = Field("", description=f"Its API key as {KEY_REFERENCE_FORMS}; empty: none.")

    @field_validator("name")
    @classmethod
    def not_local(cls, name: str) -> str:
        if name == LOCAL_BACKEND:
            raise ValueError(f"{LOCAL_BACKEND!r} is the local engine's name; choose another")
        return name

    @field_validator("base_url")
    @classmethod
    def http_url(cls, url: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http:// or https:// URL with a host")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError("it must not hold credentials, a query or a fragment (a key goes in api_key)")
        return url.strip().rstrip("/")

    @field_validator("api_key")
    @classmethod
    def key_reference(cls, reference: str) -> str:
        # A key in clear would end up in config.toml, `config list` and backups: refuse it.
        if reference and not KEY_REFERENCE.fullmatch(reference):
            raise ValueError(f"must be {KEY_REFERENCE_FORMS}, never the key itself")
        return reference


class GroupEntry(Section):
    """Backends that share a route's requests: `[[routing.groups]]`."""

    name: str = Field(pattern=BACKEND_NAME, description="Name that routes use.")
    members: list[str] = Field(min_length=1, description="Backends (or local) the group spreads requests over.")


class RouteEntry(Section):
    """Where requests for some models go: `[[routing.routes]]`; the first route that matches wins."""

    model: str = Field(min_length=1, description="Model name it matches: exact, or a glob (*, ?, [abc]).")
    to: str = Field(
        min_length=1, description="Backend, group or local; 'NAME:MODEL' asks that backend for MODEL instead."
    )
    fallback: list[str] = Field(
        default_factory=list, description="Backends or groups tried in turn when it fails before the first byte."
    )


def target_name(target: str) -> str:
    """The backend or group a route target names: `cloud:gpt-4o-mini` -> `cloud`."""
    return target.partition(":")[0]


class RoutingSettings(Section):
    backends: list[BackendEntry] = Field(
        default_factory=list,
        description="Upstream servers requests may be routed to (managed by `mlx-manager backends`);"
        " keys by reference only.",
        json_schema_extra={"expected": "entries made by `mlx-manager backends add`, or a JSON array of tables"},
    )
    groups: list[GroupEntry] = Field(
        default_factory=list,
        description="Named sets of backends a route spreads requests over (least outstanding requests first).",
        json_schema_extra={"expected": 'a JSON array of tables like [{"name": "macs", "members": ["mac2", "mac3"]}]'},
    )
    routes: list[RouteEntry] = Field(
        default_factory=list,
        description="Model patterns mapped to a backend or group, with fallbacks; unmatched models stay local.",
        json_schema_extra={
            "expected": 'a JSON array of tables like [{"model": "claude-*", "to": "cloud", "fallback": ["local"]}]'
        },
    )
    connect_timeout: Duration = Field(5, ge=0.1, le=600, description="Seconds to connect to a backend.")
    read_timeout: Duration = Field(
        120,
        ge=1,
        le=86400,
        description="Seconds a backend may send nothing (before its first token, or between two) before the"
        " attempt fails.",
    )
    cooldown: Duration = Field(
        30,
        ge=1,
        le=86400,
        description="Seconds a backend that failed is skipped; then a health check puts it back.",
    )
    max_connections: int = Field(
        64, ge=1, le=10000, description="Most connections open to one backend (kept alive between requests)."
    )

    @model_validator(mode="after")
    def names_resolve(self, info: ValidationInfo) -> RoutingSettings:
        # Only the whole settings can tell (a route set alone names backends of the file): checked
        # when they are put together (WHOLE), and again by the router that uses them.
        if info.context and info.context.get(WHOLE):
            problem = self.unresolved()
            if problem:
                raise ValueError(problem)
        return self

    def unresolved(self) -> str | None:
        """What a group or route names that does not exist (or a name used twice), else None."""
        backends = [b.name for b in self.backends]
        groups = [g.name for g in self.groups]
        names = backends + groups
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            return f"two backends or groups are named {twice[0]!r}; names must be unique"
        if LOCAL_BACKEND in groups:
            return f"{LOCAL_BACKEND!r} is the local engine's name; choose another group name"
        for group in self.groups:
            for member in group.members:
                if member not in {*backends, LOCAL_BACKEND}:
                    return f"group {group.name!r}: no backend named {member!r}"
        for route in self.routes:
            for target in (route.to, *route.fallback):
                if target_name(target) not in {*names, LOCAL_BACKEND}:
                    return f"route {route.model!r}: no backend or group named {target_name(target)!r}"
        return None


class Settings(Section):
    server: ServerSettings = Field(default_factory=ServerSettings)
    timeouts: TimeoutSettings = Field(default_factory=TimeoutSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    log: LogSettings = Field(default_factory=LogSettings)
    supervisor: SupervisorSettings = Field(default_factory=SupervisorSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)

    def audit_path(self) -> Path:
        return Path(self.audit.path).expanduser() if self.audit.path else home() / "audit.db"

    def log_path(self) -> Path:
        return Path(self.log.file).expanduser() if self.log.file else home() / "logs" / "daemon.log"

    def prompt_cache_folder(self) -> Path:
        """Where the prompt cache's disk tier keeps its files (when cache.disk is on)."""
        return home() / "prompt-cache"


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
