"""The per-day rollup (table `audit_rollup`): `audit stats` reads ~groups rows per closed day, not every request.

A rollup row sums one UTC day's requests of one (model, endpoint, status, backend type, key, backend) and
keeps their durations, sorted, in whole microseconds: the numbers `audit stats` shows come out
the same as from the requests themselves, exact percentiles included.

It is a cache. The daemon's writer fills it (one day at a time, between batches of rows: the
reads of `refresh_step` in a read transaction, `plan_step`, then its writes in a short write
transaction, `apply_step`, so no commit waits for the reads); inserting or deleting requests
drops the rollup of their days (`query.insert_rows`, `query.delete_older_batch`); a reader uses
a day's rollup only when it exists and reads the requests of every other day. Each time the
writer starts it also checks every rolled-up day's count once, so a program that changed the
table without knowing the rollup (an older version) cannot leave wrong numbers behind for long.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from mlx_manager.audit.filters import AuditFilter
from mlx_manager.audit.query import ROLLUP_TABLE, TABLE, Connection, matches, where

# What a rollup row is per: every column `audit stats` groups or filters by, except the time.
DIMENSIONS: tuple[str, ...] = ("model", "endpoint", "status", "backend_type", "api_key", "backend")

_SUMS = (
    "count(*), count(time_to_first_token_ms), sum(time_to_first_token_ms),"
    " coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0),"
    " sum(CASE WHEN completion_tokens > 0 THEN duration_ms END)"
)
# Whole microseconds, as integers: SQLite prints integers far faster than floats.
_DURATIONS = "group_concat(CAST(duration_ms * 1000 AS INTEGER))"
_STATUSES = "sum(status = 'error'), sum(status = 'timeout'), sum(status = 'cancelled')"


@dataclass(slots=True)
class Partial:
    """Summary numbers of some requests of one group: summed with others into one stats line."""

    requests: int = 0
    errors: int = 0
    timeouts: int = 0
    cancelled: int = 0
    ttft_count: int = 0
    ttft_ms: list[float] = field(default_factory=list)  # partial sums, added exactly at the end
    prompt_tokens: int = 0
    completion_tokens: int = 0
    producing_ms: list[float] = field(default_factory=list)  # likewise
    durations: list[array[int]] = field(default_factory=list)  # sorted runs, whole microseconds


def requests_partials(conn: Connection, filters: AuditFilter, group: str | None) -> dict[Any, Partial]:
    """The requests a filter selects, one Partial per value of the `group` column (or one, under None)."""
    condition = where(filters)
    key = group or "NULL"
    sql = f"SELECT {key}, {_SUMS}, {_STATUSES}, {_DURATIONS} FROM {TABLE}{condition.sql}"
    if group:
        # `+`: group with a temporary b-tree, over the rows the WHERE finds by time; grouping by
        # the column itself lets SQLite walk its whole (column, timestamp) index instead.
        sql += f" GROUP BY +{group}"
    partials: dict[Any, Partial] = {}
    for (
        value,
        requests,
        ttft_count,
        ttft,
        prompt,
        completion,
        producing,
        errors,
        timeouts,
        cancelled,
        durations,
    ) in conn.execute(sql, condition.params):
        if not requests:
            continue  # the plain aggregate over no rows
        part = partials.setdefault(value, Partial())
        part.requests += requests
        part.errors += errors
        part.timeouts += timeouts
        part.cancelled += cancelled
        _add_sums(part, ttft_count, ttft, prompt, completion, producing)
        part.durations.append(array("q", sorted(map(int, durations.split(",")))))
    return partials


def rollup_partials(
    conn: Connection, first_day: str, end_day: str, filters: AuditFilter, group: str | None, into: dict[Any, Partial]
) -> None:
    """Add the rollup of days [first_day, end_day) to `into`, per value of `group`; `filters`' time is ignored."""
    exact, values = matches(filters, tuple(name for name in DIMENSIONS if name != "backend"))
    clauses = ["day >= ?", "day < ?", *exact]
    params: list[Any] = [first_day, end_day, *values]
    key = group or "NULL"
    where_days = " AND ".join(clauses)
    sums = conn.execute(
        f"SELECT {key}, sum(requests), sum(requests * (status = 'error')), sum(requests * (status = 'timeout')),"
        f" sum(requests * (status = 'cancelled')), sum(ttft_count), sum(ttft_ms), sum(prompt_tokens),"
        f" sum(completion_tokens), sum(producing_ms) FROM {ROLLUP_TABLE} WHERE {where_days} GROUP BY +{key}",
        params,
    )
    for value, requests, errors, timeouts, cancelled, ttft_count, ttft, prompt, completion, producing in sums:
        part = into.setdefault(value, Partial())
        part.requests += requests
        part.errors += errors
        part.timeouts += timeouts
        part.cancelled += cancelled
        _add_sums(part, ttft_count, ttft, prompt, completion, producing)
    for value, blob in conn.execute(f"SELECT {key}, durations FROM {ROLLUP_TABLE} WHERE {where_days}", params):
        into[value].durations.append(_unpack(blob))


def rolled_up_days(conn: Connection, since: datetime | None, until: datetime | None) -> list[str]:
    """The days, oldest first, that lie wholly in [since, until) and have a rollup."""
    first = day_of(since) if since else ""
    end = day_of(until + timedelta(days=1)) if until else "~"
    days = [
        d
        for (d,) in conn.execute(
            f"SELECT DISTINCT day FROM {ROLLUP_TABLE} WHERE day >= ? AND day < ? ORDER BY day", (first, end)
        )
    ]
    return [
        day
        for day in days
        if (since is None or start_of(day) >= since) and (until is None or start_of(next_day(day)) <= until)
    ]


# -- the writer's side ---------------------------------------------------------------------


def refresh_step(conn: Connection, today: str, checked: set[str]) -> bool:
    """Bring one day's rollup up to date, inside the caller's write transaction; False when all are.

    Days before `today` (UTC) with requests and no rollup are built; a rolled-up day not in
    `checked` is counted once (then added to it) and rebuilt if its requests changed behind the
    rollup's back; rollups of days that no longer have any request are dropped.
    """
    return apply_step(conn, plan_step(conn, today, checked), checked)


@dataclass(slots=True)
class Step:
    """What one `refresh_step` does, worked out by `plan_step` (reads only) for `apply_step`."""

    drop: list[str] = field(default_factory=list)  # days whose rollup goes
    day: str = ""  # the day built, from `rows`
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    fingerprint: tuple[int, int] = (0, 0)  # the day's request count and highest id when `rows` were read


def plan_step(conn: Connection, today: str, checked: set[str]) -> Step | None:
    """The reads of `refresh_step` (None: every rollup is up to date). The writer runs them in a
    read transaction, which never holds the write lock, and `apply_step` in a short write one."""
    rolled = {
        day: requests for day, requests in conn.execute(f"SELECT day, sum(requests) FROM {ROLLUP_TABLE} GROUP BY day")
    }
    seen: set[str] = set()
    for day in _days_with_requests(conn, before=today):
        seen.add(day)
        if day in rolled and day in checked:
            continue
        if day in rolled and _count_day(conn, day) == rolled[day]:
            checked.add(day)
            continue
        return Step(day=day, rows=_day_rows(conn, day), fingerprint=_fingerprint(conn, day))
    orphans = [day for day in rolled if day not in seen and day < today]
    return Step(drop=orphans) if orphans else None


def apply_step(conn: Connection, step: Step | None, checked: set[str]) -> bool:
    """Write what `plan_step` planned, in the caller's write transaction; False when it planned
    nothing. A day whose requests changed since they were read is left for the next step."""
    if step is None:
        return False
    if step.drop:
        conn.executemany(f"DELETE FROM {ROLLUP_TABLE} WHERE day = ?", [(day,) for day in step.drop])
        return True
    if _fingerprint(conn, step.day) == step.fingerprint:
        _store_day(conn, step.day, step.rows)
        checked.add(step.day)
    return True


def _day_rows(conn: Connection, day: str) -> list[tuple[Any, ...]]:
    condition = where(AuditFilter(since=start_of(day), until=start_of(next_day(day))))
    dims = ", ".join(DIMENSIONS)
    rows = []
    for *group, requests, ttft_count, ttft, prompt, completion, producing, durations in conn.execute(
        f"SELECT {dims}, {_SUMS}, {_DURATIONS} FROM {TABLE}{condition.sql} GROUP BY {dims}", condition.params
    ):
        packed = array("q", sorted(map(int, durations.split(","))))
        rows.append((day, *group, requests, ttft_count, ttft, prompt, completion, producing, _pack(packed)))
    return rows


def _store_day(conn: Connection, day: str, rows: list[tuple[Any, ...]]) -> None:
    dims = ", ".join(DIMENSIONS)
    conn.execute(f"DELETE FROM {ROLLUP_TABLE} WHERE day = ?", (day,))
    conn.executemany(
        f"INSERT INTO {ROLLUP_TABLE} (day, {dims}, requests, ttft_count, ttft_ms, prompt_tokens, completion_tokens,"
        f" producing_ms, durations) VALUES ({', '.join('?' for _ in range(len(DIMENSIONS) + 8))})",
        rows,
    )


def _fingerprint(conn: Connection, day: str) -> tuple[int, int]:
    """A day's request count and highest id: any insert or delete among its requests changes it."""
    condition = where(AuditFilter(since=start_of(day), until=start_of(next_day(day))))
    count, last = conn.execute(
        f"SELECT count(*), coalesce(max(id), 0) FROM {TABLE}{condition.sql}", condition.params
    ).fetchone()
    return count, last


# -- days ------------------------------------------------------------------------------------


def day_of(moment: datetime) -> str:
    return moment.astimezone(UTC).date().isoformat()


def start_of(day: str) -> datetime:
    return datetime.combine(date.fromisoformat(day), time(), tzinfo=UTC)


def next_day(day: str) -> str:
    return (date.fromisoformat(day) + timedelta(days=1)).isoformat()


def _days_with_requests(conn: Connection, *, before: str) -> Iterator[str]:
    """Each UTC day before `before` that has requests, oldest first: one index seek per day."""
    (first,) = conn.execute(f"SELECT min(timestamp) FROM {TABLE}").fetchone()
    while first is not None and first[:10] < before:
        day = first[:10]
        yield day
        (first,) = conn.execute(f"SELECT min(timestamp) FROM {TABLE} WHERE timestamp >= ?", (next_day(day),)).fetchone()


def _count_day(conn: Connection, day: str) -> int:
    condition = where(AuditFilter(since=start_of(day), until=start_of(next_day(day))))
    return conn.execute(f"SELECT count(*) FROM {TABLE}{condition.sql}", condition.params).fetchone()[0]


def _add_sums(
    part: Partial, ttft_count: int, ttft: float | None, prompt: int, completion: int, producing: float | None
) -> None:
    part.ttft_count += ttft_count
    if ttft is not None:
        part.ttft_ms.append(ttft)
    part.prompt_tokens += prompt
    part.completion_tokens += completion
    if producing is not None:
        part.producing_ms.append(producing)


def _pack(values: array[int]) -> bytes:
    if sys.byteorder == "big":  # stored little-endian, whatever machine wrote it
        values = array("q", values)
        values.byteswap()
    return values.tobytes()


def _unpack(blob: bytes) -> array[int]:
    values = array("q")
    values.frombytes(blob)
    if sys.byteorder == "big":
        values.byteswap()
    return values
