"""Which audit rows a caller wants, and the parsing of the time forms users type (`30m`, `7d`, ISO dates).

Pure Python, no SQL: `query.select_rows` turns an `AuditFilter` into bound-parameter SQL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)

AGE_FORMS = "a duration like 90s, 30m, 2h, 7d or 2w"
TIME_FORMS = (
    f"{AGE_FORMS} (that long ago), or an ISO date or time like 2026-05-01 or 2026-05-01T12:00:00Z"
    " (UTC unless it has an offset)"
)


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Exact-match filters plus a time window [since, until). None means "any"."""

    model: str | None = None
    status: str | None = None
    endpoint: str | None = None
    backend_type: str | None = None
    backend: str | None = None  # a backend's name, or a backend type (rows of every backend of that type)
    request_id: str | None = None
    api_key: str | None = None  # the key's name
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise ValueError(f"AuditFilter.{name} must be timezone-aware")


def parse_age(text: str) -> timedelta:
    """`30m` -> 30 minutes. Raises ValueError naming the accepted forms."""
    match = _AGE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration: use {AGE_FORMS}")
    amount, unit = float(match.group(1)), match.group(2).lower()
    if amount <= 0:
        raise ValueError(f"{text!r} is not a duration: use {AGE_FORMS}")
    return timedelta(**{_UNITS[unit]: amount})


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """A point in time: a duration means that long before `now`; an ISO date or time is taken as is.

    Naive ISO values are UTC, like every time the audit log shows. Returns an aware UTC datetime.
    """
    now = now or datetime.now(UTC)
    try:
        return now - parse_age(text)
    except ValueError:
        pass
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a time: use {TIME_FORMS}") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)
