"""Typed errors of the audit log; the CLI and the daemon decide how to show them."""

from __future__ import annotations

from pathlib import Path


class AuditError(Exception):
    """Something is wrong with the audit database at `path`."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(message)
        self.path = path


class AuditLogMissing(AuditError):
    """There is no audit database yet (the daemon has not written one)."""


class AuditLogCorrupt(AuditError):
    """The file exists but is not a readable audit database."""


class AuditLogBusy(AuditError):
    """Another process held the database lock for longer than the busy timeout."""


class AuditLogUnavailable(AuditError):
    """The file cannot be opened or written (permissions, read-only disk, disk full)."""
