"""Login-service files that run `mlx-manager serve` under the system's own supervisor: a systemd
user unit on Linux, a launchd agent on macOS. Both restart the daemon when it fails, and stop it
with SIGTERM so it drains. Pure text in, text out; the CLI writes and activates them."""

from __future__ import annotations

import os
import plistlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mlx_manager.settings import home

Platform = Literal["linux", "macos"]
UNIT_NAME = "mlx-manager.service"
AGENT_LABEL = "io.github.mlx-manager"
# Passed through to the service, which does not see the login shell's environment: where
# mlx-manager keeps its files, and where (and whether online) Hugging Face models are found.
PASSED_ENV = ("MLX_MANAGER_HOME", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE")
# A drain may take server.drain_timeout (30 s by default) plus a few seconds to close up.
STOP_SECONDS = 60


def current_platform() -> Platform:
    return "macos" if sys.platform == "darwin" else "linux"


@dataclass(frozen=True)
class ServiceFile:
    platform: Platform
    path: Path
    text: str


def serve_command(
    host: str | None,
    port: int | None,
    model: str | None,
    insecure_no_auth: bool = False,
    program: list[str] | None = None,
) -> list[str]:
    """`PROGRAM serve` and its flags. The program is by default the console script next to this
    interpreter, or the interpreter itself running the CLI."""
    if program is None:
        script = Path(sys.executable).parent / "mlx-manager"
        program = [str(script)] if script.exists() else [sys.executable, "-m", "mlx_manager.cli"]
    command = [*program, "serve"]
    for flag, value in (("--host", host), ("--port", port), ("--model", model)):
        if value is not None:
            command += [flag, str(value)]
    if insecure_no_auth:
        command.append("--insecure-no-auth")
    return command


def environment() -> dict[str, str]:
    env = {name: os.environ[name] for name in PASSED_ENV if os.environ.get(name)}
    env["MLX_MANAGER_HOME"] = str(home().expanduser().resolve())  # pinned: the service's HOME may differ
    return env


def service_file(
    platform: Platform,
    host: str | None = None,
    port: int | None = None,
    model: str | None = None,
    insecure_no_auth: bool = False,
) -> ServiceFile:
    command, env = serve_command(host, port, model, insecure_no_auth), environment()
    if platform == "macos":
        return ServiceFile(platform, launchd_path(), launchd_agent(command, env))
    return ServiceFile(platform, systemd_path(), systemd_unit(command, env))


# -- systemd ----------------------------------------------------------------------------------------


def systemd_path() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "systemd" / "user" / UNIT_NAME


def systemd_quote(word: str) -> str:
    """One ExecStart= word: `%` is a specifier and `$` a variable to systemd, so both are doubled;
    words with spaces, quotes or backslashes go in double quotes with C-style escapes."""
    word = word.replace("%", "%%").replace("$", "$$")
    if word and not re.search(r'[\s"\'\\;]', word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_unit(command: list[str], env: dict[str, str]) -> str:
    environment_lines = "".join(f"Environment={systemd_quote(f'{k}={v}')}\n" for k, v in sorted(env.items()))
    return f"""\
# Written by `mlx-manager service install`; `mlx-manager service uninstall` removes it.
[Unit]
Description=mlx-manager: OpenAI-compatible API for local MLX models
# More than 5 failed starts within 60 s: stop trying (`systemctl --user status` says so).
StartLimitIntervalSec=60
StartLimitBurst=5

[Service]
Type=exec
ExecStart={" ".join(systemd_quote(word) for word in command)}
{environment_lines}Restart=on-failure
RestartSec=2
# SIGTERM makes the daemon drain running requests and flush its audit rows before it exits.
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec={STOP_SECONDS}

[Install]
WantedBy=default.target
"""


# -- launchd ----------------------------------------------------------------------------------------


def launchd_path() -> Path:
    return Path.home() / "Library" / "LaunchAgents" / f"{AGENT_LABEL}.plist"


def launchd_agent(command: list[str], env: dict[str, str]) -> str:
    log = str(home().expanduser().resolve() / "logs" / "service.log")
    agent = {
        "Label": AGENT_LABEL,
        "ProgramArguments": command,
        "EnvironmentVariables": env,
        "RunAtLoad": True,
        # Started again when it exits with an error or is killed; a clean stop stays stopped.
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 5,  # at least 5 s between starts, so a crash loop does not spin
        "ExitTimeOut": STOP_SECONDS,  # SIGTERM, then this long to drain before SIGKILL
        "StandardOutPath": log,
        "StandardErrorPath": log,
    }
    return plistlib.dumps(agent, sort_keys=False).decode()
