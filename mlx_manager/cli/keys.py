"""`mlx-manager keys add | list | revoke`: the API keys /v1 clients must send once any is set.

The config file keeps only each key's SHA-256 (`[[auth.keys]]`, file mode 0600), so `add` prints
the key once and nothing can show it again. A running daemon reloads and applies the change at once.
"""

# Annotations stay objects here, without `from __future__ import annotations`: Typer reads every
# command's annotations at each start, and a string annotation costs a compile and an eval.

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from mlx_manager.cli.config import changing_config
from mlx_manager.cli.output import EXIT_ERROR, EXIT_USAGE, JsonOption, console, fail, print_json, say, warn
from mlx_manager.settings import (
    SettingsError,
    check_config_text,
    config_path,
    load_settings,
    parse_config_document,
    read_config_text,
    write_config_text,
)

if TYPE_CHECKING:
    from mlx_manager.settings import Settings

app = typer.Typer(
    help="Manage the API keys clients must send (stored hashed); a running daemon applies changes live.",
    no_args_is_help=True,
)

KEYS_SETTING = "auth.keys"

NameArgument = Annotated[
    str,
    typer.Argument(
        help="Name of the key: up to 64 letters, digits, '.', '_' or '-', e.g. laptop or ci-runner.",
        show_default=False,
    ),
]


def _broken(error: SettingsError, json_output: bool) -> NoReturn:
    fail(f"{error}.", "Fix it with `mlx-manager config edit`.", code=EXIT_ERROR, json_output=json_output)


def _read(json_output: bool):
    """(settings in the file, its tomlkit document) or exit 1 naming what is wrong with the file."""
    path = config_path()
    try:
        text = read_config_text(path)
        return check_config_text(text, path), parse_config_document(text, path)
    except SettingsError as error:
        _broken(error, json_output)


def _save(document: Any, json_output: bool) -> None:
    path = config_path()
    try:
        check_config_text(document.as_string(), path)  # never write a file the daemon would refuse
        write_config_text(document.as_string(), path)
    except SettingsError as error:
        _broken(error, json_output)
    except OSError as error:
        fail(f"cannot write {path}: {error.strerror or error}", json_output=json_output)


def _reload(summary: str) -> None:
    """Have a running daemon apply the change, and say on the summary line whether it did."""
    from mlx_manager.cli.config import apply_live

    apply_live(summary, [KEYS_SETTING])


def _reload_json() -> dict[str, Any]:
    """The same for --json: what the daemon made of it, as data."""
    from mlx_manager.cli.daemon_client import request_reload

    outcome = request_reload()
    return {
        "running": outcome.running,
        "url": outcome.url,
        "applied": KEYS_SETTING in outcome.applied,
        "error": outcome.error,
    }


@app.command(
    epilog=(
        "Examples:\n\n  mlx-manager keys add laptop\n\n  mlx-manager keys add ci --json | jq -r .key\n\n"
        '  curl -H "Authorization: Bearer $KEY" http://127.0.0.1:10242/v1/models'
    )
)
def add(name: NameArgument, json_output: JsonOption = False) -> None:
    """Make a new API key, keep its hash in the config file, and print the key (this once only)."""
    from mlx_manager.auth import add_key_entry, key_digest, new_key, now_utc
    from mlx_manager.settings import KEY_NAME

    if not re.fullmatch(KEY_NAME, name):
        fail(
            f"{name!r} is not a valid key name; use up to 64 letters, digits, '.', '_' or '-'.",
            code=EXIT_USAGE,
            json_output=json_output,
        )
    with changing_config(json_output):
        settings, document = _read(json_output)
        if any(key.name == name for key in settings.auth.keys):
            fail(
                f"a key named {name} already exists.",
                f"Revoke it first (`mlx-manager keys revoke {name}`) or choose another name.",
                code=EXIT_ERROR,
                json_output=json_output,
            )
        key, created = new_key(), now_utc()
        add_key_entry(document, name, key_digest(key), created)
        _save(document, json_output)
    if json_output:
        print_json({"name": name, "key": key, "created": created.isoformat(), "daemon": _reload_json()})
        return
    _reload(f"Added key {name}")
    say("Copy it now; it is not shown again. Clients send it as 'Authorization: Bearer KEY':")
    say(key)


@app.command(
    "list",
    epilog="Examples:\n\n  mlx-manager keys list\n\n  mlx-manager keys list --json | jq -r '.[].name'",
)
def list_(json_output: JsonOption = False) -> None:
    """Show the API keys by name and creation date (never the keys themselves)."""
    try:
        settings = load_settings()
    except SettingsError as error:
        _broken(error, json_output)
    rows = [{"name": k.name, "created": k.created.isoformat(), "source": "config"} for k in settings.auth.keys]
    rows += _outside_keys(settings)
    if json_output:
        print_json(rows)
        return
    if not rows:
        say(
            "No API keys: /v1 answers anyone who can reach the daemon (only this machine, by default). "
            "Add one with `mlx-manager keys add NAME`."
        )
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("Name", "Created", "Source"):
        table.add_column(column, no_wrap=True)
    for row in rows:
        created = row["created"].replace("T", " ").replace("+00:00", " UTC") if row["created"] else "-"
        table.add_row(row["name"], created, row["source"])
    console.print(table)


def _outside_keys(settings: "Settings") -> list[dict[str, Any]]:
    """Keys the daemon also accepts that `keys` does not manage: auth.keys_file and the environment."""
    from mlx_manager.auth import ENV_KEY, read_keys_file

    rows: list[dict[str, Any]] = []
    if settings.auth.keys_file:
        path = Path(settings.auth.keys_file).expanduser()
        try:
            rows += [{"name": f"keys_file:{n}", "created": None, "source": str(path)} for n, _ in read_keys_file(path)]
        except SettingsError as error:
            warn(f"{error}; the daemon will refuse to start or reload until it is fixed.")
    if os.environ.get(ENV_KEY, "").strip():
        rows.append({"name": ENV_KEY, "created": None, "source": "environment"})
    return rows


@app.command(epilog="Examples:\n\n  mlx-manager keys revoke laptop\n\n  mlx-manager keys revoke ci --json")
def revoke(name: NameArgument, json_output: JsonOption = False) -> None:
    """Remove an API key: a running daemon refuses it from the next request on."""
    from mlx_manager.auth import remove_key_entry

    with changing_config(json_output):
        settings, document = _read(json_output)
        if not remove_key_entry(document, name):
            names = ", ".join(k.name for k in settings.auth.keys) or "none"
            fail(
                f"no key named {name} (keys: {names}).",
                "`mlx-manager keys list` shows them.",
                code=EXIT_ERROR,
                json_output=json_output,
            )
        last = len(settings.auth.keys) == 1
        # Revoking must never open the API: with the last key gone, keys stay required unless the
        # file already says otherwise (an explicit auth.required = false).
        closed = last and "required" not in settings.auth.model_fields_set
        if closed:
            document.setdefault("auth", {})["required"] = True
        _save(document, json_output)
    if json_output:
        print_json({"revoked": name, "keys_left": len(settings.auth.keys) - 1, "daemon": _reload_json()})
        return
    _reload(f"Revoked key {name}")
    if closed:
        warn(
            "no key is left, so /v1 refuses every request until one is added (auth.required = true is now "
            "in the config file). `mlx-manager config set auth.required false` serves loopback clients "
            "without a key again."
        )
    elif last:
        warn(
            "no key is left and auth.required is false: a daemon on this machine's loopback serves /v1 to "
            "anyone here; one on a network address refuses /v1 until a key is added."
        )
