"""`mlx-manager config ...`: read and change the validated settings file; a running daemon reloads.

Refusals (unknown key, bad value, invalid edit) exit 2 and leave the file byte-for-byte as it was;
a config file that is already broken exits 1 and names the file, line and key.
"""

# Annotations stay objects here, without `from __future__ import annotations`: Typer reads every
# command's annotations at each start, and a string annotation costs a compile and an eval.

import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from mlx_manager.cli.output import EXIT_ERROR, EXIT_USAGE, JsonOption, console, fail, print_json, say, warn
from mlx_manager.settings import (
    ConfigBusyError,
    SettingsError,
    changed_keys,
    check_config_text,
    config_lock,
    config_path,
    entry_info,
    flatten,
    home,
    key_info,
    key_infos,
    load_settings_with_origins,
    parse_config_document,
    parse_value,
    read_config_text,
    sections,
    set_in_document,
    suggest_key,
    unset_in_document,
    write_config_text,
)

app = typer.Typer(
    help="Read and change settings (config.toml); a running daemon applies changes live.",
    no_args_is_help=True,
)

NEW_FILE_TEMPLATE = """\
# mlx-manager settings. `mlx-manager config list` shows every key, its value and what it does.
# Seconds keys also take durations in quotes, e.g.:
#
# [timeouts]
# chat = "15m"
"""


def _complete_key(incomplete: str) -> list[tuple[str, str]]:
    return [(key, info.description) for key, info in key_infos().items() if key.startswith(incomplete)]


def _complete_value(ctx: typer.Context, incomplete: str) -> list[str]:
    info = key_infos().get(ctx.params.get("key") or "")
    return [choice for choice in (info.choices if info else ()) if choice.startswith(incomplete)]


KeyArgument = Annotated[
    str,
    typer.Argument(
        help="Setting name as section.key, e.g. timeouts.chat (`mlx-manager config list` shows them all).",
        autocompletion=_complete_key,
        show_default=False,
    ),
]


def _refuse(error: SettingsError, json_output: bool = False) -> NoReturn:
    """A bad key or value given on the command line: exit 2, nothing written."""
    key = error.key or ""
    lost = key not in key_infos() and key not in sections() and not suggest_key(key)
    hint = "`mlx-manager config list` shows every key." if lost else None
    fail(f"{error}.", hint, code=EXIT_USAGE, json_output=json_output)


def _broken(error: SettingsError, json_output: bool = False) -> NoReturn:
    """Settings that were already invalid before this command (the file, or a variable)."""
    hint = "Fix it with `mlx-manager config edit`." if error.file else "Fix or unset that variable."
    fail(f"{error}.", hint, code=EXIT_ERROR, json_output=json_output)


def _effective(json_output: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """Every key's value as `config` may show it: secret ones (API keys) only as a count."""
    try:
        settings, origins = load_settings_with_origins()
    except SettingsError as error:
        _broken(error, json_output)
    values = {key: _hidden(value) if key_infos()[key].secret else value for key, value in flatten(settings).items()}
    return values, origins


def _hidden(value: Any) -> str:
    count = len(value) if isinstance(value, list) else int(bool(value))
    return f"(hidden: {count} key{'' if count == 1 else 's'})"


def _refuse_secret(key: str, action: str) -> None:
    """API keys are made and revoked by `mlx-manager keys` only: `config` never takes one in plain text."""
    if key_infos().get(key) is not None and key_infos()[key].secret:
        fail(
            f"{key} cannot be {action} with `mlx-manager config`.",
            "Use `mlx-manager keys add NAME` or `mlx-manager keys revoke NAME`.",
            code=EXIT_USAGE,
        )


def _shown(value: Any, key: str | None = None) -> str:
    """How a value reads on a terminal: lists and maps as JSON, booleans as TOML writes them, durations
    with their unit (`900s (15m)`; --json keeps the bare number of seconds)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    if key is not None and isinstance(value, int | float) and key_infos()[key].kind == "duration":
        return duration_text(float(value))
    return str(value)


def duration_text(seconds: float) -> str:
    """`900s (15m)`, `5400s (1h30m)`, `45s`, `0.5s`."""
    plain = f"{seconds:g}s"
    if seconds < 60 or seconds != int(seconds):
        return plain
    rest = int(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return f"{plain} ({''.join(parts)})"


def _origin_label(key: str, origin: str) -> str:
    return f"env {key_infos()[key].env_var}" if origin == "env" else origin


def _env_note(key: str) -> None:
    var = key_infos()[key].env_var
    if var in os.environ:
        warn(f"{var} is set in this environment and overrides the file's value here.")


def apply_live(summary: str, keys: list[str] | None) -> None:
    """Tell a running daemon to reload and say, on the summary line, what it made of the change.
    `keys` are the keys this command changed; None reports whatever the daemon says changed."""
    from mlx_manager.cli.daemon_client import request_reload

    outcome = request_reload()
    if not outcome.running:
        say(f"{summary} (no daemon running; takes effect at next start)")
        return
    if outcome.error:
        say(summary)
        warn(
            f"the running daemon at {outcome.url} did not confirm the change: {outcome.error}. "
            "Restart it to apply the change."
        )
        return
    applied = [key for key in outcome.applied if keys is None or key in keys]
    restart = [key for key in outcome.restart_needed if keys is None or key in keys]
    said = f"running daemon at {outcome.url}"
    if applied:
        said += " applied " + ("it" if keys and applied == keys == [applied[0]] else ", ".join(applied))
    if restart:
        said += ("; " if applied else ": ") + "restart needed for " + ", ".join(restart)
    if not applied and not restart:
        # Typically the daemon was started with a flag (serve --port) or a variable for this key.
        said += " reloaded; no value it uses changed"
    say(f"{summary} ({said})")


@contextlib.contextmanager
def changing_config(json_output: bool = False) -> Iterator[None]:
    """Hold the config file's lock around a whole read-modify-write, so that two commands changing
    it at once cannot lose one change; exit 1 if another command keeps it locked too long."""
    path = config_path()
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(config_lock(path, on_wait=None if json_output else lambda: _say_waiting(path)))
        except ConfigBusyError as error:
            fail(f"{error}.", code=EXIT_ERROR, json_output=json_output)
        except OSError as error:
            fail(f"cannot lock {path}: {error.strerror or error}", code=EXIT_ERROR, json_output=json_output)
        yield


def _say_waiting(path: Path) -> None:
    say(f"Waiting for another mlx-manager command to finish changing {path}...", err=True)


def _save(text: str, json_output: bool = False) -> None:
    try:
        write_config_text(text)
    except OSError as error:
        fail(f"cannot write {config_path()}: {error.strerror or error}", code=EXIT_ERROR, json_output=json_output)


@app.command(
    epilog="Examples:\n\n  mlx-manager config get timeouts.chat\n\n  mlx-manager config get server.port --json"
)
def get(key: KeyArgument, json_output: JsonOption = False) -> None:
    """Print the value a setting has now (flag > environment > file > default)."""
    try:
        info = key_info(key)
    except SettingsError as error:
        _refuse(error, json_output)
    values, origins = _effective(json_output)
    value = values[info.base]
    if info.entry is not None:  # one entry of a map key, `models.aliases.NAME`
        if info.entry not in value:
            fail(
                f"{info.base} has no entry {info.entry!r}.",
                f"`mlx-manager config get {info.base}` shows them all.",
                code=EXIT_ERROR,
                json_output=json_output,
            )
        value = value[info.entry]
    if json_output:
        print_json({"key": key, "value": value, "origin": origins[info.base]})
    else:
        say(_shown(value, key if info.entry is None else None))


@app.command(
    "set",
    epilog=(
        "Examples:\n\n  mlx-manager config set timeouts.chat 1200\n\n  mlx-manager config set timeouts.chat 20m\n\n"
        "  mlx-manager config set models.allowed ./models/a,mlx-community/b\n\n"
        "  mlx-manager config set log.level debug\n\n"
        "  mlx-manager config set models.aliases.qwen mlx-community/Qwen3-0.6B-4bit"
    ),
    # `-5` must reach the validator (and its clear message) rather than look like an option.
    context_settings={"ignore_unknown_options": True},
)
def set_(
    key: KeyArgument,
    value: Annotated[
        str,
        typer.Argument(
            help="New value: a number, a duration (90s, 15m, 2h), true/false, text, or a list as a,b or JSON.",
            autocompletion=_complete_value,
            show_default=False,
        ),
    ],
) -> None:
    """Validate a value and write it to the config file; a running daemon reloads it."""
    _refuse_secret(key, "set")
    try:
        typed = parse_value(key, value)
        base = key_info(key).base
    except SettingsError as error:
        _refuse(error)
    typed, made_absolute = _absolute_paths(key, typed)
    path = config_path()
    with changing_config():
        try:
            text = read_config_text(path)
            check_config_text(text, path)
            document = parse_config_document(text, path)
        except SettingsError as error:
            _broken(error)
        set_in_document(document, key, typed)
        try:  # the file as a whole: a value may name others (a route, the backends it goes to)
            check_config_text(document.as_string(), path)
        except SettingsError as error:
            _refuse(error)
        _save(document.as_string())
    _env_note(base)
    apply_live(f"Set {key} = {_shown(typed, base)}", [base])
    for given, absolute in made_absolute:
        say(f"  {given} is stored as {absolute}: the daemon may start from any folder.")


# Settings naming model folders: a relative path is resolved where `config set` runs, so that the
# daemon (started from anywhere) finds the same folder and every place names the model the same way.
MODEL_PATH_KEYS = ("models.preload", "models.allowed", "models.folders", "models.default")


def _absolute_paths(key: str, value: Any) -> tuple[Any, list[tuple[str, str]]]:
    """`value` with each relative folder made absolute (for MODEL_PATH_KEYS and the entries of
    models.aliases), and what was changed. An entry is a folder when it starts with ., .. or ~, or
    names a folder that exists here (else it stays as written: a Hugging Face id such as
    mlx-community/Qwen3-4B-4bit, or an alias)."""
    if key.startswith("models.aliases.") or (key in MODEL_PATH_KEYS and isinstance(value, str)):
        # one model, which may be an alias: a bare name is a folder here only when written ./name
        absolute = _absolute(value) if isinstance(value, str) and "/" in value else value
        return absolute, [(value, absolute)] if absolute != value else []
    if key not in MODEL_PATH_KEYS or not isinstance(value, list):
        return value, []
    result = [_absolute(entry) if isinstance(entry, str) else entry for entry in value]
    return result, [(given, made) for given, made in zip(value, result, strict=True) if given != made]


def _absolute(entry: str) -> str:
    looks_like_path = entry.startswith((".", "~")) or (entry != "" and Path(entry).exists())
    return str(Path(entry).expanduser().resolve()) if looks_like_path else entry


@app.command(epilog="Examples:\n\n  mlx-manager config unset timeouts.chat")
def unset(key: KeyArgument) -> None:
    """Remove a setting from the config file so its default applies again; a running daemon reloads."""
    _refuse_secret(key, "unset")
    path = config_path()
    entry = entry_info(key)  # one entry of a map key, `models.aliases.NAME`
    known = key in key_infos() or entry is not None
    with changing_config():
        try:
            text = read_config_text(path)
            document = parse_config_document(text, path)
        except SettingsError as error:
            _broken(error)
        if not unset_in_document(document, key):
            if not known:
                try:
                    key_info(key)
                except SettingsError as error:
                    _refuse(error)
            say(f"{key} is not set in {path}; nothing to do.")
            return
        new_text = document.as_string()
        try:
            check_config_text(new_text, path)
        except SettingsError as error:
            _broken(error)  # the file held other problems before; removing this key did not fix them
        _save(new_text)
    if not known:  # the file was broken until now, so the daemon may have missed earlier changes
        apply_live(f"Removed unknown key {key} from {path}", None)
        return
    if entry is not None:
        _env_note(entry.base)
        apply_live(f"Removed {key}", [entry.base])
        return
    _env_note(key)
    apply_live(f"Unset {key}; the default {_shown(key_infos()[key].default, key)} applies", [key])


@app.command(
    "list",
    epilog=(
        "Examples:\n\n  mlx-manager config list\n\n  mlx-manager config list --show-origin\n\n"
        "  mlx-manager config list --json"
    ),
)
def list_(
    json_output: JsonOption = False,
    show_origin: Annotated[
        bool, typer.Option("--show-origin", help="Also show where each value comes from: default, file, env or flag.")
    ] = False,
) -> None:
    """Show every setting with its current value and what it does."""
    values, origins = _effective(json_output)
    if json_output:
        if show_origin:
            print_json({key: {"value": value, "origin": origins[key]} for key, value in values.items()})
        else:
            print_json(values)
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    table.add_column("Key", no_wrap=True)
    table.add_column("Value", overflow="fold")
    if show_origin:
        table.add_column("Origin", no_wrap=True)
    table.add_column("Description")
    for key, value in values.items():
        shown = _shown(value, key) if value != "" else '""'
        row = [key, shown] + ([_origin_label(key, origins[key])] if show_origin else [])
        table.add_row(*row, key_infos()[key].description)
    console.print(table)


@app.command(epilog='Examples:\n\n  mlx-manager config path\n\n  cat "$(mlx-manager config path)"')
def path() -> None:
    """Print where the config file lives (it may not exist until the first `config set`)."""
    say(str(config_path()))


@app.command(epilog="Examples:\n\n  mlx-manager config edit\n\n  EDITOR=nano mlx-manager config edit")
def edit() -> None:
    """Open the config file in $VISUAL or $EDITOR; the result is kept only if it is valid."""
    path = config_path()
    try:
        original = read_config_text(path)
    except SettingsError as error:
        _broken(error)
    start = original if path.exists() else NEW_FILE_TEMPLATE
    draft = start
    while True:
        draft = _run_editor(draft)
        if draft == start:
            say(f"No changes; {path} left as it was.")
            return
        try:
            after = check_config_text(draft, path)
            break
        except SettingsError as error:
            # Interactive users get their text back to fix it, like visudo; scripts get a refusal.
            if sys.stdin.isatty() and typer.confirm(f"{error}\nEdit again?", default=True, err=True):
                continue
            fail(f"{error}.", f"Nothing was saved; {path} is unchanged.", code=EXIT_USAGE)
    # The editor session holds no lock (a human may take minutes), so another command may have
    # changed the file meanwhile: write only over the text the user saw, or with their consent.
    base = original
    while True:
        with changing_config():
            try:
                current = read_config_text(path)
            except SettingsError as error:
                _broken(error)
            if current == base:
                _save(draft)
                break
        raced = f"{path} was changed by another command while you were editing it"
        question = f"{raced}. Replace it with your version?"
        replace = sys.stdin.isatty() and typer.confirm(question, default=False, err=True)
        if not replace:
            fail(f"{raced}; nothing was saved.", "Run `mlx-manager config edit` again.", code=EXIT_ERROR)
        base = current
    try:
        changed: list[str] | None = changed_keys(check_config_text(base, path), after)
    except SettingsError:
        changed = None  # the old file was broken, so the daemon may hold older values: reload anyway
    if changed == []:
        say(f"Saved {path} (no setting changed value)")
        return
    apply_live(f"Saved {path}" + (f"; changed {', '.join(changed)}" if changed else ""), changed)


def _run_editor(text: str) -> str:
    """Let the user edit `text` in their editor, in a private temp file next to the config.
    Not click.edit: it says only "Editing failed" for an editor that cannot start or exits non-zero
    (never which error or status), and its draft goes to the shared temp folder."""
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    folder = home()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, name = tempfile.mkstemp(dir=folder, prefix=".config.edit.", suffix=".toml")  # mode 0600
    draft = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        try:
            result = subprocess.run([*shlex.split(editor), str(draft)])
        except OSError as error:
            fail(f"cannot run editor {editor!r}: {error.strerror or error}", "Set $EDITOR, e.g. export EDITOR=nano.")
        if result.returncode != 0:
            fail(f"editor {editor!r} exited with status {result.returncode}; nothing was saved.")
        return draft.read_text(encoding="utf-8")
    finally:
        draft.unlink(missing_ok=True)
