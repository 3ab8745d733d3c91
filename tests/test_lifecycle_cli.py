"""`mlx-manager start | stop | restart | status | logs` end to end: the real CLI in its own process,
a real detached supervisor, the real daemon on a free port, real signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from functools import partial

import httpx
import psutil
import pytest

from mlx_manager.runtime import read_daemon_info
from mlx_manager.supervisor.state import lock_holder, read_state, same_process, write_state
from tests.daemon_server import wait_until as _wait_until
from tests.processes import free_port, reading_at_end

# Status checks here start a process each: poll gently.
wait_until = partial(_wait_until, interval=0.1)

pytestmark = pytest.mark.slow


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_manager.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def status_json() -> tuple[int, dict]:
    done = cli("status", "--json")
    return done.returncode, json.loads(done.stdout)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _ours() -> set[int]:
    """Every supervisor and daemon the files under this test's home still name."""
    pids = set()
    state = read_state() or {}
    if (holder := lock_holder()) is not None:
        pids.add(holder)
    if same_process(state.get("daemon_pid"), state.get("daemon_started")):
        pids.add(state["daemon_pid"])
    if (info := read_daemon_info()) is not None:
        pids.add(info["pid"])
    return pids


@pytest.fixture(autouse=True)
def clean_up():
    """Stop what the test started (gracefully), then kill anything left."""
    seen: set[int] = set()
    yield seen
    seen |= _ours()
    cli("stop", "--timeout", "10")
    for pid in seen | _ours():
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass


def start(*args: str) -> tuple[str, int, int]:
    """`start` on a free port; returns (url, daemon pid, supervisor pid)."""
    port = free_port()
    done = cli("start", "--port", str(port), *args)
    assert done.returncode == 0, done.stderr
    state = read_state()
    assert done.stdout.strip() == (
        f"Started: http://127.0.0.1:{port} (daemon pid {state['daemon_pid']},"
        f" supervisor pid {state['supervisor_pid']})."
    )
    return state["url"], state["daemon_pid"], state["supervisor_pid"]


def test_start_status_stop(clean_up):
    url, daemon, supervisor = start()
    clean_up |= {daemon, supervisor}
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert httpx.get(f"{url}/v1/models").status_code == 200
    assert httpx.get(f"{url}/v1/models/no-such-model").status_code == 404

    code, body = status_json()
    assert code == 0
    assert body["running"] and body["healthy"] and body["supervised"]
    assert (body["daemon_pid"], body["supervisor_pid"], body["url"]) == (daemon, supervisor, url)
    assert body["version"] and body["rss_bytes"] > 0 and body["uptime_seconds"] >= 0
    assert body["restarts"] == 0 and body["queue_depth"] == 0 and body["models_loaded"] == []
    if sys.platform.startswith("linux"):  # server.blas = "auto" found the OpenBLAS our dependencies bring
        assert "blas" in body["blas"].lower() and body["blas"] != "bundled"
    # The main figures come from the daemon's /metrics.
    assert body["figures"]["requests"] == 2 and body["figures"]["requests_by_status"] == {"success": 1, "error": 1}
    human = cli("status")
    assert human.returncode == 0
    assert human.stdout.startswith("Running, healthy.") and f"pid {daemon}" in human.stdout
    assert "2 served (1 error, 1 success)" in human.stdout
    assert "BLAS" in human.stdout

    again = cli("start")
    assert again.returncode == 0
    assert again.stdout.startswith(f"Already running: {url} (daemon pid {daemon}")

    stopped = cli("stop")
    assert stopped.returncode == 0
    assert stopped.stdout.startswith(f"Stopped (daemon pid {daemon}, supervisor pid {supervisor}) in ")
    assert wait_until(lambda: gone(daemon) and gone(supervisor))  # its state released, the process may still be exiting
    assert cli("status").returncode == 3
    nothing = cli("stop")
    assert (nothing.returncode, nothing.stdout.strip()) == (0, "Not running.")


def test_a_killed_daemon_is_restarted(clean_up):
    # "Within five seconds" is a figure of benchmarks/bench_restart.py, not a deadline here.
    url, daemon, supervisor = start()
    clean_up |= {daemon, supervisor}
    os.kill(daemon, signal.SIGKILL)

    def restarted():
        code, body = status_json()
        return body if code == 0 and body["daemon_pid"] != daemon else None

    body = wait_until(restarted)
    assert body, status_json()
    assert body["restarts"] == 1 and body["supervisor_pid"] == supervisor
    assert body["last_exit"]["reason"] == "killed by SIGKILL"
    assert httpx.get(f"{url}/health").status_code == 200


def test_a_crash_loop_is_cut_off_and_reported(clean_up, isolated_home):
    url, daemon, supervisor = start()
    clean_up |= {daemon, supervisor}
    # From now on every start fails at once (exit 2): the supervisor's restarts crash in a loop.
    (isolated_home / "config.toml").write_text('[server]\nport = "not a port"\n')
    os.kill(daemon, signal.SIGKILL)
    # 1 + 2 + 4 + 8 s of backoff, and four failed starts.
    assert wait_until(lambda: gone(supervisor), timeout=180)

    done = cli("status")
    assert done.returncode == 1
    assert "gave up (5 crashes within 60 s (last: exited with code 2); not restarting)" in done.stdout
    assert "server.port" in done.stdout  # the daemon's own last words
    code, body = status_json()
    assert code == 1 and body["given_up"] and body["restarts"] == 4
    stop = cli("stop")
    assert stop.returncode == 0 and "had given up" in stop.stdout
    assert cli("status").returncode == 3


def test_the_watchdog_restarts_a_frozen_daemon(clean_up):
    port = free_port()
    # The supervisor run directly, with a short hang timeout (settings will carry these for `start`).
    supervisor = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_manager.supervisor",
            "--port",
            str(port),
            "--health-interval",
            "0.5",
            "--hang-timeout",
            "3",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    clean_up.add(supervisor.pid)
    state = wait_until(lambda: (s := read_state()) and s.get("ready") and s, timeout=60)
    frozen = state["daemon_pid"]
    clean_up.add(frozen)
    os.kill(frozen, signal.SIGSTOP)  # alive, but answers nothing: a wedged daemon
    try:

        def restarted():
            code, body = status_json()
            return body if code == 0 and body["daemon_pid"] != frozen else None

        body = wait_until(restarted)
        assert body, status_json()
        assert body["restarts"] == 1
        assert "stopped answering /health" in body["last_exit"]["reason"]
        assert "watchdog" in body["last_exit"]["reason"]
        assert gone(frozen)
        assert "watchdog: the daemon stopped answering /health" in cli("logs", "--supervisor").stdout
    finally:
        if not gone(frozen):
            os.kill(frozen, signal.SIGKILL)


def test_stop_lets_an_in_flight_request_finish(clean_up, slow_model, isolated_home):
    # Drain and stop timeouts no busy machine reaches: the request runs to its end, however slowly.
    (isolated_home / "config.toml").write_text("[server]\ndrain_timeout = 240\n\n[supervisor]\nstop_timeout = 250\n")
    url, daemon, supervisor = start("--model", slow_model)
    clean_up |= {daemon, supervisor}
    assert wait_until(lambda: httpx.get(f"{url}/ready").json().get("loaded"), timeout=120)
    result = {}

    def ask():
        body = {
            "model": slow_model,
            "messages": [{"role": "user", "content": "tell me everything"}],
            "max_tokens": 80,
            "temperature": 0,
        }  # seconds of decoding
        result["response"] = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=280)

    request = threading.Thread(target=ask)
    request.start()
    assert wait_until(lambda: httpx.get(f"{url}/ready").json().get("active_jobs"))
    stopped = cli("stop", "--timeout", "260", timeout=280)
    request.join(280)

    assert stopped.returncode == 0
    assert "running requests were allowed to finish" in stopped.stdout
    response = result["response"]
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "length"  # ran to the end, not cut short
    assert response.json()["usage"]["completion_tokens"] == 80
    assert wait_until(lambda: gone(daemon) and gone(supervisor))  # its state released, the process may still be exiting


def test_stop_with_defaults_answers_every_request_and_writes_its_row(clean_up, slow_model, isolated_home):
    # A drain shorter than the requests, and longer than `stop` used to wait (30 s, killing the
    # daemon before the drain ran out): every client must get its answer or the `draining` problem.
    (isolated_home / "config.toml").write_text("[server]\ndrain_timeout = 31\n")
    url, daemon, supervisor = start("--model", slow_model)
    clean_up |= {daemon, supervisor}
    assert wait_until(lambda: httpx.get(f"{url}/ready").json().get("loaded"), timeout=120)
    answers: dict[str, object] = {}

    def ask(n: int) -> None:
        request_id = f"long-{n}"
        body = {"model": slow_model, "prompt": f"tell me everything {n}", "max_tokens": 3000, "temperature": 0}
        try:
            with httpx.Client(base_url=url, timeout=280, headers={"x-request-id": request_id}) as http:
                if n % 2:
                    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
                        answers[request_id] = (stream.status_code, "".join(stream.iter_text()))
                else:
                    answer = http.post("/v1/completions", json=body)
                    answers[request_id] = (answer.status_code, answer.text)
        except httpx.HTTPError as exc:  # a dropped connection: what this test forbids
            answers[request_id] = exc

    requests = [threading.Thread(target=ask, args=(n,)) for n in range(4)]
    for request in requests:
        request.start()
    assert wait_until(lambda: httpx.get(f"{url}/ready").json().get("active_jobs") == 4, timeout=120)
    stopped = cli("stop", timeout=280)
    for request in requests:
        request.join(280)

    assert stopped.returncode == 0, stopped.stderr
    assert wait_until(lambda: gone(daemon) and gone(supervisor))  # its state released, the process may still be exiting
    assert len(answers) == 4
    for request_id, answer in answers.items():
        assert isinstance(answer, tuple), f"{request_id}: {answer!r}"
        status, text = answer
        if request_id in ("long-1", "long-3"):  # streams: a complete stream that ends with its error event
            last = text.strip().splitlines()[-1]
            assert status == 200 and last.startswith("data: ") and json.loads(last[6:])["error"]["code"] == "draining"
        else:
            assert status == 503 and json.loads(text)["error"]["code"] == "draining", text
    with sqlite3.connect(isolated_home / "audit.db") as db:
        rows = dict(db.execute("SELECT request_id, status FROM audit_logs"))
    assert {request_id: rows.get(request_id) for request_id in answers} == dict.fromkeys(answers, "error")


def test_restart_with_a_broken_config_leaves_the_daemon_running(clean_up, isolated_home):
    url, daemon, supervisor = start()
    clean_up |= {daemon, supervisor}
    config = isolated_home / "config.toml"
    config.write_text('[server]\ndrain_timeout = 5\n\n[timeouts]\nchat = "soon"\n')

    done = cli("restart")
    assert done.returncode == 2
    assert done.stderr.startswith(f"Error: the settings cannot be read: {config}:5: timeouts.chat")
    assert "nothing was started or stopped" in done.stderr
    assert not gone(daemon) and not gone(supervisor)  # the running daemon was left alone
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert read_state()["daemon_pid"] == daemon


def test_start_with_a_broken_config_starts_nothing(clean_up, isolated_home):
    config = isolated_home / "config.toml"
    config.write_text("[server]\nport = 99999\n")
    done = cli("start")
    assert done.returncode == 2
    assert done.stderr.startswith(f"Error: the settings cannot be read: {config}:2: server.port")
    assert lock_holder() is None and read_state() is None and read_daemon_info() is None


def test_start_with_other_options_while_running_says_what_differs(clean_up, fast_model):
    url, daemon, supervisor = start()
    clean_up |= {daemon, supervisor}
    port = read_state()["port"]

    same = cli("start", "--port", str(port))
    assert same.returncode == 0 and same.stdout.startswith(f"Already running: {url}")
    other = cli("start", "--model", fast_model, "--port", str(port + 1))
    assert other.returncode == 1
    assert other.stdout.startswith(f"Already running: {url}")
    assert other.stderr.strip() == (
        f"Error: it runs with no --model (not {fast_model}); --port {port} (not {port + 1}): what you asked for "
        "was not applied. Run `mlx-manager restart` with the options you want; it replaces them."
    )
    assert read_state()["daemon_pid"] == daemon  # left alone


def test_start_on_a_busy_port_fails_with_the_reason(clean_up):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = cli("start", "--port", str(port))
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        f"Error: the daemon did not start: port {port} on 127.0.0.1 is already in use. "
        "Stop the program using it, or pass --port."
    )
    assert "Last lines of the log:" in done.stderr
    assert lock_holder() is None and read_daemon_info() is None  # nothing left running
    assert cli("status").returncode == 1  # it gave up; `status` says why
    assert "already in use" in cli("status").stdout


def test_start_with_a_model_that_cannot_load_fails_with_the_reason(clean_up, tmp_path):
    missing = str(tmp_path / "no-such-model")
    done = cli("start", "--port", str(free_port()), "--model", missing)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: the daemon did not start: could not preload model '{missing}'")
    assert lock_holder() is None and read_daemon_info() is None
    assert cli("status").returncode == 1


def test_start_replaces_a_stale_state_file(clean_up):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_state(
        {
            "state": "running",
            "supervisor_pid": dead.pid,
            "daemon_pid": dead.pid,
            "daemon_started": 1.0,
            "url": "http://127.0.0.1:9",
            "restarts": 7,
        }
    )
    assert cli("status").returncode == 3
    url, daemon, supervisor = start()
    clean_up |= {daemon, supervisor}
    state = read_state()
    assert state["supervisor_pid"] == supervisor != dead.pid
    assert state["restarts"] == 0


def test_a_daemon_whose_supervisor_was_killed_can_still_be_stopped(clean_up):
    url, daemon, supervisor = start()
    clean_up |= {daemon, supervisor}
    os.kill(supervisor, signal.SIGKILL)
    assert wait_until(lambda: gone(supervisor))

    code, body = status_json()
    assert code == 0 and body["running"] and not body["supervised"] and body["daemon_pid"] == daemon
    assert "nothing restarts it" in cli("status").stdout
    # (`start` would now adopt it: test_start_adopts_a_daemon_whose_supervisor_was_killed.)
    stopped = cli("stop")
    assert stopped.returncode == 0 and f"daemon pid {daemon}" in stopped.stdout
    assert gone(daemon)
    assert cli("status").returncode == 3


def test_start_adopts_a_daemon_whose_supervisor_was_killed(clean_up, fast_model):
    url, daemon, supervisor = start("--model", fast_model)
    clean_up |= {daemon, supervisor}
    os.kill(supervisor, signal.SIGKILL)
    assert wait_until(lambda: gone(supervisor))

    adopted = cli("start")
    assert adopted.returncode == 0, adopted.stderr
    state = read_state()
    clean_up.add(state["supervisor_pid"])
    assert state["supervisor_pid"] != supervisor and state["daemon_pid"] == daemon and not gone(daemon)
    assert adopted.stdout.startswith(f"Already running: {url} (daemon pid {daemon}); its supervisor was gone")
    code, body = status_json()
    assert code == 0 and body["supervised"] and body["supervisor_pid"] == state["supervisor_pid"]
    # Supervised again: a crash is restarted, with the options it was started with.
    os.kill(daemon, signal.SIGKILL)
    restarted = wait_until(
        lambda: (s := read_state()) and s.get("ready") and s["daemon_pid"] not in (None, daemon) and s, timeout=120
    )
    assert restarted, read_state()
    clean_up.add(restarted["daemon_pid"])
    assert restarted["flags"]["model"] == fast_model and restarted["restarts"] == 1
    assert wait_until(lambda: httpx.get(f"{url}/ready").json().get("loaded") == [fast_model], timeout=120)


def test_restart_keeps_the_options_and_replaces_the_daemon(clean_up):
    url, daemon, supervisor = start()
    clean_up |= {daemon, supervisor}
    done = cli("restart")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("Stopped (")
    state = read_state()
    clean_up |= {state["daemon_pid"], state["supervisor_pid"]}
    assert lines[1].startswith(f"Started: {url} ")  # the same --port
    assert state["daemon_pid"] != daemon and gone(daemon)


def test_stop_force_kills_at_once(clean_up):
    url, daemon, supervisor = start()
    clean_up |= {daemon, supervisor}
    done = cli("stop", "--force")
    assert done.returncode == 0
    assert done.stdout.strip() == f"Killed (daemon pid {daemon}, supervisor pid {supervisor})."
    assert wait_until(lambda: gone(daemon) and gone(supervisor))  # its state released, the process may still be exiting
    assert cli("status").returncode == 3


def test_logs_show_the_daemon_log_and_the_supervisor_log(clean_up, isolated_home, children):
    assert "No log yet" in cli("logs").stderr
    url, daemon, supervisor = start()
    clean_up |= {daemon, supervisor}
    daemon_log = cli("logs", "-n", "200")
    assert daemon_log.returncode == 0
    assert f"serving the OpenAI API on {url} (pid {daemon})" in daemon_log.stdout
    assert len(cli("logs", "-n", "2").stdout.splitlines()) == 2
    supervisor_log = cli("logs", "--supervisor").stdout
    assert f"daemon ready at {url} (pid {daemon})" in supervisor_log

    follower = children.start(
        [sys.executable, "-m", "mlx_manager.cli", "logs", "--follow", "-n", "0"],
        ctrl_c=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    seen: list[str] = []
    threading.Thread(target=lambda: seen.extend(follower.stdout), daemon=True).start()
    path = isolated_home / "logs" / "daemon.log"
    try:
        assert wait_until(lambda: reading_at_end(follower.pid, path))  # it follows the file from here on
        with open(path, "a") as log:
            log.write("a line written while following\n")
        assert wait_until(lambda: "a line written while following\n" in seen), seen
    finally:
        follower.send_signal(signal.SIGINT)
        assert follower.wait(60) == 0
