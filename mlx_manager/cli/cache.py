"""`mlx-manager cache stats | clear`: the prompt cache, through the running daemon; its disk tier
(`cache.disk`) also when no daemon runs."""

from pathlib import Path
from typing import Any, NoReturn

import typer

from mlx_manager.cli.output import JsonOption, console, fail, print_json, say

app = typer.Typer(
    help="The prompt cache: what it holds and does, and clearing it.",
    no_args_is_help=True,
)


def _failure(message: str, json_output: bool) -> NoReturn:
    fail(f"{message}.", json_output=json_output)


def _disk_folder() -> Path:
    from mlx_manager.settings import SettingsError, load_settings

    try:
        return load_settings().prompt_cache_folder()
    except SettingsError as exc:
        fail(str(exc), "Fix it with `mlx-manager config edit`.", code=2)


@app.command(
    epilog="Examples:\n\n  mlx-manager cache stats\n\n  mlx-manager cache stats --json | jq '.models[].hit_rate'"
)
def stats(json_output: JsonOption = False) -> None:
    """Show each loaded model's prompt cache: entries, memory, hits, misses, hit rate, tokens not
    computed again; and the disk tier. Without a daemon: the disk tier only."""
    from mlx_manager.cli.daemon_client import DaemonError, admin_call
    from mlx_manager.hub.pull import format_bytes

    try:
        report: dict[str, Any] = admin_call("GET", "/admin/cache")
    except DaemonError as error:
        if error.running:
            _failure(error.message, json_output)
        from mlx_manager.engine.prompt_cache_disk import folder_usage

        entries, size = folder_usage(_disk_folder())
        if json_output:
            print_json({"running": False, "disk_entries": entries, "disk_bytes": size})
        else:
            say(f"No daemon is running. The prompt cache's disk tier holds {entries} entries ({format_bytes(size)}).")
        return
    if json_output:
        print_json({"running": True, **report})
        return
    if not report["enabled"]:
        say("The prompt cache is off (cache.max_bytes or cache.max_entries is 0).")
    disk = "on" if report["disk"] else "off"
    say(
        f"Limits per model: {format_bytes(report['max_bytes'])}, {report['max_entries']} entries. Disk tier: {disk}, "
        f"{report['disk_entries']} entries ({format_bytes(report['disk_bytes'])}) in all."
    )
    if not report["models"]:
        say("No model is loaded.")
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("MODEL", "ENTRIES", "MEMORY", "HITS", "MISSES", "HIT RATE", "CACHED TOKENS", "DISK"):
        table.add_column(column, justify="left" if column == "MODEL" else "right", no_wrap=column != "MODEL")
    for m in report["models"]:
        rate = "-" if m["hit_rate"] is None else f"{100 * m['hit_rate']:.0f}%"
        table.add_row(
            m["model"],
            str(m["entries"]),
            format_bytes(m["bytes"]),
            str(m["hits"]),
            str(m["misses"]),
            rate,
            f"{m['cached_tokens']:,}",
            f"{m['disk_entries']} ({format_bytes(m['disk_bytes'])})",
        )
    console.print(table)


@app.command(epilog="Examples:\n\n  mlx-manager cache clear\n\n  mlx-manager cache clear --json")
def clear(json_output: JsonOption = False) -> None:
    """Forget every prompt-cache entry, in the daemon's memory and on disk. Without a daemon: the
    disk tier's files."""
    from mlx_manager.cli.daemon_client import DaemonError, admin_call

    try:
        cleared = int(admin_call("DELETE", "/admin/cache")["cleared"])
        running = True
    except DaemonError as error:
        if error.running:
            _failure(error.message, json_output)
        from mlx_manager.engine.prompt_cache_disk import clear_folder

        cleared, running = clear_folder(_disk_folder()), False
    if json_output:
        print_json({"running": running, "cleared": cleared})
        return
    where = "in the daemon and on disk" if running else "on disk (no daemon is running)"
    say(f"Cleared {cleared} prompt-cache entries {where}.")
