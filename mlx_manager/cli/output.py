"""Everything the CLI prints goes through here: rich consoles, JSON output and the one failure helper."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

# What we print is data (paths, keys, model names, values), never rich markup: "[x]" and ":x:"
# print as written, and nothing is coloured by guesswork.


class _Console(Console):
    """A rich console that reads the terminal's width ($COLUMNS) each time it prints.

    Rich fixes the width when a console is made if $COLUMNS is set then; ours are made once, at import,
    and must follow the terminal (and a test's $COLUMNS) afterwards."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._width = None


console = _Console(markup=False, emoji=False, highlight=False)
err_console = _Console(stderr=True, markup=False, emoji=False, highlight=False)

# Every command spells its machine-output switch the same way; bind it to `json_output`.
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of the human form.")]

# Exit codes shared by every command.
EXIT_ERROR = 1
EXIT_USAGE = 2


def say(line: str, *, err: bool = False) -> None:
    """One line for people, on stdout (stderr with `err`); paths and values are never broken across lines."""
    (err_console if err else console).print(line, soft_wrap=True)


def fail(message: str, hint: str | None = None, *, code: int = EXIT_ERROR, json_output: bool = False) -> NoReturn:
    """Print one line saying what went wrong (and what to do) on stderr, then exit non-zero."""
    if json_output:
        payload = {"error": message}
        if hint:
            payload["hint"] = hint
        sys.stderr.write(json.dumps(payload) + "\n")
    else:
        line = f"Error: {message}"
        if hint:
            line += f" {hint}"
        say(line, err=True)
    raise typer.Exit(code)


def print_json(data: Any) -> None:
    """Machine output: plain JSON on stdout, no colours."""
    sys.stdout.write(json.dumps(data, default=str) + "\n")


def warn(message: str) -> None:
    """A one-line warning on stderr for something that went half-right; the command still succeeds."""
    say(f"Warning: {message}", err=True)
