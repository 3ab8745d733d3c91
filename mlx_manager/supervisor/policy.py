"""When to restart a crashed daemon: exponential backoff, and the crash-loop cut-off. Pure arithmetic."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class RestartPolicy:
    initial: float = 1.0
    maximum: float = 30.0
    crash_limit: int = 5
    window: float = 60.0
    _crashes: deque[float] = field(default_factory=deque)
    _streak: int = 0  # crashes since the daemon last ran long enough to count as stable

    def delay(self, streak: int) -> float:
        """Seconds to wait before restart number `streak` in a row: 1, 2, 4, ... capped."""
        return min(self.maximum, self.initial * 2 ** max(0, streak - 1))

    def crashed(self, at: float, ran_for: float) -> float | None:
        """Record a crash at monotonic time `at` of a daemon that ran `ran_for` seconds.
        Returns the delay before the next start, or None when this is a crash loop: give up."""
        if ran_for >= self.window:
            self._streak = 0  # it was stable: a lone crash starts over at the short delay
        self._streak += 1
        self._crashes.append(at)
        while self._crashes and at - self._crashes[0] > self.window:
            self._crashes.popleft()
        if len(self._crashes) >= self.crash_limit:
            return None
        return self.delay(self._streak)

    @property
    def recent_crashes(self) -> int:
        return len(self._crashes)
