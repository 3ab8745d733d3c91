"""The one Settings model: every key, its type, bounds, default and description.

Also where mlx-manager keeps its files: everything lives under `home()` so that
`MLX_MANAGER_HOME` moves config, audit database, logs and pid files at once.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

ENV_PREFIX = "MLX_MANAGER_"

Seconds = Annotated[float, Field(ge=1, le=86400)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ServerSettings(Section):
    host: str = Field("127.0.0.1", description="Address the daemon listens on (loopback unless told otherwise).")
    port: int = Field(10242, ge=1, le=65535, description="TCP port the daemon listens on.")
    drain_timeout: float = Field(
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


class TimeoutSettings(Section):
    chat: Seconds = Field(900, description="Deadline for /v1/chat/completions, in seconds.")
    completions: Seconds = Field(600, description="Deadline for /v1/completions, in seconds.")
    embeddings: Seconds = Field(120, description="Deadline for /v1/embeddings, in seconds.")


class ModelSettings(Section):
    allowed: list[str] = Field(
        default_factory=list,
        description="Models requests may load (folder paths or Hugging Face ids); empty allows any.",
    )
    max_loaded: int = Field(2, ge=1, le=64, description="Most models kept loaded at once (least recently used goes first).")
    keep_alive: float = Field(
        1800, ge=0, le=7 * 86400, description="Seconds an idle model stays loaded; 0 keeps it forever."
    )
    preload: list[str] = Field(default_factory=list, description="Models loaded when the daemon starts.")
    default_max_tokens: int = Field(
        512, ge=1, le=1_000_000, description="max_tokens used when a request gives none."
    )


class AuditSettings(Section):
    path: str = Field("", description="SQLite audit database; empty means audit.db under the home folder.")
    retention_days: int = Field(30, ge=1, le=36500, description="Days audit rows are kept before pruning.")
    prune_interval: float = Field(3600, ge=60, le=7 * 86400, description="Seconds between automatic prunes.")


class TelemetrySettings(Section):
    enabled: bool = Field(True, description="Turn Logfire / OpenTelemetry tracing on or off.")
    environment: str = Field("production", description="Environment name attached to traces.")
    console: bool = Field(False, description="Also print spans to the console.")
    otlp_endpoint: str = Field("", description="Send traces to this OTLP endpoint instead of (or as well as) Logfire.")


class LogSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Daemon log level.")
    file: str = Field("", description="Daemon log file; empty means logs/daemon.log under the home folder.")


class Settings(Section):
    server: ServerSettings = Field(default_factory=ServerSettings)
    timeouts: TimeoutSettings = Field(default_factory=TimeoutSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    log: LogSettings = Field(default_factory=LogSettings)

    def audit_path(self) -> Path:
        return Path(self.audit.path).expanduser() if self.audit.path else home() / "audit.db"

    def log_path(self) -> Path:
        return Path(self.log.file).expanduser() if self.log.file else home() / "logs" / "daemon.log"


def home() -> Path:
    """The folder that holds every file mlx-manager keeps."""
    env = os.environ.get(f"{ENV_PREFIX}HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_config_path

    return user_config_path("mlx-manager", appauthor=False)


def config_path() -> Path:
    return home() / "config.toml"


def load_settings() -> Settings:
    """Defaults, overlaid by the config file, overlaid by MLX_MANAGER_<SECTION>__<KEY> variables."""
    data: dict = {}
    path = config_path()
    if path.exists():
        data = tomllib.loads(path.read_text())
    for name, value in os.environ.items():
        if name.startswith(ENV_PREFIX) and "__" in name:
            section, key = name[len(ENV_PREFIX) :].lower().split("__", 1)
            data.setdefault(section, {})[key] = value
    return Settings.model_validate(data)
