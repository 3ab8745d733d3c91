"""The audit log's statements: the one filtered row query, plus the insert and the batched delete.

Statements are plain SQL built from the record's column names, with every value a bound
parameter (never a user's string in the SQL). `select_rows` is pure and serves `audit tail`,
`audit query`, `audit stats` (through `where`) and the daemon alike.

The functions that run them take any connection with `sqlite3.Connection`'s `execute` and
`executemany`: the CLI passes its `sqlite3` connection, the daemon's writer a SQLAlchemy one
behind a thin adapter (so its statements are traced). Rows come back as JSON-ready dicts keyed
by `COLUMNS`, the timestamp as its stored UTC text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

from mlx_manager.audit.filters import AuditFilter
from mlx_manager.audit.record import COLUMNS, INSERT_COLUMNS, format_timestamp

TABLE = "audit_logs"
ROLLUP_TABLE = "audit_rollup"
MINUTES_TABLE = "audit_minutes"
MINUTES_DONE_TABLE = "audit_minutes_done"

Order = Literal["newest", "oldest"]
ORDERS: tuple[str, ...] = ("newest", "oldest")

# The exact-match filters of AuditFilter: each is a column of the same name.
FILTER_COLUMNS: tuple[str, ...] = ("model", "status", "endpoint", "backend_type", "request_id", "api_key")
assert set(FILTER_COLUMNS) <= set(COLUMNS)

_INSERT = f"INSERT INTO {TABLE} ({', '.join(INSERT_COLUMNS)}) VALUES ({', '.join('?' for _ in INSERT_COLUMNS)})"
_TIMESTAMP_AT = INSERT_COLUMNS.index("timestamp")


class Connection(Protocol):
    """What the functions below need of a connection (`sqlite3.Connection` has it): `execute`
    returning a cursor (iterable, `fetchone`, `fetchall`, `rowcount`) and `executemany`."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Any: ...

    def executemany(self, sql: str, parameters: Any, /) -> Any: ...


@dataclass(frozen=True, slots=True)
class Statement:
    """SQL text with `?` placeholders and the values bound to them."""

    sql: str
    params: tuple[Any, ...] = ()


def matches(filters: AuditFilter, columns: tuple[str, ...] = FILTER_COLUMNS) -> tuple[list[str], list[Any]]:
    """The conditions (and their values) of a filter's exact matches on `columns`, and its backend
    (by name or by type): what the rows and the rollup are both selected by."""
    clauses: list[str] = []
    params: list[Any] = []
    for name in columns:
        value = getattr(filters, name)
        if value is not None:
            clauses.append(f"{name} = ?")
            params.append(value)
    if filters.backend is not None:
        clauses.append("(backend = ? OR backend_type = ?)")
        params += [filters.backend, filters.backend]
    return clauses, params


def where(filters: AuditFilter | None) -> Statement:
    """The WHERE clause (or "") for a filter: exact matches and the half-open window [since, until)."""
    if filters is None:
        return Statement("")
    clauses, params = matches(filters)
    if filters.since is not None:
        clauses.append("timestamp >= ?")
        params.append(format_timestamp(filters.since))
    if filters.until is not None:
        clauses.append("timestamp < ?")
        params.append(format_timestamp(filters.until))
    return Statement(" WHERE " + " AND ".join(clauses) if clauses else "", tuple(params))


def select_rows(
    filters: AuditFilter | None = None,
    *,
    limit: int | None = 20,
    order: Order = "newest",
    after_id: int | None = None,
) -> Statement:
    """The statement for the rows a filter selects.

    `order` sorts by request time (ties by id). With `after_id`, only rows written after that
    id are selected, in the order they were written (what `tail --follow` polls for).
    `limit` None or 0 means every row.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, not {order!r}")
    condition = where(filters)
    sql = f"SELECT {', '.join(COLUMNS)} FROM {TABLE}{condition.sql}"
    params = list(condition.params)
    if after_id is not None:
        sql += (" AND" if condition.sql else " WHERE") + " id > ? ORDER BY id"
        params.append(after_id)
    elif order == "newest":
        sql += " ORDER BY timestamp DESC, id DESC"
    else:
        sql += " ORDER BY timestamp, id"
    if limit:
        sql += " LIMIT ?"
        params.append(limit)
    return Statement(sql, tuple(params))


def query_rows(
    conn: Connection,
    filters: AuditFilter | None = None,
    *,
    limit: int | None = 20,
    order: Order = "newest",
    after_id: int | None = None,
) -> list[dict[str, Any]]:
    """Run `select_rows` and return the rows as dicts."""
    statement = select_rows(filters, limit=limit, order=order, after_id=after_id)
    return [dict(zip(COLUMNS, row, strict=True)) for row in conn.execute(statement.sql, statement.params)]


def backend_names(conn: Connection) -> list[str]:
    """The backends the log has rows of, by name: one index seek each, not a scan of the rows."""
    names: list[str] = []
    (name,) = conn.execute(f"SELECT min(backend) FROM {TABLE}").fetchone()
    while name is not None:
        names.append(name)
        (name,) = conn.execute(f"SELECT min(backend) FROM {TABLE} WHERE backend > ?", (name,)).fetchone()
    return names


def count_rows(conn: Connection, filters: AuditFilter | None = None) -> int:
    condition = where(filters)
    return conn.execute(f"SELECT count(*) FROM {TABLE}{condition.sql}", condition.params).fetchone()[0]


def last_id(conn: Connection) -> int:
    """The id of the newest written row (0 when the log is empty)."""
    return conn.execute(f"SELECT coalesce(max(id), 0) FROM {TABLE}").fetchone()[0]


def insert_rows(conn: Connection, rows: Sequence[tuple[Any, ...]]) -> int:
    """Insert rows given as `AuditRecord.values()` tuples; return the id of the last one.

    One executemany inside the caller's transaction. Under the write lock SQLite gives the rows
    consecutive ids: `last - len(rows) + 1 .. last`. The days the rows fall on lose their
    rollup (it no longer counts every request of those days), and their minutes their mark of
    being rolled up (the writer rolls them up again).
    """
    conn.executemany(_INSERT, rows)
    last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
    stamps = [row[_TIMESTAMP_AT] for row in rows if isinstance(row[_TIMESTAMP_AT], str)]
    days = sorted({stamp[:10] for stamp in stamps})
    if days:
        conn.execute(f"DELETE FROM {ROLLUP_TABLE} WHERE day IN ({', '.join('?' for _ in days)})", days)
    minutes = sorted({stamp[:16] for stamp in stamps})
    if minutes:
        conn.execute(f"DELETE FROM {MINUTES_DONE_TABLE} WHERE minute IN ({', '.join('?' for _ in minutes)})", minutes)
    return last


def delete_older_batch(conn: Connection, before: datetime, batch_size: int) -> int:
    """Delete at most `batch_size` rows older than `before`; return how many went.

    The rollup of every day up to `before`'s goes with them (those days lost requests).
    """
    cutoff = format_timestamp(before)
    deleted = conn.execute(
        f"DELETE FROM {TABLE} WHERE id IN (SELECT id FROM {TABLE} WHERE timestamp < ? LIMIT ?)", (cutoff, batch_size)
    ).rowcount
    if deleted:
        conn.execute(f"DELETE FROM {ROLLUP_TABLE} WHERE day <= ?", (cutoff[:10],))
        conn.execute(f"DELETE FROM {MINUTES_DONE_TABLE} WHERE minute <= ?", (cutoff[:16],))
    return deleted
