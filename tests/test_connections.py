"""Connections as a hostile client opens them (issue 24, item 1): thousands of idle sockets,
slowloris headers, slow bodies. The daemon keeps answering /health and real requests, closes
what idles or dawdles, refuses what is over its limit with a 503 problem, and is never restarted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import h11
import httpx
import pytest

from mlx_manager.daemon import connections
from mlx_manager.daemon.app import create_app
from mlx_manager.daemon.connections import H11Connection
from mlx_manager.supervisor.state import read_state
from tests.daemon_server import LiveServer, assert_problem, settings_with, wait_until
from tests.processes import free_port

IDLE_SOCKETS = 3000
# The watchdog's limit here (the default is 60 s) and how long the attack lasts: longer than it.
HANG_TIMEOUT = 15
ATTACK_SECONDS = 20


@contextlib.contextmanager
def open_files(needed: int) -> Iterator[None]:
    """This process may hold `needed` descriptors (mlx-lm, imported by the tests, lowered the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"the hard open-file limit ({hard}) is below {needed}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def idle_sockets(port: int, count: int) -> list[socket.socket]:
    """`count` connections that never send a byte; connects not waited for (a stalled server must
    not stall the attacker)."""
    sockets = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex(("127.0.0.1", port))
        assert code in (0, errno.EINPROGRESS, errno.EAGAIN), code
        sockets.append(sock)
    return sockets


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset: closed as well
        return True


class Slowloris(threading.Thread):
    """Clients that send a request's headers one byte at a time, a byte every `pause` seconds."""

    def __init__(self, port: int, clients: int = 5, pause: float = 0.3) -> None:
        super().__init__(daemon=True)
        self.port, self.pause = port, pause
        self.sockets = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(clients)]
        self.closed_after: dict[int, float] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        request = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 10_000
        started = time.monotonic()
        for at in range(len(request)):
            for index, sock in enumerate(self.sockets):
                if index in self.closed_after:
                    continue
                try:
                    sock.send(request[at : at + 1])
                except OSError:
                    self.closed_after[index] = time.monotonic() - started
            if len(self.closed_after) == len(self.sockets) or self.stopping.wait(self.pause):
                return

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def supervised(tmp_path, fast_model):
    """`python -m mlx_manager.supervisor` (as `start` runs it) with a HANG_TIMEOUT watchdog, a 3-second
    read timeout, and the fast model; yields (url, port, daemon pid)."""
    port = free_port()
    env = {"MLX_MANAGER_SERVER__READ_TIMEOUT": "3", "MLX_MANAGER_SERVER__IDLE_TIMEOUT": "2"}
    supervisor = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_manager.supervisor",
            "--port",
            str(port),
            "--model",
            fast_model,
            "--health-interval",
            "1",
            "--hang-timeout",
            str(HANG_TIMEOUT),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **env},
        start_new_session=True,
    )
    try:
        state = wait_until(lambda: (s := read_state()) and s.get("ready") and s, timeout=120, interval=0.2)
        assert state, "the supervised daemon never got ready"
        yield state["url"], port, state["daemon_pid"]
    finally:
        supervisor.terminate()
        try:
            supervisor.wait(60)
        except subprocess.TimeoutExpired:
            supervisor.kill()
            supervisor.wait(10)


OPEN_FILE_LIMITS = """
import resource, sys
from mlx_manager.engine.open_files import import_mlx_lm, raise_open_file_limit
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 256), hard))  # a macOS shell's default
raise_open_file_limit()  # what `serve` does first
raised = resource.getrlimit(resource.RLIMIT_NOFILE)
import_mlx_lm()  # what the engine does: mlx_lm.utils sets (2048, 4096) when imported
assert "mlx_lm.utils" in sys.modules
print(hard, *raised, *resource.getrlimit(resource.RLIMIT_NOFILE))
"""


def test_the_open_file_limit_is_raised_and_importing_mlx_lm_lowers_nothing():
    done = subprocess.run([sys.executable, "-c", OPEN_FILE_LIMITS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    hard, raised_soft, raised_hard, soft, hard_after = map(int, done.stdout.split())
    assert raised_hard == hard and raised_soft > 256
    if hard != resource.RLIM_INFINITY:
        assert raised_soft == hard
    assert (soft, hard_after) == (raised_soft, raised_hard)


@pytest.mark.slow
def test_idle_sockets_and_slowloris_do_not_stop_the_daemon(supervised, fast_model):
    url, port, daemon_pid = supervised
    body = {"model": fast_model, "prompt": "hello", "max_tokens": 3}
    with open_files(IDLE_SOCKETS + 500):
        slow = Slowloris(port)
        slow.start()
        idle = idle_sockets(port, IDLE_SOCKETS)
        try:
            # Longer than the watchdog's limit: /health, asked on a new connection as the watchdog
            # asks, answers within that limit every time, and a real request is served. (Taking in
            # thousands of connections at once costs the daemon about a millisecond of syscalls
            # each, so the first answers may take seconds on a busy machine; never the limit.)
            until = time.monotonic() + ATTACK_SECONDS
            while time.monotonic() < until:
                assert httpx.get(url + "/health", timeout=HANG_TIMEOUT).status_code == 200
                answer = httpx.post(url + "/v1/completions", json=body, timeout=30)
                assert answer.status_code == 200, answer.text
                assert answer.json()["usage"]["completion_tokens"] >= 1
                time.sleep(0.3)
            # The daemon closed what idled (2 s) and what trickled its headers (3 s, when a
            # client dribbling 10 kB a byte each 0.3 s would otherwise hold on for 50 minutes).
            assert wait_until(lambda: sum(closed_by_peer(s) for s in idle) == len(idle), timeout=10)
            assert wait_until(lambda: len(slow.closed_after) == len(slow.sockets), timeout=10)
            assert max(slow.closed_after.values()) < ATTACK_SECONDS
        finally:
            slow.stop()
            for sock in idle:
                sock.close()
        state = read_state() or {}
        assert state["restarts"] == 0 and state["daemon_pid"] == daemon_pid, state


def test_with_every_connection_busy_a_new_one_gets_503_but_health_answers(tmp_path):
    """16 clients that send their headers and then dawdle over their bodies hold every
    connection: a new request is refused with a 503 problem, /health and /ready are served, and
    once the dawdlers are cut off (read timeout, 2 s) requests are served again."""
    settings = settings_with(server={"max_connections": 16, "read_timeout": 2, "idle_timeout": 1})
    with LiveServer(create_app(settings)) as live:
        head = (
            b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        dawdlers = [socket.create_connection(("127.0.0.1", live.port), timeout=5) for _ in range(16)]
        try:
            for sock in dawdlers:
                sock.sendall(head)
            assert wait_until(lambda: live.daemon.in_flight == 16, timeout=5)
            with httpx.Client(base_url=live.url, timeout=5) as http:
                refused = http.get("/v1/models")
                body = assert_problem(refused, 503, "overloaded")
                assert "server.max_connections" in body["detail"]
                assert int(refused.headers["retry-after"]) >= 1
            assert httpx.get(live.url + "/health", timeout=5).status_code == 200
            assert httpx.get(live.url + "/ready", timeout=5).status_code == 200
            # The read timeout ends the dawdlers; then the daemon serves again.
            assert wait_until(lambda: all(closed_by_peer_blocking(s) for s in dawdlers), timeout=10)
            assert wait_until(lambda: httpx.get(live.url + "/v1/models", timeout=5).status_code == 200, timeout=10)
        finally:
            for sock in dawdlers:
                sock.close()


def closed_by_peer_blocking(sock: socket.socket) -> bool:
    """True once the daemon closed this connection (any answer it sent first is read and dropped)."""
    sock.settimeout(0.05)
    try:
        while data := sock.recv(65536):
            del data
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def test_a_streamed_body_is_framed_on_the_wire_as_h11_frames_it():
    """The daemon's HTTP/1.1 connection frames a chunked body's pieces itself (a stream sends one a
    token): byte for byte as h11 does, and a body of known length is still h11's (it counts it)."""

    def responding(connection: h11.Connection, headers: list[tuple[str, str]]) -> h11.Connection:
        connection.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        while connection.next_event() is not h11.NEED_DATA:
            pass
        connection.send(h11.Response(status_code=200, headers=headers))
        return connection

    pieces = [b"data: x\n\n", bytearray(b"\xc3\xa9" * 300), memoryview(b"tail"), b""]
    chunked = [("transfer-encoding", "chunked")]
    ours, theirs = responding(H11Connection(h11.SERVER), chunked), responding(h11.Connection(h11.SERVER), chunked)
    assert type(ours._writer) is connections._CHUNKED  # the framing is ours with this h11 (not its fallback)
    for piece in pieces:
        assert ours.send(h11.Data(data=piece)) == theirs.send(h11.Data(data=piece))
    assert ours.send(h11.EndOfMessage()) == theirs.send(h11.EndOfMessage()) == b"0\r\n\r\n"
    assert ours.our_state is theirs.our_state is h11.DONE

    sized = responding(H11Connection(h11.SERVER), [("content-length", "4")])
    assert sized.send(h11.Data(data=b"abcd")) == b"abcd"
    with pytest.raises(h11.LocalProtocolError):
        sized.send(h11.Data(data=b"e"))  # more than it said: h11's own check
