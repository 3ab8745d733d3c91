"""`mlx-manager backends list | add | remove | check`: the upstream servers requests may be routed to.

They live in the config file as `[[routing.backends]]` tables, each API key only as a reference
(`env:NAME`, or the path of a file holding it): the file, `config list` and these commands show
the reference, never the key. Routes and groups (`routing.routes`, `routing.groups`) are set with
`mlx-manager config set` or `config edit`; `list` shows them too. A running daemon reloads.
"""

# Annotations stay objects here, without `from __future__ import annotations`: Typer reads every
# command's annotations at each start, and a string annotation costs a compile and an eval.

from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn

import typer

from mlx_manager.cli.config import apply_live, changing_config
from mlx_manager.cli.output import EXIT_ERROR, EXIT_USAGE, JsonOption, console, fail, print_json, say
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
    help="Manage the upstream servers requests may be routed to; a running daemon applies changes live.",
    no_args_is_help=True,
)

SETTING = "routing.backends"

NameArgument = Annotated[
    str,
    typer.Argument(
        help="Name of the backend, used by routes, groups and the audit log, e.g. mac2 or cloud.", show_default=False
    ),
]


def _broken(error: SettingsError, json_output: bool = False) -> NoReturn:
    fail(f"{error}.", "Fix it with `mlx-manager config edit`.", code=EXIT_ERROR, json_output=json_output)


def _settings(json_output: bool) -> "Settings":
    try:
        return load_settings()
    except SettingsError as error:
        _broken(error, json_output)


@app.command(
    "list",
    epilog="Examples:\n\n  mlx-manager backends list\n\n  mlx-manager backends list --json | jq -r '.backends[].name'",
)
def list_(json_output: JsonOption = False) -> None:
    """Show the backends (keys as their references), then the groups and routes that use them."""
    routing = _settings(json_output).routing
    data = {
        "backends": [entry.model_dump() for entry in routing.backends],
        "groups": [group.model_dump() for group in routing.groups],
        "routes": [route.model_dump() for route in routing.routes],
    }
    if json_output:
        print_json(data)
        return
    if not routing.backends:
        say(
            "No backends: every request is served here. Add one with "
            "`mlx-manager backends add NAME --type openai --url URL`."
        )
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("Name", "Type", "Base URL", "API key"):
        table.add_column(column, no_wrap=column != "Base URL", overflow="fold")
    for entry in routing.backends:
        table.add_row(entry.name, entry.type, entry.base_url, entry.api_key or "-")
    console.print(table)
    for group in routing.groups:
        say(f"group {group.name}: {', '.join(group.members)}")
    for route in routing.routes:
        fallback = f" (then {', '.join(route.fallback)})" if route.fallback else ""
        say(f"route {route.model} -> {route.to}{fallback}")
    if not routing.routes:
        say(
            "No routes yet: requests go to a backend once a route names it, e.g. "
            '`mlx-manager config set routing.routes \'[{"model": "gpt-*", "to": "NAME"}]\'`.'
        )


@app.command(
    epilog=(
        "Examples:\n\n  mlx-manager backends add mac2 --type openai --url http://mac2.local:10242/v1 "
        "--api-key env:MAC2_KEY\n\n  mlx-manager backends add cloud --type anthropic --url https://api.anthropic.com "
        "--api-key ~/.config/anthropic.key"
    )
)
def add(
    name: NameArgument,
    kind: Annotated[
        Literal["openai", "anthropic"],
        typer.Option(
            "--type",
            help="openai: any OpenAI-compatible server (mlx-manager, mlx_lm.server, vLLM, OpenAI);"
            " anthropic: Anthropic's Messages API.",
        ),
    ],
    url: Annotated[
        str,
        typer.Option(
            "--url",
            help="Its base URL, as its SDK takes it: http://host:10242/v1, https://api.anthropic.com.",
            show_default=False,
        ),
    ],
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            metavar="REF",
            help="Its API key by reference: env:NAME (a variable of the daemon's"
            " environment) or the path of a file holding it. Never the key itself.",
        ),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Add an upstream server to the config file (a route then sends requests to it)."""
    entry = {"name": name, "type": kind, "base_url": url, "api_key": api_key or ""}
    with changing_config(json_output):
        settings, document = _read(json_output)
        routing = settings.routing
        if name in {b.name for b in routing.backends} | {g.name for g in routing.groups}:
            fail(
                f"a backend or group named {name} already exists.",
                f"Remove it first (`mlx-manager backends remove {name}`) or choose another name.",
                code=EXIT_ERROR,
                json_output=json_output,
            )
        _append(document, entry)
        _save(document, json_output, refused_code=EXIT_USAGE)
    if json_output:
        print_json({"added": entry})
        return
    apply_live(f"Added backend {name} ({kind}, {url})", [SETTING])


@app.command(epilog="Examples:\n\n  mlx-manager backends remove mac2")
def remove(name: NameArgument, json_output: JsonOption = False) -> None:
    """Remove a backend from the config file (routes and groups must not name it any more)."""
    with changing_config(json_output):
        settings, document = _read(json_output)
        users = _users(settings, name)
        if users:
            fail(
                f"backend {name} is still used by {', '.join(users)}.",
                "Change those first (`mlx-manager config edit`).",
                code=EXIT_ERROR,
                json_output=json_output,
            )
        if not _drop(document, name):
            names = ", ".join(b.name for b in settings.routing.backends) or "none"
            fail(
                f"no backend named {name} (backends: {names}).",
                "`mlx-manager backends list` shows them.",
                code=EXIT_ERROR,
                json_output=json_output,
            )
        _save(document, json_output, refused_code=EXIT_ERROR)
    if json_output:
        print_json({"removed": name})
        return
    apply_live(f"Removed backend {name}", [SETTING])


@app.command(epilog="Examples:\n\n  mlx-manager backends check\n\n  mlx-manager backends check mac2 --json")
def check(
    name: Annotated[str | None, typer.Argument(help="Only this backend.", show_default=False)] = None,
    json_output: JsonOption = False,
) -> None:
    """Ask each backend for its models: reachable or not, how fast, which models it lists (exit 1 if one fails)."""
    import asyncio

    routing = _settings(json_output).routing
    entries = [b for b in routing.backends if name is None or b.name == name]
    if name is not None and not entries:
        fail(f"no backend named {name}.", "`mlx-manager backends list` shows them.", json_output=json_output)
    results = asyncio.run(_check_all(entries, routing))
    if json_output:
        print_json(results)
    elif not results:
        say("No backends to check.")
    else:
        for result in results:
            if result["ok"]:
                models = ", ".join(result["models"][:8]) + (" ..." if len(result["models"]) > 8 else "")
                say(
                    f"{result['name']}: ok in {result['latency_ms']:.0f} ms, {len(result['models'])} model(s)"
                    + (f": {models}" if models else "")
                )
            else:
                say(f"{result['name']}: FAILED, {result['error']}")
    if any(not result["ok"] for result in results):
        raise typer.Exit(EXIT_ERROR)


async def _check_all(entries: list[Any], routing: Any) -> list[dict[str, Any]]:
    import asyncio

    from mlx_manager.routing.backend import check as check_backend
    from mlx_manager.routing.backend import make_client
    from mlx_manager.routing.keyref import resolve_key

    async def one(entry: Any) -> dict[str, Any]:
        row: dict[str, Any] = {"name": entry.name, "type": entry.type, "base_url": entry.base_url}
        try:
            key = resolve_key(entry.api_key, entry.name)
        except SettingsError as error:
            return {**row, "ok": False, "latency_ms": None, "models": [], "error": error.problem}
        async with make_client(entry, key, routing) as client:
            health = await check_backend(client, entry.type)
        return {
            **row,
            "ok": health.ok,
            "latency_ms": health.latency_ms,
            "models": list(health.models),
            "error": health.error,
        }

    return list(await asyncio.gather(*(one(entry) for entry in entries)))


# -- the config file -----------------------------------------------------------------------


def _read(json_output: bool) -> tuple["Settings", Any]:
    path = config_path()
    try:
        text = read_config_text(path)
        return check_config_text(text, path), parse_config_document(text, path)
    except SettingsError as error:
        _broken(error, json_output)


def _save(document: Any, json_output: bool, *, refused_code: int) -> None:
    """Write the document if the whole file still validates; else say why (nothing written)."""
    path = config_path()
    text = document.as_string()
    try:
        check_config_text(text, path)
    except SettingsError as error:
        fail(f"{error.problem}.", "Nothing was written.", code=refused_code, json_output=json_output)
    try:
        write_config_text(text, path)
    except OSError as error:
        fail(f"cannot write {path}: {error.strerror or error}", json_output=json_output)


def _users(settings: "Settings", name: str) -> list[str]:
    """The groups and routes that name a backend."""
    from mlx_manager.settings.schema import target_name

    routing = settings.routing
    users = [f"group {g.name}" for g in routing.groups if name in g.members]
    users += [f"route {r.model!r}" for r in routing.routes if name in {target_name(t) for t in (r.to, *r.fallback)}]
    return users


def _append(document: Any, entry: dict[str, str]) -> None:
    """Append one `[[routing.backends]]` table; comments elsewhere are kept."""
    import tomlkit

    if "routing" not in document:
        document.add("routing", tomlkit.table(is_super_table=True))  # no bare [routing] header
    routing = document["routing"]
    if "backends" not in routing:
        routing.append("backends", tomlkit.aot())
    table = tomlkit.table()
    for key, value in entry.items():
        if value:
            table[key] = value
    table.add(tomlkit.nl())
    routing["backends"].append(table)


def _drop(document: Any, name: str) -> bool:
    """Remove the backend named `name`; the last one takes its list (and an empty [routing]) with it."""
    routing = document.get("routing")
    backends = routing.get("backends") if routing is not None and hasattr(routing, "get") else None
    if backends is None:
        return False
    at = next((i for i, entry in enumerate(backends) if entry.get("name") == name), None)
    if at is None:
        return False
    if len(backends) == 1:
        del routing["backends"]
        if not routing:
            del document["routing"]
    else:
        del backends[at]
    return True
