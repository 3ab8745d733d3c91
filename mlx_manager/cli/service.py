"""`mlx-manager service install | uninstall | show`: a launchd agent or systemd user unit that runs the daemon."""

from __future__ import annotations

import typer

app = typer.Typer(help="Install, remove or show a login service (systemd user unit or launchd agent) for the daemon.", no_args_is_help=True)
