"""The dashboard's figures per closed UTC minute (tables `audit_minutes`, `audit_minutes_done`):
a day's charts read ~1,440 x groups rows, not every request.

A row holds one minute's API requests of one (model, API key, error type): the sums
`series.BUCKET_SQL` takes of them, their durations and times to first token as comma-separated
whole microseconds. `BUCKET_SQL` here, over a bucket's rolled-up minutes, answers what
`series.BUCKET_SQL` answers over its requests (the same values; the float sum of the producing
time may differ in its last bits), so percentiles stay exact.

It is a cache. The daemon's writer fills it for the last day (`refresh_step`, between batches of
rows, in SQL only: no row passes through Python). A minute is marked done with the count and the
highest id of all its rows, which is what the reader's bucket fingerprint is made of: writing rows
unmarks their minutes (`query.insert_rows`), and the reader uses a bucket's minutes only when their
marks add up to the bucket's fingerprint, so rows written behind the writer's back (or late rows
of a long request) are read from `audit_logs` until the writer has rolled them up again.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from datetime import datetime, timedelta

from mlx_manager.audit.query import MINUTES_DONE_TABLE, MINUTES_TABLE, TABLE, Connection
from mlx_manager.audit.record import format_timestamp
from mlx_manager.audit.series import BUCKET_SQL as REQUESTS_BUCKET_SQL

# The dashboard's longest window, and a margin: older minutes are dropped.
KEEP = timedelta(days=1, hours=1)
# A minute is rolled up once it has been over this long (most of its requests are written by then).
SETTLE = timedelta(minutes=1)
# Minutes rolled up per step (one write transaction); the writer takes the next step soon after.
STEP_MINUTES = 10  # ~30 ms a step (an hour took 150-200 ms): a waiting commit is not held up long

_COLUMNS = (
    "minute, model, api_key, error_type, requests, errors, timeouts, cancelled, prompt_tokens,"
    " completion_tokens, producing_ms, durations, ttfts"
)
# One minute's rows, from its requests: series.BUCKET_SQL with the minute in front.
_BUILD = f"INSERT INTO {MINUTES_TABLE} ({_COLUMNS}) " + REQUESTS_BUCKET_SQL.replace("SELECT ", "SELECT ?, ", 1)
_MARK = (
    f"INSERT OR REPLACE INTO {MINUTES_DONE_TABLE} (minute, rows, last_id)"
    f" SELECT ?, count(*), coalesce(max(id), 0) FROM {TABLE} WHERE timestamp >= ? AND timestamp < ?"
)
# A bucket's figures from its minutes, in the columns (and groups) of series.BUCKET_SQL.
BUCKET_SQL = (
    "SELECT model, api_key, error_type, sum(requests), sum(errors), sum(timeouts), sum(cancelled),"
    " sum(prompt_tokens), sum(completion_tokens), sum(producing_ms), group_concat(durations), group_concat(ttfts)"
    f" FROM {MINUTES_TABLE} WHERE minute >= ? AND minute < ? GROUP BY model, api_key, error_type"
)
MARKS_SQL = f"SELECT minute, rows, last_id FROM {MINUTES_DONE_TABLE} WHERE minute >= ? AND minute < ?"


def minute_of(stamp: str) -> str:
    """The minute (`2026-05-01T12:00`) of a stored timestamp or bucket bound."""
    return stamp[:16]


def covered(bucket_bounds: Sequence[tuple[str, str]], marks: Sequence[tuple[str, int, int]]) -> list[tuple[int, int]]:
    """Per bucket ([start, end) as stored timestamps, in order), the (count, last id) its marked
    minutes add up to: a bucket is wholly rolled up when that equals its fingerprint."""
    starts = [minute_of(start) for start, _ in bucket_bounds]
    sums = [(0, 0) for _ in bucket_bounds]
    for minute, rows, last_id in marks:
        at = bisect.bisect_right(starts, minute) - 1
        if at >= 0 and minute < minute_of(bucket_bounds[at][1]):
            count, last = sums[at]
            sums[at] = (count + rows, max(last, last_id))
    return sums


def refresh_step(conn: Connection, now: datetime) -> bool:
    """Roll up (inside the caller's write transaction) the next unmarked closed minutes of the
    last day, at most STEP_MINUTES of them, and drop older ones; False when none is left."""
    since = minute_of(format_timestamp(now - KEEP))
    closed = minute_of(format_timestamp(now - SETTLE))
    conn.execute(f"DELETE FROM {MINUTES_TABLE} WHERE minute < ?", (since,))
    conn.execute(f"DELETE FROM {MINUTES_DONE_TABLE} WHERE minute < ?", (since,))
    done = {
        minute for (minute,) in conn.execute(f"SELECT minute FROM {MINUTES_DONE_TABLE} WHERE minute >= ?", (since,))
    }
    built = 0
    after = since
    while True:
        # The next minute with rows: one index seek (";" sorts right after the ":" of a minute's seconds).
        (first,) = conn.execute(
            f"SELECT min(timestamp) FROM {TABLE} WHERE timestamp >= ? AND timestamp < ?", (after, closed)
        ).fetchone()
        if first is None:
            return False
        minute = minute_of(first)
        after = minute + ";"
        if minute in done:
            continue
        if built == STEP_MINUTES:
            return True
        build_minute(conn, minute)
        built += 1


def build_minute(conn: Connection, minute: str) -> None:
    """(Re)write one minute's rows from its requests, and mark it done."""
    start = datetime.fromisoformat(minute + ":00+00:00")
    bounds = (format_timestamp(start), format_timestamp(start + timedelta(minutes=1)))
    conn.execute(f"DELETE FROM {MINUTES_TABLE} WHERE minute = ?", (minute,))
    conn.execute(_BUILD, (minute, *bounds))
    conn.execute(_MARK, (minute, *bounds))
