"""`mlx-manager service install | uninstall | show`: a launchd agent or systemd user unit that runs the daemon.

The service runs `mlx-manager serve` under the system's own supervisor (systemd or launchd), which
restarts it on failure; use it instead of `mlx-manager start`, not together with it.
"""

# Annotations stay objects here, without `from __future__ import annotations`: Typer reads every
# command's annotations at each start, and a string annotation costs a compile and an eval.

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, cast

import typer

from mlx_manager.cli.output import EXIT_USAGE, fail, say, warn
from mlx_manager.cli.serve import InsecureOption
from mlx_manager.files import write_atomic

app = typer.Typer(
    help="Install, remove or show a login service (systemd user unit or launchd agent) for the daemon.",
    no_args_is_help=True,
)

HostOption = Annotated[
    str | None, typer.Option("--host", help="Address the daemon listens on (default from settings: 127.0.0.1).")
]
PortOption = Annotated[
    int | None, typer.Option("--port", help="Port the daemon listens on (default from settings: 10242).")
]
ModelOption = Annotated[
    str | None, typer.Option("--model", help="Preload this model (a local folder or a cached Hugging Face id).")
]


def _model(model: str | None) -> str | None:
    from mlx_manager.cli.lifecycle import model_argument  # a folder given here must work from anywhere

    return model_argument(model)


@contextmanager
def _service_environment() -> Iterator[list[str]]:
    """os.environ as the service will see it: of the MLX_MANAGER_* variables only those the service
    file passes on (supervisor.service.environment). Yields the names hidden, restores them after."""
    from mlx_manager.settings import ENV_PREFIX
    from mlx_manager.supervisor.service import environment

    passed = {name: value for name, value in environment().items() if name.startswith(ENV_PREFIX)}
    saved = {name: value for name, value in os.environ.items() if name.startswith(ENV_PREFIX)}
    hidden = sorted(name for name in saved if name not in passed)
    try:
        for name in saved:
            del os.environ[name]
        os.environ.update(passed)
        yield hidden
    finally:
        for name in passed:
            os.environ.pop(name, None)
        os.environ.update(saved)


def _check_bind(host: str | None, insecure_no_auth: bool) -> None:
    """Refuse, as `serve` and `start` do (auth.unsafe_bind), a service that would listen on a network
    address without any API key: it would fail at every start. Judged by the settings the service
    will read, so a key only in this shell's MLX_MANAGER_API_KEY does not count. Settings that
    cannot be read are refused too, as `start` does: the service would fail at every start."""
    from mlx_manager.auth import load_keyring, unsafe_bind
    from mlx_manager.settings import SettingsError, load_settings

    with _service_environment() as hidden:
        try:
            settings = load_settings({"server.host": host})
            keyring = load_keyring(settings)
        except SettingsError as exc:
            fail(
                f"the settings cannot be read: {exc}.",
                "Fix them (mlx-manager config ...); nothing was installed.",
                code=EXIT_USAGE,
            )
    refusal = unsafe_bind(settings.server.host, keyring, insecure_no_auth)
    if refusal is not None:
        hint = f"({', '.join(hidden)} in this shell: not passed to the service.)" if hidden else None
        fail(refusal, hint, code=EXIT_USAGE)


@app.command(
    epilog="Examples:\n\n  mlx-manager service show\n\n  mlx-manager service show --platform macos --port 8080"
)
def show(
    host: HostOption = None,
    port: PortOption = None,
    model: ModelOption = None,
    platform: Annotated[
        str | None,
        typer.Option("--platform", help="linux (systemd user unit) or macos (launchd agent); default: this system's."),
    ] = None,
    insecure_no_auth: InsecureOption = False,
) -> None:
    """Print the service file `install` would write, without installing anything."""
    from mlx_manager.supervisor.service import Platform, current_platform, service_file

    chosen = platform or current_platform()
    if chosen not in ("linux", "macos"):
        raise typer.BadParameter(f"{chosen!r} is not a platform: use linux or macos", param_hint="--platform")
    typer.echo(service_file(cast(Platform, chosen), host, port, _model(model), insecure_no_auth).text, nl=False)


@app.command(
    epilog="Examples:\n\n  mlx-manager service install\n\n"
    "  mlx-manager service install --port 8080 --model ./models/my-model\n\n"
    "  mlx-manager service install --no-enable\n\n"
    "  mlx-manager keys add laptop && mlx-manager service install --host 0.0.0.0"
)
def install(
    host: HostOption = None,
    port: PortOption = None,
    model: ModelOption = None,
    enable: Annotated[
        bool,
        typer.Option("--enable/--no-enable", help="Also enable and start the service now (else only write the file)."),
    ] = True,
    insecure_no_auth: InsecureOption = False,
) -> None:
    """Write a login service that runs the daemon and restarts it on failure, then enable and start it.

    On an address other than loopback it needs an API key (`mlx-manager keys add NAME`).
    """
    from mlx_manager.supervisor.service import current_platform, service_file

    _check_bind(host, insecure_no_auth)
    service = service_file(current_platform(), host, port, _model(model), insecure_no_auth)
    service.path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(service.path, service.text, mode=0o666)  # the service manager never reads half a file
    say(f"Wrote {service.path}.")
    commands = _activate_commands(service.platform, str(service.path))
    if not enable:
        say("To start it now and at every login, run:")
        for command in commands:
            say("  " + " ".join(command))
        return
    problem = _run(commands)
    if problem:
        warn(
            f"the file is written, but the service could not be started ({problem}). Run: "
            + "; ".join(" ".join(c) for c in commands)
        )
        return
    say("Enabled and started; it starts again at every login and after a failure.")


@app.command(epilog="Examples:\n\n  mlx-manager service uninstall")
def uninstall() -> None:
    """Stop and disable the login service, and remove its file."""
    from mlx_manager.supervisor.service import current_platform, launchd_path, systemd_path

    platform = current_platform()
    path = launchd_path() if platform == "macos" else systemd_path()
    if not path.exists():
        say(f"Not installed ({path} does not exist).")
        return
    if platform == "macos":
        problem = _run([["launchctl", "bootout", f"gui/{os.getuid()}", str(path)]])
    else:
        problem = _run([["systemctl", "--user", "disable", "--now", path.name]])
    path.unlink()
    if platform == "linux":
        _run([["systemctl", "--user", "daemon-reload"]])
    say(f"Removed {path}.")
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
