"""The supervisor on its own: backoff arithmetic, the crash-loop cut-off, the lock, the state file,
signals and log following. The supervisor runs as a real process; its "daemon" is a small Python
script that crashes, sleeps or drains on SIGTERM, so each behaviour is seen through real exits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from mlx_manager.supervisor.logfile import follow, tail
from mlx_manager.supervisor.policy import RestartPolicy
from mlx_manager.supervisor.state import (
    Lock,
    lock_holder,
    read_state,
    same_process,
    state_file,
    supervisor_log,
    supervisor_running,
    write_state,
)
from tests.daemon_server import wait_until
from tests.processes import reading_at_end

CRASH = "import sys; sys.exit(3)"
# Appends its start time to a file, then crashes: the gaps between lines are the backoff delays.
CRASH_AND_RECORD = "import sys, time; open(sys.argv[1], 'a').write(f'{time.time()}\\n'); sys.exit(3)"
SLEEP = "import time; print('child up', flush=True); time.sleep(600)"
# Drains for a moment on SIGTERM, leaves proof that it did, and exits cleanly.
DRAIN_ON_TERM = """
import pathlib, signal, sys, time
def stop(*_):
    time.sleep(0.5)
    pathlib.Path(sys.argv[1]).write_text('drained')
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print('child up', flush=True)
while True:
    time.sleep(0.1)
"""
IGNORE_TERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"
)


def supervise(*options: str, child: str, args: tuple[str, ...] = ()) -> subprocess.Popen:
    """A real supervisor process running `python -c child args...` as its daemon."""
    command = [sys.executable, "-m", "mlx_manager.supervisor", *options, "--", sys.executable, "-c", child, *args]
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_tree(pid: int) -> None:
    try:
        process = psutil.Process(pid)
        family = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture
def reap():
    """Kill whatever a test leaves: supervisors it started and every daemon they ran."""
    started: list[subprocess.Popen] = []
    yield started.append
    state = read_state() or {}
    for process in started:
        kill_tree(process.pid)
        process.wait(60)
    if same_process(state.get("daemon_pid"), state.get("daemon_started")):
        kill_tree(state["daemon_pid"])


def log_text() -> str:
    try:
        return supervisor_log().read_text()
    except FileNotFoundError:
        return ""


def state_when(predicate, timeout: float = 60.0) -> dict:
    state = wait_until(lambda: (s := read_state()) is not None and predicate(s) and s, timeout)
    assert state, f"state never matched; last: {read_state()}"
    return state


# -- pure arithmetic -------------------------------------------------------------------------------


def test_backoff_doubles_from_one_second_to_thirty():
    policy = RestartPolicy()
    assert [policy.delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]


def test_five_crashes_within_a_minute_is_a_crash_loop():
    policy = RestartPolicy()
    delays = [policy.crashed(at, ran_for=0.5) for at in (0, 1.5, 4, 8.5, 17)]
    assert delays == [1, 2, 4, 8, None]


def test_crashes_spread_over_more_than_a_minute_keep_restarting():
    policy = RestartPolicy()
    # Each daemon ran 50 s: never stable (60 s), so the delay keeps growing, but only 2 crashes
    # ever fall in one 60 s window.
    delays = [policy.crashed(at, ran_for=50) for at in (0, 51, 102, 153, 204, 255)]
    assert None not in delays
    assert delays == [1, 2, 4, 8, 16, 30]


def test_a_stable_run_resets_the_backoff():
    policy = RestartPolicy()
    assert policy.crashed(0, ran_for=1) == 1
    assert policy.crashed(2, ran_for=1) == 2
    assert policy.crashed(500, ran_for=400) == 1


# -- state file and lock ---------------------------------------------------------------------------


def test_state_file_is_replaced_whole_and_private():
    write_state({"state": "running", "restarts": 2})
    assert read_state()["restarts"] == 2
    assert read_state()["updated_at"]
    assert state_file().stat().st_mode & 0o777 == 0o600
    assert [p.name for p in state_file().parent.iterdir() if p.name.endswith(".tmp")] == []
    state_file().write_text("{half a fi")
    assert read_state() is None


def test_lock_excludes_a_second_holder_and_dies_with_its_process():
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from mlx_manager.supervisor.state import Lock; import time; Lock().acquire();"
            " print('held', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert supervisor_running()
        assert lock_holder() == holder.pid
        assert not Lock().acquire(wait=0.2)
        holder.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock
        holder.wait()
        assert not supervisor_running()
        lock = Lock()
        assert lock.acquire()
        lock.release()
    finally:
        holder.kill()
        holder.wait()
        holder.wait()


def test_same_process_rejects_a_recycled_pid():
    me = psutil.Process()
    assert same_process(me.pid, me.create_time())
    assert not same_process(me.pid, me.create_time() - 3600)  # same number, another process
    assert not same_process(None, me.create_time())


# -- the supervisor process ------------------------------------------------------------------------


def test_crash_loop_is_cut_off_after_five_crashes(reap):
    supervisor = supervise("--backoff-initial", "0.05", child=CRASH)
    reap(supervisor)
    assert supervisor.wait(120) == 1
    state = read_state()
    assert state["state"] == "given_up" and state["given_up"] is True
    assert "5 crashes within 60 s" in state["reason"]
    assert state["restarts"] == 4
    assert state["last_exit"]["reason"] == "exited with code 3"
    assert not supervisor_running()
    status = subprocess.run([sys.executable, "-m", "mlx_manager.cli", "status"], capture_output=True, text=True)
    assert status.returncode == 1
    assert "gave up" in status.stdout and "5 crashes" in status.stdout


def test_restarts_wait_longer_each_time(reap, tmp_path):
    starts = tmp_path / "starts"
    supervisor = supervise("--backoff-initial", "0.3", child=CRASH_AND_RECORD, args=(str(starts),))
    reap(supervisor)
    assert supervisor.wait(120) == 1
    times = [float(line) for line in starts.read_text().split()]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(times) == 5
    # The supervisor says which delay it chose, and the next start really came no sooner.
    # (Starting a process takes longer on a busy machine: the gaps have no upper bound here.)
    said = [
        line.split("restarting the daemon in ")[1]
        for line in log_text().splitlines()
        if "restarting the daemon in" in line
    ]
    assert said == ["0.3 s", "0.6 s", "1.2 s", "2.4 s"]
    for gap, delay in zip(gaps, (0.3, 0.6, 1.2, 2.4), strict=False):
        assert delay <= gap, gaps


def test_without_retry_a_daemon_that_never_got_ready_is_not_restarted(reap):
    supervisor = supervise(
        "--no-retry-before-ready", child="print('Error: bad things', flush=True); raise SystemExit(2)"
    )
    reap(supervisor)
    assert supervisor.wait(60) == 1
    state = read_state()
    assert state["restarts"] == 0
    assert state["reason"] == "the daemon exited with code 2 before it was ready"
    assert state["last_exit"]["last_output"] == "Error: bad things"
    assert "Error: bad things" in log_text().splitlines()  # the line itself, copied from the child


def test_a_clean_exit_is_not_a_crash(reap):
    supervisor = supervise(child="raise SystemExit(0)")
    reap(supervisor)
    assert supervisor.wait(60) == 0
    state = read_state()
    assert state["state"] == "stopped" and state["restarts"] == 0


def test_sigterm_drains_the_daemon_then_the_supervisor_exits(reap, tmp_path):
    proof = tmp_path / "drained"
    supervisor = supervise(child=DRAIN_ON_TERM, args=(str(proof),))
    reap(supervisor)
    daemon_pid = state_when(lambda s: s.get("daemon_pid"))["daemon_pid"]
    assert wait_until(lambda: "child up" in log_text().splitlines())
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(60) == 0
    assert proof.read_text() == "drained"  # the daemon finished its drain before the supervisor left
    assert not psutil.pid_exists(daemon_pid) or psutil.Process(daemon_pid).status() == psutil.STATUS_ZOMBIE
    state = read_state()
    assert state["state"] == "stopped" and state["daemon_pid"] is None
    assert not supervisor_running()


def test_a_daemon_that_ignores_sigterm_is_killed_after_the_stop_timeout(reap):
    supervisor = supervise("--stop-timeout", "1", child=IGNORE_TERM)
    reap(supervisor)
    assert wait_until(lambda: "up" in log_text().splitlines())
    began = time.monotonic()
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(60) == 0
    assert time.monotonic() - began >= 1  # it waited the stop timeout, then killed
    assert read_state()["last_exit"]["reason"] == "did not stop within 1 s and was killed"


def test_a_daemon_that_never_answers_is_killed_by_the_watchdog(reap):
    supervisor = supervise("--start-timeout", "1", "--crash-limit", "1", child=SLEEP)
    reap(supervisor)
    assert supervisor.wait(60) == 1
    last_exit = read_state()["last_exit"]
    assert "never answered /health" in last_exit["reason"] and "watchdog" in last_exit["reason"]
    assert "watchdog: the daemon never answered /health" in log_text()


def test_only_one_supervisor_per_home(reap):
    first = supervise(child=SLEEP)
    reap(first)
    state = state_when(lambda s: s.get("daemon_pid"))
    second = supervise(child=SLEEP)
    reap(second)
    assert second.wait(60) == 3
    assert read_state()["supervisor_pid"] == state["supervisor_pid"] == first.pid  # untouched
    assert "another supervisor is already running" in log_text()


def test_a_daemon_orphaned_by_a_killed_supervisor_is_stopped_by_the_next_one(reap, tmp_path):
    proof = tmp_path / "drained"
    first = supervise(child=DRAIN_ON_TERM, args=(str(proof),))
    reap(first)
    orphan = state_when(lambda s: s.get("daemon_pid"))["daemon_pid"]
    assert wait_until(lambda: "child up" in log_text().splitlines())  # its SIGTERM handler is in place
    first.kill()  # SIGKILL: the state file stays behind, still naming the daemon
    first.wait()
    assert psutil.pid_exists(orphan)
    assert not supervisor_running()
    second = supervise(child=SLEEP)
    reap(second)
    state = state_when(lambda s: s.get("supervisor_pid") == second.pid and s.get("daemon_pid"))
    assert proof.exists(), log_text()
    assert proof.read_text() == "drained"
    assert wait_until(lambda: not psutil.pid_exists(orphan) or psutil.Process(orphan).status() == psutil.STATUS_ZOMBIE)
    assert state["daemon_pid"] != orphan


def test_stale_state_from_a_dead_supervisor_reads_as_not_running():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_state(
        {
            "state": "running",
            "supervisor_pid": dead.pid,
            "daemon_pid": dead.pid,
            "daemon_started": 1.0,
            "url": "http://127.0.0.1:9",
            "restarts": 0,
        }
    )
    Path(os.environ["MLX_MANAGER_HOME"], "supervisor.lock").write_text(f"{dead.pid}\n")
    status = subprocess.run(
        [sys.executable, "-m", "mlx_manager.cli", "status", "--json"], capture_output=True, text=True
    )
    assert status.returncode == 3
    body = json.loads(status.stdout)
    assert body["running"] is False and body["stale"] is True


# -- logs ------------------------------------------------------------------------------------------


def test_tail_reads_the_last_lines_of_a_big_file(tmp_path):
    path = tmp_path / "big.log"
    path.write_text("".join(f"line {n}\n" for n in range(50_000)))
    assert tail(path, 3) == ["line 49997", "line 49998", "line 49999"]
    assert tail(path, 0) == []
    assert tail(tmp_path / "missing.log", 5) == []


def test_follow_sees_new_lines_and_survives_rotation(tmp_path):
    path = tmp_path / "daemon.log"
    path.write_text("old\n")
    seen: list[str] = []
    thread = threading.Thread(target=lambda: [seen.append(line) for line in follow(path, poll=0.02)], daemon=True)
    thread.start()
    assert wait_until(lambda: reading_at_end(os.getpid(), path))  # it follows the file from here on
    with open(path, "a") as handle:
        handle.write("first\n")
    assert wait_until(lambda: seen == ["first"])
    path.rename(tmp_path / "daemon.log.1")  # what RotatingFileHandler does
    path.write_text("after rotation\n")
    assert wait_until(lambda: seen == ["first", "after rotation"]), seen
