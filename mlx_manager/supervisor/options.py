"""The supervisor's knobs, with the defaults used when the settings do not (yet) name them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Probe GET /health this often once the daemon is up.
HEALTH_INTERVAL = 5.0
# A daemon that has not answered /health for this long is wedged: killed and restarted. Generous,
# because one long prefill on a slow machine may hold the event loop for a while.
HANG_TIMEOUT = 60.0
# A daemon that never answers /health this long after it was started is treated as hung too
# (importing MLX from a cold disk can take a while; models load after /health answers).
START_TIMEOUT = 120.0
# How long a stop waits for the daemon to drain before it is killed (server.drain_timeout is 30 s
# by default, and the daemon needs a few more seconds to close connections and flush its audit rows).
STOP_TIMEOUT = 60.0
# What a stop waits beyond server.drain_timeout: the requests still running are then ended with
# the `draining` problem (up to 5 s), the engine stops (up to 10 s), connections close (5 s) and
# the audit rows are flushed. A stop never waits less than this past the drain.
AFTER_DRAIN = 30.0
# Restarts: wait 1 s after the first crash, doubling up to 30 s; 5 crashes within 60 s is a crash loop.
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 30.0
CRASH_LIMIT = 5
CRASH_WINDOW = 60.0


@dataclass(frozen=True)
class SupervisorOptions:
    health_interval: float = HEALTH_INTERVAL
    hang_timeout: float = HANG_TIMEOUT
    start_timeout: float = START_TIMEOUT
    stop_timeout: float = STOP_TIMEOUT
    backoff_initial: float = BACKOFF_INITIAL
    backoff_max: float = BACKOFF_MAX
    crash_limit: int = CRASH_LIMIT
    crash_window: float = CRASH_WINDOW
    # False (what `start` asks for): a daemon that exits before it was ever ready is a bad config,
    # a busy port or a missing model; retrying cannot help, so the supervisor reports it and ends.
    retry_before_ready: bool = True

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> SupervisorOptions:
        """Values from a `supervisor` settings section when there is one, else the defaults."""
        section = getattr(settings, "supervisor", None)
        values = {
            name: float(getattr(section, name))
            for name in ("health_interval", "hang_timeout", "start_timeout", "stop_timeout")
            if section is not None and getattr(section, name, None) is not None
        }
        values["stop_timeout"] = stop_wait(settings)
        return cls(**{**values, **overrides})


def stop_wait(settings: Any) -> float:
    """How long a graceful stop may take before the daemon is killed: supervisor.stop_timeout, but
    never less than server.drain_timeout + AFTER_DRAIN, so a drain that runs out still answers its
    requests (the `draining` problem) and writes their audit rows before the process is killed."""
    section = getattr(settings, "supervisor", None)
    stop_timeout = float(getattr(section, "stop_timeout", None) or STOP_TIMEOUT)
    drain = getattr(getattr(settings, "server", None), "drain_timeout", None)
    return stop_timeout if drain is None else max(stop_timeout, float(drain) + AFTER_DRAIN)
