"""When an API request last named each model, from the audit log: `models list` shows it.

Plain sqlite3, read-only, one indexed lookup per model (the (model, timestamp) index, newest
first): `models list` must answer at once, so SQLAlchemy is not imported for it. Admin calls
(a pull, a load) are not uses. A missing or unreadable log means no answer.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from mlx_manager.audit.record import parse_timestamp

BUSY_TIMEOUT_SECONDS = 2.0
_NEWEST_USE = (
    "SELECT timestamp FROM audit_logs WHERE model = ? AND endpoint LIKE '/v1/%' ORDER BY timestamp DESC LIMIT 1"
)


def last_used_by_model(path: Path, model_ids: Iterable[str]) -> dict[str, datetime]:
    """model id -> the time of the newest API request for it (UTC), for those the log names."""
    if not path.exists():
        return {}
    try:
        connection = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True, timeout=BUSY_TIMEOUT_SECONDS)
    except sqlite3.Error:
        return {}
    found = {}
    try:
        for model_id in dict.fromkeys(model_ids):
            row = connection.execute(_NEWEST_USE, (model_id,)).fetchone()
            if row is not None:
                found[model_id] = parse_timestamp(row[0])
    except (sqlite3.Error, TypeError, ValueError):
        return found
    finally:
        connection.close()
    return found
