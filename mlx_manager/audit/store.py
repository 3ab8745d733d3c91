"""Opening the audit database: the file (0600 in a 0700 folder), the SQLite engine and its migrations.

Every connection runs in WAL mode with a busy timeout, so the CLI reads and prunes while the
daemon writes. Write transactions start with BEGIN IMMEDIATE: they take the write lock up front
and wait for it (up to the busy timeout) instead of failing with "database is locked" when a
read transaction later tries to upgrade. `synchronous=FULL` makes a committed batch survive a
crash or power loss, at the cost of one fsync per batch.

The SQLite driver is the standard library's, used synchronously: the CLI calls it directly and
the daemon's writer calls it from its own thread (see `writer.py`), so the event loop never
waits on the disk.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError

from mlx_manager.audit.errors import AuditError, AuditLogBusy, AuditLogCorrupt, AuditLogMissing, AuditLogUnavailable
from mlx_manager.audit.migrations import MIGRATIONS, MIGRATIONS_TABLE
from mlx_manager.audit.record import format_timestamp

BUSY_TIMEOUT_MS = 10_000
_BEGIN_OPTION = "audit_begin"

# SQLite primary result codes (the low byte of extended codes).
_SQLITE_PERM, _SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 3, 5, 6, 8
_SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_CANTOPEN = 10, 11, 13, 14
_SQLITE_AUTH, _SQLITE_NOTADB = 23, 26


class AuditStore:
    """An open audit database: an engine plus read and write transactions that report typed errors."""

    def __init__(self, path: Path, engine: Engine) -> None:
        self.path = path
        self.engine = engine

    @classmethod
    def open(cls, path: Path, *, create: bool = True, migrate: bool = True) -> AuditStore:
        """Open (and with `create`, make) the database and apply pending migrations.

        Raises AuditLogMissing when the file does not exist and `create` is false,
        AuditLogCorrupt when it is not a SQLite database, AuditError for other failures.
        """
        path = Path(path).expanduser()
        if not path.exists():
            if not create:
                raise AuditLogMissing(path, f"no audit log yet at {path}")
            _create_private_file(path)
        elif path.is_dir():
            raise AuditLogUnavailable(path, f"the audit log path {path} is a folder, not a database file")
        store = cls(path, _make_engine(path))
        try:
            if migrate:
                store.migrate()
            else:
                store.applied_migrations()
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> AuditStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read transaction: one consistent snapshot until the block ends; never blocks writers."""
        with self.translate_errors(), self.engine.connect() as conn:
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction (BEGIN IMMEDIATE), committed when the block ends without error."""
        with self.translate_errors(), self.engine.connect() as conn:
            conn.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})
            with conn.begin():
                yield conn

    def connect_writer(self) -> Connection:
        """A long-lived connection whose transactions begin IMMEDIATE (the writer thread owns it)."""
        with self.translate_errors():
            conn = self.engine.connect()
        conn.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})
        return conn

    @contextmanager
    def translate_errors(self) -> Iterator[None]:
        """Turn driver errors into the typed AuditError family, naming the file."""
        try:
            yield
        except DBAPIError as exc:
            raise classify_error(self.path, exc) from exc

    def applied_migrations(self) -> list[str]:
        with self.read() as conn:
            return _applied(conn)

    def migrate(self, *, upto: str | None = None) -> list[str]:
        """Apply the migrations not yet recorded (in order, up to and including `upto`); return their names."""
        wanted = _migrations_upto(upto)
        recorded = set(self.applied_migrations())
        if all(m.name in recorded for m in wanted):
            return []
        applied_now: list[str] = []
        with self.write() as conn:
            conn.exec_driver_sql(MIGRATIONS_TABLE)
            done = set(_applied(conn))  # again, under the write lock: another process may have migrated
            for migration in wanted:
                if migration.name in done:
                    continue
                for statement in migration.statements:
                    conn.exec_driver_sql(statement)
                conn.exec_driver_sql(
                    "INSERT INTO audit_migrations (name, applied_at) VALUES (?, ?)",
                    (migration.name, format_timestamp(datetime.now(timezone.utc))),
                )
                applied_now.append(migration.name)
        return applied_now


def classify_error(path: Path, exc: DBAPIError) -> AuditError:
    orig = exc.orig
    code = getattr(orig, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    detail = str(orig)
    if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return AuditLogCorrupt(path, f"{path} is not a readable audit database ({detail})")
    if primary in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return AuditLogBusy(
            path, f"the audit database at {path} stayed locked by another process for {BUSY_TIMEOUT_MS // 1000} s"
        )
    if primary in (_SQLITE_PERM, _SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_AUTH):
        return AuditLogUnavailable(path, f"cannot use the audit database at {path} ({detail})")
    return AuditError(path, f"audit database error at {path} ({detail})")


def _applied(conn: Connection) -> list[str]:
    exists = conn.exec_driver_sql(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit_migrations'"
    ).first()
    if not exists:
        return []
    return [row[0] for row in conn.exec_driver_sql("SELECT name FROM audit_migrations ORDER BY name")]


def _migrations_upto(upto: str | None):
    if upto is None:
        return MIGRATIONS
    names = [m.name for m in MIGRATIONS]
    if upto not in names:
        raise ValueError(f"unknown migration {upto!r}")
    return MIGRATIONS[: names.index(upto) + 1]


def _create_private_file(path: Path) -> None:
    """Make the folder (0700) and an empty database file (0600) before SQLite touches them.

    SQLite gives the -wal and -shm files the database file's mode, so they stay private too.
    """
    if not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def _make_engine(path: Path) -> Engine:
    # mode=rw: never let SQLite create a stray file (for instance after the database was deleted).
    uri = path.absolute().as_uri() + "?mode=rw"

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(
            uri,
            uri=True,
            timeout=BUSY_TIMEOUT_MS / 1000,
            check_same_thread=False,  # the pool hands a connection to one thread at a time
            isolation_level=None,  # SQLAlchemy's "begin" hook below emits BEGIN itself
        )

    engine = create_engine(f"sqlite+pysqlite:///{path.absolute()}", creator=connect)

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.execute("PRAGMA cache_size = -32000")  # 32 MB: stats and prune scan a lot
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine
