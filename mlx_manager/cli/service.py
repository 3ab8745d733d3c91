"""`mlx-manager service install | uninstall | show`: a launchd agent or systemd user unit that runs the daemon.

The service runs `mlx-manager serve` under the system's own supervisor (systemd or launchd), which
restarts it on failure; use it instead of `mlx-manager start`, not together with it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Annotated, Optional

import typer

from mlx_manager.cli.output import console, warn

app = typer.Typer(
    help="Install, remove or show a login service (systemd user unit or launchd agent) for the daemon.",
    no_args_is_help=True,
)

HostOption = Annotated[
    Optional[str], typer.Option("--host", help="Address the daemon listens on (default from settings: 127.0.0.1).")
]
PortOption = Annotated[Optional[int], typer.Option("--port", help="Port the daemon listens on (default from settings: 10242).")]
ModelOption = Annotated[
    Optional[str], typer.Option("--model", help="Preload this model (a local folder or a cached Hugging Face id).")
]


def _say(line: str) -> None:
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def _model(model: str | None) -> str | None:
    from mlx_manager.cli.lifecycle import model_argument  # a folder given here must work from anywhere

    return model_argument(model)


@app.command(
    epilog="Examples:\n\n  mlx-manager service show\n\n  mlx-manager service show --platform macos --port 8080"
)
def show(
    host: HostOption = None,
    port: PortOption = None,
    model: ModelOption = None,
    platform: Annotated[
        Optional[str],
        typer.Option("--platform", help="linux (systemd user unit) or macos (launchd agent); default: this system's."),
    ] = None,
) -> None:
    """Print the service file `install` would write, without installing anything."""
    from mlx_manager.supervisor.service import current_platform, service_file

    chosen = platform or current_platform()
    if chosen not in ("linux", "macos"):
        raise typer.BadParameter(f"{chosen!r} is not a platform: use linux or macos", param_hint="--platform")
    typer.echo(service_file(chosen, host, port, _model(model)).text, nl=False)


@app.command(
    epilog="Examples:\n\n  mlx-manager service install\n\n  mlx-manager service install --port 8080 --model ./models/my-model\n\n"
    "  mlx-manager service install --no-enable"
)
def install(
    host: HostOption = None,
    port: PortOption = None,
    model: ModelOption = None,
    enable: Annotated[
        bool, typer.Option("--enable/--no-enable", help="Also enable and start the service now (else only write the file).")
    ] = True,
) -> None:
    """Write a login service that runs the daemon and restarts it on failure, then enable and start it."""
    from mlx_manager.supervisor.service import current_platform, service_file

    service = service_file(current_platform(), host, port, _model(model))
    service.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = service.path.with_name(f".{service.path.name}.tmp")
    tmp.write_text(service.text)
    os.replace(tmp, service.path)  # atomic: the service manager never reads half a file
    _say(f"Wrote {service.path}.")
    commands = _activate_commands(service.platform, str(service.path))
    if not enable:
        _say("To start it now and at every login, run:")
        for command in commands:
            _say("  " + " ".join(command))
        return
    problem = _run(commands)
    if problem:
        warn(f"the file is written, but the service could not be started ({problem}). Run: "
             + "; ".join(" ".join(c) for c in commands))
        return
    _say("Enabled and started; it starts again at every login and after a failure.")


@app.command(epilog="Examples:\n\n  mlx-manager service uninstall")
def uninstall() -> None:
    """Stop and disable the login service, and remove its file."""
    from mlx_manager.supervisor.service import current_platform, launchd_path, systemd_path

    platform = current_platform()
    path = launchd_path() if platform == "macos" else systemd_path()
    if not path.exists():
        _say(f"Not installed ({path} does not exist).")
        return
    if platform == "macos":
        problem = _run([["launchctl", "bootout", f"gui/{os.getuid()}", str(path)]])
    else:
        problem = _run([["systemctl", "--user", "disable", "--now", path.name]])
    path.unlink()
    if platform == "linux":
        _run([["systemctl", "--user", "daemon-reload"]])
    _say(f"Removed {path}.")
    if problem:
        warn(f"it may still be running until the next login ({problem}).")


def _activate_commands(platform: str, path: str) -> list[list[str]]:
    if platform == "macos":
        return [["launchctl", "bootstrap", f"gui/{os.getuid()}", path]]
    name = os.path.basename(path)
    return [["systemctl", "--user", "daemon-reload"], ["systemctl", "--user", "enable", "--now", name]]


def _run(commands: list[list[str]]) -> str | None:
    """Run each command; the first failure, in a few words, or None when all worked."""
    for command in commands:
        if shutil.which(command[0]) is None:
            return f"{command[0]} not found"
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(command)}: {exc}"
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()
            return f"{' '.join(command)}: {detail[-1] if detail else f'exit code {done.returncode}'}"
    return None
