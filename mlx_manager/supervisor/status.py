"""`status`: what the supervisor's state file, the daemon's answers and psutil say about the daemon."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from mlx_manager.runtime import read_daemon_info
from mlx_manager.supervisor import probe
from mlx_manager.supervisor.state import GIVEN_UP, STOPPED, lock_holder, read_state, same_process

PROBE_TIMEOUT = 5.0  # generous: a busy machine may be slow to answer, and that is not "unhealthy"


@dataclass
class Status:
    running: bool = False
    healthy: bool = False
    supervised: bool = False
    state: str = "not running"
    supervisor_pid: int | None = None
    daemon_pid: int | None = None
    url: str | None = None
    uptime_seconds: float | None = None
    version: str | None = None
    models_loaded: list[str] = field(default_factory=list)
    loading: str | None = None
    queue_depth: int | None = None
    active_jobs: int | None = None
    blas: str | None = None  # "bundled" or the optimised BLAS library's path
    rss_bytes: int | None = None
    cpu_percent: float | None = None
    restarts: int = 0
    last_exit: dict[str, Any] | None = None
    given_up: bool = False
    reason: str | None = None
    problem: str | None = None  # why it is not healthy, in a few words
    stale: bool = False  # a state file left by a supervisor that died without cleaning up
    figures: dict[str, Any] | None = None  # the main Prometheus figures from GET /metrics

    @property
    def exit_code(self) -> int:
        """0 running and healthy; 3 not running; 1 running but unhealthy, or given up."""
        if not self.running:
            return 1 if self.given_up else 3
        return 0 if self.healthy else 1


def status() -> Status:
    state = read_state() or {}
    supervisor = lock_holder()
    if supervisor is not None and state.get("supervisor_pid") != supervisor:
        state = {"state": "starting"}  # a new supervisor has the lock but has not written its state yet
    info = read_daemon_info()
    result = Status(restarts=int(state.get("restarts") or 0), last_exit=state.get("last_exit"))
    if supervisor is not None:
        result.running = result.supervised = True
        result.supervisor_pid = supervisor
        result.state = state.get("state") or "starting"
        result.daemon_pid = state.get("daemon_pid")
        result.url = state.get("url") or (info or {}).get("url")
    elif info is not None:  # `mlx-manager serve`, a service, or a daemon whose supervisor was killed
        result.running = True
        result.state = "running (unsupervised)"
        result.daemon_pid, result.url = info.get("pid"), info.get("url")
        if not same_process(state.get("daemon_pid"), state.get("daemon_started")):
            result.restarts, result.last_exit = 0, None  # that history belongs to another daemon
    else:
        result.given_up = state.get("state") == "given_up"
        result.state = "given up" if result.given_up else "not running"
        result.reason = state.get("reason")
        result.stale = state.get("state") not in (None, STOPPED, GIVEN_UP)
        return result
    result.reason = state.get("reason") if result.supervised else None
    _ask_daemon(result, state)
    _measure(result)
    return result


def _ask_daemon(result: Status, state: dict[str, Any]) -> None:
    if result.state == "restarting":
        last = (result.last_exit or {}).get("reason", "it exited")
        result.problem = f"{last}; restarting at {state.get('next_restart_at')}"
        return
    if not result.url:
        result.problem = "not listening yet"
        return
    health = probe.get(result.url, "/health", PROBE_TIMEOUT)
    if health is None:
        starting = result.state == "starting"
        result.problem = "starting, not answering yet" if starting else f"no answer from {result.url}/health"
        return
    result.version = health.body.get("version")
    result.healthy = health.ok and health.body.get("status", "ok") == "ok"
    if not result.healthy:
        result.problem = f"/health says {health.body.get('status') or health.status}"
    ready = probe.get(result.url, "/ready", PROBE_TIMEOUT)
    if ready is not None:
        body = ready.body
        result.models_loaded = list(body.get("loaded") or body.get("models_loaded") or [])
        result.queue_depth = body.get("queue_depth")
        result.active_jobs = body.get("active_jobs")
        result.loading = body.get("loading")
        result.blas = body.get("blas")
    scraped = probe.fetch(result.url, "/metrics", PROBE_TIMEOUT)
    if scraped is not None and scraped[0] == 200:
        from mlx_manager.metrics import scrape_summary

        try:
            result.figures = scrape_summary(scraped[1].decode())
        except ValueError:  # not Prometheus text: an older or foreign daemon
            result.figures = None


def _measure(result: Status) -> None:
    import psutil

    if not result.daemon_pid:
        return
    try:
        process = psutil.Process(result.daemon_pid)
        with process.oneshot():
            result.rss_bytes = process.memory_info().rss
            result.uptime_seconds = max(0.0, time.time() - process.create_time())
        result.cpu_percent = process.cpu_percent(interval=0.2)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass
