"""The audit log library on a real SQLite file: schema and migrations, the writer, queries, stats, prune."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import event

from mlx_manager.audit import (
    AuditFilter,
    AuditLogCorrupt,
    AuditLogMissing,
    AuditStore,
    AuditWriter,
    compute_stats,
    count_older,
    count_rows,
    parse_age,
    parse_time,
    prune_older,
    query_rows,
    select_rows,
)
from mlx_manager.audit.migrations import MIGRATIONS
from mlx_manager.audit.record import COLUMNS, SPECS, AuditRecord
from tests.audit_rows import ago, fill, record

FINAL_INDEXES = {
    "ix_audit_logs_timestamp": ["timestamp"],
    "ix_audit_logs_model": ["model", "timestamp"],
    "ix_audit_logs_backend_type": ["backend_type", "timestamp"],
    "ix_audit_logs_status": ["status", "timestamp"],
    "ix_audit_logs_request_id": ["request_id"],
    "ix_audit_logs_api_key": ["api_key", "timestamp"],
    "ix_audit_logs_backend": ["backend", "timestamp"],
}

# The schema the first release wrote (migration 0001 only), frozen here on purpose: if someone
# edits migration 0001 instead of adding a new one, this still describes the real old file.
V1_SCHEMA = """
CREATE TABLE audit_migrations (name VARCHAR PRIMARY KEY, applied_at VARCHAR NOT NULL);
INSERT INTO audit_migrations VALUES ('0001_create_audit_logs', '2026-01-01T00:00:00.000000Z');
CREATE TABLE audit_logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id VARCHAR NOT NULL,
    timestamp VARCHAR NOT NULL,
    model VARCHAR,
    backend_type VARCHAR NOT NULL DEFAULT 'local',
    endpoint VARCHAR NOT NULL,
    status VARCHAR NOT NULL,
    http_status INTEGER,
    duration_ms FLOAT NOT NULL,
    time_to_first_token_ms FLOAT,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens INTEGER NOT NULL DEFAULT 0,
    error_type VARCHAR
);
INSERT INTO audit_logs (request_id, timestamp, model, endpoint, status, http_status, duration_ms,
                        prompt_tokens, completion_tokens, total_tokens)
VALUES ('old-1', '2026-01-02T03:04:05.000000Z', 'old-model', '/v1/completions', 'success', 200, 42.0, 3, 4, 7);
"""

# The schema the release before API key names wrote (migrations 0001 and 0002), frozen the same way.
V2_SCHEMA = (
    V1_SCHEMA.replace(
        "INSERT INTO audit_migrations VALUES ('0001_create_audit_logs', '2026-01-01T00:00:00.000000Z');",
        "INSERT INTO audit_migrations VALUES ('0001_create_audit_logs', '2026-01-01T00:00:00.000000Z');\n"
        "INSERT INTO audit_migrations VALUES ('0002_audit_logs_indexes', '2026-01-01T00:00:00.000000Z');",
    )
    + """
CREATE INDEX ix_audit_logs_timestamp ON audit_logs (timestamp);
CREATE INDEX ix_audit_logs_model ON audit_logs (model, timestamp);
CREATE INDEX ix_audit_logs_backend_type ON audit_logs (backend_type, timestamp);
CREATE INDEX ix_audit_logs_status ON audit_logs (status, timestamp);
CREATE INDEX ix_audit_logs_request_id ON audit_logs (request_id);
INSERT INTO audit_logs (request_id, timestamp, model, endpoint, status, http_status, duration_ms,
                        prompt_tokens, completion_tokens, total_tokens, error_type)
VALUES ('old-2', '2026-01-02T03:05:00.000000Z', 'old-model', '/v1/chat/completions', 'error', 401, 1.5, 0, 0, 0,
        'unauthorized');
"""
)


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "audit" / "audit.db"


def run(coro):
    return asyncio.run(coro)


def all_rows(path: Path) -> list[dict]:
    with AuditStore.open(path, create=False) as store, store.read() as conn:
        return query_rows(conn, limit=0, order="oldest")


def table_columns(conn: sqlite3.Connection, table: str = "audit_logs") -> dict[str, dict]:
    return {
        name: {"name": name, "nullable": not notnull}
        for _, name, _type, notnull, _default, _pk in conn.execute(f"PRAGMA table_info({table})")
    }


def table_indexes(conn: sqlite3.Connection, table: str = "audit_logs") -> dict[str, list[str]]:
    return {
        name: [column for _, _, column in conn.execute(f"PRAGMA index_info({name})")]
        for _, name, _unique, origin, _partial in conn.execute(f"PRAGMA index_list({table})")
        if origin == "c"
    }


def pragma(conn: sqlite3.Connection, name: str):
    return conn.execute(f"PRAGMA {name}").fetchone()[0]


# -- schema and migrations --------------------------------------------------------------


def test_blank_database_gets_the_final_schema_private_and_in_wal_mode(db):
    with AuditStore.open(db) as store, store.read() as conn:
        assert store.applied_migrations() == [m.name for m in MIGRATIONS]
        columns = table_columns(conn)
        assert list(columns) == list(COLUMNS)
        assert list(columns) == ["id", *SPECS]  # the record's fields match the migrations
        for name, spec in SPECS.items():
            assert columns[name]["nullable"] == spec.nullable, name
        indexes = table_indexes(conn)
        assert indexes == FINAL_INDEXES
        assert table_indexes(conn, "audit_rollup") == {"ix_audit_rollup_day": ["day"]}
        assert pragma(conn, "journal_mode") == "wal"
        assert pragma(conn, "busy_timeout") == 10_000
        assert pragma(conn, "synchronous") == 2  # FULL
        # AUTOINCREMENT: ids are never reused after a prune
        assert "AUTOINCREMENT" in conn.execute("SELECT sql FROM sqlite_master WHERE name = 'audit_logs'").fetchone()[0]
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700


def test_an_old_schema_database_upgrades_and_keeps_its_rows(db):
    db.parent.mkdir()
    legacy = sqlite3.connect(db)
    legacy.executescript(V1_SCHEMA)
    legacy.close()

    with AuditStore.open(db) as store:
        assert store.applied_migrations() == [m.name for m in MIGRATIONS]
        with store.read() as conn:
            indexes = table_indexes(conn)
            assert indexes == FINAL_INDEXES
            [row] = query_rows(conn)
            assert pragma(conn, "journal_mode") == "wal"
    assert row["request_id"] == "old-1" and row["model"] == "old-model" and row["total_tokens"] == 7
    assert row["timestamp"] == "2026-01-02T03:04:05.000000Z"
    assert row["api_key"] is None
    assert (row["backend"], row["backend_type"]) == ("local", "local")  # every old row was served here
    assert row["upstream_prompt_tokens"] is None and row["upstream_completion_tokens"] is None


def test_a_database_from_before_api_key_names_upgrades_in_place_and_keeps_its_rows(db):
    db.parent.mkdir()
    legacy = sqlite3.connect(db)
    legacy.executescript(V2_SCHEMA)
    legacy.close()

    with AuditStore.open(db, migrate=False) as store:
        assert store.applied_migrations() == ["0001_create_audit_logs", "0002_audit_logs_indexes"]
        assert store.migrate() == [
            "0003_audit_logs_api_key",
            "0004_audit_rollup",
            "0005_audit_logs_generation_facts",
            "0006_audit_logs_backend",
            "0007_audit_minutes",
        ]
        assert store.applied_migrations() == [m.name for m in MIGRATIONS]
        with store.read() as conn:
            assert list(table_columns(conn)) == list(COLUMNS)
            assert table_indexes(conn) == FINAL_INDEXES
    fill(db, [record(request_id="new-alice", api_key="alice"), record(request_id="new-open")])
    rows = all_rows(db)
    assert [(r["request_id"], r["api_key"]) for r in rows] == [
        ("old-1", None),
        ("old-2", None),
        ("new-alice", "alice"),
        ("new-open", None),
    ]
    old_2 = rows[1]
    assert (old_2["status"], old_2["http_status"], old_2["error_type"]) == ("error", 401, "unauthorized")
    assert old_2["timestamp"] == "2026-01-02T03:05:00.000000Z" and old_2["duration_ms"] == 1.5
    with AuditStore.open(db, create=False) as store, store.read() as conn:
        assert ids(query_rows(conn, AuditFilter(api_key="alice"))) == ["new-alice"]
        # the key filter is one index range scan, like the model filter
        plan = " ".join(
            str(r[-1])
            for r in conn.execute(
                "EXPLAIN QUERY PLAN SELECT id FROM audit_logs WHERE api_key = 'alice' ORDER BY timestamp DESC"
            )
        )
        assert "ix_audit_logs_api_key" in plan


@pytest.mark.parametrize("applied", range(1, len(MIGRATIONS)))
def test_every_partial_migration_state_upgrades(db, applied):
    with AuditStore.open(db, migrate=False) as store:
        assert store.migrate(upto=MIGRATIONS[applied - 1].name) == [m.name for m in MIGRATIONS[:applied]]
    fill(db, [record(request_id="before-upgrade")])  # fill() opens the store: that upgrades it
    with AuditStore.open(db) as store:
        assert store.applied_migrations() == [m.name for m in MIGRATIONS]
        assert store.migrate() == []
    assert [r["request_id"] for r in all_rows(db)] == ["before-upgrade"]


def test_a_newer_programs_database_still_opens(db):
    with AuditStore.open(db) as store, store.write() as conn:
        conn.execute("INSERT INTO audit_migrations VALUES ('9999_from_the_future', 'x')")
    with AuditStore.open(db) as store:
        assert "9999_from_the_future" in store.applied_migrations()


def test_connections_opening_a_blank_database_at_once_migrate_it_once(db):
    errors = []

    def open_it():
        try:
            AuditStore.open(db).close()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with AuditStore.open(db) as store:
        assert store.applied_migrations() == [m.name for m in MIGRATIONS]


def test_missing_and_corrupt_files_raise_typed_errors(db):
    with pytest.raises(AuditLogMissing, match="no audit log yet at"):
        AuditStore.open(db, create=False)
    assert not db.exists()  # opening for reading never creates the file
    db.parent.mkdir()
    db.write_bytes(b"this is not a database, just some bytes" * 200)
    with pytest.raises(AuditLogCorrupt, match="not a readable audit database"):
        AuditStore.open(db, create=False)


# -- privacy ------------------------------------------------------------------------------


def test_no_field_or_column_can_hold_request_text():
    # The full marker test (prompts sent through the daemon, then the db and -wal files
    # scanned) lives with the daemon tests; here: the library has nowhere to put text.
    text_names = {"prompt", "prompts", "messages", "message", "input", "content", "completion", "text", "output"}
    record_fields = {f.name for f in dataclasses.fields(AuditRecord)}
    assert not record_fields & text_names
    assert set(COLUMNS) - {"id"} == record_fields
    with pytest.raises(TypeError):
        AuditRecord(
            request_id="r",
            timestamp=ago(),
            endpoint="/v1/completions",
            status="success",
            duration_ms=1.0,
            prompt="secret",
        )  # type: ignore[call-arg]


def test_records_validate_what_the_daemon_hands_over():
    # Checked when the row is taken (values() / AuditWriter.record), not when the record is
    # made: the daemon fills its record in while the request runs.
    with pytest.raises(ValueError, match="timezone-aware"):
        record(timestamp=datetime.now()).values()
    with pytest.raises(ValueError, match="success, error, timeout, cancelled"):
        record(status="ok").values()
    local = record(
        timestamp=datetime(2026, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2))),
        prompt_tokens=None,
        completion_tokens=5,
    ).row()
    assert datetime.fromisoformat(local["timestamp"]) == datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    assert (local["prompt_tokens"], local["total_tokens"]) == (0, 5)


def test_a_record_can_be_filled_in_while_its_request_runs_and_extended():
    # The daemon's RequestOutcome is an AuditRecord with fields of its own, filled in as the
    # request runs: every field has a default, and only the record's own fields are stored.
    @dataclasses.dataclass(kw_only=True)
    class Outcome(AuditRecord):
        method: str = "POST"
        stream: bool = False

    outcome = Outcome(request_id="in-progress", endpoint="/v1/chat/completions")
    assert outcome.status is None and outcome.timestamp.tzinfo is not None
    with pytest.raises(ValueError, match="status is not set"):
        outcome.values()
    outcome.status, outcome.duration_ms, outcome.completion_tokens = "success", 12.5, 3
    row = outcome.row()
    assert list(row) == list(COLUMNS[1:]) and "method" not in row
    assert (row["prompt_tokens"], row["total_tokens"]) == (0, 3)
    assert AuditRecord().status is None  # a blank record is allowed too, until it is stored


def test_the_writer_takes_the_values_when_recorded_and_refuses_bad_records(db, caplog):
    async def scenario():
        writer = AuditWriter(db)
        await writer.start()
        kept = record(request_id="kept", status="success", duration_ms=5.0)
        writer.record(kept)
        kept.status, kept.duration_ms = "error", 999.0  # the caller keeps using its object
        writer.record(record(request_id="naive", timestamp=datetime.now()))
        writer.record(record(request_id="no-status", status=None))
        writer.record(record(request_id="fine"))
        await writer.stop()
        return writer

    writer = run(scenario())
    assert writer.written == 2 and writer.dropped == 2
    rows = {r["request_id"]: r for r in all_rows(db)}
    assert set(rows) == {"kept", "fine"}
    assert (rows["kept"]["status"], rows["kept"]["duration_ms"]) == ("success", 5.0)
    assert "request naive not stored: AuditRecord.timestamp must be a timezone-aware" in caplog.text
    assert "request no-status not stored: AuditRecord.status is not set" in caplog.text


# -- the writer ---------------------------------------------------------------------------


def test_writer_loses_nothing_from_200_concurrent_requests_on_stop(db):
    async def scenario():
        writer = AuditWriter(db)
        await writer.start()

        async def request(i):
            await asyncio.sleep(0.001 * (i % 7))
            writer.record(record(request_id=f"burst-{i:03d}", duration_ms=float(i), completion_tokens=i))

        await asyncio.gather(*(request(i) for i in range(200)))
        assert writer.backlog > 0  # nothing waited for the disk
        await writer.stop()
        assert writer.backlog == 0 and writer.written == 200 and writer.dropped == 0

    run(scenario())
    rows = all_rows(db)
    assert sorted(r["request_id"] for r in rows) == [f"burst-{i:03d}" for i in range(200)]
    by_id = {r["request_id"]: r for r in rows}
    assert by_id["burst-123"]["completion_tokens"] == 123 and by_id["burst-123"]["duration_ms"] == 123.0


def test_writer_writes_a_burst_in_one_batch_and_a_lone_row_on_its_own(db):
    # How soon a lone row is committed (the flush interval) is a figure of
    # benchmarks/bench_audit.py ("slowest record-to-commit"), not a deadline here.
    inserts = []

    async def scenario():
        writer = AuditWriter(db)
        await writer.start()
        event.listen(
            writer.sql_engine,
            "before_cursor_execute",
            lambda conn, cursor, statement, params, context, many: (
                inserts.append(many) if statement.startswith("INSERT INTO audit_logs") else None
            ),
        )
        for _ in range(1000):
            writer.record(record())
        await writer.flush()
        writer.record(record(request_id="lone"))
        reader = AuditStore.open(db, create=False)
        deadline = time.monotonic() + 60  # a ceiling: nothing but the writer's own interval commits it
        committed = False
        while not committed and time.monotonic() < deadline:
            with reader.read() as conn:
                committed = bool(query_rows(conn, AuditFilter(request_id="lone")))
            await asyncio.sleep(0.005)
        reader.close()
        await writer.stop()
        return committed

    assert run(scenario()), "the lone row was never committed"
    assert inserts[0] is True and len(inserts) == 2  # 1000 rows in one executemany, then the lone row
    assert len(all_rows(db)) == 1001


def test_record_never_waits_while_another_process_holds_the_lock(db):
    AuditStore.open(db).close()

    async def scenario():
        writer = AuditWriter(db)
        await writer.start()
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        slowest = 0.0
        for i in range(50):
            started = time.perf_counter()
            writer.record(record(request_id=f"locked-{i}"))
            slowest = max(slowest, time.perf_counter() - started)
            await asyncio.sleep(0.01)
        assert writer.backlog == 50  # still waiting for the lock
        blocker.execute("COMMIT")
        blocker.close()
        await writer.stop()
        return slowest, writer.written

    slowest, written = run(scenario())
    # Waiting for the lock would take the busy timeout (10 s) per call; a busy machine, far less.
    assert slowest < 1.0, f"a record() took {slowest:.2f}s: it waited for the lock"
    assert written == 50 and len(all_rows(db)) == 50


def test_a_failed_batch_is_retried_not_lost_or_doubled(db, monkeypatch):
    from mlx_manager.audit import writer as writer_module

    real_insert = writer_module.insert_rows
    failures = []

    def flaky_insert(conn, rows):
        if not failures:
            failures.append(len(rows))
            real_insert(conn, rows)  # written, then the transaction fails: it must roll back
            raise sqlite3.OperationalError("disk I/O error (simulated)")
        return real_insert(conn, rows)

    monkeypatch.setattr(writer_module, "insert_rows", flaky_insert)

    async def scenario():
        writer = AuditWriter(db)
        await writer.start()
        for i in range(30):
            writer.record(record(request_id=f"retry-{i:02d}"))
        await writer.stop()
        return writer

    writer = run(scenario())
    assert failures == [30]
    assert writer.written == 30 and writer.dropped == 0
    assert [r["request_id"] for r in all_rows(db)] == [f"retry-{i:02d}" for i in range(30)]


def test_a_row_the_database_refuses_costs_only_that_row(db):
    async def scenario():
        writer = AuditWriter(db)
        await writer.start()
        async with writer.subscribe() as feed:
            writer.record(record(request_id="fine-1"))
            writer.record(record(request_id=None))  # a caller's bug: NOT NULL
            writer.record(record(request_id="wrong-type", duration_ms=[1.5]))  # not bindable
            writer.record(record(request_id="fine-2"))
            received = [await asyncio.wait_for(feed.__anext__(), 2) for _ in range(2)]
        await writer.stop()
        return writer, received

    writer, received = run(scenario())
    assert writer.written == 2 and writer.dropped == 2 and writer.backlog == 0
    assert [r["request_id"] for r in all_rows(db)] == ["fine-1", "fine-2"]
    assert received == all_rows(db)


def test_a_crash_after_commit_loses_no_committed_row(db):
    # A separate process records rows, waits until the writer says they are committed, then is
    # killed without any shutdown: every one of those rows must be in the file.
    script = textwrap.dedent(
        f"""
        import asyncio, os, signal, sys
        from pathlib import Path
        from tests.audit_rows import record
        from mlx_manager.audit import AuditWriter

        async def main():
            writer = AuditWriter(Path({str(db)!r}))
            await writer.start()
            for i in range(500):
                writer.record(record(request_id=f"crash-{{i}}"))
            await writer.flush()
            for i in range(500, 520):
                writer.record(record(request_id=f"unflushed-{{i}}"))
            print("committed", writer.written, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        asyncio.run(main())
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == -9, proc.stderr
    assert proc.stdout.strip() == "committed 500"
    committed = [r["request_id"] for r in all_rows(db) if r["request_id"].startswith("crash-")]
    assert sorted(committed) == sorted(f"crash-{i}" for i in range(500))


def test_subscribers_get_committed_rows_with_their_ids(db):
    async def scenario():
        writer = AuditWriter(db)
        await writer.start()
        async with writer.subscribe() as feed:
            for i in range(5):
                writer.record(record(request_id=f"live-{i}", model="m", time_to_first_token_ms=12.5))
            received = [await asyncio.wait_for(feed.__anext__(), 2) for _ in range(5)]
        late = writer.subscribe()
        await writer.stop()
        leftovers = [row async for row in late]  # the feed ends when the writer stops
        return received, leftovers

    received, leftovers = run(scenario())
    stored = {r["id"]: r for r in all_rows(db)}
    assert [r["request_id"] for r in received] == [f"live-{i}" for i in range(5)]
    for row in received:
        assert row == stored[row["id"]]  # same dict as a query returns: JSON-ready, with its real id
    assert leftovers == []


def test_writer_prunes_in_batches_and_records_after_stop_are_counted(db):
    fill(db, [record(request_id=f"old-{i}", timestamp=ago(days=10)) for i in range(4500)])
    fill(db, [record(request_id="new", timestamp=ago(hours=1))])

    async def scenario():
        writer = AuditWriter(db)
        await writer.start()
        deleted = await writer.prune(timedelta(days=7))
        await writer.stop()
        writer.record(record())
        return deleted, writer.dropped

    deleted, dropped = run(scenario())
    assert deleted == 4500 and dropped == 1
    assert [r["request_id"] for r in all_rows(db)] == ["new"]


def test_the_wal_file_is_private_too(db):
    async def scenario():
        writer = AuditWriter(db)
        await writer.start()
        writer.record(record())
        await writer.flush()
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in db.parent.iterdir()}
        await writer.stop()
        return modes

    modes = run(scenario())
    assert modes["audit.db-wal"] == 0o600 and modes["audit.db"] == 0o600


# -- the query ----------------------------------------------------------------------------


@pytest.fixture
def sample(db) -> Path:
    base = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    fill(
        db,
        [
            record(
                request_id="a",
                timestamp=base,
                model="m1",
                endpoint="/v1/chat/completions",
                status="success",
                api_key="alice",
            ),
            record(
                request_id="b",
                timestamp=base + timedelta(minutes=1),
                model="m2",
                endpoint="/v1/completions",
                status="error",
                http_status=404,
                error_type="model_not_found",
                api_key="bob",
            ),
            record(
                request_id="c",
                timestamp=base + timedelta(minutes=2),
                model="m1",
                endpoint="/v1/embeddings",
                status="timeout",
                http_status=504,
                error_type="timeout",
                api_key="alice",
            ),
            record(
                request_id="d",
                timestamp=base + timedelta(minutes=3),
                model=None,
                endpoint="/v1/chat/completions",
                status="error",
                http_status=422,
                error_type="invalid_request",
            ),
            record(
                request_id="e",
                timestamp=base + timedelta(minutes=4),
                model="m1",
                endpoint="/v1/chat/completions",
                status="cancelled",
                http_status=None,
                backend_type="openai",
            ),
        ],
    )
    return db


def ids(rows):
    return [r["request_id"] for r in rows]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (AuditFilter(), ["e", "d", "c", "b", "a"]),
        (AuditFilter(model="m1"), ["e", "c", "a"]),
        (AuditFilter(status="error"), ["d", "b"]),
        (AuditFilter(endpoint="/v1/chat/completions"), ["e", "d", "a"]),
        (AuditFilter(backend_type="openai"), ["e"]),
        (AuditFilter(request_id="c"), ["c"]),
        (AuditFilter(api_key="alice"), ["c", "a"]),
        (AuditFilter(api_key="bob", model="m2"), ["b"]),
        (AuditFilter(api_key="carol"), []),
        (
            AuditFilter(since=datetime(2026, 5, 1, 12, 1, tzinfo=UTC), until=datetime(2026, 5, 1, 12, 3, tzinfo=UTC)),
            ["c", "b"],
        ),  # [since, until)
        (AuditFilter(model="m1", status="timeout", since=datetime(2026, 5, 1, tzinfo=UTC)), ["c"]),
        (AuditFilter(model="x' OR '1'='1"), []),
    ],
)
def test_query_filters(sample, filters, expected):
    with AuditStore.open(sample, create=False) as store, store.read() as conn:
        assert ids(query_rows(conn, filters, limit=0)) == expected
        assert count_rows(conn, filters) == len(expected)


def test_query_order_limit_and_after_id(sample):
    with AuditStore.open(sample, create=False) as store, store.read() as conn:
        assert ids(query_rows(conn, limit=2)) == ["e", "d"]
        assert ids(query_rows(conn, limit=2, order="oldest")) == ["a", "b"]
        first_two = query_rows(conn, limit=2, order="oldest")
        assert ids(query_rows(conn, after_id=first_two[-1]["id"], limit=0)) == ["c", "d", "e"]
        row = query_rows(conn, AuditFilter(request_id="e"))[0]
    assert list(row) == list(COLUMNS)
    assert row["model"] == "m1" and row["http_status"] is None and row["timestamp"] == "2026-05-01T12:04:00.000000Z"
    assert row["api_key"] is None


def test_the_query_binds_every_value():
    hostile = "m'; DROP TABLE audit_logs; --"
    statement = select_rows(AuditFilter(model=hostile, since=datetime(2026, 1, 1, tzinfo=UTC)), limit=5)
    assert hostile not in statement.sql and "2026" not in statement.sql
    assert hostile in statement.params


# -- stats --------------------------------------------------------------------------------


def test_stats_numbers(db):
    rows = [
        record(model="m1", duration_ms=float(ms), completion_tokens=10, time_to_first_token_ms=ms / 10, api_key="alice")
        for ms in range(100, 1100, 100)
    ]  # 10 requests, 100..1000 ms
    rows += [
        record(model="m2", status="error", duration_ms=50.0, completion_tokens=0, http_status=500, api_key="bob"),
        record(model="m2", status="timeout", duration_ms=5000.0, completion_tokens=0, http_status=504),
    ]
    fill(db, rows)
    with AuditStore.open(db, create=False) as store, store.read() as conn:
        [overall] = compute_stats(conn)
        groups = compute_stats(conn, by="model")
        by_status = compute_stats(conn, by="status")
        by_key = compute_stats(conn, by="key")
        [bob] = compute_stats(conn, AuditFilter(api_key="bob"))
        empty = compute_stats(conn, AuditFilter(since=ago(days=-1)))
    assert overall["requests"] == 12 and overall["errors"] == 1 and overall["timeouts"] == 1
    assert overall["error_rate"] == pytest.approx(1 / 12)
    # nearest rank over 50, 100..1000, 5000: the 6th and the 12th of 12
    assert overall["p50_duration_ms"] == 500.0 and overall["p95_duration_ms"] == 5000.0
    assert overall["mean_ttft_ms"] == pytest.approx(55.0)
    assert overall["completion_tokens"] == 100
    assert overall["tokens_per_second"] == pytest.approx(100 / 5.5)  # 100 tokens over 5.5 s of producing requests
    assert [(g["model"], g["requests"]) for g in groups] == [("m1", 10), ("m2", 2)]
    assert groups[0]["p50_duration_ms"] == 500.0 and groups[0]["p95_duration_ms"] == 1000.0
    assert groups[1]["tokens_per_second"] is None and groups[1]["mean_ttft_ms"] is None
    assert {g["status"]: g["requests"] for g in by_status} == {"success": 10, "error": 1, "timeout": 1}
    assert [(g["key"], g["requests"], g["errors"], g["timeouts"]) for g in by_key] == [
        ("alice", 10, 0, 0),
        ("bob", 1, 1, 0),
        (None, 1, 0, 1),  # among equals, no key last
    ]
    assert (bob["requests"], bob["errors"]) == (1, 1)
    assert empty == []


# -- prune --------------------------------------------------------------------------------


def test_prune_deletes_only_older_rows_in_batches(db):
    fill(db, [record(request_id=f"old-{i}", timestamp=ago(days=8)) for i in range(25)])
    fill(db, [record(request_id=f"new-{i}", timestamp=ago(days=6)) for i in range(5)])
    with AuditStore.open(db, create=False) as store:
        transactions = []
        store.connection.set_trace_callback(lambda sql: transactions.append(1) if sql == "COMMIT" else None)
        cutoff = ago(days=7)
        assert count_older(store, cutoff) == 25
        assert prune_older(store, cutoff, batch_size=10, pause=0) == 25
        assert count_older(store, cutoff) == 0
    assert len(transactions) >= 3  # 10 + 10 + 5: three short transactions, not one long one
    assert sorted(ids(all_rows(db))) == sorted(f"new-{i}" for i in range(5))


# -- the time forms users type ------------------------------------------------------------


def test_parse_age_and_time():
    now = datetime(2026, 5, 10, 12, 0, tzinfo=UTC)
    assert parse_age("30m") == timedelta(minutes=30)
    assert parse_age("7d") == timedelta(days=7) and parse_age("2w") == timedelta(weeks=2)
    assert parse_time("2h", now=now) == datetime(2026, 5, 10, 10, 0, tzinfo=UTC)
    assert parse_time("2026-05-01", now=now) == datetime(2026, 5, 1, tzinfo=UTC)
    assert parse_time("2026-05-01T12:00:00+02:00", now=now) == datetime(2026, 5, 1, 10, tzinfo=UTC)
    assert parse_time("2026-05-01T12:00:00Z", now=now) == datetime(2026, 5, 1, 12, tzinfo=UTC)
    for bad in ("yesterday", "7", "-3d", "0m", "3 parsecs", ""):
        with pytest.raises(ValueError, match="30m, 2h, 7d"):
            parse_time(bad, now=now)
