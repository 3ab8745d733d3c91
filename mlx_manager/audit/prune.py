"""Retention: delete rows older than a cutoff in small transactions, so a writer is never held up for long.

Each batch is its own BEGIN IMMEDIATE transaction of a few milliseconds; between batches the
pruner sleeps briefly so a writer waiting on the lock gets it.
"""

from __future__ import annotations

import time
from datetime import datetime

from mlx_manager.audit.filters import AuditFilter
from mlx_manager.audit.query import count_rows, delete_older_batch
from mlx_manager.audit.store import AuditStore

PRUNE_BATCH = 2000
PRUNE_PAUSE_S = 0.002


def count_older(store: AuditStore, before: datetime) -> int:
    """How many rows a prune with this cutoff would delete now."""
    with store.read() as conn:
        return count_rows(conn, AuditFilter(until=before))


def prune_older(
    store: AuditStore, before: datetime, *, batch_size: int = PRUNE_BATCH, pause: float = PRUNE_PAUSE_S
) -> int:
    """Delete every row with a timestamp before `before`; return how many were deleted."""
    deleted = 0
    while True:
        with store.write() as conn:
            n = delete_older_batch(conn, before, batch_size)
        deleted += n
        if n < batch_size:
            return deleted
        if pause:
            time.sleep(pause)
