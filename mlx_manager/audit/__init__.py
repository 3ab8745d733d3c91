"""The request audit log: one SQLite row per API request, never its text. Only this package knows SQL.

The daemon's side (see `writer.py` for the details):

    from mlx_manager.audit import AuditRecord, AuditWriter

    audit_writer = AuditWriter(settings.audit_path())
    await audit_writer.start()                  # creates (0600) and migrates the database
    audit_writer.record(AuditRecord(request_id=..., timestamp=datetime.now(timezone.utc),
                                    model=..., endpoint="/v1/chat/completions", status="success",
                                    http_status=200, duration_ms=..., prompt_tokens=..., ...))
                                                # takes the values now; the caller may keep the object
    audit_writer.backlog                        # rows queued, not yet committed (a metric)
    await audit_writer.prune(timedelta(days=settings.audit.retention_days))
    async with audit_writer.subscribe() as feed:    # the WebSocket live feed
        async for row in feed: await websocket.send_json(row)
    await audit_writer.stop()                   # flushes every queued row

The CLI's side: `AuditStore.open(path, create=False)` (the standard library's `sqlite3`, no
SQLAlchemy), then `query_rows`, `compute_stats`, `count_older` / `prune_older` on it. Errors are
the `AuditError` family in `errors.py`. The columns are defined once, by `AuditRecord`'s fields
(`record.py`).

Names are loaded on first use, so importing the package costs nothing; only `writer` imports
SQLAlchemy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AuditRecord": "record",
    "STATUSES": "record",
    "BACKENDS": "record",
    "COLUMNS": "record",
    "AuditFilter": "filters",
    "parse_age": "filters",
    "parse_time": "filters",
    "AuditError": "errors",
    "AuditLogMissing": "errors",
    "AuditLogCorrupt": "errors",
    "AuditLogBusy": "errors",
    "AuditLogUnavailable": "errors",
    "AuditStore": "store",
    "select_rows": "query",
    "query_rows": "query",
    "count_rows": "query",
    "compute_stats": "stats",
    "count_older": "prune",
    "prune_older": "prune",
    "last_used_by_model": "last_used",
    "AuditWriter": "writer",
    "AuditFeed": "writer",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from mlx_manager.audit.errors import AuditError, AuditLogBusy, AuditLogCorrupt, AuditLogMissing, AuditLogUnavailable
    from mlx_manager.audit.filters import AuditFilter, parse_age, parse_time
    from mlx_manager.audit.last_used import last_used_by_model
    from mlx_manager.audit.prune import count_older, prune_older
    from mlx_manager.audit.query import count_rows, query_rows, select_rows
    from mlx_manager.audit.record import BACKENDS, COLUMNS, STATUSES, AuditRecord
    from mlx_manager.audit.stats import compute_stats
    from mlx_manager.audit.store import AuditStore
    from mlx_manager.audit.writer import AuditFeed, AuditWriter


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
