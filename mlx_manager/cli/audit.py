"""`mlx-manager audit ...`: read the request audit log."""

from __future__ import annotations

import typer

app = typer.Typer(help="Read, follow, query and prune the request audit log.", no_args_is_help=True)
