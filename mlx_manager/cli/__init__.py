"""The `mlx-manager` command: this module only wires the command groups together.

Heavy libraries (mlx, fastapi, logfire, sqlalchemy) are imported inside the commands
that need them, never here, so `--help` and `--version` stay fast.
"""

# Annotations stay objects here, without `from __future__ import annotations`: Typer reads every
# command's annotations at each start, and a string annotation costs a compile and an eval.

from typing import Annotated

import typer

from mlx_manager import __version__
from mlx_manager.cli import (
    audit,
    backends,
    bench,
    cache,
    config,
    dashboard,
    flags,
    keys,
    lifecycle,
    models,
    serve,
    service,
)

flags.install()

app = typer.Typer(
    name="mlx-manager",
    help="Serve local MLX models behind an OpenAI-compatible API; supervise, configure and audit the daemon.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mlx-manager {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool | None,
        typer.Option("--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Serve local MLX models behind an OpenAI-compatible API; supervise, configure and audit the daemon."""


app.command(epilog=serve.EPILOG)(serve.serve)
app.add_typer(models.app, name="models")
app.add_typer(config.app, name="config")
app.add_typer(keys.app, name="keys")
app.add_typer(backends.app, name="backends")
app.add_typer(audit.app, name="audit")
app.add_typer(cache.app, name="cache")
app.add_typer(service.app, name="service")
app.command(epilog=bench.EPILOG)(bench.bench)
app.command(epilog=dashboard.EPILOG)(dashboard.dashboard)
# lifecycle.register(app) adds start, stop, restart, status and logs as top-level commands.
lifecycle.register(app)


def main() -> None:
    app()
