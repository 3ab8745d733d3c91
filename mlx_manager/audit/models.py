"""The `audit_logs` table as a SQLModel class: what queries select from and inserts write to.

The schema on disk is made by the named migrations in `migrations.py`, not by `create_all`;
a test checks that the migrated database and this class agree.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import Index, String
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

from mlx_manager.audit.record import format_timestamp, parse_timestamp


class UTCTimestamp(TypeDecorator):
    """An aware datetime stored as fixed-width UTC text (`2026-05-01T12:00:00.000000Z`).

    Text order is time order, so range filters use the index; `sqlite3 audit.db` shows readable times.
    """

    impl = String
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> str | None:
        return None if value is None else format_timestamp(value)

    def process_result_value(self, value: str | None, dialect: Any) -> datetime | None:
        return None if value is None else parse_timestamp(value)


class AuditLog(SQLModel, table=True):
    """One API request: which key asked which model, when, how it ended, how long it took, how many tokens."""

    __tablename__: ClassVar[str] = "audit_logs"  # type: ignore[misc]
    __table_args__ = (
        Index("ix_audit_logs_timestamp", "timestamp"),
        # (column, timestamp): an equality filter plus a time window plus newest-first ordering
        # is one index range scan, whatever the table size.
        Index("ix_audit_logs_model", "model", "timestamp"),
        Index("ix_audit_logs_backend_type", "backend_type", "timestamp"),
        Index("ix_audit_logs_status", "status", "timestamp"),
        Index("ix_audit_logs_request_id", "request_id"),
        Index("ix_audit_logs_api_key", "api_key", "timestamp"),
        # AUTOINCREMENT: ids are never reused after a prune, so `tail --follow` can poll `id > last`.
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, primary_key=True)
    request_id: str
    timestamp: datetime = Field(sa_type=UTCTimestamp)
    model: str | None = None  # None: the request named no model
    backend_type: str = "local"
    endpoint: str
    status: str
    http_status: int | None = None  # None: no response was sent
    duration_ms: float
    time_to_first_token_ms: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    error_type: str | None = None
    # Last because migration 0003 added it (ALTER TABLE appends): the name of the API key the
    # request was made with, never the key itself; None without keys or before one matched.
    api_key: str | None = None
