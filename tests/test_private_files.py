"""Files mlx-manager keeps are private (0600 in a 0700 folder), and a daemon on a network address
runs only with an API key or an explicit --insecure-no-auth: real processes, real files."""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from mlx_manager.cli import app
from mlx_manager.private_log import PrivateRotatingFileHandler
from mlx_manager.runtime import admin_token, admin_token_file
from tests.daemon_server import wait_until

MLX_MANAGER = str(Path(sys.executable).with_name("mlx-manager"))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def no_umask():
    """Umask 0: a file left to the defaults would come out 0666, so only an explicit mode passes."""
    previous = os.umask(0)
    yield
    os.umask(previous)


class Serve:
    """`mlx-manager serve` on all addresses (0.0.0.0), reached through loopback."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [MLX_MANAGER, "serve", "--host", "0.0.0.0", "--port", str(self.port), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.process.poll() is None, self.process.communicate()
            try:
                # /health, not /ready: with an API key set, /ready needs one too.
                return httpx.get(self.url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(ready, timeout=60, interval=0.1)

    def stop(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGTERM)
        _, stderr = self.process.communicate(timeout=60)
        return self.process.returncode, stderr


@pytest.fixture
def serve():
    started: list[Serve] = []

    def start(*args: str) -> Serve:
        started.append(Serve(*args))
        return started[-1]

    yield start
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.communicate()


def test_a_network_daemon_with_a_key_and_every_file_it_keeps(tmp_path, monkeypatch, serve):
    home = tmp_path / "fresh-home"  # made by mlx-manager itself, so its mode is ours
    monkeypatch.setenv("MLX_MANAGER_HOME", str(home))
    added = CliRunner().invoke(app, ["keys", "add", "laptop"])
    assert added.exit_code == 0, added.stderr
    key = added.stdout.strip().splitlines()[-1]

    daemon = serve()
    daemon.wait_ready()
    assert httpx.get(daemon.url + "/v1/models").status_code == 401
    assert httpx.get(daemon.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    files = {
        "config.toml": home / "config.toml",
        "admin.token": admin_token_file(),
        "daemon.json": home / "daemon.json",
        "audit.db": home / "audit.db",
        "daemon.log": home / "logs" / "daemon.log",
    }
    assert {name: mode(path) for name, path in files.items()} == {name: 0o600 for name in files}
    assert mode(home) == 0o700 and mode(home / "logs") == 0o700
    code, stderr = daemon.stop()
    assert code == 0, stderr


def test_insecure_no_auth_serves_a_network_address_without_a_key(serve):
    daemon = serve("--insecure-no-auth")
    daemon.wait_ready()
    assert httpx.get(daemon.url + "/v1/models").status_code == 200
    code, stderr = daemon.stop()
    assert code == 0
    assert "listening on 0.0.0.0 with no API key (--insecure-no-auth)" in stderr


def test_rotated_logs_stay_private(tmp_path, no_umask):
    folder = tmp_path / "logs"
    folder.mkdir()
    path = folder / "daemon.log"
    handler = PrivateRotatingFileHandler(path, maxBytes=200, backupCount=2, encoding="utf-8")
    try:
        for n in range(20):
            handler.emit(logging.makeLogRecord({"msg": f"line {n} " + "x" * 40}))
    finally:
        handler.close()
    made = sorted(p.name for p in folder.iterdir())
    assert made == ["daemon.log", "daemon.log.1", "daemon.log.2"]
    assert {name: mode(folder / name) for name in made} == dict.fromkeys(made, 0o600)


def test_the_admin_token_is_private_and_never_weak(isolated_home, no_umask):
    token = admin_token(create=True)
    assert len(token) >= 32 and mode(admin_token_file()) == 0o600
    admin_token_file().chmod(0o644)  # loosened by hand, or by a copy
    assert admin_token(create=True) == token and mode(admin_token_file()) == 0o600
    admin_token_file().write_text("\n")  # an empty token must not become the credential
    replaced = admin_token(create=True)
    assert len(replaced) >= 32 and admin_token() == replaced and mode(admin_token_file()) == 0o600


@pytest.mark.slow
def test_start_and_restart_pass_insecure_no_auth_to_the_supervised_daemon():
    from mlx_manager.supervisor.state import read_state, supervisor_log

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([MLX_MANAGER, *args], capture_output=True, text=True, timeout=180)

    port = free_port()
    try:
        started = cli("start", "--host", "0.0.0.0", "--port", str(port), "--insecure-no-auth")
        assert started.returncode == 0, started.stderr
        assert started.stdout.startswith(f"Started: http://127.0.0.1:{port} ")
        assert read_state()["flags"]["insecure_no_auth"] is True
        assert mode(supervisor_log()) == 0o600
        restarted = cli("restart")
        assert restarted.returncode == 0, restarted.stderr
        assert restarted.stdout.strip().splitlines()[-1].startswith(f"Started: http://127.0.0.1:{port} ")
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 200
    finally:
        assert cli("stop", "--timeout", "10").returncode == 0
