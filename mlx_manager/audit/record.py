"""What one audit row says about one API request: the ONE definition of the audit columns.

`AuditRecord`'s fields are the stored columns, in table order; everything else derives from
them: the insert statement, the row dicts of queries and of the live feed (`COLUMNS`, the
`--json` keys), the CSV header and the CLI's table columns (each field's `Column` says how it
is shown). The schema itself is made only by the migrations in `migrations.py`.

Adding a column takes two edits:

1. a migration in `migrations.py` (`ALTER TABLE audit_logs ADD COLUMN kind VARCHAR`: it
   appends, so the field goes last);
2. one field here, last: `kind: str | None = column(header="kind", position=115, priority=9)`.

(Only a column that `audit stats` should group or filter by also needs the rollup: a migration
that adds it to `audit_rollup` and empties that table, and its name in `rollup.DIMENSIONS`.)

A test opens a blank database and checks that its columns are these fields, with the same
NULL rules. This module is plain Python (no SQL library), cheap enough for the CLI to import.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any, Literal

Status = Literal["success", "error", "timeout", "cancelled"]
Backend = Literal["local", "openai", "anthropic"]

STATUSES: tuple[str, ...] = ("success", "error", "timeout", "cancelled")
# The backend types: the engine here, or an upstream server routed to (`routing.backends`).
BACKENDS: tuple[str, ...] = ("local", "openai", "anthropic")

# How a value is printed in a table: the CLI has one renderer per kind.
Kind = Literal["time", "id", "text", "model", "status", "code", "ms", "count", "flag"]


@dataclass(frozen=True, slots=True)
class Column:
    """How one stored column is checked and shown.

    `nullable` is the schema's rule (a test compares it with the migrated table; a record
    whose NOT NULL column is unset is refused before it is queued). In tables, columns appear
    in `position` order; when the terminal is too narrow the ones with the highest `priority`
    go first, never those with priority 0 (they identify a row); priority None means only with
    `--wide` (or when the user filtered by that column). `width` is the minimum width.
    """

    header: str
    kind: Kind = "text"
    nullable: bool = True
    position: int = 0
    priority: int | None = None
    width: int = 0

    @property
    def justify(self) -> Literal["left", "right"]:
        return "right" if self.kind in ("code", "ms", "count") else "left"


def column(default: Any = None, *, default_factory: Any = MISSING, **spec: Any) -> Any:
    """A record field with its `Column` spec in the dataclass field's metadata."""
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata={"column": Column(**spec)})
    return field(default=default, metadata={"column": Column(**spec)})


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(kw_only=True)
class AuditRecord:
    """One API request, as the daemon hands it to `AuditWriter.record` (keywords only).

    Every field has a default so a record can be filled in while its request runs (the daemon's
    `RequestOutcome` extends this class with fields of its own, which are not stored). Nothing
    is checked until the row is taken (`row()`, `values()`, `AuditWriter.record()`): then
    `timestamp` must be timezone-aware (stored as UTC), `status` one of STATUSES, the NOT NULL
    columns set; token counts left None count as 0 and `total_tokens` defaults to prompt +
    completion.

    `timestamp` is when the request arrived. `model` is None when the request named none (for
    instance an invalid body); `http_status` is None when no response was sent (the client went
    away first). `time_to_first_token_ms` is set for streams; `error_type` for failures: a short
    kind such as `timeout` or `model_not_found`, never a message that could echo user input.
    `api_key` is the NAME of the API key the request was made with (`keys add NAME`, or the
    keyring's name for a key from auth.keys_file or MLX_MANAGER_API_KEY), never the key or its
    hash; None when the daemon has no keys or the request was refused before a key matched.

    There is deliberately no text field: prompts, messages, completions and embedding inputs
    are never stored.
    """

    request_id: str | None = column(header="request id", kind="id", nullable=False, position=20, priority=0, width=10)
    timestamp: datetime = column(
        default_factory=_now, header="time (UTC)", kind="time", nullable=False, position=10, priority=0, width=19
    )
    model: str | None = column(header="model", kind="model", position=40, priority=2, width=16)
    backend_type: Backend = column("local", header="type", nullable=False, position=45)
    endpoint: str | None = column(header="endpoint", nullable=False, position=50, priority=7, width=20)
    status: Status | None = column(header="status", kind="status", nullable=False, position=60, priority=1, width=9)
    http_status: int | None = column(header="http", kind="code", position=70, priority=4, width=4)
    duration_ms: float | None = column(header="ms", kind="ms", nullable=False, position=80, priority=3, width=7)
    time_to_first_token_ms: float | None = column(header="ttft ms", kind="ms", position=90, priority=10, width=7)
    prompt_tokens: int | None = column(header="in", kind="count", nullable=False, position=100, priority=9, width=6)
    completion_tokens: int | None = column(
        header="out", kind="count", nullable=False, position=101, priority=8, width=6
    )
    total_tokens: int | None = column(header="total", kind="count", nullable=False, position=102, width=6)
    error_type: str | None = column(header="error", position=110, priority=5, width=5)
    # Last because migration 0003 appended it (ALTER TABLE adds at the end).
    api_key: str | None = column(header="key", position=30, priority=6, width=6)
    # Migration 0005: what a generation did (None for other requests and for older rows).
    cached_tokens: int | None = column(header="cached", kind="count", position=103, width=6)
    reasoning_tokens: int | None = column(header="think", kind="count", position=104, width=6)
    tools_offered: bool | None = column(header="tools", kind="flag", position=105)
    tool_calls: int | None = column(header="calls", kind="count", position=106, width=5)
    constrained: bool | None = column(header="json", kind="flag", position=107)
    # Migration 0006 (routing): the backend that served it by name (`local`, or a backend of
    # routing.backends; unset, its type), and the tokens the upstream reported (None: local, or
    # the upstream said nothing, e.g. its stream was cut).
    backend: str | None = column(header="backend", nullable=False, position=44, width=7)
    upstream_prompt_tokens: int | None = column(header="up in", kind="count", position=108, width=6)
    upstream_completion_tokens: int | None = column(header="up out", kind="count", position=109, width=6)

    def row(self) -> dict[str, Any]:
        """The values to store, by column name: checked and normalised now. Raises ValueError."""
        return dict(zip(INSERT_COLUMNS, self.values(), strict=True))

    def values(self) -> tuple[Any, ...]:
        """The values to store, in `INSERT_COLUMNS` order (what the insert statement binds).

        Checked and normalised now (see the class docstring); raises ValueError.
        """
        row = list(_read_fields(self))
        timestamp = row[_AT["timestamp"]]
        if not isinstance(timestamp, datetime) or timestamp.utcoffset() is None:
            raise ValueError(f"AuditRecord.timestamp must be a timezone-aware datetime, not {timestamp!r}")
        row[_AT["timestamp"]] = format_timestamp(timestamp)
        status = row[_AT["status"]]
        if status is not None and status not in STATUSES:
            raise ValueError(f"AuditRecord.status must be one of {', '.join(STATUSES)}, not {status!r}")
        if row[_AT["backend_type"]] not in BACKENDS:
            raise ValueError(
                f"AuditRecord.backend_type must be one of {', '.join(BACKENDS)}, not {row[_AT['backend_type']]!r}"
            )
        if row[_AT["backend"]] is None:  # the only backend of its type: local, or a row made without routing
            row[_AT["backend"]] = row[_AT["backend_type"]]
        prompt = row[_AT["prompt_tokens"]] = row[_AT["prompt_tokens"]] or 0
        completion = row[_AT["completion_tokens"]] = row[_AT["completion_tokens"]] or 0
        if row[_AT["total_tokens"]] is None:
            row[_AT["total_tokens"]] = prompt + completion
        for name, at in _REQUIRED:
            if row[at] is None:
                raise ValueError(f"AuditRecord.{name} is not set")
        return tuple(row)


def format_timestamp(value: datetime) -> str:
    """The one text form of a UTC time: stored in the database, printed by --json and the live feed.

    Fixed width (`2026-05-01T12:00:00.000000Z`), so text order is time order and the timestamp
    index serves range queries.
    """
    if value.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


# Derived from the fields above: do not write these lists out by hand anywhere else.
SPECS: dict[str, Column] = {f.name: f.metadata["column"] for f in fields(AuditRecord)}
# What an insert supplies: every stored column but `id`, which SQLite assigns.
INSERT_COLUMNS: tuple[str, ...] = tuple(SPECS)
# Every column of a stored row, in table order: the keys of query rows, feed rows and --json.
COLUMNS: tuple[str, ...] = ("id", *INSERT_COLUMNS)
_AT: dict[str, int] = {name: at for at, name in enumerate(INSERT_COLUMNS)}
_REQUIRED: tuple[tuple[str, int], ...] = tuple((name, _AT[name]) for name, spec in SPECS.items() if not spec.nullable)
_read_fields = attrgetter(*INSERT_COLUMNS)
