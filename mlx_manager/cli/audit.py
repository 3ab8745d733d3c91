"""`mlx-manager audit ...`: read, follow, query, summarise and prune the request audit log.

The commands read the SQLite file directly (the standard library's `sqlite3`), whether or not
the daemon runs. The audit package's modules are imported inside the commands, so `--help`
stays fast; none of them imports SQLAlchemy on this path.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from mlx_manager.audit.filters import AGE_FORMS, TIME_FORMS, AuditFilter, parse_time
from mlx_manager.audit.record import BACKENDS, COLUMNS, Status
from mlx_manager.cli.audit_tables import ROW_COLUMNS, Layout, fit, print_table, stats_columns, stats_rows
from mlx_manager.cli.completion import complete_backend, complete_key_name
from mlx_manager.cli.output import EXIT_USAGE, JsonOption, console, err_console, fail, print_json, say
from mlx_manager.escape import spreadsheet_safe

if TYPE_CHECKING:
    from mlx_manager.audit.store import AuditStore

app = typer.Typer(help="Read, follow, query, summarise and prune the request audit log.", no_args_is_help=True)

FOLLOW_POLL_S = 0.2  # with the writer's 100 ms flush, a row shows up within ~0.3 s
FOLLOW_BATCH = 1000


def _time_value(value: str) -> datetime:
    try:
        return parse_time(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _cutoff_value(value: str) -> datetime:
    """`--older-than`: a duration (that long ago) or an ISO date."""
    try:
        return parse_time(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not an age: use {AGE_FORMS}, or an ISO date like 2026-05-01") from None


# Shared options: every command spells them the same way (JsonOption comes from output.py).
LimitOption = Annotated[int, typer.Option("--limit", "-n", min=0, help="How many rows to show; 0 shows every row.")]
SinceOption = Annotated[
    datetime | None,
    typer.Option("--since", parser=_time_value, metavar="WHEN", help=f"Only requests at or after WHEN: {TIME_FORMS}."),
]
UntilOption = Annotated[
    datetime | None,
    typer.Option(
        "--until", parser=_time_value, metavar="WHEN", help="Only requests before WHEN (same forms as --since)."
    ),
]
ModelOption = Annotated[str | None, typer.Option("--model", "-m", help="Only this model (exact name, as requested).")]
EndpointOption = Annotated[
    str | None, typer.Option("--endpoint", "-e", help="Only this endpoint, e.g. /v1/chat/completions.")
]
BackendOption = Annotated[
    str | None,
    typer.Option(
        "--backend",
        metavar="NAME",
        help="Only requests served by this backend: its name (local, or one of routing.backends) or a type"
        " (local, openai, anthropic).",
        autocompletion=complete_backend,
    ),
]
WideOption = Annotated[
    bool, typer.Option("--wide", "-w", help="Show every column at full width, however wide the terminal.")
]
JsonlOption = Annotated[
    bool, typer.Option("--jsonl", help="Print one JSON object per line (JSON Lines) instead of the table.")
]
KeyOption = Annotated[
    str | None,
    typer.Option(
        "--key",
        "-k",
        metavar="NAME",
        help="Only requests made with the API key of this name (`mlx-manager keys list` shows them).",
        autocompletion=complete_key_name,
    ),
]


# -- tail ------------------------------------------------------------------------------

TAIL_EPILOG = (
    "Examples:\n\n"
    "  mlx-manager audit tail\n\n"
    "  mlx-manager audit tail -n 100 --json | jq '.[].duration_ms'\n\n"
    "  mlx-manager audit tail --follow\n\n"
    "  mlx-manager audit tail --follow --jsonl | jq .status"
)


@app.command(epilog=TAIL_EPILOG)
def tail(
    limit: LimitOption = 20,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new rows as they are written, until Ctrl-C.")
    ] = False,
    wide: WideOption = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the rows as one JSON array (with --follow, use --jsonl).")
    ] = False,
    jsonl: JsonlOption = False,
) -> None:
    """Show the most recent requests (newest last); --follow keeps printing new ones."""
    if follow and json_output:
        fail(
            "--json prints one document and --follow never ends.",
            "Use --follow --jsonl: one JSON object per line.",
            code=EXIT_USAGE,
            json_output=True,
        )
    printer = _RowPrinter(_format(json_output=json_output, jsonl=jsonl), wide=wide)
    path = _audit_path(printer.machine)
    store = _open(path, printer.machine, waiting=follow)
    if store is None:
        printer.emit([])
        return
    try:
        with _audit_errors(printer.machine), store:
            from mlx_manager.audit.query import last_id, query_rows

            with store.read() as conn:  # one snapshot: no row falls between the tail and the follow
                rows = list(reversed(query_rows(conn, limit=limit, order="newest")))
                seen = last_id(conn)
            if not rows and not follow:
                err_console.print(f"The audit log at {path} has no requests yet.")
            printer.emit(rows)
            if follow:
                _follow(store, seen, printer)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    except BrokenPipeError:
        _quiet_broken_pipe()


def _follow(store: AuditStore, seen: int, printer: _RowPrinter) -> None:
    from mlx_manager.audit.errors import AuditLogBusy
    from mlx_manager.audit.query import query_rows

    while True:
        try:
            with store.read() as conn:
                rows = query_rows(conn, after_id=seen, limit=FOLLOW_BATCH)
        except AuditLogBusy:
            rows = []
        if rows:
            seen = rows[-1]["id"]
            printer.emit(rows)
        if len(rows) < FOLLOW_BATCH:
            time.sleep(FOLLOW_POLL_S)


def _quiet_broken_pipe() -> None:
    # The reader went away (`| head`): stop quietly, and keep Python from complaining at exit.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    raise typer.Exit(0)


# -- query -----------------------------------------------------------------------------

QUERY_EPILOG = (
    "Examples:\n\n"
    "  mlx-manager audit query --model my-model --since 7d --limit 50\n\n"
    "  mlx-manager audit query --status timeout --since 2026-05-01 --until 2026-05-02\n\n"
    "  mlx-manager audit query --request-id 5f0c... --json\n\n"
    "  mlx-manager audit query --key laptop --since 1d --wide\n\n"
    "  mlx-manager audit query --since 30d --limit 0 --csv > requests.csv"
)


@app.command(epilog=QUERY_EPILOG)
def query(
    model: ModelOption = None,
    status: Annotated[Status | None, typer.Option("--status", "-s", help="Only requests that ended this way.")] = None,
    endpoint: EndpointOption = None,
    backend: BackendOption = None,
    key: KeyOption = None,
    request_id: Annotated[str | None, typer.Option("--request-id", "-r", help="Only the request with this id.")] = None,
    since: SinceOption = None,
    until: UntilOption = None,
    limit: LimitOption = 50,
    order: Annotated[
        Literal["newest", "oldest"], typer.Option("--order", help="Newest or oldest requests first.")
    ] = "newest",
    wide: WideOption = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the rows as one JSON array.")] = False,
    jsonl: JsonlOption = False,
    csv_output: Annotated[bool, typer.Option("--csv", help="Print CSV with a header line instead of a table.")] = False,
) -> None:
    """Find requests by model, status, endpoint, backend, API key name, request id and time."""
    output = _format(json_output=json_output, jsonl=jsonl, csv_output=csv_output)
    filters = _filters(
        output != "table",
        model=model,
        status=status,
        endpoint=endpoint,
        backend=backend,
        api_key=key,
        request_id=request_id,
        since=since,
        until=until,
    )
    # The columns the user filtered by stay in the table, however narrow the terminal.
    keep = {name for name in ("model", "status", "endpoint", "backend", "api_key") if getattr(filters, name)}
    printer = _RowPrinter(output, wide=wide, keep=keep)
    path = _audit_path(printer.machine)
    store = _open(path, printer.machine)
    if store is None:
        printer.emit([])
        return
    with _audit_errors(printer.machine), store:
        from mlx_manager.audit.query import query_rows

        with store.read() as conn:
            _check_backend(conn, backend, printer.machine)
            rows = query_rows(conn, filters, limit=limit, order=order)
    try:
        if not rows and output == "table":
            err_console.print("No requests match.")
        printer.emit(rows)
    except BrokenPipeError:
        _quiet_broken_pipe()


# -- stats -----------------------------------------------------------------------------

STATS_EPILOG = (
    "Examples:\n\n"
    "  mlx-manager audit stats\n\n"
    "  mlx-manager audit stats --since 24h --by model\n\n"
    "  mlx-manager audit stats --since 7d --by endpoint --json\n\n"
    "  mlx-manager audit stats --since 7d --by key"
)


@app.command(epilog=STATS_EPILOG)
def stats(
    since: SinceOption = None,
    until: UntilOption = None,
    by: Annotated[
        Literal["model", "endpoint", "status", "backend", "key"] | None,
        typer.Option("--by", help="One line per model, endpoint, status, backend or API key name."),
    ] = None,
    model: ModelOption = None,
    endpoint: EndpointOption = None,
    backend: BackendOption = None,
    key: KeyOption = None,
    wide: WideOption = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the lines as one JSON array.")] = False,
) -> None:
    """Summarise requests: count, error and timeout rates, p50/p95 duration, time to first token, tokens/s."""
    filters = _filters(
        json_output, model=model, endpoint=endpoint, backend=backend, api_key=key, since=since, until=until
    )
    path = _audit_path(json_output)
    store = _open(path, json_output)
    if store is None:
        if json_output:
            print_json([])
        return
    with _audit_errors(json_output), store:
        from mlx_manager.audit.stats import compute_stats

        with store.read() as conn:
            _check_backend(conn, backend, json_output)
            groups = compute_stats(conn, filters, by=by)
    if json_output:
        print_json(groups)
        return
    if not groups:
        err_console.print("No requests in this window.")
        return
    rows = stats_rows(groups)
    layout = fit(stats_columns(by), rows, console.width, wide=wide, keep={by} if by else ())
    _say_hidden(layout)
    print_table(console, layout, rows, caption=_window_caption(since, until))


def _window_caption(since: datetime | None, until: datetime | None) -> str:
    start = _utc(since) if since else "the first request"
    end = _utc(until) if until else "now"
    return (
        f"From {start} to {end}. Durations are whole requests;"
        " tokens/s is completion tokens per second of request time."
    )


# -- prune -----------------------------------------------------------------------------

PRUNE_EPILOG = (
    "Examples:\n\n"
    "  mlx-manager audit prune --older-than 30d --dry-run\n\n"
    "  mlx-manager audit prune --older-than 7d --yes\n\n"
    "Safe while the daemon runs: rows go in small transactions that never hold up its writes."
)


@app.command(epilog=PRUNE_EPILOG)
def prune(
    older_than: Annotated[
        datetime,
        typer.Option(
            "--older-than",
            parser=_cutoff_value,
            metavar="AGE",
            help=f"Delete requests older than AGE: {AGE_FORMS}, or before an ISO date (UTC).",
        ),
    ],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say how many rows would be deleted.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Delete old requests from the audit log (asks first unless --yes)."""
    cutoff = older_than
    path = _audit_path(json_output)
    store = _open(path, json_output)
    if store is None:
        if json_output:
            print_json({"deleted": 0, "cutoff": _iso(cutoff), "dry_run": dry_run})
        return
    with _audit_errors(json_output), store:
        from mlx_manager.audit.prune import count_older, prune_older

        matching = count_older(store, cutoff)
        if dry_run or not matching:
            if json_output:
                print_json({"deleted": 0, "would_delete": matching, "cutoff": _iso(cutoff), "dry_run": dry_run})
            elif not matching:
                console.print(f"No requests before {_utc(cutoff)}: nothing to prune.")
            else:
                console.print(
                    f"Would delete {matching:,} requests from before {_utc(cutoff)} (dry run: nothing changed)."
                )
            return
        if not yes:
            question = f"Delete {matching:,} requests from before {_utc(cutoff)}?"
            try:
                confirmed = typer.confirm(question, default=False, err=True)
            except typer.Abort:  # end of input or Ctrl-C at the question: no answer, an error
                fail("Nothing deleted.", "Pass --yes to prune without the question.", json_output=json_output)
            if not confirmed:  # the user said no: what they asked for, not an error
                if json_output:
                    print_json({"deleted": 0, "declined": True, "cutoff": _iso(cutoff), "dry_run": False})
                else:
                    console.print("Nothing deleted.")
                return
        deleted = prune_older(store, cutoff)
    if json_output:
        print_json({"deleted": deleted, "cutoff": _iso(cutoff), "dry_run": False})
    else:
        console.print(f"Deleted {deleted:,} requests from before {_utc(cutoff)}.")


# -- shared ----------------------------------------------------------------------------


def _audit_path(json_output: bool) -> Path:
    from mlx_manager.settings import SettingsError, load_settings

    try:
        return load_settings().audit_path()
    except SettingsError as exc:  # a bad config file or MLX_MANAGER_ variable
        fail(f"Cannot read the settings: {exc}.", "Fix it with `mlx-manager config`.", json_output=json_output)


def _open(path: Path, json_output: bool, *, waiting: bool = False) -> AuditStore | None:
    """The store, or None (after saying so) when there is no database yet; waits for one if `waiting`."""
    from mlx_manager.audit.errors import AuditLogMissing
    from mlx_manager.audit.store import AuditStore

    with _audit_errors(json_output):
        try:
            return AuditStore.open(path, create=False)
        except AuditLogMissing:
            if not waiting:
                say(f"no audit log yet at {path}", err=True)
                return None
        say(f"no audit log yet at {path}; waiting for the daemon to write one (Ctrl-C to stop)", err=True)
        try:
            while True:
                time.sleep(FOLLOW_POLL_S)
                try:
                    return AuditStore.open(path, create=False)
                except AuditLogMissing:
                    continue
        except KeyboardInterrupt:
            raise typer.Exit(0) from None


@contextmanager
def _audit_errors(json_output: bool) -> Iterator[None]:
    """Typed audit errors become the one-line failure, with what to do about them."""
    from mlx_manager.audit.errors import AuditError, AuditLogBusy, AuditLogCorrupt

    try:
        yield
    except AuditLogCorrupt as exc:
        fail(
            str(exc) + ".",
            "Move the file aside (the daemon starts a new log) or set audit.path.",
            json_output=json_output,
        )
    except AuditLogBusy as exc:
        fail(str(exc) + ".", "Try again in a moment.", json_output=json_output)
    except AuditError as exc:
        fail(str(exc) + ".", "Check the file's permissions and free disk space.", json_output=json_output)


def _check_backend(conn: Any, backend: str | None, json_output: bool) -> None:
    """`--backend` names a type or a backend the log has rows of: a typo is said, not an empty answer."""
    from mlx_manager.audit.query import backend_names

    if backend is None or backend in BACKENDS:
        return
    names = backend_names(conn)
    if backend not in names:
        types = ", ".join(repr(t) for t in BACKENDS)
        fail(
            f"Invalid value for '--backend': {backend!r} is not one of {types}, nor a backend in the audit log"
            f" ({', '.join(names) or 'none'}).",
            code=EXIT_USAGE,
            json_output=json_output,
        )


def _filters(json_output: bool, **values: Any) -> AuditFilter:
    since, until = values.get("since"), values.get("until")
    if since and until and since >= until:
        fail("--since must be earlier than --until.", code=EXIT_USAGE, json_output=json_output)
    return AuditFilter(**values)


Output = Literal["table", "json", "jsonl", "csv"]


def _format(*, json_output: bool = False, jsonl: bool = False, csv_output: bool = False) -> Output:
    chosen = [name for name, on in (("--json", json_output), ("--jsonl", jsonl), ("--csv", csv_output)) if on]
    if len(chosen) > 1:
        fail(f"{' and '.join(chosen)} cannot be used together.", "Pick one output format.", code=EXIT_USAGE)
    return "json" if json_output else "jsonl" if jsonl else "csv" if csv_output else "table"


class _RowPrinter:
    """Prints audit rows as a table that fits the terminal (laid out by the first rows, so rows
    that follow line up), one JSON array, JSON lines, or CSV."""

    def __init__(self, output: Output, *, wide: bool = False, keep: set[str] | None = None) -> None:
        self.output = output
        self.wide = wide
        self.keep = keep or set()
        self.layout: Layout | None = None
        self.machine = output != "table"

    def emit(self, rows: list[dict[str, Any]]) -> None:
        if self.output == "json":
            print_json(rows)
        elif self.output == "jsonl":
            for row in rows:
                print_json(row)
        elif self.output == "csv":
            writer = csv.DictWriter(sys.stdout, fieldnames=COLUMNS, lineterminator="\n")
            writer.writeheader()
            # A model id like '=HYPERLINK(...)' must open as text in a spreadsheet, not run.
            writer.writerows({key: spreadsheet_safe(value) for key, value in row.items()} for row in rows)
        elif rows:
            first = self.layout is None
            if self.layout is None:
                self.layout = fit(ROW_COLUMNS, rows, console.width, wide=self.wide, keep=self.keep)
                _say_hidden(self.layout)
            print_table(console, self.layout, rows, header=first)
        sys.stdout.flush()


def _say_hidden(layout: Layout) -> None:
    note = layout.note()
    if note:
        err_console.print(note, markup=False, highlight=False, soft_wrap=True)


def _utc(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
