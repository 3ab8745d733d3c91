"""When an API request last named each model, from the audit log: `models list` shows it.

One indexed lookup per model (the (model, timestamp) index, newest first), through the store's
plain sqlite3 read path. Admin calls (a pull, a load) are not uses. A missing or unreadable log
means no answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from mlx_manager.audit.errors import AuditError
from mlx_manager.audit.store import AuditStore

_NEWEST_USE = (
    "SELECT timestamp FROM audit_logs WHERE model = ? AND endpoint LIKE '/v1/%' ORDER BY timestamp DESC LIMIT 1"
)


def last_used_by_model(path: Path, model_ids: Iterable[str]) -> dict[str, datetime]:
    """model id -> the time of the newest API request for it (UTC), for those the log names."""
    found: dict[str, datetime] = {}
    try:
        with AuditStore.open(path, create=False, migrate=False) as store, store.read() as conn:
            for model_id in dict.fromkeys(model_ids):
                row = conn.execute(_NEWEST_USE, (model_id,)).fetchone()
                if row is not None:
                    found[model_id] = datetime.fromisoformat(row[0])
    except (AuditError, ValueError):
        pass
    return found
