"""Generate the shell completion scripts and the man page from the Typer app and the Settings model.

python -m mlx_manager.docs          # rewrite completions/ and man/mlx-manager.1
python -m mlx_manager.docs --check  # exit 1 if the committed files are out of date
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from pydantic import BaseModel

from mlx_manager import __version__
from mlx_manager.settings import Settings

PROG = "mlx-manager"
COMPLETE_VAR = "_MLX_MANAGER_COMPLETE"
SHELLS = {"bash": "mlx-manager.bash", "zsh": "_mlx-manager", "fish": "mlx-manager.fish"}
ROOT = Path(__file__).resolve().parent.parent

EXAMPLES = [
    (
        "Get a small model from the Hugging Face hub and serve it:",
        "mlx-manager models pull mlx-community/Qwen3-0.6B-4bit\n"
        "mlx-manager serve --model mlx-community/Qwen3-0.6B-4bit",
    ),
    ("Serve on the defaults (127.0.0.1:10242), loading models on first request:", "mlx-manager serve"),
    ("Preload a model and serve it:", "mlx-manager serve --model ./models/my-model"),
    (
        "Run the daemon in the background, check it and stop it:",
        "mlx-manager start\nmlx-manager status\nmlx-manager stop",
    ),
    ("Give chat requests 15 minutes; a running daemon applies it at once:", "mlx-manager config set timeouts.chat 900"),
    ("Follow the audit log as requests arrive:", "mlx-manager audit tail --follow"),
    ("Failed requests of the last day, as JSON:", "mlx-manager audit query --status error --since 1d --json"),
]


def completion_script(shell: str) -> str:
    from typer._completion_shared import get_completion_script

    return get_completion_script(prog_name=PROG, complete_var=COMPLETE_VAR, shell=shell) + "\n"


# -- roff -------------------------------------------------------------------------------------
def _esc(text: str) -> str:
    """Escape text for roff: backslashes, leading dots/quotes, dashes in option names."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in text.splitlines() or [""]:
        line = line.strip()
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def _plain(text: str | None) -> str:
    """Help text without rich markup."""
    return re.sub(r"\[/?[a-z ]+\]", "", (text or "").strip())


# Typer ships its own copy of click, so commands and parameters are told apart by what they
# have (`commands`, `param_type_name`), not by click's classes.
def _commands(group: Any, path: list[str]) -> Iterator[tuple[list[str], Any]]:
    for name, command in group.commands.items():
        if command.hidden:
            continue
        if hasattr(command, "commands"):
            yield from _commands(command, [*path, name])
        else:
            yield [*path, name], command


def _options(command: Any) -> list[Any]:
    return [p for p in command.params if p.param_type_name == "option" and not p.hidden and p.name != "help"]


def _synopsis(path: list[str], command: Any) -> str:
    parts = [(p.metavar or p.name).upper() for p in command.params if p.param_type_name == "argument"]
    options = _options(command)
    head = f"{PROG} {' '.join(path)}"
    arguments = "".join(f" \\fI{_esc(a)}\\fR" for a in parts)
    return f"\\fB{_esc(head)}\\fR" + (" [\\fIOPTIONS\\fR]" if options else "") + arguments


def _value_name(param: Any) -> str:
    """INTEGER, NUMBER, TEXT or PATH, from the option's annotation (Optional[...] unwrapped)."""
    import typing
    from pathlib import PurePath

    annotation = param.type_descriptor.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    kind = args[0] if args else annotation
    if isinstance(kind, type) and issubclass(kind, PurePath):
        return "PATH"
    return {int: "INTEGER", float: "NUMBER"}.get(kind, "TEXT")


def _option_lines(command: Any) -> list[str]:
    out = []
    for param in _options(command):
        names = ", ".join(f"\\fB{_esc(n)}\\fR" for n in [*param.opts, *param.secondary_opts])
        if not param.is_flag:
            names += f" \\fI{_esc(param.metavar or _value_name(param))}\\fR"
        out += [".TP", names, _esc(_plain(param.help) or "(no help)")]
    return out


def _settings_rows(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _settings_rows(annotation, f"{prefix}{name}.")
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        # A default that depends on the machine is described, so the generated files are the same everywhere.
        default = extra.get("default_shown") or repr(field.get_default(call_default_factory=True))
        kind = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
        yield f"{prefix}{name}", kind, str(default), field.description or ""


def man_page() -> str:
    app = _app()
    group = typer.main.get_command(app)
    lines = [
        f'.TH MLX\\-MANAGER 1 "" "mlx\\-manager {__version__}" "User Commands"',
        ".SH NAME",
        "mlx\\-manager \\- serve local MLX models behind an OpenAI\\-compatible API, "
        "and supervise, configure and audit the daemon",
        ".SH SYNOPSIS",
        "\\fBmlx\\-manager\\fR [\\fB\\-\\-version\\fR] [\\fB\\-\\-help\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
        ".SH DESCRIPTION",
        _esc(_plain(group.help)),
        ".PP",
        _esc(
            "The daemon answers the OpenAI HTTP API (chat completions, completions, embeddings, models and "
            "Responses; streaming included), Anthropic's Messages API, and can route models to other servers. "
            "Every error is an RFC 9457 problem document. Every API request leaves one metadata row in a SQLite "
            "audit log, never the prompt or completion text."
        ),
        ".SH COMMANDS",
    ]
    for path, command in _commands(group, []):
        lines += [".SS " + _synopsis(path, command), _esc(_plain(command.help))]
        options = _option_lines(command)
        if options:
            lines += [".PP", "Options:", ".RS", *options, ".RE"]
    lines += [
        ".SH CONFIGURATION",
        _esc(
            "Settings live in config.toml under the home folder. Change them with mlx-manager config set KEY VALUE; "
            "precedence is command\\-line flag, then environment, then file, then default."
        ),
    ]
    for key, kind, default, description in _settings_rows(Settings):
        lines += [".TP", f"\\fB{_esc(key)}\\fR ({_esc(kind)}, default {_esc(default)})", _esc(description)]
    lines += [
        ".SH ENVIRONMENT",
        ".TP",
        "\\fBMLX_MANAGER_HOME\\fR",
        _esc("Folder for every file the program keeps: config, audit database, logs, pid and state files."),
        ".TP",
        "\\fBMLX_MANAGER_\\fISECTION\\fB__\\fIKEY\\fR",
        _esc("Overrides one setting, e.g. MLX_MANAGER_TIMEOUTS__CHAT=900."),
        ".TP",
        "\\fBHF_HUB_OFFLINE\\fR",
        _esc(
            "Set to 1 and `models pull` refuses to reach the Hugging Face hub. Serving never reaches it either "
            "way: models load only from folders and the local cache."
        ),
        ".TP",
        "\\fBHF_HOME\\fR, \\fBHF_HUB_CACHE\\fR",
        _esc(
            "Where the Hugging Face cache lives (models pull writes there, models list and rm read it); "
            "default ~/.cache/huggingface."
        ),
        ".TP",
        "\\fBHF_TOKEN\\fR",
        _esc("A Hugging Face token for gated or private repos (models pull)."),
        ".TP",
        "\\fBHF_ENDPOINT\\fR",
        _esc("The hub to pull from instead of https://huggingface.co (a mirror)."),
        ".SH FILES",
        ".TP",
        "\\fI$MLX_MANAGER_HOME/config.toml\\fR",
        "The settings file.",
        ".TP",
        "\\fI$MLX_MANAGER_HOME/audit.db\\fR",
        "The request audit log (SQLite, WAL mode).",
        ".TP",
        "\\fI$MLX_MANAGER_HOME/logs/daemon.log\\fR",
        "The daemon's log.",
        ".TP",
        "\\fI$MLX_MANAGER_HOME/admin.token\\fR",
        "The admin credential the CLI sends to the daemon (mode 0600).",
        ".SH EXIT STATUS",
        ".TP",
        "0",
        "Success (for status: running and healthy).",
        ".TP",
        "1",
        "Failure (for status: running but unhealthy, or given up after a crash loop).",
        ".TP",
        "2",
        "Bad usage or an invalid setting; nothing was changed.",
        ".TP",
        "3",
        "status: the daemon is not running.",
        ".SH EXAMPLES",
    ]
    for text, command in EXAMPLES:
        lines += [".PP", _esc(text), ".PP", ".RS", ".nf", _esc(command), ".fi", ".RE"]
    lines += [".SH SEE ALSO", "The README of the project, which lists the HTTP API and its error format."]
    return "\n".join(lines) + "\n"


def _app() -> typer.Typer:
    from mlx_manager.cli import app

    return app


SETTINGS_START, SETTINGS_END = "<!-- settings:start -->", "<!-- settings:end -->"


def settings_table() -> str:
    """The README's settings table, in Markdown."""
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for key, kind, default, description in _settings_rows(Settings):
        rows.append(f"| `{key}` | {kind} | `{default}` | {description} |")
    return "\n".join(rows)


FIELDS_START, FIELDS_END = "<!-- openai-fields:start -->", "<!-- openai-fields:end -->"


def _between(text: str, start: str, end: str, table: str) -> str:
    """`text` with what stands between the two markers replaced by `table`."""
    head, found, rest = text.partition(start)
    if not found:
        return text
    _, found, tail = rest.partition(end)
    return f"{head}{start}\n{table}\n{end}{tail}" if found else text


def readme_with_settings(readme: str) -> str:
    """The README with its generated tables (settings; the OpenAI request fields) made fresh."""
    from mlx_manager.daemon.openai_fields import fields_table

    readme = _between(readme, SETTINGS_START, SETTINGS_END, settings_table())
    return _between(readme, FIELDS_START, FIELDS_END, fields_table())


def generated_files() -> dict[Path, str]:
    files = {ROOT / "completions" / name: completion_script(shell) for shell, name in SHELLS.items()}
    files[ROOT / "man" / "mlx-manager.1"] = man_page()
    readme = ROOT / "README.md"
    files[readme] = readme_with_settings(readme.read_text())
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_manager.docs", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report files that are out of date")
    args = parser.parse_args(argv)
    stale = [path for path, text in generated_files().items() if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"out of date: {path.relative_to(ROOT)} (run: python -m mlx_manager.docs)")
        return 1 if stale else 0
    for path, text in generated_files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
