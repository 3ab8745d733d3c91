"""Figures over time for the dashboard: the API requests of the audit log cut into equal buckets (a
minute over the last hour, a quarter of an hour over the last day), each summed per (model, API key).

A bucket keeps its requests' durations and times to first token (whole microseconds, as numpy
arrays), so p50/p95 come out exact (nearest rank, like `audit stats`) for a bucket, a model, a key
or the whole window. A bucket also carries a fingerprint (its row count and highest id): ids only
grow, so a bucket whose fingerprint has not moved holds the same rows, and a reader recomputes
only the buckets that changed (usually the newest one) instead of the whole window.

Statements are plain SQL with bound parameters; the folding is numpy, parsing each group's
`group_concat` in C, so a day of a million rows costs little Python time (see reader.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from mlx_manager.audit.query import TABLE
from mlx_manager.audit.record import format_timestamp
from mlx_manager.audit.stats import nearest_rank

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    Micros = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Window:
    """The last `span` seconds in `step`-second buckets, aligned to multiples of `step` (UTC)."""

    name: str
    span: int
    step: int

    @property
    def count(self) -> int:
        return self.span // self.step

    def starts(self, now: float) -> list[int]:
        """The epoch second each bucket starts at, oldest first; the last one holds `now`."""
        last = int(now // self.step) * self.step
        return [last - self.step * i for i in range(self.count - 1, -1, -1)]


WINDOWS: dict[str, Window] = {
    "hour": Window("hour", 3600, 60),
    "day": Window("day", 86400, 900),
}

# Index-only (the timestamp index holds the rowid): cheap enough to run for every bucket. It
# counts every row, the admin calls too: a superset's fingerprint moves whenever the API rows do.
_FINGERPRINT = "SELECT {at}, count(*), coalesce(max(id), 0) FROM " + TABLE + " WHERE timestamp >= ? AND timestamp < ?"
# The API requests (not the admin calls), one row per (model, key, error type); durations in
# whole microseconds: integers print fast.
BUCKET_SQL = (
    "SELECT model, api_key, error_type, count(*), sum(status = 'error'), sum(status = 'timeout'),"
    " sum(status = 'cancelled'), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0),"
    " sum(CASE WHEN completion_tokens > 0 THEN duration_ms END),"
    " group_concat(CAST(duration_ms * 1000 AS INTEGER)), group_concat(CAST(time_to_first_token_ms * 1000 AS INTEGER))"
    f" FROM {TABLE} WHERE timestamp >= ? AND timestamp < ? AND substr(endpoint, 1, 4) = '/v1/'"
    " GROUP BY model, api_key, error_type"
)


def fingerprints_sql(count: int) -> str:
    """One statement for the fingerprints of `count` buckets (rows of: bucket number, count, last
    id), bound with each bucket's `bounds` in turn: one round trip instead of one per bucket."""
    return " UNION ALL ".join(_FINGERPRINT.format(at=at) for at in range(count))


def bounds(start: int, step: int) -> tuple[str, str]:
    """The bound parameters of one bucket: [start, start + step) as stored timestamps."""
    return _stamp(start), _stamp(start + step)


def _stamp(epoch: int) -> str:
    return format_timestamp(datetime.fromtimestamp(epoch, UTC))


@dataclass(slots=True)
class Group:
    """Some requests of one (model, key): counts, sums and every duration and TTFT (µs)."""

    requests: int = 0
    errors: int = 0
    timeouts: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    producing_ms: float = 0.0  # time of the requests that produced tokens
    durations: list[Micros] = field(default_factory=list)
    ttfts: list[Micros] = field(default_factory=list)

    def add(self, other: Group) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.timeouts += other.timeouts
        self.cancelled += other.cancelled
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.producing_ms += other.producing_ms
        self.durations += other.durations
        self.ttfts += other.ttfts


@dataclass(slots=True)
class Bucket:
    """One bucket's requests per (model, API key name), failures per kind, its own percentiles
    (figured once, when it is read) and its fingerprint."""

    start: int
    fingerprint: tuple[int, int]
    groups: dict[tuple[str | None, str | None], Group] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)  # error type (or status) -> count
    requests: int = 0
    completion_tokens: int = 0
    ttft_ms: tuple[float | None, float | None] = (None, None)  # p50, p95
    duration_ms: tuple[float | None, float | None] = (None, None)


def fold_bucket(start: int, fingerprint: tuple[int, int], rows: Iterable[Sequence[Any]]) -> Bucket:
    """A Bucket from the rows of BUCKET_SQL."""
    import numpy as np

    bucket = Bucket(start, fingerprint)
    whole = Group()
    for row in rows:
        (
            model,
            key,
            error_type,
            requests,
            errors,
            timeouts,
            cancelled,
            prompt,
            completion,
            producing,
            durations,
            ttfts,
        ) = row
        part = Group(
            requests=requests,
            errors=errors,
            timeouts=timeouts,
            cancelled=cancelled,
            prompt_tokens=prompt,
            completion_tokens=completion,
            producing_ms=producing or 0.0,
            durations=[np.fromstring(durations, dtype=np.int64, sep=",")],
            ttfts=[np.fromstring(ttfts, dtype=np.int64, sep=",")] if ttfts else [],
        )
        bucket.groups.setdefault((model, key), Group()).add(part)
        whole.add(part)
        # A failure's kind is its error type; one without a type is named by its status.
        kinds = (
            [(error_type, errors + timeouts + cancelled)]
            if error_type
            else [("error", errors), ("timeout", timeouts), ("cancelled", cancelled)]
        )
        for kind, count in kinds:
            if count:
                bucket.failures[kind] = bucket.failures.get(kind, 0) + count
    bucket.requests, bucket.completion_tokens = whole.requests, whole.completion_tokens
    ttft_p50, ttft_p95 = percentiles(whole.ttfts, 50, 95)
    duration_p50, duration_p95 = percentiles(whole.durations, 50, 95)
    bucket.ttft_ms, bucket.duration_ms = (ttft_p50, ttft_p95), (duration_p50, duration_p95)
    return bucket


def percentiles(runs: list[Micros], *percents: int) -> list[float | None]:
    """Exact nearest-rank percentiles, in milliseconds, of every value of `runs` (None if none)."""
    import numpy as np

    total = sum(len(run) for run in runs)
    if not total:
        return [None for _ in percents]
    values = runs[0] if len(runs) == 1 else np.concatenate(runs)
    ranks = [nearest_rank(total, p) - 1 for p in percents]
    chosen = np.partition(values, ranks)
    return [int(chosen[rank]) / 1000 for rank in ranks]


def summarize(window: Window, buckets: Sequence[Bucket], now: float) -> dict[str, Any]:
    """What the dashboard draws: a series per figure (one value per bucket, None where a bucket
    has no request to say it), the failures per kind, and the window per model, per key and in all."""
    times: list[int] = []
    series: dict[str, list[Any]] = {name: [] for name in SERIES}
    kinds = sorted({kind for bucket in buckets for kind in bucket.failures})
    failures: dict[str, list[int]] = {kind: [] for kind in kinds}
    for bucket in buckets:
        # The newest bucket is still filling: its rates are over the seconds it has lasted.
        seconds = max(min(window.step, now - bucket.start), 1.0)
        times.append(bucket.start)
        series["requests_per_second"].append(round(bucket.requests / seconds, 4))
        series["tokens_per_second"].append(round(bucket.completion_tokens / seconds, 3))
        series["ttft_p50_ms"].append(bucket.ttft_ms[0])
        series["ttft_p95_ms"].append(bucket.ttft_ms[1])
        series["duration_p50_ms"].append(bucket.duration_ms[0])
        series["duration_p95_ms"].append(bucket.duration_ms[1])
        for kind in kinds:
            failures[kind].append(bucket.failures.get(kind, 0))
    by_model: dict[str | None, Group] = {}
    by_key: dict[str | None, Group] = {}
    total = Group()
    for bucket in buckets:
        for (model, key), group in bucket.groups.items():
            by_model.setdefault(model, Group()).add(group)
            by_key.setdefault(key, Group()).add(group)
            total.add(group)
    return {
        "window": window.name,
        "step_seconds": window.step,
        "time": times,
        **series,
        "failures": failures,
        "total": breakdown(total),
        "by_model": _ranked("model", by_model),
        "by_key": _ranked("key", by_key),
    }


SERIES = (
    "requests_per_second",
    "tokens_per_second",
    "ttft_p50_ms",
    "ttft_p95_ms",
    "duration_p50_ms",
    "duration_p95_ms",
)


def breakdown(group: Group) -> dict[str, Any]:
    """The numbers of `audit stats` for some requests, with TTFT percentiles too."""
    p50, p95 = percentiles(group.durations, 50, 95)
    ttft_p50, ttft_p95 = percentiles(group.ttfts, 50, 95)
    producing = group.producing_ms
    return {
        "requests": group.requests,
        "errors": group.errors,
        "timeouts": group.timeouts,
        "cancelled": group.cancelled,
        "error_rate": group.errors / group.requests if group.requests else None,
        "p50_duration_ms": p50,
        "p95_duration_ms": p95,
        "p50_ttft_ms": ttft_p50,
        "p95_ttft_ms": ttft_p95,
        "prompt_tokens": group.prompt_tokens,
        "completion_tokens": group.completion_tokens,
        "tokens_per_second": (
            group.completion_tokens * 1000 / producing if producing and math.isfinite(producing) else None
        ),
    }


def _ranked(name: str, groups: dict[str | None, Group]) -> list[dict[str, Any]]:
    """One breakdown per value, largest first; among equals by name, the one without a name last."""
    items = [{name: value, **breakdown(group)} for value, group in groups.items()]
    items.sort(key=lambda item: (-item["requests"], item[name] is None, str(item[name] or "")))
    return items
