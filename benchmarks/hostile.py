"""Hostile checks against a real daemon: what a hostile client tries, and whether the daemon held.

    python benchmarks/hostile.py                          # every check, against a daemon it starts
    python benchmarks/hostile.py idle_sockets rebinding   # only these
    python benchmarks/hostile.py --list                   # the checks and what each tries

It makes a temporary home (MLX_MANAGER_HOME), a tiny real model (tests/models.py) and an API key,
and starts `python -m mlx_manager.supervisor` (what `mlx-manager start` runs) with a 15-second
watchdog (the default is 60 s), so that a daemon that stops answering shows up as a restart. Then each check runs in
turn and the script prints what held. Exit code 0 when every check held.

To add a check: write `def check_<name>(target: Target) -> str` under @check("what it tries"). It
returns what it saw when the daemon held, and raises (an AssertionError with the reason) when
it did not. `target` has the URL, the key, the model, the home folder and helpers.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import io
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Taking in thousands of connections at once costs about a millisecond of syscalls each: on a busy
# machine the first answers of a flood take seconds. The watchdog's limit, and how long /health
# may take to answer (asked on a new connection each time, as the watchdog asks).
WATCHDOG_SECONDS = 15.0
READ_TIMEOUT = 3.0
IDLE_TIMEOUT = 2.0


@dataclass
class Target:
    """The daemon under test and what a check needs to reach it."""

    url: str
    port: int
    key: str
    model: str
    home: Path
    env: dict[str, str]

    def http(self, **options: object) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.key}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **options)  # type: ignore[arg-type]

    def state(self) -> dict:
        from mlx_manager.supervisor.state import read_state

        with self.home_env():
            return read_state() or {}

    @contextlib.contextmanager
    def home_env(self) -> Iterator[None]:
        saved = os.environ.get("MLX_MANAGER_HOME")
        os.environ["MLX_MANAGER_HOME"] = str(self.home)
        try:
            yield
        finally:
            if saved is None:
                del os.environ["MLX_MANAGER_HOME"]
            else:
                os.environ["MLX_MANAGER_HOME"] = saved

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "mlx_manager.cli", *args], capture_output=True, text=True, env=self.env, timeout=120
        )

    def serves(self) -> None:
        """/health answers and a real generation is served, on a new connection each."""
        assert httpx.get(self.url + "/health", timeout=WATCHDOG_SECONDS).status_code == 200, "/health did not answer"
        body = {"model": self.model, "prompt": "hello", "max_tokens": 3}
        answer = httpx.post(
            self.url + "/v1/completions", json=body, timeout=30, headers={"Authorization": f"Bearer {self.key}"}
        )
        assert answer.status_code == 200, f"a real request got {answer.status_code}: {answer.text[:200]}"

    def no_restart_since(self, pid: int | None) -> None:
        state = self.state()
        assert state.get("daemon_pid") == pid, f"the daemon was restarted ({state.get('last_exit')})"


@dataclass
class Check:
    name: str
    tries: str
    run: Callable[[Target], str]


CHECKS: dict[str, Check] = {}


def check(tries: str) -> Callable[[Callable[[Target], str]], Callable[[Target], str]]:
    def register(function: Callable[[Target], str]) -> Callable[[Target], str]:
        name = function.__name__.removeprefix("check_")
        CHECKS[name] = Check(name, tries, function)
        return function

    return register


# -- helpers ----------------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.1) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def peer_closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


@dataclass
class Trickle:
    """Connections that send a request's headers a byte at a time (slowloris)."""

    port: int
    clients: int
    pause: float = 0.3
    closed: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sockets = [socket.create_connection(("127.0.0.1", self.port), timeout=5) for _ in range(self.clients)]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        request = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100_000
        started = time.monotonic()
        for at in range(len(request)):
            for index, sock in enumerate(self.sockets):
                if index not in self.closed:
                    try:
                        sock.send(request[at : at + 1])
                    except OSError:
                        self.closed[index] = time.monotonic() - started
            if len(self.closed) == len(self.sockets) or self.stopping.wait(self.pause):
                return

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(10)
        for sock in self.sockets:
            sock.close()


# -- the checks ----------------------------------------------------------------------------------------


@check("3,000 idle TCP connections: the daemon must keep serving /health and requests, and not be restarted")
def check_idle_sockets(target: Target) -> str:
    pid = target.state().get("daemon_pid")
    sockets = []
    try:
        for _ in range(3000):
            sock = socket.socket()
            sock.setblocking(False)
            assert sock.connect_ex(("127.0.0.1", target.port)) in (0, errno.EINPROGRESS, errno.EAGAIN)
            sockets.append(sock)
        until = time.monotonic() + WATCHDOG_SECONDS + 5
        served = 0
        while time.monotonic() < until:
            target.serves()
            served += 1
        closed = wait_until(lambda: sum(map(peer_closed, sockets)) == len(sockets), timeout=IDLE_TIMEOUT + 10)
        assert closed, f"{sum(map(peer_closed, sockets))} of {len(sockets)} idle sockets closed"
    finally:
        for sock in sockets:
            sock.close()
    target.no_restart_since(pid)
    return f"{served} requests served meanwhile; every idle socket closed by the daemon; no restart"


@check("50 slowloris clients trickling headers: served meanwhile, and each closed within the read timeout")
def check_slowloris(target: Target) -> str:
    pid = target.state().get("daemon_pid")
    slow = Trickle(target.port, 50)
    try:
        until = time.monotonic() + WATCHDOG_SECONDS + 5
        while time.monotonic() < until:
            target.serves()
        assert wait_until(lambda: len(slow.closed) == slow.clients, timeout=READ_TIMEOUT + 10), (
            f"{slow.clients - len(slow.closed)} slowloris clients still connected"
        )
    finally:
        slow.stop()
    target.no_restart_since(pid)
    return f"all {slow.clients} closed after at most {max(slow.closed.values()):.1f} s; no restart"


@check("DNS rebinding: a page on evil.example rebound to 127.0.0.1 calls the API and the admin feed")
def check_rebinding(target: Target) -> str:
    evil = f"evil.example:{target.port}"
    headers = {"Host": evil, "Origin": f"http://{evil}", "User-Agent": "Mozilla/5.0"}
    with target.http() as http:
        for method, path, body in (
            ("GET", "/health", None),
            ("GET", "/v1/models", None),
            ("POST", "/v1/completions", {"model": target.model, "prompt": "hi"}),
            ("POST", "/admin/models/load", {"model": "/etc"}),
        ):
            answer = http.request(method, path, json=body, headers=headers)
            assert answer.status_code == 421, f"{method} {path} with Host {evil}: {answer.status_code}"
    with socket.create_connection(("127.0.0.1", target.port), timeout=10) as sock:
        sock.sendall(
            f"GET /admin/audit/feed HTTP/1.1\r\nHost: {evil}\r\nUpgrade: websocket\r\nConnection: Upgrade"
            f"\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Origin: http://{evil}\r\n\r\n".encode()
        )
        status = sock.recv(1024).split(b"\r\n")[0].decode()
    assert " 403 " in status + " ", f"the admin WebSocket answered {status}"
    return "421 on every route, 403 on the WebSocket handshake"


@check("70 requests naming a 1 MB model: refused before the audit log, the metrics or the logs grow")
def check_huge_model_ids(target: Target) -> str:
    database = target.home / "audit.db"
    before = database.stat().st_size
    with target.http() as http:
        for i in range(70):
            answer = http.post("/v1/completions", json={"model": chr(97 + i % 26) * 1_000_000, "prompt": "hi"})
            assert answer.status_code == 422, f"a 1 MB model id got {answer.status_code}"
        time.sleep(1)  # the audit writer's batch
        started = time.monotonic()
        metrics = http.get("/metrics").text
        scrape = time.monotonic() - started
    grown = database.stat().st_size - before
    assert grown < 1_000_000 and len(metrics) < 200_000, f"audit.db grew {grown} bytes, /metrics is {len(metrics)}"
    return (
        f"422 each; audit.db +{grown / 1024:.0f} KiB, /metrics {len(metrics) / 1024:.0f} KiB,"
        f" scraped in {scrape * 1000:.0f} ms"
    )


@check("X-Forwarded-For from loopback: a forged client address must not be believed")
def check_forwarded_for(target: Target) -> str:
    answer = httpx.post(target.url + "/admin/reload", headers={"X-Forwarded-For": "203.0.113.9"})
    assert answer.status_code == 401, f"the daemon took the forged address (got {answer.status_code}, not 401)"
    return "the request stayed a loopback one (401 for the missing admin token, not 403 for a remote client)"


@check("unpaired UTF-16 surrogates in content, prompt and embedding input: 4xx, never 500")
def check_surrogates(target: Target) -> str:
    lone = '"a\\ud800b"'
    bodies = {
        "/v1/chat/completions": '{"model": "M", "messages": [{"role": "user", "content": L}], "max_tokens": 2}',
        "/v1/completions": '{"model": "M", "prompt": L, "max_tokens": 2}',
        "/v1/embeddings": '{"model": "M", "input": L}',
        "/v1/messages": '{"model": "M", "max_tokens": 2, "messages": [{"role": "user", "content": L}]}',
    }
    seen = []
    with target.http() as http:
        for path, body in bodies.items():
            text = body.replace('"M"', f'"{target.model}"').replace("L", lone)
            answer = http.post(path, content=text.encode(), headers={"Content-Type": "application/json"})
            assert 400 <= answer.status_code < 500, f"{path}: {answer.status_code}"
            seen.append(str(answer.status_code))
    return f"{', '.join(sorted(set(seen)))} on all {len(bodies)} routes"


@check("probing the file system through `model` (folders, /proc, names too long for the OS)")
def check_filesystem_probe(target: Target) -> str:
    probes = [
        "/etc",
        "/nonexistent",
        "/proc/1/cwd",
        "/" + "a" * 300,
        str(Path(target.model).parent),
        "/tmp",
        str(Path(target.model) / "config.json"),
    ]
    details = set()
    with target.http() as http:
        for model in probes:
            answer = http.post("/v1/completions", json={"model": model, "prompt": "hi"})
            assert answer.status_code == 404, f"{model!r}: {answer.status_code} {answer.text[:120]}"
            details.add(answer.json()["detail"].replace(repr(model), "MODEL"))
    assert len(details) == 1, f"{len(details)} different messages: {details}"
    return f"404 with one message for all {len(probes)}"


@check("log, terminal and CSV injection through a path and a model id")
def check_injection(target: Target) -> str:
    forged = "2026-01-01 00:00:00,000 INFO mlx_manager.daemon: forged"
    path = "/v1/x%0a" + forged.replace(" ", "%20") + "%1b%5b31m"
    with target.http() as http:
        assert http.get(path).status_code == 404
        formula = '=HYPERLINK("http://evil.example","x")'
        assert http.post("/v1/completions", json={"model": formula, "prompt": "hi"}).status_code == 404
    log = (target.home / "logs" / "daemon.log").read_text()
    assert not any(line.startswith(forged) for line in log.splitlines()), "a forged line is in the daemon's log"
    assert "\x1b" not in log, "an escape sequence reached the daemon's log"

    def exported_models() -> list[str]:
        done = target.cli("audit", "query", "--csv", "--limit", "0")
        return [row["model"] for row in csv.DictReader(io.StringIO(done.stdout))]

    models: list[str] = []

    def exported() -> bool:
        models[:] = exported_models()
        return any(formula[1:] in model for model in models)

    assert wait_until(exported, timeout=10), "the request's audit row did not show up"
    assert "'" + formula in models and formula not in models, "the CSV holds a live formula"
    tail = target.cli("audit", "tail", "--wide").stdout
    assert "\x1b" not in tail, "an escape sequence reached the terminal"
    return "one log line per record, escapes shown as text, the CSV cell starts with '"


@check("with a key set: /metrics, /ready, /openapi.json and /docs without one")
def check_extras(target: Target) -> str:
    for path in ("/metrics", "/ready", "/openapi.json"):
        answer = httpx.get(target.url + path)
        assert answer.status_code == 401, f"{path} without a key: {answer.status_code}"
    docs = httpx.get(target.url + "/docs").status_code
    assert docs in (401, 404), f"/docs (Swagger UI from a CDN) answered {docs}"
    return f"401 without a key; /docs {docs}"


# -- running them ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def daemon(work: Path) -> Iterator[Target]:
    from tests.models import build_model

    model = str(build_model(work / "models" / "fast", "fast"))
    port = _free_port()
    key = "hostile-" + secrets.token_urlsafe(24)
    env = {
        **os.environ,
        "MLX_MANAGER_HOME": str(work / "home"),
        "MLX_MANAGER_API_KEY": key,
        "HF_HUB_OFFLINE": "1",
        "MLX_MANAGER_SERVER__READ_TIMEOUT": str(READ_TIMEOUT),
        "MLX_MANAGER_SERVER__IDLE_TIMEOUT": str(IDLE_TIMEOUT),
        "MLX_MANAGER_TELEMETRY__ENABLED": "false",
        "PYTHONPATH": str(ROOT),
    }
    supervisor = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_manager.supervisor",
            "--port",
            str(port),
            "--model",
            model,
            "--health-interval",
            "1",
            "--hang-timeout",
            str(WATCHDOG_SECONDS),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    target = Target(f"http://127.0.0.1:{port}", port, key, model, work / "home", env)
    try:
        if not wait_until(lambda: target.state().get("ready"), timeout=180, interval=0.2):
            raise SystemExit(f"the daemon did not get ready; see {work / 'home'}/logs")
        yield target
    finally:
        supervisor.terminate()
        try:
            supervisor.wait(60)
        except subprocess.TimeoutExpired:
            supervisor.kill()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checks", nargs="*", help="names of the checks to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    args = parser.parse_args()
    if args.list:
        for item in CHECKS.values():
            print(f"{item.name:20} {item.tries}")
        return 0
    unknown = [name for name in args.checks if name not in CHECKS]
    if unknown:
        parser.error(f"no check named {', '.join(unknown)}; --list shows them")
    chosen = [CHECKS[name] for name in args.checks] or list(CHECKS.values())
    from mlx_manager.engine.open_files import import_mlx_lm, raise_open_file_limit

    raise_open_file_limit()  # thousands of client sockets here, and as many for the daemon (it inherits it)
    import_mlx_lm()  # before tests.models imports it: it would lower the limit
    held = 0
    with tempfile.TemporaryDirectory(prefix="hostile-") as work, daemon(Path(work)) as target:
        print(f"daemon at {target.url} (pid {target.state().get('daemon_pid')}), model {target.model}")
        for item in chosen:
            started = time.monotonic()
            try:
                verdict, ok = item.run(target), True
            except Exception as exc:  # a check that could not even run has not shown the daemon held
                verdict, ok = f"{type(exc).__name__}: {exc}" if not isinstance(exc, AssertionError) else str(exc), False
            held += ok
            print(f"{'held  ' if ok else 'FAILED'} {item.name:18} {time.monotonic() - started:5.1f}s  {verdict}")
            print(f"       {'':18}         tried: {item.tries}")
        restarts = target.state().get("restarts")
    print(f"{held} of {len(chosen)} held; supervisor restarts: {restarts}")
    print("reproduce: python benchmarks/hostile.py " + " ".join(args.checks))
    return 0 if held == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
