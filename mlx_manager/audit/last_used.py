"""When each model was last asked for, from the audit log: `models list` shows it.

Plain sqlite3, read-only, one indexed query (the (model, timestamp) index): `models list` must
answer at once, so SQLAlchemy is not imported for it. A missing or unreadable log means no answer.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path

from mlx_manager.audit.record import parse_timestamp

BUSY_TIMEOUT_SECONDS = 2.0


def last_used_by_model(path: Path) -> dict[str, datetime]:
    """model id -> the time of its newest audit row (UTC); {} when there is no readable log."""
    if not path.exists():
        return {}
    try:
        connection = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True, timeout=BUSY_TIMEOUT_SECONDS)
    except sqlite3.Error:
        return {}
    try:
        rows = connection.execute(
            "SELECT model, MAX(timestamp) FROM audit_logs WHERE model IS NOT NULL GROUP BY model"
        ).fetchall()
    except sqlite3.Error:
        return {}
    finally:
        connection.close()
    found = {}
    for model, stamp in rows:
        try:
            found[str(model)] = parse_timestamp(stamp)
        except (TypeError, ValueError):
            continue
    return found
