"""What one audit row says about one API request, as plain Python (no SQL here).

This module and `filters` are cheap to import: the CLI uses their names at import time,
while SQLAlchemy is only loaded by the store, the query functions and the writer.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

Status = Literal["success", "error", "timeout", "cancelled"]
Backend = Literal["local", "openai", "anthropic"]

STATUSES: tuple[str, ...] = ("success", "error", "timeout", "cancelled")
# `local` is the only backend today; the others are reserved for the cloud providers to come.
BACKENDS: tuple[str, ...] = ("local", "openai", "anthropic")

# Every column of a stored row, in display order. There is deliberately no text column:
# prompts, messages, completions and embedding inputs are never stored.
COLUMNS: tuple[str, ...] = (
    "id",
    "request_id",
    "timestamp",
    "model",
    "backend_type",
    "endpoint",
    "status",
    "http_status",
    "duration_ms",
    "time_to_first_token_ms",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "error_type",
    "api_key",  # last: migration 0003 appended it to the table
)
# What an insert supplies: every column but `id`, which SQLite assigns.
INSERT_COLUMNS: tuple[str, ...] = COLUMNS[1:]


@dataclass(slots=True, kw_only=True)
class AuditRecord:
    """One finished API request, as the daemon hands it to `AuditWriter.record` (keywords only).

    `timestamp` is when the request arrived, timezone-aware (converted to UTC here).
    `model` is None when the request named none (for instance an invalid body); `http_status`
    is None when no response was sent (the client went away first). Token counts given as
    None count as 0; `total_tokens` defaults to prompt + completion.
    `time_to_first_token_ms` is set for streams; `error_type` for failures: a short kind such
    as `timeout` or `model_not_found`, never a message that could echo user input.
    `api_key` is the NAME of the API key the request was made with (`keys add NAME`, or the
    keyring's name for a key from auth.keys_file or MLX_MANAGER_API_KEY), never the key or its
    hash; None when the daemon has no keys or the request was refused before a key matched.
    """

    request_id: str
    timestamp: datetime
    endpoint: str
    status: Status
    duration_ms: float
    model: str | None = None
    backend_type: Backend = "local"
    http_status: int | None = None
    time_to_first_token_ms: float | None = None
    prompt_tokens: int | None = 0
    completion_tokens: int | None = 0
    total_tokens: int | None = None
    error_type: str | None = None
    api_key: str | None = None

    def __post_init__(self) -> None:
        if self.timestamp.tzinfo is None or self.timestamp.utcoffset() is None:
            raise ValueError("AuditRecord.timestamp must be timezone-aware")
        if self.timestamp.tzinfo is not timezone.utc:
            self.timestamp = self.timestamp.astimezone(timezone.utc)
        if self.status not in STATUSES:
            raise ValueError(f"AuditRecord.status must be one of {', '.join(STATUSES)}, not {self.status!r}")
        if self.backend_type not in BACKENDS:
            raise ValueError(f"AuditRecord.backend_type must be one of {', '.join(BACKENDS)}, not {self.backend_type!r}")
        self.prompt_tokens = self.prompt_tokens or 0
        self.completion_tokens = self.completion_tokens or 0
        if self.total_tokens is None:
            self.total_tokens = self.prompt_tokens + self.completion_tokens

    def values(self) -> tuple[Any, ...]:
        """The stored values in `INSERT_COLUMNS` order, the timestamp as its stored text."""
        return (
            self.request_id,
            format_timestamp(self.timestamp),
            self.model,
            self.backend_type,
            self.endpoint,
            self.status,
            self.http_status,
            self.duration_ms,
            self.time_to_first_token_ms,
            self.prompt_tokens,
            self.completion_tokens,
            self.total_tokens,
            self.error_type,
            self.api_key,
        )


def format_timestamp(value: datetime) -> str:
    """The one text form of a UTC time: stored in the database, printed by --json and the live feed.

    Fixed width, so text order is time order and the timestamp index serves range queries.
    """
    if value.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_timestamp(text: str) -> datetime:
    """The inverse of `format_timestamp` (an aware UTC datetime)."""
    return datetime.fromisoformat(text)
