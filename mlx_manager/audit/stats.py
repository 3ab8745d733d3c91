"""Summary numbers over the rows a filter selects, optionally per model, endpoint, status, backend or API key.

Closed days that have a rollup (see `rollup.py`) are read from it; the rest of the window (today,
days cut by --since/--until, days not rolled up yet) from the requests themselves, in one SQL
pass each that hands every group's durations over as one `group_concat` string. Percentiles
are exact nearest-rank over whole microseconds, whichever way the rows were read: the k-th
smallest of a few sorted runs is found without sorting them all together.
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

from mlx_manager.audit.filters import AuditFilter
from mlx_manager.audit.query import Connection
from mlx_manager.audit.rollup import Partial, next_day, requests_partials, rolled_up_days, rollup_partials, start_of

GroupBy = Literal["model", "endpoint", "status", "backend", "key"]
GROUP_BYS: tuple[str, ...] = ("model", "endpoint", "status", "backend", "key")
GROUP_COLUMNS: dict[str, str] = {
    "model": "model",
    "endpoint": "endpoint",
    "status": "status",
    "backend": "backend",  # by name (`local`, or one of routing.backends)
    "key": "api_key",  # the API key's name
}


def compute_stats(
    conn: Connection, filters: AuditFilter | None = None, *, by: GroupBy | None = None
) -> list[dict[str, Any]]:
    """One dict per group (a single one without `by`; none when no row matches), largest group first.

    Keys: the group column (when grouped), requests, errors, timeouts, cancelled, error_rate,
    timeout_rate, p50_duration_ms, p95_duration_ms, mean_ttft_ms (streams only), prompt_tokens,
    completion_tokens, tokens_per_second (completion tokens per second of request time, over
    the requests that produced tokens).
    """
    if by is not None and by not in GROUP_BYS:
        raise ValueError(f"by must be one of {', '.join(GROUP_BYS)}, not {by!r}")
    filters = filters or AuditFilter()
    group = GROUP_COLUMNS[by] if by else None
    partials = _partials(conn, filters, group)

    results = []
    for value, part in partials.items():
        requests = part.requests
        producing_ms = math.fsum(part.producing_ms) if part.producing_ms else None
        p50, p95 = kth_smallest(part.durations, nearest_rank(requests, 50), nearest_rank(requests, 95))
        item: dict[str, Any] = {by: value} if by else {}
        item.update(
            requests=requests,
            errors=part.errors,
            timeouts=part.timeouts,
            cancelled=part.cancelled,
            error_rate=part.errors / requests,
            timeout_rate=part.timeouts / requests,
            p50_duration_ms=p50 / 1000,
            p95_duration_ms=p95 / 1000,
            mean_ttft_ms=math.fsum(part.ttft_ms) / part.ttft_count if part.ttft_count else None,
            prompt_tokens=part.prompt_tokens,
            completion_tokens=part.completion_tokens,
            tokens_per_second=(part.completion_tokens * 1000 / producing_ms) if producing_ms else None,
        )
        results.append(item)
    # Largest first; among equals by name, the group without one (no model, no key) last.
    name = by or ""
    results.sort(key=lambda item: (-item["requests"], item.get(name) is None, str(item.get(name) or "")))
    return results


def _partials(conn: Connection, filters: AuditFilter, group: str | None) -> dict[Any, Partial]:
    """Per group value: the rolled-up days of the window from the rollup, every other stretch from the requests."""
    days = [] if filters.request_id is not None else rolled_up_days(conn, filters.since, filters.until)
    partials: dict[Any, Partial] = {}
    gaps: list[AuditFilter] = []
    cursor = filters.since
    for _, run in itertools.groupby(enumerate(days), key=lambda pair: start_of(pair[1]).toordinal() - pair[0]):
        consecutive = [day for _, day in run]
        first, end = consecutive[0], next_day(consecutive[-1])
        rollup_partials(conn, first, end, filters, group, into=partials)
        if cursor is None or cursor < start_of(first):
            gaps.append(replace(filters, since=cursor, until=start_of(first)))
        cursor = start_of(end)
    if not days:
        gaps = [filters]
    elif cursor is not None and (filters.until is None or cursor < filters.until):
        gaps.append(replace(filters, since=cursor))
    for gap in gaps:
        for value, part in requests_partials(conn, gap, group).items():
            _merge(partials.setdefault(value, Partial()), part)
    return partials


def _merge(into: Partial, part: Partial) -> None:
    into.requests += part.requests
    into.errors += part.errors
    into.timeouts += part.timeouts
    into.cancelled += part.cancelled
    into.ttft_count += part.ttft_count
    into.ttft_ms += part.ttft_ms
    into.prompt_tokens += part.prompt_tokens
    into.completion_tokens += part.completion_tokens
    into.producing_ms += part.producing_ms
    into.durations += part.durations


def nearest_rank(count: int, percent: int) -> int:
    """The 1-based rank of the `percent`th percentile of `count` values (nearest-rank method)."""
    return max((percent * count + 99) // 100, 1)


# One value in SAMPLE_STEP of each run is sampled, standing for its block of the run.
SAMPLE_STEP = 32


def kth_smallest(runs: Sequence[Sequence[int]], *ks: int) -> list[int]:
    """The k-th smallest (1-based) of all the values of `runs` (each sorted ascending), for each k.

    A sample (the middle value of each block of SAMPLE_STEP values of each run, weighted by its
    block's size) tells about where the k-th value is. Exact counts (a bisect per run) at a
    sampled value a little below and one a little above confirm that it lies between them
    (else the window moves and widens); the few values between the two are then sorted.
    """
    runs = [run for run in runs if len(run)]
    if len(runs) == 1:
        return [runs[0][k - 1] for k in ks]
    values: list[int] = []
    weights: list[int] = []
    for run in runs:
        whole = len(run) // SAMPLE_STEP * SAMPLE_STEP
        middles = run[SAMPLE_STEP // 2 : whole : SAMPLE_STEP]
        values.extend(middles)
        weights.extend(itertools.repeat(SAMPLE_STEP, len(middles)))
        if whole < len(run):  # the last, shorter block
            values.append(run[(whole + len(run) - 1) // 2])
            weights.append(len(run) - whole)
    order = sorted(range(len(values)), key=values.__getitem__)
    pivots = [values[i] for i in order]
    estimated_ranks = list(itertools.accumulate(weights[i] for i in order))
    return [_select(runs, k, pivots, estimated_ranks) for k in ks]


def _select(runs: list[Sequence[int]], k: int, pivots: list[int], estimated_ranks: list[int]) -> int:
    margin = 8 + math.isqrt(len(runs))  # the estimate is off by about sqrt(runs) blocks at most
    guess = bisect_left(estimated_ranks, k)
    low, high = guess - margin, guess + margin  # positions in pivots; -1 stands below every value
    while True:
        low, high = max(low, -1), min(high, len(pivots) - 1)
        below = _count_at_or_below(runs, pivots[low]) if low >= 0 else 0
        if below >= k:  # the k-th value is lower: move the window down
            low, high, margin = low - 4 * margin, low, 4 * margin
        elif high < len(pivots) - 1 and _count_at_or_below(runs, pivots[high]) < k:  # higher: move it up
            low, high, margin = high, high + 4 * margin, 4 * margin
        else:
            break
    top = pivots[high] if high < len(pivots) - 1 else max(run[-1] for run in runs)
    if low < 0:
        between = sorted(value for run in runs for value in run[: bisect_right(run, top)])
    else:
        bottom = pivots[low]
        between = sorted(value for run in runs for value in run[bisect_right(run, bottom) : bisect_right(run, top)])
    return between[k - below - 1]


def _count_at_or_below(runs: list[Sequence[int]], value: int) -> int:
    return sum(map(bisect_right, runs, itertools.repeat(value)))
