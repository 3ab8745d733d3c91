"""The daemon's reads of the audit log for the dashboard, off the event loop.

    reader = AuditReader(path)
    rows = await reader.recent(50)                   # newest first, like `audit tail`
    figures = await reader.series(WINDOWS["day"])    # see series.summarize
    await reader.close()

One read-only aiosqlite connection: its statements run on aiosqlite's own thread, and SQLite
releases the GIL while it works, so a heavy read (a day of a million rows is a few seconds of
SQLite the first time) leaves the event loop running. numpy folds each bucket's values on a
thread of the reader's own. Both threads yield the CPU when it is short (see `yield_cpu`). The
folding still holds the GIL for much of a cold read, so the daemon reads its charts' `series` in
a child process (reader_process.py) and only the live feed's `recent` rows here.
Each window's buckets are kept between calls, and a bucket is read again only when its
fingerprint moved (usually just the newest one); one refresh of a window runs at a time and
callers that arrive meanwhile get its result. A bucket whose minutes the daemon's writer has
rolled up (all its rows: see minutes.py) is read from those, not from its requests: the first
read of a day over a million rows costs about a third of the CPU, and a tenth of the SQLite time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import sys
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlx_manager.audit.errors import AuditLogMissing
from mlx_manager.audit.minutes import BUCKET_SQL as MINUTES_BUCKET_SQL
from mlx_manager.audit.minutes import MARKS_SQL, covered, minute_of
from mlx_manager.audit.query import select_rows
from mlx_manager.audit.record import COLUMNS
from mlx_manager.audit.series import BUCKET_SQL, Bucket, Window, bounds, fingerprints_sql, fold_bucket, summarize
from mlx_manager.audit.store import BUSY_TIMEOUT_MS, classify_error

if TYPE_CHECKING:
    import aiosqlite

# A summary this young is answered again as it is: several open pages cost one refresh.
FRESH_SECONDS = 1.0
# A window nobody asked for in this long gives its buckets' memory back.
IDLE_SECONDS = 600.0
BACKGROUND_NICE = 19
_NONE = Bucket(0, (-1, -1))  # the fingerprint of a bucket never read


class AuditReader:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._conn: aiosqlite.Connection | None = None
        self._opening = asyncio.Lock()
        self._refreshing: dict[str, asyncio.Lock] = {}
        self._buckets: dict[str, dict[int, Bucket]] = {}
        self._summaries: dict[str, tuple[float, dict[str, Any]]] = {}
        self._used: dict[str, float] = {}
        # numpy's share of a read (parsing each bucket's values, the percentiles) runs here.
        self._folding = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-reader", initializer=yield_cpu)

    async def recent(self, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` rows, newest first, as the live feed sends rows."""
        statement = select_rows(None, limit=limit, order="newest")
        async with self._reading() as conn:
            rows = await conn.execute_fetchall(statement.sql, statement.params)
        return [dict(zip(COLUMNS, row, strict=True)) for row in rows]

    async def series(self, window: Window) -> dict[str, Any]:
        """`series.summarize` of the window ending now."""
        self._forget_idle(window.name)
        lock = self._refreshing.setdefault(window.name, asyncio.Lock())
        async with lock:
            now = time.time()
            done = self._summaries.get(window.name)
            if done is not None and now - done[0] < FRESH_SECONDS:
                return done[1]
            buckets = await self._refresh(window, now)
            summary = await asyncio.get_running_loop().run_in_executor(self._folding, summarize, window, buckets, now)
            self._summaries[window.name] = (now, summary)
            return summary

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
        self._folding.shutdown(wait=False)

    async def _refresh(self, window: Window, now: float) -> list[Bucket]:
        known = self._buckets.get(window.name, {})
        starts = window.starts(now)
        fresh: dict[int, Bucket] = {}
        loop = asyncio.get_running_loop()
        # One read transaction: every bucket from the same snapshot of the log.
        async with self._reading(transaction=True) as conn:
            params = [value for start in starts for value in bounds(start, window.step)]
            marks = {
                at: (count, last_id)
                for at, count, last_id in await conn.execute_fetchall(fingerprints_sql(len(starts)), params)
            }
            spans = [bounds(start, window.step) for start in starts]
            stale = {at for at, start in enumerate(starts) if known.get(start, _NONE).fingerprint != marks[at]}
            rolled_up = await self._rolled_up(conn, spans) if stale else []
            for at, start in enumerate(starts):
                if at in stale:
                    statement = _bucket_statement(spans[at], marks[at], rolled_up[at])
                    rows = await conn.execute_fetchall(*statement) if statement else []
                    fresh[start] = await loop.run_in_executor(self._folding, fold_bucket, start, marks[at], rows)
                else:
                    fresh[start] = known[start]
        self._buckets[window.name] = fresh
        return list(fresh.values())

    async def _rolled_up(self, conn: aiosqlite.Connection, spans: list[tuple[str, str]]) -> list[tuple[int, int]]:
        """Per bucket, what its minutes rolled up by the writer add up to (see minutes.covered)."""
        try:
            marks = await conn.execute_fetchall(MARKS_SQL, (minute_of(spans[0][0]), minute_of(spans[-1][1])))
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
            return [(0, 0) for _ in spans]  # a log not yet migrated by a daemon: no minute rolled up
        return covered(spans, [(minute, rows, last_id) for minute, rows, last_id in marks])

    def _forget_idle(self, name: str) -> None:
        now = time.monotonic()
        self._used[name] = now
        for other, used in list(self._used.items()):
            if now - used > IDLE_SECONDS:
                del self._used[other]
                self._buckets.pop(other, None)
                self._summaries.pop(other, None)

    @asynccontextmanager
    async def _reading(self, *, transaction: bool = False) -> AsyncIterator[aiosqlite.Connection]:
        """The connection (opened on first use), with driver errors turned into AuditErrors."""
        try:
            conn = await self._connection()
            if not transaction:
                yield conn
                return
            await conn.execute("BEGIN")
            try:
                yield conn
            finally:
                await conn.execute("COMMIT")  # a read transaction: nothing to undo
        except sqlite3.Error as exc:
            raise classify_error(self.path, exc) from exc

    async def _connection(self) -> aiosqlite.Connection:
        async with self._opening:
            if self._conn is None:
                import aiosqlite

                if not self.path.exists():  # mode=ro never creates it, but says so less clearly
                    raise AuditLogMissing(self.path, f"no audit log yet at {self.path}")
                conn = await aiosqlite.connect(
                    self.path.absolute().as_uri() + "?mode=ro",
                    uri=True,
                    timeout=BUSY_TIMEOUT_MS / 1000,
                    isolation_level=None,  # transactions are begun explicitly
                    factory=_YieldingConnection,
                )
                try:
                    await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                    await conn.execute("PRAGMA cache_size = -32000")
                except BaseException:
                    await conn.close()
                    raise
                self._conn = conn
            return self._conn


def yield_cpu() -> None:
    """Let this thread give way when the CPU is short: on Linux, a nice of 19 for this thread
    only, so the inference thread and the event loop run first. (macOS has no per-thread nice;
    its machines have the cores to spare.) The threads that call it hold the GIL only briefly:
    SQLite works without it, numpy parses and ranks each bucket in C."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)


class _YieldingConnection(sqlite3.Connection):
    """aiosqlite makes its connection on its own thread, so this is where that thread yields too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        yield_cpu()
        super().__init__(*args, **kwargs)


def _bucket_statement(
    span: tuple[str, str], fingerprint: tuple[int, int], rolled_up: tuple[int, int]
) -> tuple[str, tuple[str, ...]] | None:
    """A bucket's statement: none for no row; over its minutes when they hold all its rows (the
    writer rolled them up), else over its requests."""
    if not fingerprint[0]:
        return None
    first, end = span
    if rolled_up == fingerprint:
        return MINUTES_BUCKET_SQL, (minute_of(first), minute_of(end))
    return BUCKET_SQL, (first, end)
