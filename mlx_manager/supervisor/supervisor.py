"""The supervisor process: runs the daemon as its child and keeps it alive.

One loop, one thread (plus one that copies the child's output into the log): spawn the daemon,
probe it, and when it exits decide between "that was asked for", "restart after a backoff" and
"give up". Signal handlers only set flags; the loop acts on them within a tick.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections import deque
from datetime import UTC
from typing import Any

from mlx_manager.runtime import read_daemon_info
from mlx_manager.supervisor import probe
from mlx_manager.supervisor.options import SupervisorOptions
from mlx_manager.supervisor.policy import RestartPolicy
from mlx_manager.supervisor.state import (
    GIVEN_UP,
    RESTARTING,
    RUNNING,
    STARTING,
    STOPPED,
    STOPPING,
    Lock,
    now_iso,
    process_started,
    read_state,
    same_process,
    supervisor_log,
    wait_gone,
    write_state,
)

log = logging.getLogger("mlx_manager.supervisor")
daemon_output = logging.getLogger("mlx_manager.supervisor.daemon")

EXIT_STOPPED, EXIT_GAVE_UP, EXIT_LOCKED = 0, 1, 3
TICK = 0.1  # how often the loop looks at the child and the signal flags
STARTUP_PROBE_INTERVAL = 0.2  # until the daemon is ready, probe often: `start` is waiting for it
LOCK_WAIT = 2.0


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class Supervisor:
    def __init__(
        self, command: list[str], options: SupervisorOptions | None = None, flags: dict[str, Any] | None = None
    ) -> None:
        self.command = list(command)
        self.options = options or SupervisorOptions()
        o = self.options
        self.policy = RestartPolicy(o.backoff_initial, o.backoff_max, o.crash_limit, o.crash_window)
        self.state: dict[str, Any] = {
            "supervisor_pid": os.getpid(),
            "supervisor_started": process_started(os.getpid()),
            "supervisor_started_at": now_iso(),
            "state": STARTING,
            "flags": dict(flags or {}),
            "command": self.command,
            "log_file": str(supervisor_log()),
            "daemon_pid": None,
            "daemon_started": None,
            "daemon_started_at": None,
            "url": None,
            "host": None,
            "port": None,
            "ready": False,
            "restarts": 0,
            "last_exit": None,
            "given_up": False,
            "reason": None,
            "next_restart_at": None,
        }
        self.stop_signals = 0  # SIGTERM/SIGINT received; the loop forwards each one to the daemon
        self._forwarded = 0
        self._output_tail: deque[str] = deque(maxlen=20)
        self._reader: threading.Thread | None = None
        self.ready_once = False  # some daemon of ours has answered /ready 200 at least once

    # -- entry point --------------------------------------------------------------------------
    def run(self) -> int:
        lock = Lock()
        if not lock.acquire(wait=LOCK_WAIT):
            log.error("another supervisor is already running for this MLX_MANAGER_HOME; this one exits")
            return EXIT_LOCKED
        try:
            self._install_signal_handlers()
            old = read_state()
            adopted = self._adopt(old)
            if adopted is None:
                self._stop_orphan(old)
            log.info("supervisor started (pid %d): %s", os.getpid(), " ".join(self.command))
            return self._loop(adopted)
        except Exception:
            log.exception("supervisor failed")
            self._set(state=STOPPED, reason="the supervisor itself failed; see its log")
            raise
        finally:
            lock.release()

    def _install_signal_handlers(self) -> None:
        def stop(signum, frame) -> None:
            self.stop_signals += 1

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        # A closed terminal must not end the service. A handler rather than SIG_IGN: an ignored
        # signal stays ignored in the daemon we exec, a handled one goes back to its default there.
        signal.signal(signal.SIGHUP, lambda signum, frame: None)

    # -- the loop -------------------------------------------------------------------------------
    def _loop(self, adopted: Adopted | None = None) -> int:
        while True:
            child: subprocess.Popen | Adopted = adopted or self._spawn()
            adopted = None
            started = time.monotonic()
            watchdog_reason = self._watch(child, started)
            code = child.wait()
            self._finish_reader()
            ran_for = time.monotonic() - started
            reason = watchdog_reason or (describe_exit(code) if code is not None else "exited (code unknown: adopted)")
            last_exit = {"at": now_iso(), "reason": reason, "code": code, "ran_for": round(ran_for, 1)}
            if self._output_tail:
                last_exit["last_output"] = self._output_tail[-1][:300]
            self._set(last_exit=last_exit, daemon_pid=None, daemon_started=None, ready=False)

            if self.stop_signals:
                log.info("daemon stopped (%s)", reason)
                self._set(state=STOPPED, reason="stopped on request", url=None)
                return EXIT_STOPPED
            if code == 0 and watchdog_reason is None:
                # A clean exit was asked for by someone (a signal sent to the daemon itself): not a crash.
                log.info("daemon exited cleanly on its own; the supervisor stops too")
                self._set(state=STOPPED, reason="the daemon exited cleanly on its own", url=None)
                return EXIT_STOPPED
            if not self.ready_once and not self.options.retry_before_ready:
                return self._give_up(f"the daemon {reason} before it was ready")
            log.warning("daemon %s after %.1f s", reason, ran_for)
            delay = self.policy.crashed(time.monotonic(), ran_for)
            if delay is None:
                return self._give_up(
                    f"{self.policy.recent_crashes} crashes within {self.options.crash_window:g} s "
                    f"(last: {reason}); not restarting"
                )
            log.info("restarting the daemon in %g s", delay)
            self._set(state=RESTARTING, next_restart_at=_iso_in(delay))
            if not self._sleep(delay):
                self._set(state=STOPPED, reason="stopped on request", url=None, next_restart_at=None)
                return EXIT_STOPPED
            self.state["restarts"] += 1

    def _give_up(self, why: str) -> int:
        log.error("giving up: %s", why)
        self._set(state=GIVEN_UP, given_up=True, reason=why, url=None, next_restart_at=None)
        return EXIT_GAVE_UP

    def _spawn(self) -> subprocess.Popen:
        env = dict(os.environ)
        # The daemon logs to its own file; told it is supervised, it can leave stderr (which we copy
        # into the supervisor log) to what escapes logging: tracebacks and startup errors.
        env["MLX_MANAGER_SUPERVISED"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        child = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            # Its own process group: a Ctrl-C meant for a foreground supervisor reaches the daemon
            # once, through us, instead of twice (which would skip the drain).
            start_new_session=True,
        )
        self._output_tail.clear()
        self._reader = threading.Thread(target=self._copy_output, args=(child,), daemon=True)
        self._reader.start()
        log.info("daemon started (pid %d)", child.pid)
        self._set(
            state=STARTING,
            daemon_pid=child.pid,
            daemon_started=process_started(child.pid),
            daemon_started_at=now_iso(),
            ready=False,
            next_restart_at=None,
        )
        return child

    def _watch(self, child: subprocess.Popen | Adopted, started: float) -> str | None:
        """Run until the child exits. Returns why the watchdog killed it, or None."""
        o = self.options
        last_answer = None  # monotonic time /health last answered
        next_probe = started
        stop_deadline = None
        killed_for = None
        while child.poll() is None:
            now = time.monotonic()
            if self.stop_signals > self._forwarded:
                # First signal: the daemon drains. A second one makes it stop at once.
                self._forwarded = self.stop_signals
                if stop_deadline is None:
                    log.info("stop requested: asking the daemon to drain and exit")
                    self._set(state=STOPPING)
                    stop_deadline = now + o.stop_timeout
                _signal(child, signal.SIGTERM)
            if stop_deadline is not None:
                if now > stop_deadline and killed_for is None:
                    log.warning("the daemon did not stop within %g s; killing it", o.stop_timeout)
                    killed_for = f"did not stop within {o.stop_timeout:g} s and was killed"
                    _signal(child, signal.SIGKILL)
            elif now >= next_probe and killed_for is None:
                if self._probe(child.pid):
                    last_answer = time.monotonic()
                now = time.monotonic()
                silent_for = now - (last_answer if last_answer is not None else started)
                limit = o.hang_timeout if last_answer is not None else o.start_timeout
                if silent_for > limit:
                    what = "stopped answering /health" if last_answer is not None else "never answered /health"
                    killed_for = f"{what} for {silent_for:.0f} s; killed by the watchdog"
                    log.error("watchdog: the daemon %s; killing it", killed_for.split(";")[0])
                    _signal(child, signal.SIGKILL)  # a wedged process cannot drain; TERM would be ignored
                next_probe = now + (o.health_interval if self.state["ready"] else STARTUP_PROBE_INTERVAL)
            time.sleep(TICK)
        return killed_for

    def _probe(self, pid: int) -> bool:
        """Probe the child; true when it answered /health. Marks it ready on its first /ready 200."""
        info = read_daemon_info()
        if info is None or info.get("pid") != pid:
            return False  # not listening yet: daemon.json is written once its socket is bound
        url = str(info.get("url") or f"http://{info['host']}:{info['port']}")
        if self.state["url"] != url:
            self._set(url=url, host=info.get("host"), port=info.get("port"))
        timeout = max(0.5, min(5.0, self.options.health_interval, self.options.hang_timeout / 2))
        if self.state["ready"]:
            return probe.healthy(url, timeout)
        answer = probe.get(url, "/ready", timeout)
        if answer is None:
            return False
        if answer.ok:
            log.info("daemon ready at %s (pid %d)", url, pid)
            self.ready_once = True
            self._set(state=RUNNING, ready=True)
            return True
        return probe.healthy(url, timeout)  # /ready says 503 (a model loading): alive all the same

    def _sleep(self, seconds: float) -> bool:
        """Wait, unless a stop is asked for first (then False)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.stop_signals:
                return False
            time.sleep(min(TICK, max(0.0, deadline - time.monotonic())))
        return not self.stop_signals

    # -- the daemon's output ----------------------------------------------------------------------
    def _copy_output(self, child: subprocess.Popen) -> None:
        assert child.stdout is not None
        for raw in iter(child.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            self._output_tail.append(line)
            daemon_output.info(line, extra={"raw": True})
        child.stdout.close()

    def _finish_reader(self) -> None:
        # A grandchild holding the pipe open must not block the restart: wait a moment, not forever.
        if self._reader is not None:
            self._reader.join(timeout=2.0)
            self._reader = None

    # -- orphans and state ---------------------------------------------------------------------------
    def _adopt(self, old: dict[str, Any] | None) -> Adopted | None:
        """A supervisor killed with SIGKILL leaves its daemon running. One we would have started
        ourselves (the same command) is adopted: watched, probed, stopped and restarted as our own."""
        if not old or old.get("command") != self.command:
            return None
        if not same_process(old.get("daemon_pid"), old.get("daemon_started")):
            return None
        pid = old["daemon_pid"]
        log.warning("adopting the daemon (pid %d) left running by supervisor pid %s", pid, old.get("supervisor_pid"))
        self.state.update({name: old.get(name) for name in ("daemon_started_at", "url", "host", "port", "last_exit")})
        self.state["restarts"] = old.get("restarts") or 0
        self.ready_once = bool(old.get("ready"))
        self._set(state=STARTING, daemon_pid=pid, daemon_started=old["daemon_started"], ready=False)
        return Adopted(pid)

    def _stop_orphan(self, old: dict[str, Any] | None) -> None:
        """A supervisor killed with SIGKILL leaves its daemon running; stop it before starting anew."""
        if not old or not same_process(old.get("daemon_pid"), old.get("daemon_started")):
            return
        pid = old["daemon_pid"]
        log.warning("a daemon (pid %d) left by a previous supervisor is still running; stopping it", pid)
        terminate(pid, self.options.stop_timeout)

    def _set(self, **changes: Any) -> None:
        self.state.update(changes)
        write_state(self.state)


class Adopted:
    """A daemon started by an earlier supervisor, watched like our own child (but not our child:
    its exit code cannot be known, and its output goes where that supervisor had sent it)."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.pid = pid
        self._process = psutil.Process(pid)

    def poll(self) -> int | None:
        """None while it runs; once gone, -1 (the code is unknown, so never read as a clean exit)."""
        import psutil

        try:
            running = self._process.is_running() and self._process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            running = False
        return None if running else -1

    def wait(self) -> int | None:
        while self.poll() is None:
            time.sleep(TICK)
        return None

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)


def _signal(child: subprocess.Popen | Adopted, sig: int) -> None:
    try:
        child.send_signal(sig)
    except ProcessLookupError:
        pass


def _iso_in(seconds: float) -> str:
    from datetime import datetime, timedelta

    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat(timespec="seconds")


def terminate(pid: int, timeout: float) -> bool:
    """SIGTERM a process that is not our child, wait up to `timeout`, then SIGKILL. True if it drained."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    if wait_gone(pid, timeout):
        return True
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    wait_gone(pid, 5.0)
    return False
