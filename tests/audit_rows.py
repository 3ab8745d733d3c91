"""Audit rows for the audit tests and benchmark: records with sensible defaults, and a fast bulk fill."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mlx_manager.audit.record import AuditRecord

_ids = itertools.count(1)


def record(**overrides) -> AuditRecord:
    values = dict(
        request_id=f"req-{next(_ids):06d}",
        timestamp=datetime.now(UTC),
        model="tiny-model",
        endpoint="/v1/chat/completions",
        status="success",
        http_status=200,
        duration_ms=100.0,
        prompt_tokens=10,
        completion_tokens=20,
    )
    values.update(overrides)
    return AuditRecord(**values)


def ago(**delta) -> datetime:
    return datetime.now(UTC) - timedelta(**delta)


def fill(path: Path, records: Iterable[AuditRecord], *, chunk: int = 50_000) -> int:
    """Insert records straight into the database (no writer), in big transactions; return the count."""
    from mlx_manager.audit.query import insert_rows
    from mlx_manager.audit.store import AuditStore

    total = 0
    with AuditStore.open(path) as store:
        batch: list[tuple] = []
        for item in records:
            batch.append(item.values())
            if len(batch) >= chunk:
                with store.write() as conn:
                    insert_rows(conn, batch)
                total += len(batch)
                batch = []
        if batch:
            with store.write() as conn:
                insert_rows(conn, batch)
            total += len(batch)
    return total
