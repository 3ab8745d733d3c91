"""Opening the audit database: the file (0600 in a 0700 folder), its connections and its migrations.

Every connection runs in WAL mode with a busy timeout, so the CLI reads and prunes while the
daemon writes. Write transactions start with BEGIN IMMEDIATE: they take the write lock up front
and wait for it (up to the busy timeout) instead of failing with "database is locked" when a
read transaction later tries to upgrade. With `fsync` (the default) connections run with
`synchronous=FULL`: a committed transaction survives a crash of the process and of the machine
(an OS crash or a power loss), at the cost of one fsync per commit. Without it they run with
`synchronous=NORMAL`, which in WAL mode still keeps every committed transaction across a crash
of the process (kill -9 included: the commit's WAL frames are in the OS's page cache before
COMMIT returns) and only an OS crash or a power loss can undo the last ones; the WAL is synced
at each checkpoint, so the database is never corrupted either way.

Only the standard library's `sqlite3` is used here, so the CLI's read commands start fast; the
daemon's writer wraps `AuditStore.connect` in a SQLAlchemy engine for tracing (see `writer.py`).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from mlx_manager.audit.errors import AuditError, AuditLogBusy, AuditLogCorrupt, AuditLogMissing, AuditLogUnavailable
from mlx_manager.audit.migrations import MIGRATIONS, MIGRATIONS_TABLE, Migration
from mlx_manager.audit.record import format_timestamp

BUSY_TIMEOUT_MS = 10_000

# SQLite primary result codes (the low byte of extended codes).
_SQLITE_PERM, _SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 3, 5, 6, 8
_SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_CANTOPEN = 10, 11, 13, 14
_SQLITE_AUTH, _SQLITE_NOTADB = 23, 26


class AuditStore:
    """An open audit database: one connection, with read and write transactions that report typed errors."""

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = path
        self.fsync = fsync
        self.connection = self.connect()

    @classmethod
    def open(cls, path: Path, *, create: bool = True, migrate: bool = True, fsync: bool = True) -> AuditStore:
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
        store = cls(path, fsync=fsync)
        try:
            if migrate:
                store.migrate()
            else:
                store.applied_migrations()
        except BaseException:
            store.close()
            raise
        return store

    def connect(self) -> sqlite3.Connection:
        """A new connection to this file, configured like every other (the writer makes its own)."""
        # mode=rw: never let SQLite create a stray file (for instance after the database was deleted).
        uri = self.path.absolute().as_uri() + "?mode=rw"
        with self.translate_errors():
            conn = sqlite3.connect(
                uri,
                uri=True,
                timeout=BUSY_TIMEOUT_MS / 1000,
                check_same_thread=False,  # used by one thread at a time, not always the one that opened it
                isolation_level=None,  # transactions are begun explicitly (BEGIN or BEGIN IMMEDIATE)
            )
            try:
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                _set_wal(conn)
                conn.execute(f"PRAGMA synchronous = {'FULL' if self.fsync else 'NORMAL'}")
                conn.execute("PRAGMA cache_size = -32000")  # 32 MB: stats and prune scan a lot
            except BaseException:
                conn.close()
                raise
        return conn

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> AuditStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent snapshot until the block ends; never blocks writers.

        A `read()` or `write()` block inside another joins the outer one's transaction."""
        with self.translate_errors(), _transaction(self.connection, "BEGIN"):
            yield self.connection

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE), committed when the block ends without error."""
        with self.translate_errors(), _transaction(self.connection, "BEGIN IMMEDIATE"):
            yield self.connection

    @contextmanager
    def translate_errors(self) -> Iterator[None]:
        """Turn driver errors into the typed AuditError family, naming the file."""
        try:
            yield
        except sqlite3.Error as exc:
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
            conn.execute(MIGRATIONS_TABLE)
            done = set(_applied(conn))  # again, under the write lock: another process may have migrated
            for migration in wanted:
                if migration.name in done:
                    continue
                for statement in migration.statements:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO audit_migrations (name, applied_at) VALUES (?, ?)",
                    (migration.name, format_timestamp(datetime.now(UTC))),
                )
                applied_now.append(migration.name)
        return applied_now


@contextmanager
def _transaction(conn: sqlite3.Connection, begin: str) -> Iterator[None]:
    if conn.in_transaction:  # a block inside another joins its transaction
        yield
        return
    conn.execute(begin)
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def classify_error(path: Path, orig: BaseException) -> AuditError:
    """The typed error for a driver error (`sqlite3.Error`, also as SQLAlchemy's `exc.orig`)."""
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


def _applied(conn: sqlite3.Connection) -> list[str]:
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit_migrations'").fetchone()
    if not exists:
        return []
    return [row[0] for row in conn.execute("SELECT name FROM audit_migrations ORDER BY name")]


def _migrations_upto(upto: str | None) -> tuple[Migration, ...]:
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


def _set_wal(conn: sqlite3.Connection) -> None:
    """Put the database in WAL mode. While another connection switches a new database's journal
    mode, SQLite answers "database is locked" at once, without its busy handler: wait for that
    here, up to the busy timeout, as for any other lock (seen with 6 connections opening a blank
    database together: about 1 time in 12)."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
