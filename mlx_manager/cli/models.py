"""`mlx-manager models pull | list | ps | rm | load | unload`: get models, see them, serve them.

`pull`, `list` and `rm` work on this machine's Hugging Face cache (`HF_HOME`) and need no
daemon; `ps`, `load` and `unload` ask the running daemon through its admin endpoints. The work is
in `mlx_manager.hub` (imported inside each command, so `--help` stays fast); this module parses
options and renders.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from mlx_manager.cli.completion import complete_cached_model, complete_model
from mlx_manager.cli.output import EXIT_USAGE, JsonOption, console, fail, print_json, say, warn

if TYPE_CHECKING:
    from mlx_manager.cli.daemon_client import DaemonError
    from mlx_manager.hub.errors import HubError

app = typer.Typer(
    help="Get models from the Hugging Face hub, list and remove them, and load or unload them in the running daemon.",
    no_args_is_help=True,
)

EXIT_INTERRUPTED = 130
START_HINT = "Start one with `mlx-manager start`."

RepoArgument = Annotated[
    str,
    typer.Argument(
        metavar="REPO[@REVISION]",
        help="A Hugging Face repo id, e.g. mlx-community/Qwen3-0.6B-4bit; @REVISION pins a branch, tag or commit.",
        show_default=False,
    ),
]
CachedArgument = Annotated[
    str,
    typer.Argument(
        metavar="REPO[@REVISION]",
        help="A repo in the Hugging Face cache (all its revisions), or one revision of it.",
        autocompletion=complete_cached_model,
        show_default=False,
    ),
]
ModelArgument = Annotated[
    str,
    typer.Argument(
        metavar="MODEL",
        help="A Hugging Face repo id in the local cache (org/name[@revision]) or a model folder.",
        autocompletion=complete_model,
        show_default=False,
    ),
]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before deleting.")]


def _hub_failure(error: HubError, json_output: bool) -> NoReturn:
    fail(f"{error.message}.", error.hint, code=EXIT_USAGE if error.kind == "invalid_id" else 1, json_output=json_output)


def _daemon_failure(error: DaemonError, json_output: bool) -> NoReturn:
    if not error.running:
        fail("no daemon is running.", START_HINT, json_output=json_output)
    fail(f"{error.message}.", json_output=json_output)


# -- pull ---------------------------------------------------------------------------------------------


@app.command(
    epilog=(
        "Examples:\n\n  mlx-manager models pull mlx-community/Qwen3-0.6B-4bit\n\n"
        "  mlx-manager models pull mlx-community/Llama-3.2-1B-Instruct-4bit@main\n\n"
        "  mlx-manager models pull mlx-community/Qwen3-0.6B-4bit --json | jq -c 'select(.event == \"done\")'\n\n"
        "HF_TOKEN (a token for gated or private repos), HF_ENDPOINT (a mirror) and HF_HOME (where the cache "
        "lives) work as for every Hugging Face tool."
    )
)
def pull(model: RepoArgument, json_output: JsonOption = False) -> None:
    """Download an MLX model from the Hugging Face hub into the local cache, ready to serve.

    Only the files a model needs (weights, config, tokenizer, chat template) are fetched, after a
    check that they fit on the disk; an interrupted pull (Ctrl-C, a dropped connection) goes on
    where it stopped when run again. At the end mlx-lm (or mlx-embeddings) loads what arrived, to
    be sure it can be served.
    """
    from mlx_manager.cli.pull_display import display_for
    from mlx_manager.hub.errors import HubError
    from mlx_manager.hub.pull import download, format_bytes, make_plan

    display = display_for(json_output)
    try:
        plan = make_plan(model)
        display(plan.event())
        result = download(plan, display)
    except HubError as error:
        display.close()
        _hub_failure(error, json_output)
    except KeyboardInterrupt:
        display.close()
        fail(
            "interrupted; what arrived so far stays in the cache.",
            f"Run `mlx-manager models pull {model}` again to go on from there.",
            code=EXIT_INTERRUPTED,
            json_output=json_output,
        )
    display.close()
    _warn_if_not_allowed(result.model)
    if json_output:
        return
    size = sum(f.size for f in plan.files)
    say(f"Pulled {result.model} ({format_bytes(size)}, {result.kind}) into {result.path}")
    say(f"Serve it: mlx-manager serve --model {result.model}")


def _warn_if_not_allowed(model_id: str) -> None:
    from mlx_manager.settings import SettingsError, load_settings

    try:
        allowed = load_settings().models.allowed
    except SettingsError:
        return
    if allowed and model_id not in allowed:
        warn(
            f"models.allowed does not list {model_id}, so the daemon will refuse it; "
            f"add it with `mlx-manager config set models.allowed '{', '.join([*allowed, model_id])}'`."
        )


# -- list ---------------------------------------------------------------------------------------------


@app.command(
    "list",
    epilog="Examples:\n\n  mlx-manager models list\n\n  mlx-manager models list --json | jq -r '.[].id'",
)
def list_(json_output: JsonOption = False) -> None:
    """Show the models on this machine: the Hugging Face cache and the folders in models.folders.

    For each: the id to serve it as, its kind (chat, text or embedding), size on disk,
    quantization, whether models.allowed lets the daemon load it, and when a request last used it
    (from the audit log).
    """
    from mlx_manager.audit.last_used import last_used_by_model
    from mlx_manager.hub.cache import local_models
    from mlx_manager.hub.errors import HubError
    from mlx_manager.settings import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as error:
        fail(f"{error}.", "Fix it with `mlx-manager config edit`.", json_output=json_output)
    try:
        models = local_models(settings.models.folders)
    except (HubError, OSError) as error:
        fail(f"cannot read the model cache: {error}.", json_output=json_output)
    # The audit log names a model by its alias in models.aliases when it has one (daemon/model_names.py).
    names = {m.id: [m.id, *_aliases_of(m.id, settings.models.aliases)] for m in models}
    by_name = last_used_by_model(settings.audit_path(), [n for group in names.values() for n in group])
    used = {i: max(by_name[n] for n in group if n in by_name) for i, group in names.items() if by_name.keys() & group}
    allowed = settings.models.allowed
    rows: list[dict[str, Any]] = [
        {
            "id": m.id,
            "kind": m.kind,
            "size_bytes": m.size_bytes,
            "quantization": m.quantization,
            "allowed": not allowed or m.id in allowed,
            "last_used": _iso(used.get(m.id)),
            "source": m.source,
            "path": str(m.path),
            "commit": m.commit,
        }
        for m in models
    ]
    if json_output:
        print_json(rows)
        return
    if not rows:
        say("No models here yet. Get one with `mlx-manager models pull mlx-community/Qwen3-0.6B-4bit`.")
        return
    from rich.table import Table

    from mlx_manager.hub.pull import format_bytes

    table = Table(box=None, pad_edge=False)
    for column, justify in (
        ("ID", "left"),
        ("KIND", "left"),
        ("SIZE", "right"),
        ("QUANT", "left"),
        ("ALLOWED", "left"),
        ("LAST USED", "left"),
    ):
        table.add_column(column, no_wrap=column != "ID", justify=justify)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(
            row["id"],
            row["kind"],
            format_bytes(row["size_bytes"]),
            row["quantization"] or "-",
            "yes" if row["allowed"] else "no",
            _ago(used.get(row["id"])),
        )
    console.print(table, markup=False, highlight=False)


def _aliases_of(model_id: str, aliases: dict[str, str]) -> list[str]:
    """The aliases of models.aliases that stand for this model (by its id, or its folder's path)."""

    def folder(target: str) -> str | None:
        return str(Path(target).expanduser().resolve()) if target.startswith(("/", "~", ".")) else None

    return [alias for alias, target in aliases.items() if model_id in (target, folder(target))]


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _ago(moment: datetime | None) -> str:
    if moment is None:
        return "never"
    seconds = (datetime.now(UTC) - moment).total_seconds()
    return f"{_span(seconds)} ago" if seconds >= 1 else "just now"


def _span(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# -- ps / load / unload (the running daemon) ----------------------------------------------------------


@app.command(
    epilog="Examples:\n\n  mlx-manager models ps\n\n  mlx-manager models ps --json | jq '.models[].memory_bytes'"
)
def ps(json_output: JsonOption = False) -> None:
    """Show what the running daemon has loaded: memory, prompt cache, jobs running and waiting, and when keep-alive
    unloads it."""
    from mlx_manager.cli.daemon_client import DaemonError, admin_call

    try:
        answer = admin_call("GET", "/admin/models")
    except DaemonError as error:
        _daemon_failure(error, json_output)
    if json_output:
        print_json(answer)
        return
    models = answer.get("models") or []
    if not models:
        waiting = f"; {answer['queue_depth']} job(s) waiting" if answer.get("queue_depth") else ""
        loading = f"; loading {answer['loading']}" if answer.get("loading") else ""
        say(f"No model is loaded{loading}{waiting}.")
        return
    from rich.table import Table

    from mlx_manager.hub.pull import format_bytes

    table = Table(box=None, pad_edge=False)
    for column, justify in (
        ("ID", "left"),
        ("KIND", "left"),
        ("MEMORY", "right"),
        ("CACHE", "right"),
        ("ACTIVE", "right"),
        ("QUEUED", "right"),
        ("IDLE", "right"),
        ("UNTIL", "left"),
    ):
        table.add_column(column, no_wrap=column != "ID", justify=justify)  # type: ignore[arg-type]
    for model in models:
        cache = format_bytes(model["prompt_cache_bytes"]) if model["kind"] == "generate" else "-"
        table.add_row(
            model["id"],
            model["kind"],
            format_bytes(model["memory_bytes"]),
            cache,
            str(model["active_jobs"]),
            str(model["queued_jobs"]),
            _span(model["idle_seconds"]),
            _until(model),
        )
    console.print(table, markup=False, highlight=False)


def _until(model: dict[str, Any]) -> str:
    """When keep-alive unloads it, as `ollama ps` says: in 29m, forever, or busy."""
    if model["keep_alive_seconds"] <= 0:
        return "forever"
    if model["expires_in_seconds"] is None:
        return "busy"
    return f"in {_span(model['expires_in_seconds'])}"


@app.command(
    epilog="Examples:\n\n  mlx-manager models load mlx-community/Qwen3-0.6B-4bit\n\n"
    "  mlx-manager models load ./models/my-model"
)
def load(model: ModelArgument, json_output: JsonOption = False) -> None:
    """Load a model in the running daemon now, so the first request does not wait for it."""
    from mlx_manager.cli.daemon_client import DaemonError, admin_call
    from mlx_manager.hub.pull import format_bytes

    try:
        answer = admin_call("POST", "/admin/models/load", {"model": model}, timeout=3600)
    except DaemonError as error:
        _daemon_failure(error, json_output)
    if json_output:
        print_json(answer)
        return
    say(f"Loaded {answer['id']} ({format_bytes(answer['memory_bytes'])}, keep-alive {_until(answer)})")


@app.command(
    epilog="Examples:\n\n  mlx-manager models unload mlx-community/Qwen3-0.6B-4bit\n\n"
    "  mlx-manager models unload ./models/my-model --force"
)
def unload(
    model: ModelArgument,
    force: Annotated[
        bool, typer.Option("--force", help="Fail the model's running and waiting requests and unload it anyway.")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Unload a model from the running daemon, freeing its memory; refused while it has requests unless --force."""
    from mlx_manager.cli.daemon_client import DaemonError, admin_call

    try:
        answer = admin_call("POST", "/admin/models/unload", {"model": model, "force": force})
    except DaemonError as error:
        if error.kind == "model_busy":
            fail(f"{error.message}.", "Wait for them, or pass --force to fail them.", json_output=json_output)
        _daemon_failure(error, json_output)
    if json_output:
        print_json(answer)
        return
    say(f"Unloaded {answer['unloaded']}")


# -- rm -----------------------------------------------------------------------------------------------


@app.command(
    epilog="Examples:\n\n  mlx-manager models rm mlx-community/Qwen3-0.6B-4bit\n\n"
    "  mlx-manager models rm mlx-community/Qwen3-0.6B-4bit@v1.0 --yes\n\n"
    "  mlx-manager models rm mlx-community/Qwen3-0.6B-4bit --force --yes"
)
def rm(
    model: CachedArgument,
    yes: YesOption = False,
    force: Annotated[
        bool, typer.Option("--force", help="If the running daemon has it loaded, unload it first.")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Delete a model from the Hugging Face cache (asks first).

    Refused while the running daemon has it loaded, unless --force unloads it first."""
    from mlx_manager.hub.cache import find_cached, remove_cached
    from mlx_manager.hub.errors import HubError
    from mlx_manager.hub.pull import format_bytes

    try:
        target = find_cached(model)
    except HubError as error:
        _hub_failure(error, json_output)
    loaded = _loaded_from([target.folder] if target.whole_repo else list(target.snapshots), json_output)
    if loaded and not force:
        fail(
            f"the running daemon has {', '.join(loaded)} loaded.",
            f"Unload it first (`mlx-manager models unload {loaded[0]}`), or pass --force to do both.",
            json_output=json_output,
        )
    what = target.repo_id if target.whole_repo else f"{target.repo_id} ({len(target.commits)} revision(s))"
    if not yes and not typer.confirm(f"Delete {what}, {format_bytes(target.size_bytes)}, from {target.folder}?"):
        fail("nothing deleted.", json_output=json_output)
    for model_id in loaded:
        from mlx_manager.cli.daemon_client import DaemonError, admin_call

        try:
            admin_call("POST", "/admin/models/unload", {"model": model_id, "force": True})
        except DaemonError as error:
            if error.kind != "model_not_loaded":  # it went by itself meanwhile: fine
                _daemon_failure(error, json_output)
    try:
        remove_cached(target)
    except OSError as error:
        fail(f"could not delete {target.folder}: {error.strerror or error}.", json_output=json_output)
    if json_output:
        print_json(
            {"deleted": model, "commits": list(target.commits), "freed_bytes": target.size_bytes, "unloaded": loaded}
        )
        return
    unloaded = "; unloaded it from the daemon first" if loaded else ""
    say(f"Deleted {what} ({format_bytes(target.size_bytes)} freed{unloaded})")


def _loaded_from(folders: list[Path], json_output: bool) -> list[str]:
    """The ids under which the running daemon has a model from these folders loaded (none: no daemon)."""
    from mlx_manager.cli.daemon_client import DaemonError, admin_call

    try:
        answer = admin_call("GET", "/admin/models")
    except DaemonError as error:
        if not error.running:
            return []
        _daemon_failure(error, json_output)
    inside = [folder.resolve() for folder in folders]
    return [m["id"] for m in answer.get("models") or [] if any(Path(m["path"]).is_relative_to(f) for f in inside)]
