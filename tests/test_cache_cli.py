"""`mlx-manager cache stats | clear` and the prompt cache in `status`, against a real daemon process;
the disk tier after it stopped."""

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

pytestmark = pytest.mark.slow


def mlx_manager(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_manager.cli", *args], capture_output=True, text=True, timeout=300)


def as_json(*args: str) -> dict:
    done = mlx_manager(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def daemon(fast_model):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert mlx_manager("config", "set", "cache.disk", "true").returncode == 0
    started = mlx_manager("start", "--port", str(port), "--model", fast_model)
    try:
        assert started.returncode == 0, started.stderr
        yield f"http://127.0.0.1:{port}"
    finally:
        pids = {p for p in (lock_holder(), (read_daemon_info() or {}).get("pid")) if p}
        mlx_manager("stop", "--timeout", "30")
        for pid in pids:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass


def test_stats_clear_and_status_through_the_daemon_then_the_disk_tier(daemon, fast_model, isolated_home):
    client = openai.OpenAI(base_url=daemon + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "Be brief. " * 40}, {"role": "user", "content": "hello"}]
    for _ in range(2):  # the second one reuses the first's prompt
        client.chat.completions.create(model=fast_model, messages=messages, max_tokens=4, temperature=0)

    report = as_json("cache", "stats")
    [model] = report["models"]
    assert report["running"] and report["enabled"] and report["disk"]
    assert model["model"] == fast_model and model["entries"] >= 1 and model["bytes"] > 0
    assert (model["hits"], model["misses"]) == (1, 1) and model["hit_rate"] == 0.5 and model["cached_tokens"] > 0
    human = mlx_manager("cache", "stats")
    assert human.returncode == 0 and fast_model in human.stdout and "50%" in human.stdout
    status = mlx_manager("status")
    assert "Prompt cache" in status.stdout and "50% of prompts hit" in status.stdout

    cleared = as_json("cache", "clear")
    assert cleared["running"] and cleared["cleared"] >= 1
    assert as_json("cache", "stats")["models"][0]["entries"] == 0

    client.chat.completions.create(model=fast_model, messages=messages, max_tokens=4, temperature=0)
    assert mlx_manager("stop", "--timeout", "30").returncode == 0  # the memory tier goes to disk
    offline = as_json("cache", "stats")
    assert not offline["running"] and offline["disk_entries"] >= 1 and offline["disk_bytes"] > 0
    files = list((isolated_home / "prompt-cache").rglob("*.safetensors"))
    assert files and all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    cleared = as_json("cache", "clear")
    assert not cleared["running"] and cleared["cleared"] == len(files)
    assert not list((isolated_home / "prompt-cache").rglob("*.safetensors"))
