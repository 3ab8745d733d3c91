"""The daemon's batched background audit writer: requests wait on the disk only where they must.

    audit_writer = AuditWriter(settings.audit_path(), fsync=False)
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
`committed()`) only once its transaction has committed, so a crash of the process after that
loses nothing; with `fsync` each commit is also synced to the disk (`synchronous=FULL`), so an
OS crash or a power loss loses nothing either; without it (`synchronous=NORMAL`, the daemon's
default: see `store.py`) they can lose the last commits, never the database.

`committed()` is the group commit behind audit.durability = "acknowledged": the queue is
written at once, not at the next interval, and every row queued by then shares the commit.
Without `fsync` a commit takes a fraction of a millisecond (no fsync), so it is made right there
on the event loop, on a connection of its own that never waits for the lock, while the writer
thread has no batch of the queue: handing it to the thread and learning back that it committed
takes two or three turns of a busy loop and two thread switches, ten times the commit itself.
Otherwise (with `fsync`, the lock held elsewhere, a batch on the thread) the waiters are
released straight from the writer thread's commit, and the rows recorded while one transaction
is on the disk go in the next one.

A batch that fails (disk full, lock held past the busy timeout) stays at the head of the queue
and is retried with backoff; `committed()` then returns False without waiting. Nothing is
dropped unless the queue passes `max_backlog`, the database refuses a row (a constraint or a
wrong type: only that row goes), or the final flush in `stop()` gives up after `stop_timeout`;
all of these are counted in `dropped` and logged.

`record` takes the row's values at once (the caller may keep its object, for instance a
`RequestOutcome` that extends `AuditRecord`). When no row is waiting, the writer also rolls up
closed days for `audit stats` (see `rollup.py`), one day at a time, and the last day's closed
minutes for the dashboard's charts (see `minutes.py`), an hour at a time. Its INSERTs, prunes
and rollups go through a SQLAlchemy engine (`sql_engine`) so telemetry can trace them (the
bookkeeping statements around an INSERT go straight to the driver: see `_InsertDriver`); the
CLI reads with `sqlite3`.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
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
from mlx_manager.audit.rollup import apply_step, plan_step
from mlx_manager.audit.store import AuditStore

log = logging.getLogger("mlx_manager.audit")

_END = object()
# Driver errors that condemn a row, not the batch: retrying would fail the same way forever.
_REJECTED_ROW = (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError)
_REQUEST_ID_AT = INSERT_COLUMNS.index("request_id")
# The most rows committed on the event loop at once (see `_commit_here`); more go to the writer thread.
_HERE_MAX = 256
# How often the writer looks for closed days to roll up (sooner while some are left to do).
ROLLUP_INTERVAL_S = 60.0


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("audit writer task died; rows are no longer written", exc_info=task.exception())


class _Doorbell:
    """An asyncio.Event's set/clear, with a timed wait that ends one turn of the loop after
    `set()` (`asyncio.wait_for(event.wait(), t)` takes three: it wraps the wait in a task)."""

    def __init__(self) -> None:
        self._rung = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._rung = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def clear(self) -> None:
        self._rung = False

    async def wait(self, timeout: float) -> None:
        if self._rung:
            return
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


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
        fsync: bool = False,
    ) -> None:
        self.path = Path(path)
        self.fsync = fsync  # see the module docstring: what a commit survives
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
        # committed()'s waiters, (ticket, n, future) by ticket, released straight from the writer
        # thread's commit (one turn of the loop), and the highest ticket released so far.
        self._tickets: list[tuple[int, int, asyncio.Future[bool]]] = []
        self._ticket_order = itertools.count()
        self._released = 0
        self._failing = False  # the last write failed: nobody is kept waiting for the disk meanwhile
        self._feeds: set[AuditFeed] = set()
        self._store: AuditStore | None = None
        self._engine: Engine | None = None
        self._conn: Connection | None = None  # the writer thread's
        self._express: sqlite3.Connection | None = None  # the loop's own, for committed() (see _commit_here)
        self._writing = False  # the task has a batch on the writer thread
        self._rollup_due = 0.0  # loop time of the next look for days to roll up
        self._rollup_checked: set[str] = set()  # rolled-up days whose counts were checked since start
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wake: _Doorbell | None = None
        self._progress: asyncio.Condition | None = None
        self._stopping = False
        self._closed = False
        self._flushing = 0  # callers in flush()
        self._notifying: set[asyncio.Future[None]] = set()

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
        self._wake = _Doorbell()
        self._progress = asyncio.Condition()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-writer")
        try:
            self._store = await self._in_thread(functools.partial(AuditStore.open, self.path, fsync=self.fsync))
            self._engine = _traced_engine(self._store)
            self._conn = await self._in_thread(self._engine.connect)
            if not self.fsync:
                self._express = await self._in_thread(self._connect_express)
        except BaseException:
            await self._close_resources()
            raise
        self._task = asyncio.create_task(self._run(), name="audit-writer")
        self._task.add_done_callback(_report_crash)
        self._task.add_done_callback(lambda _: self._release_all())
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
        self._release_all()
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
        assert self._loop is not None, "AuditWriter not started"
        if self._settled(ticket):
            return True
        if self._failing or not self.running:
            return False
        if self._commit_here() and self._settled(ticket):
            return True
        waiter: asyncio.Future[bool] = self._loop.create_future()
        heapq.heappush(self._tickets, (ticket, next(self._ticket_order), waiter))
        self._waiting += 1
        self._wake_soon()
        try:
            return await waiter
        finally:
            self._waiting -= 1

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
        self._flushing += 1
        try:
            async with self._progress:
                await self._progress.wait_for(lambda: self._written + self._lost >= target or not self.running)
        finally:
            self._flushing -= 1

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

    def _connect_express(self) -> sqlite3.Connection:
        assert self._store is not None
        conn = self._store.connect()
        conn.execute("PRAGMA busy_timeout = 0")  # a lock held elsewhere: fail at once, the writer thread waits instead
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # checkpoints (which sync) are the writer thread's
        return conn

    def _commit_here(self) -> bool:
        """For a committed() caller: commit the queue right here, on the loop; True if it did.

        Only without `fsync` (the commit hands its pages to the OS: no disk wait), only while the
        writer thread has no batch of the queue (rows keep their order, tickets their meaning), and
        for a short queue. Whatever stops it (the lock held elsewhere: this connection does not
        wait for it; a full disk) leaves the rows queued, for the writer thread to write or report.
        """
        if self._express is None or self._writing or self._stopping or not 0 < len(self._pending) <= _HERE_MAX:
            return False
        count = min(len(self._pending), self.batch_size)
        batch = [self._pending.popleft() for _ in range(count)]
        upto = self._written + self._lost + count
        conn = self._express
        try:
            conn.execute("BEGIN IMMEDIATE")
            last = insert_rows(conn, batch)
            conn.execute("COMMIT")
        except Exception:  # the lock, the disk, a row the database refuses: the writer thread's to handle
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite rolled it back itself
            self._pending.extendleft(reversed(batch))
            return False
        self._committed(count, 0, _feed_rows(batch, last) if self._feeds else [], upto)
        if self._flushing:
            notify = asyncio.ensure_future(self._notify_progress())
            self._notifying.add(notify)
            notify.add_done_callback(self._notifying.discard)
        return True

    def _committed(self, count: int, rejected: int, rows: list[dict[str, Any]], upto: int) -> None:
        self._written += count - rejected
        self._dropped += rejected
        self._lost += rejected
        if rows:
            self._publish(rows)
        self._release(upto)

    async def _notify_progress(self) -> None:
        assert self._progress is not None
        async with self._progress:
            self._progress.notify_all()

    def _lose_pending(self) -> None:
        lost = len(self._pending)
        self._pending.clear()
        self._dropped += lost
        self._lost += lost
        self._release(self._written + self._lost)

    def _settled(self, ticket: int) -> bool:
        return self._written + self._lost >= ticket or self._released >= ticket

    def _release(self, upto: int) -> None:
        """On the loop: the rows up to ticket `upto` are settled; their committed() waiters go on."""
        self._released = max(self._released, upto)
        while self._tickets and self._tickets[0][0] <= upto:
            waiter = heapq.heappop(self._tickets)[2]
            if not waiter.done():
                waiter.set_result(True)

    def _release_all(self) -> None:
        """The writer stopped, or cannot write for now: every committed() waiter goes on, its
        answer whether its row is settled."""
        tickets, self._tickets = self._tickets, []
        for ticket, _, waiter in tickets:
            if not waiter.done():
                waiter.set_result(self._settled(ticket))

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
                await self._wake.wait(delay)
            self._wake.clear()

    async def _set_failing(self, failing: bool) -> None:
        if failing != self._failing:
            self._failing = failing
            if failing:
                self._release_all()  # waiters go on without their row while the disk fails
            assert self._progress is not None
            async with self._progress:
                self._progress.notify_all()

    async def _write_pending(self) -> bool:
        """Write the queue in batches; on a failure put the batch back at the head and return False."""
        self._writing = True
        try:
            while self._pending:
                count = min(len(self._pending), self.batch_size)
                batch = [self._pending.popleft() for _ in range(count)]
                upto = self._written + self._lost + count  # the batch's last ticket
                self._in_flight = count
                try:
                    rows, rejected = await self._in_thread(self._commit_batch, batch, bool(self._feeds), upto)
                except Exception as exc:  # nothing was committed: the transaction rolled back
                    self._pending.extendleft(reversed(batch))
                    reason = exc.orig if isinstance(exc, DBAPIError) else exc  # not the parameters: no row dumps
                    log.error("audit writer could not write %d rows to %s (will retry): %s", count, self.path, reason)
                    return False
                finally:
                    self._in_flight = 0
                self._committed(count, rejected, rows, upto)
                await self._notify_progress()
        finally:
            self._writing = False
        return True

    def _commit_batch(
        self, values: list[tuple[Any, ...]], want_rows: bool, upto: int
    ) -> tuple[list[dict[str, Any]], int]:
        """On the writer thread: `_write_batch`, then its waiters are released from here, a turn
        of the loop sooner than the writer's task would (it also resumes on the loop)."""
        written = self._write_batch(values, want_rows)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._release, upto)
        return written

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
                last = insert_rows(_InsertDriver(self._conn), values)
        except DBAPIError as exc:
            if not isinstance(exc.orig, _REJECTED_ROW):
                raise
            return self._write_one_by_one(values, want_rows)
        return (_feed_rows(values, last) if want_rows else []), 0

    def _write_one_by_one(self, values: list[tuple[Any, ...]], want_rows: bool) -> tuple[list[dict[str, Any]], int]:
        assert self._conn is not None
        written: list[dict[str, Any]] = []
        rejected = 0
        with self._conn.begin():
            for row in values:
                try:
                    row_id = insert_rows(_InsertDriver(self._conn), [row])  # a failed statement undoes only itself
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
        """Roll up (at most) an hour of minutes, then one closed day, each in a transaction of its
        own: rows that come in between are written first. Look again soon while some are left (or
        rows came in), else in a while."""
        assert self._loop is not None
        more = False
        try:
            for step in (self._minutes_step, self._days_step, self._checkpoint):
                if self._pending or self._stopping:  # rows first, the caches after
                    more = True
                    break
                more = await self._in_thread(step) or more
        except Exception as exc:  # a cache: the rows are safe, stats read them instead
            reason = exc.orig if isinstance(exc, DBAPIError) else exc
            log.warning("audit writer could not update the stats rollup of %s (will retry): %s", self.path, reason)
            more = False
        self._rollup_due = self._loop.time() + (0 if more else ROLLUP_INTERVAL_S)

    def _minutes_step(self) -> bool:
        """The dashboard's minutes first: its charts read them every few seconds."""
        assert self._conn is not None
        with self._conn.begin():
            return minutes.refresh_step(_Driver(self._conn), datetime.now(UTC))

    def _days_step(self) -> bool:
        """A closed day's rollup: read in a read transaction (a day of requests can take a second),
        written in a write transaction of a few milliseconds."""
        assert self._conn is not None
        raw = self._conn.connection.driver_connection
        assert raw is not None
        raw.execute("BEGIN")  # a snapshot: never blocks a commit
        try:
            step = plan_step(raw, datetime.now(UTC).date().isoformat(), self._rollup_checked)
        finally:
            raw.execute("COMMIT")
        with self._conn.begin():
            return apply_step(_Driver(self._conn), step, self._rollup_checked)

    def _checkpoint(self) -> bool:
        """The commits made on the loop never checkpoint (a checkpoint syncs): the WAL is copied back here."""
        assert self._conn is not None
        if self._express is not None:
            raw = self._conn.connection.driver_connection
            assert raw is not None
            raw.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return False

    def _publish(self, rows: Iterable[dict[str, Any]]) -> None:
        feeds = list(self._feeds)
        for row in rows:
            for feed in feeds:
                feed._put(dict(row) if len(feeds) > 1 else row)

    async def _close_resources(self) -> None:
        conn, express, engine, store, executor = self._conn, self._express, self._engine, self._store, self._executor
        self._conn = self._express = self._engine = self._store = self._executor = None
        if executor is None:
            return

        def close() -> None:
            for connection in (conn, express):
                if connection is not None:
                    connection.close()
            if engine is not None:
                engine.dispose()
            if store is not None:
                store.close()

        try:
            await asyncio.get_running_loop().run_in_executor(executor, close)
        finally:
            executor.shutdown(wait=False)


def _feed_rows(values: list[tuple[Any, ...]], last: int) -> list[dict[str, Any]]:
    """Committed rows (ids up to `last`, consecutive under the write lock) as the feeds get them."""
    first = last - len(values) + 1
    return [dict(zip(COLUMNS, (first + offset, *row), strict=True)) for offset, row in enumerate(values)]


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


class _InsertDriver(_Driver):
    """For `insert_rows`: the INSERT (the one statement of a batch worth a span) goes through
    SQLAlchemy; its bookkeeping (the last id, the rollup marks) straight to the driver, in the same
    transaction. A span costs about as much CPU as the whole commit, and this is the path an
    answer's last byte waits on under audit.durability = "acknowledged"."""

    __slots__ = ("_raw",)

    def __init__(self, conn: Connection) -> None:
        super().__init__(conn)
        self._raw: sqlite3.Connection = conn.connection.driver_connection  # type: ignore[assignment]

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> Any:
        return self._raw.execute(sql, tuple(parameters))


def _traced_engine(store: AuditStore) -> Engine:
    """A SQLAlchemy engine over the store's connections whose transactions begin IMMEDIATE."""
    engine = create_engine(f"sqlite+pysqlite:///{store.path.absolute()}", creator=store.connect)

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.connection.driver_connection.execute("BEGIN IMMEDIATE")  # type: ignore[union-attr]  # no span

    return engine
