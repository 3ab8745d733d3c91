"""`mlx-manager audit ...`: read, follow, query, summarise and prune the request audit log.

The commands read the SQLite file directly, whether or not the daemon runs. SQLAlchemy is
imported inside the commands only, so `mlx-manager --help` stays fast.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from mlx_manager.audit.filters import AGE_FORMS, TIME_FORMS, AuditFilter, parse_time
from mlx_manager.audit.record import COLUMNS, Backend, Status
from mlx_manager.cli.completion import complete_key_name
from mlx_manager.cli.output import EXIT_USAGE, JsonOption, console, err_console, fail, print_json, say

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
    Optional[datetime],
    typer.Option("--since", parser=_time_value, metavar="WHEN", help=f"Only requests at or after WHEN: {TIME_FORMS}."),
]
UntilOption = Annotated[
    Optional[datetime],
    typer.Option("--until", parser=_time_value, metavar="WHEN", help="Only requests before WHEN (same forms as --since)."),
]
ModelOption = Annotated[Optional[str], typer.Option("--model", "-m", help="Only this model (exact name, as requested).")]
EndpointOption = Annotated[
    Optional[str], typer.Option("--endpoint", "-e", help="Only this endpoint, e.g. /v1/chat/completions.")
]
BackendOption = Annotated[Optional[Backend], typer.Option("--backend", help="Only this backend type.")]
KeyOption = Annotated[
    Optional[str],
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
    "  mlx-manager audit tail -n 100 --json | jq .duration_ms\n\n"
    "  mlx-manager audit tail --follow"
)


@app.command(epilog=TAIL_EPILOG)
def tail(
    limit: LimitOption = 20,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new rows as they are written, until Ctrl-C.")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Show the most recent requests (newest last); --follow keeps printing new ones."""
    path = _audit_path(json_output)
    store = _open(path, json_output, waiting=follow)
    if store is None:
        return
    try:
        with _audit_errors(json_output), store:
            from mlx_manager.audit.query import last_id, query_rows

            with store.read() as conn:  # one snapshot: no row falls between the tail and the follow
                rows = list(reversed(query_rows(conn, limit=limit, order="newest")))
                seen = last_id(conn)
            if not rows and not follow:
                err_console.print(f"The audit log at {path} has no requests yet.")
            _emit(rows, json_output, header=True)
            if follow:
                _follow(store, seen, json_output, header_shown=bool(rows))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    except BrokenPipeError:
        _quiet_broken_pipe()


def _follow(store: AuditStore, seen: int, json_output: bool, *, header_shown: bool) -> None:
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
            _emit(rows, json_output, header=not header_shown)
            header_shown = True
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
    "  mlx-manager audit query --key laptop --since 1d\n\n"
    "  mlx-manager audit query --since 30d --limit 0 --csv > requests.csv"
)


@app.command(epilog=QUERY_EPILOG)
def query(
    model: ModelOption = None,
    status: Annotated[Optional[Status], typer.Option("--status", "-s", help="Only requests that ended this way.")] = None,
    endpoint: EndpointOption = None,
    backend: BackendOption = None,
    key: KeyOption = None,
    request_id: Annotated[Optional[str], typer.Option("--request-id", "-r", help="Only the request with this id.")] = None,
    since: SinceOption = None,
    until: UntilOption = None,
    limit: LimitOption = 50,
    order: Annotated[
        Literal["newest", "oldest"], typer.Option("--order", help="Newest or oldest requests first.")
    ] = "newest",
    json_output: JsonOption = False,
    csv_output: Annotated[bool, typer.Option("--csv", help="Print CSV with a header line instead of a table.")] = False,
) -> None:
    """Find requests by model, status, endpoint, backend, API key name, request id and time."""
    if json_output and csv_output:
        fail("--json and --csv cannot be used together.", "Pick one output format.", code=EXIT_USAGE)
    filters = _filters(json_output, model=model, status=status, endpoint=endpoint, backend_type=backend,
                       api_key=key, request_id=request_id, since=since, until=until)
    path = _audit_path(json_output)
    store = _open(path, json_output)
    if store is None:
        if csv_output:
            _write_csv([])
        return
    with _audit_errors(json_output), store:
        from mlx_manager.audit.query import query_rows

        with store.read() as conn:
            rows = query_rows(conn, filters, limit=limit, order=order)
    try:
        if csv_output:
            _write_csv(rows)
        elif not rows:
            if not json_output:
                err_console.print("No requests match.")
        else:
            _emit(rows, json_output, header=True)
    except BrokenPipeError:
        _quiet_broken_pipe()


def _write_csv(rows: list[dict[str, Any]]) -> None:
    writer = csv.DictWriter(sys.stdout, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    sys.stdout.flush()


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
        Optional[Literal["model", "endpoint", "status", "backend", "key"]],
        typer.Option("--by", help="One line per model, endpoint, status, backend or API key name."),
    ] = None,
    model: ModelOption = None,
    endpoint: EndpointOption = None,
    backend: BackendOption = None,
    key: KeyOption = None,
    json_output: JsonOption = False,
) -> None:
    """Summarise requests: count, error and timeout rates, p50/p95 duration, time to first token, tokens/s."""
    filters = _filters(json_output, model=model, endpoint=endpoint, backend_type=backend, api_key=key,
                       since=since, until=until)
    path = _audit_path(json_output)
    store = _open(path, json_output)
    if store is None:
        return
    with _audit_errors(json_output), store:
        from mlx_manager.audit.stats import compute_stats

        with store.read() as conn:
            groups = compute_stats(conn, filters, by=by)
    if json_output:
        for group in groups:
            print_json(group)
        return
    if not groups:
        err_console.print("No requests in this window.")
        return
    table = Table(box=box.SIMPLE_HEAD, caption=_window_caption(since, until), caption_justify="left")
    if by:
        table.add_column(by, overflow="fold")
    for header in ("requests", "errors", "timeouts", "cancelled", "p50 ms", "p95 ms", "mean TTFT ms", "tokens/s"):
        table.add_column(header, justify="right", no_wrap=True)
    for group in groups:
        cells = [] if not by else ["-" if group[by] is None else str(group[by])]
        cells += [
            f"{group['requests']:,}",
            _rate(group["errors"], group["error_rate"]),
            _rate(group["timeouts"], group["timeout_rate"]),
            _rate(group["cancelled"], group["cancelled"] / group["requests"]),
            _number(group["p50_duration_ms"]),
            _number(group["p95_duration_ms"]),
            _number(group["mean_ttft_ms"]),
            _number(group["tokens_per_second"], digits=1),
        ]
        table.add_row(*cells)
    console.print(table)


def _window_caption(since: datetime | None, until: datetime | None) -> str:
    start = _utc(since) if since else "the first request"
    end = _utc(until) if until else "now"
    return f"From {start} to {end}. Durations are whole requests; tokens/s is completion tokens per second of request time."


def _rate(count: int, rate: float) -> str:
    return f"{count:,} ({rate:.1%})"


def _number(value: float | None, *, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


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
            except typer.Abort:  # end of input or Ctrl-C at the question
                confirmed = False
            if not confirmed:
                fail("Nothing deleted.", "Pass --yes to prune without the question.", json_output=json_output)
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
        fail(str(exc) + ".", "Move the file aside (the daemon starts a new log) or set audit.path.", json_output=json_output)
    except AuditLogBusy as exc:
        fail(str(exc) + ".", "Try again in a moment.", json_output=json_output)
    except AuditError as exc:
        fail(str(exc) + ".", "Check the file's permissions and free disk space.", json_output=json_output)


def _filters(json_output: bool, **values: Any) -> AuditFilter:
    since, until = values.get("since"), values.get("until")
    if since and until and since >= until:
        fail("--since must be earlier than --until.", code=EXIT_USAGE, json_output=json_output)
    return AuditFilter(**values)


_STATUS_STYLES = {"success": "green", "error": "red", "timeout": "yellow", "cancelled": "magenta"}

# (header, key, justify, min_width): min widths keep --follow rows aligned under the first table.
_TABLE_COLUMNS = (
    ("time (UTC)", "timestamp", "left", 19),
    ("request id", "request_id", "left", 12),
    ("key", "api_key", "left", 6),
    ("model", "model", "left", 16),
    ("endpoint", "endpoint", "left", 20),
    ("status", "status", "left", 9),
    ("http", "http_status", "right", 4),
    ("ms", "duration_ms", "right", 7),
    ("ttft ms", "time_to_first_token_ms", "right", 7),
    ("in", "prompt_tokens", "right", 6),
    ("out", "completion_tokens", "right", 6),
    ("error", "error_type", "left", 5),
)


def _emit(rows: list[dict[str, Any]], json_output: bool, *, header: bool) -> None:
    if json_output:
        for row in rows:
            print_json(row)
        sys.stdout.flush()
        return
    if not rows:
        return
    table = Table(box=box.SIMPLE_HEAD, show_header=header, show_edge=False, pad_edge=False)
    for title, _key, justify, width in _TABLE_COLUMNS:
        table.add_column(title, justify=justify, min_width=width, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(key, row[key]) for _title, key, _justify, _width in _TABLE_COLUMNS))
    console.print(table)
    console.file.flush()


def _cell(key: str, value: Any) -> str | Text:
    if value is None:
        return "-"
    if key == "timestamp":
        return value[:19].replace("T", " ")
    if key == "status":
        return Text(value, style=_STATUS_STYLES.get(value, ""))
    if key in ("duration_ms", "time_to_first_token_ms"):
        return f"{value:,.0f}"
    if isinstance(value, int) and key != "http_status":
        return f"{value:,}"
    return str(value)


def _utc(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _iso(value: datetime) -> str:
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")

