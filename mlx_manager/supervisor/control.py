"""What the CLI asks of the supervisor: start it detached, find it, stop it (`status` is in status.py).

Raises typed errors and returns plain data; only `mlx_manager.cli` prints.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from mlx_manager.runtime import read_daemon_info
from mlx_manager.supervisor.logfile import tail
from mlx_manager.supervisor.options import SupervisorOptions
from mlx_manager.supervisor.state import (
    GIVEN_UP,
    RUNNING,
    STOPPED,
    lock_holder,
    lock_if_free,
    read_state,
    same_process,
    supervisor_log,
    supervisor_running,
    wait_gone,
    write_state,
)
from mlx_manager.supervisor.supervisor import EXIT_LOCKED, terminate

POLL = 0.1
LOG_LINES_ON_FAILURE = 15


class StartFailed(Exception):
    """The daemon did not come up. `log_lines`: the end of what it printed while trying."""

    def __init__(self, message: str, log_lines: list[str], hint: str | None = None) -> None:
        super().__init__(message)
        self.message, self.log_lines, self.hint = message, log_lines, hint


def _daemon_said(state: dict[str, Any]) -> str | None:
    """The daemon's own one-line error (`serve` prints "Error: ..."), which says it best."""
    output = ((state.get("last_exit") or {}).get("last_output") or "").strip()
    return output.removeprefix("Error: ") if output.startswith("Error: ") else None


@dataclass(frozen=True)
class Running:
    """A daemon found running: under our supervisor, or on its own (`mlx-manager serve`, a service)."""

    url: str | None
    daemon_pid: int | None
    supervisor_pid: int | None
    already: bool = False  # `start` found it running and did nothing
    adopted: bool = False  # `start` found it without its supervisor and had a new one take it over

    @property
    def supervised(self) -> bool:
        return self.supervisor_pid is not None


def find_running() -> Running | None:
    supervisor = lock_holder()
    info = read_daemon_info()
    if supervisor is not None:
        state = read_state() or {}
        return Running(state.get("url") or (info or {}).get("url"), state.get("daemon_pid"), supervisor)
    if info is not None:
        return Running(info.get("url"), info.get("pid"), None)
    return None


# -- start ------------------------------------------------------------------------------------------


def supervisor_command(flags: dict[str, Any], options: SupervisorOptions) -> list[str]:
    command = [sys.executable, "-m", "mlx_manager.supervisor"]
    for name in ("health_interval", "hang_timeout", "start_timeout", "stop_timeout"):
        command += [f"--{name.replace('_', '-')}", f"{getattr(options, name):g}"]
    if not options.retry_before_ready:
        command.append("--no-retry-before-ready")
    for name in ("host", "port", "model"):
        if flags.get(name) is not None:
            command += [f"--{name}", str(flags[name])]
    if flags.get("insecure_no_auth"):
        command.append("--insecure-no-auth")
    return command


def start(flags: dict[str, Any], options: SupervisorOptions, wait: float) -> Running:
    """Launch a detached supervisor and wait until its daemon is ready. Raises StartFailed.
    A daemon whose supervisor was killed is adopted by a new one, started with the flags it had."""
    running = find_running()
    if running is not None:
        orphaned = _orphaned(running)
        if orphaned is None:
            return Running(running.url, running.daemon_pid, running.supervisor_pid, already=True)
        adopted = _launch(orphaned, options, wait)
        return Running(adopted.url, adopted.daemon_pid, adopted.supervisor_pid, already=True, adopted=True)
    return _launch(flags, options, wait)


def _orphaned(running: Running) -> dict[str, Any] | None:
    """The flags of a daemon that runs without the supervisor that started it (killed), or None."""
    state = read_state() or {}
    if running.supervised or running.daemon_pid is None or state.get("daemon_pid") != running.daemon_pid:
        return None
    if not same_process(state.get("daemon_pid"), state.get("daemon_started")):
        return None
    return dict(state.get("flags") or {})


def _launch(flags: dict[str, Any], options: SupervisorOptions, wait: float) -> Running:
    log_path = supervisor_log()
    log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    offset = os.fstat(fd).st_size  # the failure report shows only what this attempt wrote
    try:
        # A new session, no terminal, output to the log: it outlives this command and the login.
        supervisor = subprocess.Popen(
            supervisor_command(flags, options),
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(fd)
    deadline = time.monotonic() + wait
    while True:
        code = supervisor.poll()
        state = read_state() or {}
        ours = state.get("supervisor_pid") == supervisor.pid
        if ours and state.get("state") == RUNNING and state.get("ready"):
            return Running(state.get("url"), state.get("daemon_pid"), supervisor.pid)
        if code is not None:
            if code == EXIT_LOCKED and (other := find_running()) is not None:  # a concurrent `start` won
                return Running(other.url, other.daemon_pid, other.supervisor_pid, already=True)
            said = _daemon_said(state) if ours else None
            reason = state.get("reason") if ours else None
            raise StartFailed(
                said or reason or f"the supervisor exited with code {code}",
                tail(log_path, LOG_LINES_ON_FAILURE, start=offset),
                None if said else "See `mlx-manager logs --supervisor` for the whole story.",
            )
        if time.monotonic() > deadline:
            raise StartFailed(
                f"the daemon was not ready within {wait:g} s; it is still starting in the background",
                tail(log_path, LOG_LINES_ON_FAILURE, start=offset),
                "Check `mlx-manager status` in a moment, or stop it with `mlx-manager stop`.",
            )
        time.sleep(POLL)


# -- stop -------------------------------------------------------------------------------------------


@dataclass
class Stopped:
    was_running: bool
    graceful: bool = True  # False when something had to be killed
    seconds: float = 0.0
    supervisor_pid: int | None = None
    daemon_pid: int | None = None
    note: str | None = None  # e.g. the previous supervisor had given up
    # How the daemon ended, as its supervisor saw it ({"reason", "code", "last_output"...}); None
    # when that is not known (a daemon running on its own is not our child).
    daemon_exit: dict[str, Any] | None = None


def stop(timeout: float, force: bool = False) -> Stopped:
    """Stop the supervisor and its daemon (or a daemon running on its own): SIGTERM, so the daemon
    drains, then SIGKILL once `timeout` seconds have passed, or at once with `force`."""
    began = time.monotonic()
    supervisor = lock_holder()
    state = read_state() or {}
    if supervisor is None:
        info = read_daemon_info()
        if info is None:
            return Stopped(False, note=_clear_dead_state(state))
        graceful = _kill(info["pid"]) if force else terminate(info["pid"], timeout)
        _clear_dead_state(state)  # a daemon whose supervisor was killed: its record is stale too
        return Stopped(True, graceful and not force, time.monotonic() - began, daemon_pid=info["pid"])

    daemon = state.get("daemon_pid") if same_process(state.get("daemon_pid"), state.get("daemon_started")) else None
    if force:
        children = _children(supervisor)  # taken first: a daemon it is just starting is not in the state yet
        _send(supervisor, signal.SIGKILL)  # before the daemon, so nothing restarts it
        for pid in {pid for pid in (daemon, *children) if pid is not None}:
            _kill(pid)
        _wait_for(lambda: not supervisor_running(), 5.0)
        _clear_dead_state(read_state() or {}, reason="killed on request (stop --force)")
        return Stopped(True, False, time.monotonic() - began, supervisor, daemon)

    earlier_exit = state.get("last_exit")
    _send(supervisor, signal.SIGTERM)  # the supervisor passes it on and waits for the drain
    graceful = _wait_for(lambda: not supervisor_running(), timeout)
    if not graceful:
        if daemon:
            _kill(daemon)  # the supervisor sees its child die and exits
        if not _wait_for(lambda: not supervisor_running(), 5.0):
            children = _children(supervisor)
            _send(supervisor, signal.SIGKILL)
            for pid in children:
                _kill(pid)
            _wait_for(lambda: not supervisor_running(), 5.0)
            _clear_dead_state(read_state() or {}, reason="killed on request (stop timed out)")
    last_exit = (read_state() or {}).get("last_exit")
    daemon_exit = last_exit if daemon and last_exit != earlier_exit else None
    return Stopped(True, graceful, time.monotonic() - began, supervisor, daemon, daemon_exit=daemon_exit)


def _clear_dead_state(state: dict[str, Any], reason: str | None = None) -> str | None:
    """After a stop nothing runs: a given-up or stale record becomes "stopped" (its last exit kept),
    so `status` says "not running" rather than reporting an old failure forever."""
    if not state or state.get("state") == STOPPED:
        return None
    note = f"it had given up: {state.get('reason')}" if state.get("state") == GIVEN_UP else None
    with lock_if_free() as free:
        if free:
            write_state(
                {
                    **state,
                    "state": STOPPED,
                    "given_up": False,
                    "daemon_pid": None,
                    "url": None,
                    "ready": False,
                    "reason": reason or "stopped on request",
                }
            )
    return note


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return []


def _send(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _kill(pid: int) -> bool:
    _send(pid, signal.SIGKILL)
    wait_gone(pid, 5.0)
    return False


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL)
    return True
