"""Model aliases end to end, as a user sets them: a real daemon started with `mlx-manager start
--model`, whose model answers to its folder's name at once; `config set models.aliases.NAME`
adds one that the running daemon applies; requests, /v1/models and the audit log show it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import openai
import psutil
import pytest

from mlx_manager.runtime import read_daemon_info
from mlx_manager.supervisor.state import lock_holder
from tests.daemon_server import wait_until

pytestmark = pytest.mark.slow


def mlx_manager(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_manager.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def daemon(fast_model):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = mlx_manager("start", "--port", str(port), "--model", fast_model)
    try:
        assert started.returncode == 0, started.stderr
        yield f"http://127.0.0.1:{port}"
    finally:
        pids = {p for p in (lock_holder(), (read_daemon_info() or {}).get("pid")) if p}
        mlx_manager("stop", "--timeout", "10")
        for pid in pids:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass


def test_aliases_are_served_listed_and_audited(daemon, fast_model):
    client = openai.OpenAI(base_url=daemon + "/v1", api_key="unused", max_retries=0)
    # `start --model .../fast`: the folder's name is an alias at once.
    assert client.completions.create(model="fast", prompt="hi", max_tokens=2).model == "fast"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="quick", prompt="hi", max_tokens=2)

    done = mlx_manager("config", "set", "models.aliases.quick", fast_model)
    assert done.returncode == 0, done.stderr
    assert f"Set models.aliases.quick = {fast_model} (running daemon at {daemon} applied it)" in done.stdout
    reply = client.chat.completions.with_raw_response.create(
        model="quick",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        extra_headers={"X-Request-ID": "by-alias-1"},
    )
    assert reply.parse().model == "quick"
    assert {(m.id, m.root) for m in client.models.list().data} == {("quick", fast_model), ("fast", fast_model)}

    def row() -> dict | None:
        query = mlx_manager("audit", "query", "--model", "quick", "--json")
        rows = [r for r in json.loads(query.stdout or "[]") if r["request_id"] == "by-alias-1"]
        return rows[0] if rows else None

    found = wait_until(row, timeout=60)
    assert found is not None and found["model"] == "quick" and found["status"] == "success"

    done = mlx_manager("config", "unset", "models.aliases.quick")
    assert done.returncode == 0 and "applied it" in done.stdout, done.stdout + done.stderr
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="quick", prompt="hi", max_tokens=2)
