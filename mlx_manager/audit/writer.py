"""The daemon's batched background audit writer: requests never wait on the disk.

    audit_writer = AuditWriter(settings.audit_path())
    await audit_writer.start()                 # open + migrate the database, start the flush task
    ticket = audit_writer.record(AuditRecord(...))   # sync, O(1), never touches the disk
    await audit_writer.committed(ticket)       # only where an answer must wait for its row
    deleted = await audit_writer.prune(timedelta(days=30))
    async with audit_writer.subscribe() as feed:
        async for row in feed: ...             # JSON-ready dicts, once committed
    await audit_writer.stop()                  # writes every queued row, then closes

`record` appends to an in-memory queue; a task on the event loop hands the queue to one
dedicated thread in batches (one executemany in one BEGIN IMMEDIATE transaction per batch)
at least every `flush_interval` (100 ms), sooner when `batch_size` rows are waiting. A row
counts as written (leaves `backlog`, reaches subscribers, satisfies `flush()` and
`committed()`) only once its transaction has committed with `synchronous=FULL`, so a crash after
that loses nothing. While some caller waits in `committed()` the queue is written at once, not
at the next interval: a group commit, as the rows recorded while one transaction is on the disk
all go in the next one. A batch that fails (disk full, lock held past the busy timeout) stays at the head of the queue
and is retried with backoff. Nothing is dropped unless the queue passes `max_backlog`, the
database refuses a row (a constraint or a wrong type: only that row goes), or the final flush
in `stop()` gives up after `stop_timeout`; all of these are counted in `dropped` and logged.

`record` takes the row's values at once (the caller may keep its object, for instance a
`RequestOutcome` that extends `AuditRecord`). When no row is waiting, the writer also rolls up
closed days for `audit stats` (see `rollup.py`), one day at a time, and the last day's closed
minutes for the dashboard's charts (see `minutes.py`), an hour at a time. Its statements go through a
SQLAlchemy engine (`sql_engine`) so telemetry can trace them; the CLI reads with `sqlite3`.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError

from mlx_manager.audit import minutes
from mlx_manager.audit.prune import PRUNE_BATCH
from mlx_manager.audit.query import delete_older_batch, insert_rows
from mlx_manager.audit.record import COLUMNS, INSERT_COLUMNS, AuditRecord
from mlx_manager.audit.rollup import refresh_step
from mlx_manager.audit.store import AuditStore

log = logging.getLogger("mlx_manager.audit")

_END = object()
# Driver errors that condemn a row, not the batch: retrying would fail the same way forever.
_REJECTED_ROW = (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError)
_REQUEST_ID_AT = INSERT_COLUMNS.index("request_id")
# How often the writer looks for closed days to roll up (sooner while some are left to do).
ROLLUP_INTERVAL_S = 60.0


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("audit writer task died; rows are no longer written", exc_info=task.exception())


class AuditFeed:
    """Rows as they are committed, for one live-feed consumer; use `async with` / `async for`.

    A consumer that falls more than `maxsize` rows behind loses the oldest ones rather than
    slowing the writer. Iteration ends when the writer stops.
    """

    def __init__(self, writer: AuditWriter, maxsize: int) -> None:
        self._writer = writer
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize)

    def _put(self, item: Any) -> None:
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(item)

    def __aiter__(self) -> AuditFeed:
        return self

    async def __anext__(self) -> dict[str, Any]:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # keep ending for any later reader
            raise StopAsyncIteration
        return item

    async def __aenter__(self) -> AuditFeed:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._writer._feeds.discard(self)


class AuditWriter:
    """Batched background writer of audit rows; see the module docstring for the lifecycle."""

    def __init__(
        self,
        path: Path,
        *,
        flush_interval: float = 0.1,
        batch_size: int = 10_000,
        max_backlog: int = 1_000_000,
        stop_timeout: float = 30.0,
    ) -> None:
        self.path = Path(path)
        self.flush_interval = flush_interval
        self.batch_size = batch_size
        self.max_backlog = max_backlog
        self.stop_timeout = stop_timeout
        self._pending: deque[tuple[Any, ...]] = deque()  # AuditRecord.values(), taken at record()
        self._in_flight = 0
        self._accepted = 0
        self._written = 0
        self._dropped = 0
        self._lost = 0  # the part of `_dropped` that had been accepted by record()
        self._waiting = 0  # callers in committed(): the queue is written without waiting for the interval
        self._failing = False  # the last write failed: nobody is kept waiting for the disk meanwhile
        self._feeds: set[AuditFeed] = set()
        self._store: AuditStore | None = None
        self._engine: Engine | None = None
        self._conn: Connection | None = None
        self._rollup_due = 0.0  # loop time of the next look for days to roll up
        self._rollup_checked: set[str] = set()  # rolled-up days whose counts were checked since start
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wake: asyncio.Event | None = None
        self._progress: asyncio.Condition | None = None
        self._stopping = False
        self._closed = False

    # -- what the daemon reads -------------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Rows recorded but not yet committed."""
        return len(self._pending) + self._in_flight

    @property
    def written(self) -> int:
        """Rows committed since start."""
        return self._written

    @property
    def dropped(self) -> int:
        """Rows lost: recorded after stop, past `max_backlog`, refused by the database, or still
        unwritten when `stop()` gave up."""
        return self._dropped

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open (creating and migrating) the database and start the flush task. Raises AuditError."""
        if self._task is not None:
            raise RuntimeError("AuditWriter already started")
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._progress = asyncio.Condition()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-writer")
        try:
            self._store = await self._in_thread(AuditStore.open, self.path)
            self._engine = _traced_engine(self._store)
            self._conn = await self._in_thread(self._engine.connect)
        except BaseException:
            await self._close_resources()
            raise
        self._task = asyncio.create_task(self._run(), name="audit-writer")
        self._task.add_done_callback(_report_crash)
        if self._pending:
            self._wake.set()

    async def stop(self) -> None:
        """Write every queued row (giving up after `stop_timeout`), end the feeds, close the database."""
        if self._closed:
            return
        self._stopping = True
        if self._task is None and self._pending:  # never started: there is nowhere to write them
            self._lose_pending()
        if self._task is not None:
            assert self._wake is not None
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self.stop_timeout)
            except TimeoutError:
                self._task.cancel()
                log.error("audit writer stopped with %d rows it could not write to %s", len(self._pending), self.path)
                self._lose_pending()
            except asyncio.CancelledError:
                self._task.cancel()
                raise
        self._closed = True
        if self._pending and self._conn is not None:
            # Recorded between the task's last look at the queue and now.
            if not await self._write_pending():
                self._lose_pending()
        if self._progress is not None:
            async with self._progress:
                self._progress.notify_all()
        for feed in list(self._feeds):
            feed._put(_END)
        await self._close_resources()

    # -- the daemon's calls --------------------------------------------------------------

    def record(self, row: AuditRecord) -> int | None:
        """Queue one request's row; never blocks, never raises. Call it from the event loop's thread.
        Returns its ticket for `committed()` (None: it will not be stored).

        The values are taken now (`row.values()`): the caller may keep and change the object. A
        record that cannot be stored (a naive timestamp, an unknown status, a NOT NULL column
        unset) is counted in `dropped` and logged, like a row the database refuses.
        """
        if self._closed:
            self._dropped += 1
            log.warning("audit row for request %s recorded after the writer stopped; not stored", row.request_id)
            return None
        if len(self._pending) >= self.max_backlog:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 10_000 == 0:
                log.error("audit backlog full (%d rows): %d rows dropped so far", self.max_backlog, self._dropped)
            return None
        try:
            values = row.values()
        except ValueError as exc:
            self._dropped += 1
            log.error("audit row for request %s not stored: %s", row.request_id, exc)
            return None
        self._pending.append(values)
        self._accepted += 1
        if len(self._pending) >= self.batch_size:
            self._wake_soon()
        return self._accepted

    async def committed(self, ticket: int) -> bool:
        """Wait until the row `record()` gave this ticket is committed; True when it is. Returns
        False at once, without waiting for the disk, while the writer cannot write (a failing
        disk: the row stays queued and is written once it can be) or after it stopped."""
        assert self._progress is not None, "AuditWriter not started"

        def settled() -> bool:
            return self._written + self._lost >= ticket or self._failing or not self.running

        if not settled():
            self._waiting += 1
            self._wake_soon()
            try:
                async with self._progress:
                    await self._progress.wait_for(settled)
            finally:
                self._waiting -= 1
        return self._written + self._lost >= ticket

    @property
    def sql_engine(self) -> Engine:
        """The SQLAlchemy engine the writer's statements go through (for tracing them)."""
        assert self._engine is not None, "AuditWriter not started"
        return self._engine

    def subscribe(self, *, maxsize: int = 1000) -> AuditFeed:
        """A live feed of rows (JSON-ready dicts, `COLUMNS` keys) from now on, each once committed."""
        feed = AuditFeed(self, maxsize)
        if self._closed:
            feed._put(_END)
        else:
            self._feeds.add(feed)
        return feed

    async def flush(self) -> None:
        """Wait until every row recorded before this call is committed (or the writer has stopped)."""
        assert self._progress is not None, "AuditWriter not started"
        target = self._accepted
        self._wake_soon()
        async with self._progress:
            await self._progress.wait_for(lambda: self._written + self._lost >= target or not self.running)

    async def prune(self, older_than: timedelta) -> int:
        """Delete rows older than `older_than`, in small transactions interleaved with the writes."""
        before = datetime.now(UTC) - older_than
        deleted = 0
        while True:
            n = await self._in_thread(self._prune_batch, before)
            deleted += n
            if n < PRUNE_BATCH:
                return deleted

    # -- inside ------------------------------------------------------------------------

    def _lose_pending(self) -> None:
        lost = len(self._pending)
        self._pending.clear()
        self._dropped += lost
        self._lost += lost

    def _wake_soon(self) -> None:
        if self._wake is None or self._loop is None:
            return  # not started: start() wakes the task if rows are waiting
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _in_thread(self, fn: Any, *args: Any) -> Any:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _run(self) -> None:
        assert self._wake is not None and self._loop is not None
        failures = 0
        while True:
            started = self._loop.time()
            if self._pending:
                if await self._write_pending():
                    failures = 0
                else:
                    failures += 1
                await self._set_failing(failures > 0)
            if self._stopping and not self._pending:
                return
            if not self._pending and not self._stopping and self._loop.time() >= self._rollup_due:
                await self._refresh_rollup()  # only while no row waits: rows first, the stats cache after
            delay = self.flush_interval - (self._loop.time() - started)
            if self._waiting and self._pending:
                delay = 0  # someone waits for these rows: write them now (they share one commit)
            if failures:
                delay = min(0.1 * 2 ** (failures - 1), 2.0)
            if delay > 0 and not (self._stopping and not failures):
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except TimeoutError:
                    pass
            self._wake.clear()

    async def _set_failing(self, failing: bool) -> None:
        if failing != self._failing:
            self._failing = failing
            assert self._progress is not None
            async with self._progress:
                self._progress.notify_all()  # waiters go on without their row while the disk fails

    async def _write_pending(self) -> bool:
        """Write the queue in batches; on a failure put the batch back at the head and return False."""
        while self._pending:
            count = min(len(self._pending), self.batch_size)
            batch = [self._pending.popleft() for _ in range(count)]
            self._in_flight = count
            try:
                rows, rejected = await self._in_thread(self._write_batch, batch, bool(self._feeds))
            except Exception as exc:  # nothing was committed: the transaction rolled back
                self._pending.extendleft(reversed(batch))
                reason = exc.orig if isinstance(exc, DBAPIError) else exc  # not the parameters: no row dumps in logs
                log.error("audit writer could not write %d rows to %s (will retry): %s", count, self.path, reason)
                return False
            finally:
                self._in_flight = 0
            self._written += count - rejected
            self._dropped += rejected
            self._lost += rejected
            if rows:
                self._publish(rows)
            assert self._progress is not None
            async with self._progress:
                self._progress.notify_all()
        return True

    def _write_batch(self, values: list[tuple[Any, ...]], want_rows: bool) -> tuple[list[dict[str, Any]], int]:
        """On the writer thread: one transaction, one executemany. Returns the committed rows for
        the feeds and how many rows were rejected.

        A row the database refuses (a constraint, a value of the wrong type) is not a reason to
        retry the batch forever: the batch is then written row by row and only that row is dropped.
        Anything else (lock, disk) raises, and the caller retries the whole batch later.
        """
        assert self._conn is not None
        try:
            with self._conn.begin():
                last = insert_rows(_Driver(self._conn), values)
        except DBAPIError as exc:
            if not isinstance(exc.orig, _REJECTED_ROW):
                raise
            return self._write_one_by_one(values, want_rows)
        if not want_rows:
            return [], 0
        first = last - len(values) + 1
        return [dict(zip(COLUMNS, (first + offset, *row), strict=True)) for offset, row in enumerate(values)], 0

    def _write_one_by_one(self, values: list[tuple[Any, ...]], want_rows: bool) -> tuple[list[dict[str, Any]], int]:
        assert self._conn is not None
        written: list[dict[str, Any]] = []
        rejected = 0
        with self._conn.begin():
            for row in values:
                try:
                    row_id = insert_rows(_Driver(self._conn), [row])  # a failed statement undoes only itself
                except DBAPIError as exc:
                    if not isinstance(exc.orig, _REJECTED_ROW):
                        raise
                    rejected += 1
                    log.error("audit row for request %s rejected by the database: %s", row[_REQUEST_ID_AT], exc.orig)
                    continue
                if want_rows:
                    written.append(dict(zip(COLUMNS, (row_id, *row), strict=True)))
        return written, rejected

    def _prune_batch(self, before: datetime) -> int:
        assert self._conn is not None
        with self._conn.begin():
            return delete_older_batch(_Driver(self._conn), before, PRUNE_BATCH)

    async def _refresh_rollup(self) -> None:
        """Roll up (at most) an hour of minutes and one closed day; look again soon while some are
        left, else in a while."""
        assert self._loop is not None
        try:
            more = await self._in_thread(self._rollup_step, datetime.now(UTC).date().isoformat())
        except Exception as exc:  # a cache: the rows are safe, stats read them instead
            reason = exc.orig if isinstance(exc, DBAPIError) else exc
            log.warning("audit writer could not update the stats rollup of %s (will retry): %s", self.path, reason)
            more = False
        self._rollup_due = self._loop.time() + (0 if more else ROLLUP_INTERVAL_S)

    def _rollup_step(self, today: str) -> bool:
        assert self._conn is not None
        with self._conn.begin():  # the dashboard's minutes first: its charts read them every few seconds
            minutes_left = minutes.refresh_step(_Driver(self._conn), datetime.now(UTC))
        with self._conn.begin():
            return refresh_step(_Driver(self._conn), today, self._rollup_checked) or minutes_left

    def _publish(self, rows: Iterable[dict[str, Any]]) -> None:
        feeds = list(self._feeds)
        for row in rows:
            for feed in feeds:
                feed._put(dict(row) if len(feeds) > 1 else row)

    async def _close_resources(self) -> None:
        conn, engine, store, executor = self._conn, self._engine, self._store, self._executor
        self._conn = self._engine = self._store = self._executor = None
        if executor is None:
            return

        def close() -> None:
            if conn is not None:
                conn.close()
            if engine is not None:
                engine.dispose()
            if store is not None:
                store.close()

        try:
            await asyncio.get_running_loop().run_in_executor(executor, close)
        finally:
            executor.shutdown(wait=False)


class _Driver:
    """A SQLAlchemy connection with `sqlite3.Connection`'s `execute`/`executemany`, so the shared
    statements of `query.py` and `rollup.py` run through SQLAlchemy (and its tracing)."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> Any:
        if not parameters:
            return self._conn.exec_driver_sql(sql)
        return self._conn.exec_driver_sql(sql, tuple(parameters))

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]]) -> Any:
        return self._conn.exec_driver_sql(sql, list(parameters))


def _traced_engine(store: AuditStore) -> Engine:
    """A SQLAlchemy engine over the store's connections whose transactions begin IMMEDIATE."""
    engine = create_engine(f"sqlite+pysqlite:///{store.path.absolute()}", creator=store.connect)

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
