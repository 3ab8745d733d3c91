"""Per-client rate limit for /v1 (server.rate_limit requests per minute): one token bucket per client.

A bucket holds up to a minute's allowance and refills continuously, so a client may burst its
whole minute at once but never exceed the rate over time. In-process and in memory: one daemon,
one event loop, so no lock and no extra service.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

# Idle clients' buckets are dropped once this many are kept, so a stream of new addresses
# cannot grow the table without end.
MAX_CLIENTS = 10_000


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.per_minute = 0
        self._buckets: dict[str, _Bucket] = {}

    def take(self, client: str, per_minute: int) -> float | None:
        """Count one request of `client`. None if it may go ahead; else the seconds until it may."""
        if per_minute <= 0:
            return None
        if per_minute != self.per_minute:  # a reload changed the rate: everyone starts afresh
            self.per_minute = per_minute
            self._buckets.clear()
        now = self.clock()
        rate = per_minute / 60.0  # tokens per second
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= MAX_CLIENTS:
                self._forget_idle(now, rate)
            bucket = self._buckets[client] = _Bucket(float(per_minute), now)
        else:
            bucket.tokens = min(float(per_minute), bucket.tokens + (now - bucket.at) * rate)
            bucket.at = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return None
        return (1 - bucket.tokens) / rate

    def _forget_idle(self, now: float, rate: float) -> None:
        """Drop buckets that have refilled: forgetting them changes nothing for their clients."""
        full = [c for c, b in self._buckets.items() if b.tokens + (now - b.at) * rate >= self.per_minute]
        for client in full:
            del self._buckets[client]
        if len(self._buckets) >= MAX_CLIENTS:  # all busy: forget the oldest rather than grow
            for client in sorted(self._buckets, key=lambda c: self._buckets[c].at)[: MAX_CLIENTS // 10]:
                del self._buckets[client]
