"""The audit log's statements: the one filtered row query, plus the insert and the batched delete.

`select_rows` is pure (it only builds a statement, every value a bound parameter) and serves
`audit tail`, `audit query`, `audit stats` (through `filter_clauses`) and the daemon alike.
Rows come back as JSON-ready dicts in `COLUMNS` order, the timestamp as its stored UTC text.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Connection, Select, String, delete, func, select, type_coerce
from sqlalchemy.sql.elements import ColumnElement

from mlx_manager.audit.filters import AuditFilter
from mlx_manager.audit.models import AuditLog
from mlx_manager.audit.record import COLUMNS, INSERT_COLUMNS

TABLE = AuditLog.__table__

Order = Literal["newest", "oldest"]
ORDERS: tuple[str, ...] = ("newest", "oldest")

_FILTER_COLUMNS = {
    "model": TABLE.c.model,
    "status": TABLE.c.status,
    "endpoint": TABLE.c.endpoint,
    "backend_type": TABLE.c.backend_type,
    "request_id": TABLE.c.request_id,
    "api_key": TABLE.c.api_key,
}

# Timestamps are selected as their stored text: callers want JSON, not datetime objects.
_ROW_COLUMNS = [
    type_coerce(TABLE.c.timestamp, String).label("timestamp") if name == "timestamp" else TABLE.c[name]
    for name in COLUMNS
]


_INSERT = (
    f"INSERT INTO {TABLE.name} ({', '.join(INSERT_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in INSERT_COLUMNS)})"
)


def filter_clauses(filters: AuditFilter | None) -> list[ColumnElement[bool]]:
    """The WHERE conditions for a filter: exact matches and the half-open window [since, until)."""
    if filters is None:
        return []
    clauses: list[ColumnElement[bool]] = []
    for name, column in _FILTER_COLUMNS.items():
        value = getattr(filters, name)
        if value is not None:
            clauses.append(column == value)
    if filters.since is not None:
        clauses.append(TABLE.c.timestamp >= filters.since)
    if filters.until is not None:
        clauses.append(TABLE.c.timestamp < filters.until)
    return clauses


def select_rows(
    filters: AuditFilter | None = None,
    *,
    limit: int | None = 20,
    order: Order = "newest",
    after_id: int | None = None,
) -> Select:
    """The statement for the rows a filter selects.

    `order` sorts by request time (ties by id). With `after_id`, only rows written after that
    id are selected, in the order they were written (what `tail --follow` polls for).
    `limit` None or 0 means every row.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, not {order!r}")
    statement = select(*_ROW_COLUMNS).where(*filter_clauses(filters))
    if after_id is not None:
        statement = statement.where(TABLE.c.id > after_id).order_by(TABLE.c.id)
    elif order == "newest":
        statement = statement.order_by(TABLE.c.timestamp.desc(), TABLE.c.id.desc())
    else:
        statement = statement.order_by(TABLE.c.timestamp, TABLE.c.id)
    if limit:
        statement = statement.limit(limit)
    return statement


def query_rows(
    conn: Connection,
    filters: AuditFilter | None = None,
    *,
    limit: int | None = 20,
    order: Order = "newest",
    after_id: int | None = None,
) -> list[dict[str, Any]]:
    """Run `select_rows` and return the rows as dicts."""
    result = conn.execute(select_rows(filters, limit=limit, order=order, after_id=after_id))
    return [dict(row._mapping) for row in result]


def count_rows(conn: Connection, filters: AuditFilter | None = None) -> int:
    return conn.execute(select(func.count()).select_from(TABLE).where(*filter_clauses(filters))).scalar_one()


def last_id(conn: Connection) -> int:
    """The id of the newest written row (0 when the log is empty)."""
    return conn.execute(select(func.coalesce(func.max(TABLE.c.id), 0))).scalar_one()


def insert_rows(conn: Connection, rows: Sequence[tuple[Any, ...]]) -> int:
    """Insert rows given as `AuditRecord.values()` tuples; return the id of the last one.

    One executemany straight to the driver inside the caller's transaction: at tens of
    thousands of rows a second, SQLAlchemy's per-row parameter processing would be the cost.
    Under the write lock SQLite gives the rows consecutive ids: `last - len(rows) + 1 .. last`.
    """
    conn.exec_driver_sql(_INSERT, list(rows))
    return conn.exec_driver_sql("SELECT last_insert_rowid()").scalar_one()


def delete_older_batch(conn: Connection, before: datetime, batch_size: int) -> int:
    """Delete at most `batch_size` rows older than `before`; return how many went."""
    oldest = select(TABLE.c.id).where(TABLE.c.timestamp < before).limit(batch_size)
    return conn.execute(delete(TABLE).where(TABLE.c.id.in_(oldest))).rowcount
