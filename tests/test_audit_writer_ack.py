"""The writer's group commit (`committed()`, behind audit.durability = "acknowledged") and what a
commit survives (`fsync`), on a real SQLite file. The kill -9 end to end test is test_audit_durability.py."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest
from sqlalchemy import event

from mlx_manager.audit import AuditStore, AuditWriter
from tests.audit_rows import record


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "audit.db"


def stored_ids(path: Path) -> set[str]:
    """What another connection (another process would see the same) finds on disk."""
    with AuditStore.open(path, create=False) as store, store.read() as conn:
        return {request_id for (request_id,) in conn.execute("SELECT request_id FROM audit_logs")}


@pytest.mark.parametrize("fsync", [False, True])  # committed on the event loop / by the writer thread
def test_committed_returns_once_the_row_is_on_disk_and_rows_queued_by_then_share_the_commit(
    db: Path, fsync: bool
) -> None:
    inserts: list[int] = []

    async def scenario() -> tuple[bool, set[str], bool, set[str], list[bool]]:
        writer = AuditWriter(db, flush_interval=3600, fsync=fsync)  # the interval never commits here
        await writer.start()
        event.listen(
            writer.sql_engine,
            "before_cursor_execute",
            lambda conn, cursor, statement, params, context, many: (
                inserts.append(len(params) if many else 1) if statement.startswith("INSERT INTO audit_logs") else None
            ),
        )
        lone = writer.record(record(request_id="lone"))
        assert lone is not None
        alone = await writer.committed(lone)
        after_lone = stored_ids(db)
        # Eight answers end together: their rows are queued when the first one waits, and share its commit.
        tickets = [writer.record(record(request_id=f"together-{i}")) for i in range(8)]
        assert None not in tickets
        first = await writer.committed(tickets[0])  # type: ignore[arg-type]
        after_first = stored_ids(db)
        rest = await asyncio.gather(*(writer.committed(t) for t in tickets[1:]))  # type: ignore[arg-type]
        await writer.stop()
        return alone, after_lone, first, after_first, list(rest)

    alone, after_lone, first, after_first, rest = asyncio.run(scenario())
    assert alone and after_lone == {"lone"}
    assert first and after_first == {"lone", *(f"together-{i}" for i in range(8))}
    assert rest == [True] * 7
    if fsync:  # the writer thread's INSERTs are traced: one commit for the lone row, one for the eight
        assert inserts == [1, 8]


def test_a_row_committed_for_a_waiting_answer_reaches_the_live_feed_with_its_id(db: Path) -> None:
    async def scenario() -> tuple[dict, int]:
        writer = AuditWriter(db, flush_interval=3600)
        await writer.start()
        async with writer.subscribe() as feed:
            ticket = writer.record(record(request_id="fed"))
            assert ticket is not None and await writer.committed(ticket)
            row = await asyncio.wait_for(anext(feed), 60)
        await writer.stop()
        with AuditStore.open(db, create=False) as store, store.read() as conn:
            (stored_id,) = conn.execute("SELECT id FROM audit_logs WHERE request_id = 'fed'").fetchone()
        return row, stored_id

    row, stored_id = asyncio.run(scenario())
    assert row["request_id"] == "fed" and row["id"] == stored_id


def test_committed_does_not_wait_for_the_disk_after_stop(db: Path) -> None:
    async def scenario() -> tuple[bool, bool]:
        writer = AuditWriter(db)
        await writer.start()
        ticket = writer.record(record(request_id="before-stop"))
        assert ticket is not None
        await writer.stop()  # writes every queued row
        return await writer.committed(ticket), await writer.committed(ticket + 1)

    assert asyncio.run(scenario()) == (True, False)  # ticket + 1 was never recorded: False at once
    assert stored_ids(db) == {"before-stop"}


def test_committed_while_another_process_holds_the_lock_waits_for_it_without_blocking_the_loop(db: Path) -> None:
    AuditStore.open(db).close()

    async def scenario() -> tuple[float, bool, bool, set[str], set[str]]:
        writer = AuditWriter(db)
        await writer.start()
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        ticket = writer.record(record(request_id="under-lock"))
        assert ticket is not None
        started = time.perf_counter()
        waiting = asyncio.ensure_future(writer.committed(ticket))
        for _ in range(20):  # the loop keeps turning: nothing waits for the lock on it
            await asyncio.sleep(0)
        turned = time.perf_counter() - started
        done_under_lock = waiting.done()
        blocker.execute("COMMIT")
        blocker.close()
        first = await waiting
        after = writer.record(record(request_id="after-lock"))
        assert after is not None
        second = await writer.committed(after)
        stored_first = stored_ids(db)
        await writer.stop()
        return turned, done_under_lock, first and second, stored_first, stored_ids(db)

    turned, done_under_lock, committed, stored, at_stop = asyncio.run(scenario())
    # Waiting for the lock on the loop would take the busy timeout (10 s); a busy machine, far less.
    assert turned < 1.0, f"the loop stood still {turned:.2f}s: a commit waited for the lock on it"
    assert not done_under_lock
    assert committed and stored == at_stop == {"under-lock", "after-lock"}


@pytest.mark.parametrize(("fsync", "level"), [(False, 1), (True, 2)])
def test_fsync_decides_what_a_commit_survives(db: Path, fsync: bool, level: int) -> None:
    """synchronous=NORMAL (1) in WAL mode: a commit survives a crash of the process, not of the OS;
    FULL (2): an fsync per commit, it survives an OS crash or a power loss too."""

    async def scenario() -> int:
        writer = AuditWriter(db, fsync=fsync)
        await writer.start()
        with writer.sql_engine.connect() as conn:  # configured like the writer's own connection
            synchronous = conn.exec_driver_sql("PRAGMA synchronous").scalar_one()
        await writer.stop()
        return int(synchronous)

    assert asyncio.run(scenario()) == level
