"""Summary numbers over the rows a filter selects, optionally per model, endpoint, status, backend or API key.

One pass over the table: SQLite computes the counts, means and sums, and hands each group's
durations (in whole microseconds) over as one `group_concat` string, from which Python takes
exact nearest-rank percentiles (SQLite has no percentile function; its window-function sort
is twice as slow).
"""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy import Connection, Integer, case, cast, func, literal_column, select

from mlx_manager.audit.filters import AuditFilter
from mlx_manager.audit.query import TABLE, filter_clauses

GroupBy = Literal["model", "endpoint", "status", "backend", "key"]
GROUP_BYS: tuple[str, ...] = ("model", "endpoint", "status", "backend", "key")
_GROUP_COLUMNS = {
    "model": TABLE.c.model,
    "endpoint": TABLE.c.endpoint,
    "status": TABLE.c.status,
    "backend": TABLE.c.backend_type,
    "key": TABLE.c.api_key,  # the API key's name
}


def compute_stats(conn: Connection, filters: AuditFilter | None = None, *, by: GroupBy | None = None) -> list[dict[str, Any]]:
    """One dict per group (a single one without `by`; none when no row matches), largest group first.

    Keys: the group column (when grouped), requests, errors, timeouts, cancelled, error_rate,
    timeout_rate, p50_duration_ms, p95_duration_ms, mean_ttft_ms (streams only), prompt_tokens,
    completion_tokens, tokens_per_second (completion tokens per second of request time, over
    the requests that produced tokens).
    """
    if by is not None and by not in GROUP_BYS:
        raise ValueError(f"by must be one of {', '.join(GROUP_BYS)}, not {by!r}")
    key = _GROUP_COLUMNS[by] if by else literal_column("NULL")
    produced = TABLE.c.completion_tokens > 0

    def count_where(condition):
        return func.sum(case((condition, 1), else_=0))

    statement = (
        select(
            key.label("key"),
            func.count().label("requests"),
            count_where(TABLE.c.status == "error").label("errors"),
            count_where(TABLE.c.status == "timeout").label("timeouts"),
            count_where(TABLE.c.status == "cancelled").label("cancelled"),
            func.avg(TABLE.c.time_to_first_token_ms).label("mean_ttft_ms"),
            func.coalesce(func.sum(TABLE.c.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(TABLE.c.completion_tokens), 0).label("completion_tokens"),
            func.sum(case((produced, TABLE.c.duration_ms))).label("producing_ms"),
            # Whole microseconds: SQLite prints integers far faster than floats.
            func.group_concat(cast(TABLE.c.duration_ms * 1000, Integer)).label("durations_us"),
        )
        .where(*filter_clauses(filters))
    )
    if by:
        statement = statement.group_by(key)  # ungrouped needs no sort: it is a plain aggregate

    results = []
    for row in conn.execute(statement):
        if not row.requests:
            continue  # the plain aggregate over no rows
        durations_us = sorted(map(int, row.durations_us.split(",")))
        item: dict[str, Any] = {by: row.key} if by else {}
        requests = row.requests
        item.update(
            requests=requests,
            errors=row.errors,
            timeouts=row.timeouts,
            cancelled=row.cancelled,
            error_rate=row.errors / requests,
            timeout_rate=row.timeouts / requests,
            p50_duration_ms=nearest_rank(durations_us, 50) / 1000,
            p95_duration_ms=nearest_rank(durations_us, 95) / 1000,
            mean_ttft_ms=row.mean_ttft_ms,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            tokens_per_second=(row.completion_tokens * 1000 / row.producing_ms) if row.producing_ms else None,
        )
        results.append(item)
    # Largest first; among equals by name, the group without one (no model, no key) last.
    results.sort(key=lambda item: (-item["requests"], item.get(by) is None, str(item.get(by) or "")))
    return results


def nearest_rank(ordered: list[int], percent: int) -> int:
    """The smallest value with at least `percent`% of the values at or below it."""
    rank = (percent * len(ordered) + 99) // 100
    return ordered[max(rank, 1) - 1]
