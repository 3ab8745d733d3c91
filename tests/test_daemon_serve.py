"""`mlx-manager serve` as a user runs it: a real process, real signals, its files and exit codes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

from mlx_manager.runtime import daemon_file
from tests.daemon_server import wait_until
from tests.processes import free_port

MLX_MANAGER = str(Path(sys.executable).with_name("mlx-manager"))


class Daemon:
    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [MLX_MANAGER, "serve", "--port", str(self.port), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )

    def wait_ready(self, model: str | None = None, timeout: float = 120) -> None:
        def ready() -> bool:
            assert self.process.poll() is None, self.process.communicate()
            try:
                body = httpx.get(self.url + "/ready", timeout=2).json()
            except httpx.HTTPError:
                return False
            return body.get("status") == "ready" and (model is None or model in body["loaded"])

        assert wait_until(ready, timeout=timeout, interval=0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> tuple[int, str]:
        self.process.send_signal(sig)
        _, stderr = self.process.communicate(timeout=timeout)
        return self.process.returncode, stderr

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
def daemons():
    started: list[Daemon] = []

    def start(*args: str, **kwargs) -> Daemon:
        started.append(Daemon(*args, **kwargs))
        return started[-1]

    yield start
    for daemon in started:
        daemon.kill()


def test_starts_healthy_without_a_model_and_stops_cleanly(daemons):
    daemon = daemons()
    daemon.wait_ready()
    assert httpx.get(daemon.url + "/health").json()["status"] == "ok"
    info = json.loads(daemon_file().read_text())
    assert info["pid"] == daemon.process.pid and info["port"] == daemon.port and info["url"] == daemon.url
    assert info["host"] == "127.0.0.1" and info["version"] and info["started_at"]
    code, stderr = daemon.stop()
    assert code == 0, stderr
    assert not daemon_file().exists()
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests(daemons, slow_model):
    # A drain timeout no busy machine reaches: the request runs to its end, however slowly.
    daemon = daemons("--model", slow_model, env={"MLX_MANAGER_SERVER__DRAIN_TIMEOUT": "240"})
    daemon.wait_ready(slow_model)
    results = {}

    def in_flight():
        with httpx.Client(base_url=daemon.url, timeout=280) as http:
            body = {"model": slow_model, "prompt": "long answer", "max_tokens": 80, "temperature": 0}
            results["answer"] = http.post("/v1/completions", json=body)

    thread = threading.Thread(target=in_flight)
    thread.start()
    assert wait_until(lambda: httpx.get(f"{daemon.url}/ready").json().get("active_jobs"))
    daemon.process.send_signal(signal.SIGTERM)
    assert wait_until(lambda: httpx.get(f"{daemon.url}/ready").json().get("reason") == "draining")
    # New work is refused while the running request finishes.
    with pytest.raises(openai.InternalServerError) as caught:
        daemon.openai().completions.create(model=slow_model, prompt="new", max_tokens=2)
    assert caught.value.status_code == 503 and caught.value.code == "draining"
    assert caught.value.response.headers["content-type"] == "application/problem+json"
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert caught.value.response.json()["request_id"]
    thread.join(280)
    answer = results["answer"]
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] > 0
    _, stderr = daemon.process.communicate(timeout=60)
    assert daemon.process.returncode == 0, stderr
    assert not daemon_file().exists()


@pytest.mark.slow
def test_drain_timeout_ends_a_stream_with_an_error_event(daemons, slow_model):
    daemon = daemons("--model", slow_model, env={"MLX_MANAGER_SERVER__DRAIN_TIMEOUT": "1"})
    daemon.wait_ready(slow_model)
    body = {"model": slow_model, "prompt": "never ending", "max_tokens": 2000, "temperature": 0, "stream": True}
    events = []
    with (
        httpx.Client(base_url=daemon.url, timeout=60) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data:"))  # streaming has begun
        daemon.process.send_signal(signal.SIGTERM)
        events = [line for line in lines if line]
    # Cut short at the drain timeout, long before its 2000 tokens: an error event, no [DONE].
    assert events[-2] == "event: error"
    problem = json.loads(events[-1].removeprefix("data: "))
    assert problem["status"] == 503 and problem["type"] == "urn:mlx-manager:problem:draining"
    assert problem["request_id"] == response.headers["x-request-id"]
    assert "data: [DONE]" not in events
    _, stderr = daemon.process.communicate(timeout=60)
    assert daemon.process.returncode == 0, stderr


def test_busy_port_is_one_line(daemons):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([MLX_MANAGER, "serve", "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    expected = f"Error: port {port} on 127.0.0.1 is already in use. Stop the program using it, or pass --port."
    assert result.stderr.strip() == expected
    assert not daemon_file().exists()


def test_a_preload_model_that_cannot_load_stops_the_daemon(daemons, tmp_path):
    missing = str(tmp_path / "no-such-model")
    daemon = daemons("--model", missing)
    code = daemon.process.wait(timeout=60)
    stderr = daemon.process.stderr.read()
    assert code == 1
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: could not preload model '{missing}'")
    assert last.endswith("Check the model (--model or models.preload).")
    assert "Traceback" not in stderr and "serving the OpenAI API" not in stderr  # it never served
    assert not daemon_file().exists()


# Injected into the daemon's process by a sitecustomize (a stand-in for a bug: nothing in
# mlx-manager breaks its own loop): the engine's loop fails once a job is generating.
BREAK_THE_LOOP = """
from mlx_manager.engine.worker import Worker

real = Worker._step_batches


def step_batches(self):
    if any(slot.job.completion_tokens for batch in self.batches.values() for slot in batch.slots.values()):
        raise RuntimeError("injected bug in the engine's loop")
    real(self)


Worker._step_batches = step_batches
"""


def test_an_engine_whose_loop_fails_stops_the_daemon_with_an_error(daemons, fast_model, tmp_path):
    """Not a daemon that answers /health but never a request again: the request in flight gets an
    error, and the daemon exits 1 with the reason, so a supervisor starts a new one."""
    (tmp_path / "sitecustomize.py").write_text(BREAK_THE_LOOP)
    daemon = daemons("--model", fast_model, env={"PYTHONPATH": str(tmp_path)})
    daemon.wait_ready(fast_model)
    body = {"model": fast_model, "prompt": "hello", "max_tokens": 50, "temperature": 0}
    answer = httpx.post(daemon.url + "/v1/completions", json=body, timeout=120)
    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert daemon.process.wait(timeout=60) == 1
    stderr = daemon.process.stderr.read()
    last = stderr.strip().splitlines()[-1]
    assert last == (
        "Error: the inference engine failed (RuntimeError; the log has its traceback). "
        "This is a bug in mlx-manager: please report it with that traceback."
    )
    assert "injected bug in the engine's loop" in stderr  # the traceback, in the log
    assert not daemon_file().exists()


def test_bad_config_file_is_one_line_and_exit_2(isolated_home):
    (isolated_home / "config.toml").write_text('[timeouts]\nchat = "abc"\n')
    result = subprocess.run([MLX_MANAGER, "serve"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "config.toml" in lines[0] and "timeouts.chat" in lines[0]
    assert "Traceback" not in result.stderr


def test_help_does_not_import_the_server_stack():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from mlx_manager.cli import app\n"
        "CliRunner().invoke(app, ['serve', '--help'])\n"
        "print([m for m in ('fastapi', 'uvicorn', 'starlette', 'mlx_manager.daemon.app') if m in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr


@pytest.mark.slow
def test_config_set_applies_to_the_running_daemon(daemons, slow_model):
    daemon = daemons("--model", slow_model)
    daemon.wait_ready(slow_model)
    command = [MLX_MANAGER, "config", "set", "timeouts.chat", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"running daemon at {daemon.url} applied it" in result.stdout
    with pytest.raises(openai.APIStatusError) as caught:  # long before its 100000 tokens
        daemon.openai().chat.completions.create(
            model=slow_model, messages=[{"role": "user", "content": "go"}], max_tokens=100000, timeout=120
        )
    assert caught.value.status_code == 504
    assert caught.value.response.json()["timeout_seconds"] == 1
    code, stderr = daemon.stop()
    assert code == 0, stderr
