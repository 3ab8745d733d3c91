"""Stopping while MLX works: no SIGABRT at exit, a model load abandoned at a stop, and `stop`
saying what really happened. Real processes throughout: a Python that makes engines, a real
supervisor and daemon (tests/slow_load.py only adds time to its loads), the real CLI."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from mlx_manager.supervisor.state import read_state, same_process
from tests.daemon_server import wait_until
from tests.processes import free_port

pytestmark = pytest.mark.slow

# Two engines one after the other, the second stopped without waiting for its thread: the exit of
# such a process aborted ("terminate called without an active exception") on MLX's per-thread state.
TWO_ENGINES = """
import asyncio, sys
from mlx_manager.engine.config import EngineConfig
from mlx_manager.engine.engine import Engine

async def main(model):
    for timeout in (10.0, 0.0):
        engine = Engine(EngineConfig(allow_any_path=True))
        engine.start()
        await engine.load(model)
        engine.stop(timeout)
    print("both ran", flush=True)

asyncio.run(main(sys.argv[1]))
"""

ABORT_ON_TERM = """
import os, signal, time
signal.signal(signal.SIGTERM, lambda *_: os.abort())
print('up', flush=True)
time.sleep(600)
"""


def test_a_process_that_made_two_engines_exits_cleanly(fast_model):
    done = subprocess.run([sys.executable, "-c", TWO_ENGINES, fast_model], capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout.strip()) == (0, "both ran"), done.stderr
    assert "terminate called" not in done.stderr


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_manager.cli", *args], capture_output=True, text=True, timeout=180)


@pytest.fixture
def supervise() -> Iterator:
    """Start a real supervisor running `daemon` (a command line); whatever is left is killed at the end."""
    started: list[subprocess.Popen] = []

    def start(daemon: list[str]) -> subprocess.Popen:
        command = [sys.executable, "-m", "mlx_manager.supervisor", "--no-retry-before-ready", "--", *daemon]
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        started.append(process)
        return process

    yield start
    state = read_state() or {}
    for process in started:
        family = [process]
        try:
            family += psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        for member in family:
            try:
                member.kill()
            except psutil.NoSuchProcess:
                pass
        process.wait(60)
    if same_process(state.get("daemon_pid"), state.get("daemon_started")):
        psutil.Process(state["daemon_pid"]).kill()


def loading(home: Path, model: str) -> bool:
    """Whether the daemon has begun reading the model (not just importing mlx-lm to do so)."""
    log = home / "logs" / "daemon.log"
    return log.exists() and f"loading text model {model} from" in log.read_text()


def slow_daemon(model: str, port: int, step_seconds: float, step_bytes: int, engine_stop_timeout: float) -> list[str]:
    serve = ["serve", "--port", str(port), "--model", model]
    return [
        sys.executable,
        "-m",
        "tests.slow_load",
        str(step_seconds),
        str(step_bytes),
        str(engine_stop_timeout),
        *serve,
    ]


def test_stop_during_a_load_abandons_it_and_says_so(fast_model, supervise, isolated_home):
    port = free_port()
    # One tensor per step, each taking 0.5 s: about 10 s for the whole model.
    supervise(slow_daemon(fast_model, port, 0.5, 1, 10.0))
    assert wait_until(lambda: loading(isolated_home, fast_model), timeout=120)
    stopped = cli("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.startswith("Stopped (daemon pid ")
    assert stopped.stdout.rstrip().endswith(
        f"; running requests were allowed to finish. Note: the load of model {fast_model!r} was abandoned."
    )
    last_exit = (read_state() or {})["last_exit"]
    assert last_exit["code"] == 0, last_exit
    log = (isolated_home / "logs" / "daemon.log").read_text()
    assert f"the load of model {fast_model!r} was abandoned" in log
    assert "loaded text model" not in log


def test_stop_while_a_load_step_cannot_be_interrupted_exits_without_waiting(fast_model, supervise, isolated_home):
    port = free_port()
    # One step for the whole model, longer than the stop waits for the inference thread (1 s).
    supervise(slow_daemon(fast_model, port, 60.0, 1 << 40, 1.0))
    assert wait_until(lambda: loading(isolated_home, fast_model), timeout=120)
    stopped = cli("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert "running requests were allowed to finish. Note: the inference thread was still loading model" in (
        stopped.stdout
    ), stopped.stdout
    last_exit = (read_state() or {})["last_exit"]
    assert last_exit["code"] == 0, last_exit  # not SIGABRT


def test_stop_says_when_the_daemon_died_by_a_signal(supervise):
    supervisor = supervise([sys.executable, "-c", ABORT_ON_TERM])
    assert wait_until(lambda: (s := read_state()) is not None and s.get("daemon_pid") is not None)
    daemon = read_state()["daemon_pid"]
    stopped = cli("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.startswith(f"Stopped (daemon pid {daemon}, supervisor pid {supervisor.pid}) in ")
    assert ", but the daemon was killed by SIGABRT: requests it was running may have been cut off." in stopped.stdout
    assert "allowed to finish" not in stopped.stdout
    assert signal.Signals(-read_state()["last_exit"]["code"]) == signal.SIGABRT
