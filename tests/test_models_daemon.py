"""From nothing to a served model, as a newcomer goes: a real daemon started with `mlx-manager
start` pulls the tiny model through its admin stream from a stand-in for the Hugging Face hub on
loopback (tests/hub_server.py; the hub cannot be reached from here, only the remote side is a
stand-in), serves it to the official openai client, and `models list | ps | load | unload | rm`
show and steer it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import httpx
import openai
import psutil
import pytest
from typer.testing import CliRunner

from mlx_manager.cli import app
from mlx_manager.hub.pull import format_bytes
from mlx_manager.runtime import admin_token, read_daemon_info
from mlx_manager.supervisor.state import lock_holder
from tests.daemon_server import assert_problem, serving, settings_with, wait_until
from tests.hub_server import StandInHub, model_files

pytestmark = pytest.mark.slow

runner = CliRunner()


def models(*args: str):
    return runner.invoke(app, ["models", *args])


def mlx_manager(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_manager.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def daemon(tmp_path, monkeypatch, fast_model):
    """The stand-in hub serving org/tiny (main, and tag v1), and a daemon started against it."""
    hub = StandInHub()
    hub.add_commit("org/tiny", model_files(fast_model), refs=("main", "v1"))
    for name, value in {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = mlx_manager("start", "--port", str(port))
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
        hub.close()


def pull_through(url: str, model: str) -> list[dict]:
    """POST /admin/models/pull and read the stream to its end: the events."""
    headers = {"Authorization": f"Bearer {admin_token()}"}
    with (
        httpx.Client(timeout=300) as http,
        http.stream("POST", f"{url}/admin/models/pull", headers=headers, json={"model": model}) as response,
    ):
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    return [json.loads(line.removeprefix("data: ")) for line in lines]


def test_a_model_pulled_through_the_daemon_is_served_listed_and_removed(daemon):
    url = daemon
    events = pull_through(url, "org/tiny")
    assert events[0]["event"] == "plan" and events[-1]["event"] == "done"
    assert {"file", "progress", "file_done", "check"} <= {e["event"] for e in events}
    assert events[-1]["model"] == "org/tiny" and events[-1]["kind"] == "chat"

    listed = models("list")
    assert listed.exit_code == 0, listed.output
    size = format_bytes(events[-1]["size_bytes"])
    assert listed.stdout.splitlines()[1].split() == ["org/tiny", "chat", *size.split(), "f32", "yes", "never"]
    ps = models("ps")
    assert (ps.exit_code, ps.stdout) == (0, "No model is loaded.\n")

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(
        model="org/tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8
    )
    assert answer.model == "org/tiny" and answer.choices[0].message.content
    assert answer.usage.completion_tokens > 0

    ps = models("ps", "--json")
    (loaded,) = json.loads(ps.stdout)["models"]
    assert loaded["id"] == "org/tiny" and loaded["path"] == events[-1]["path"] and loaded["memory_bytes"] > 100_000
    # The conversation's KV state stays in the prompt cache for its next turn.
    assert loaded["prompt_cache_entries"] == 1 and loaded["prompt_cache_bytes"] > 0
    table = models("ps").stdout.splitlines()
    assert table[0].split() == ["ID", "KIND", "MEMORY", "CACHE", "ACTIVE", "QUEUED", "IDLE", "UNTIL"]
    row = table[1].split()  # id, kind, memory (2 words), cache (2 words), active, queued, idle, until ("in 29m")
    assert row[:2] == ["org/tiny", "generate"] and row[6:8] == ["0", "0"] and row[-2] == "in"
    assert " ".join(row[4:6]) == format_bytes(loaded["prompt_cache_bytes"])
    # The audit log names the model: `list` says when it was last used.
    assert wait_until(lambda: json.loads(models("list", "--json").stdout)[0]["last_used"], timeout=30)

    unloaded = models("unload", "org/tiny")
    assert (unloaded.exit_code, unloaded.stdout) == (0, "Unloaded org/tiny\n")
    again = models("unload", "org/tiny")
    assert again.exit_code == 1 and again.stderr == "Error: model 'org/tiny' is not loaded.\n"
    loaded_again = models("load", "org/tiny")
    assert loaded_again.exit_code == 0 and loaded_again.stdout.startswith("Loaded org/tiny (")

    refused = models("rm", "org/tiny", "--yes")
    assert refused.exit_code == 1
    assert refused.stderr == (
        "Error: the running daemon has org/tiny loaded. Unload it first "
        "(`mlx-manager models unload org/tiny`), or pass --force to do both.\n"
    )
    removed = models("rm", "org/tiny", "--yes", "--force")
    assert removed.exit_code == 0, removed.output
    assert removed.stdout.startswith("Deleted org/tiny (") and removed.stdout.endswith(
        "freed; unloaded it from the daemon first)\n"
    )
    assert models("ps").stdout == "No model is loaded.\n"
    assert models("list").stdout.startswith("No models here yet.")
    gone = client.chat.completions.create
    with pytest.raises(openai.NotFoundError):
        gone(model="org/tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)


def test_a_pinned_revision_is_served_under_its_id(daemon):
    url = daemon
    events = pull_through(url, "org/tiny@v1")
    assert events[-1]["model"] == "org/tiny@v1"
    loaded = models("load", "org/tiny@v1", "--json")
    assert loaded.exit_code == 0, loaded.output
    assert json.loads(loaded.stdout)["path"] == events[-1]["path"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(
        model="org/tiny@v1", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert answer.choices[0].message.content


def test_max_loaded_holds_while_every_model_is_busy(slow_model, fast_model):
    other = fast_model
    settings = settings_with(models={"max_loaded": 1})
    with serving(slow_model, settings=settings, max_loaded=1) as live, live.http(timeout=120) as http:
        # Greedy from this prompt runs hundreds of tokens without an end (seconds on any machine).
        body = {"model": slow_model, "prompt": "story 0", "max_tokens": 4000, "temperature": 0, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as busy:
            lines = busy.iter_lines()  # kept: a dropped iterator closes the stream
            next(lines)  # decoding: the one loaded model is busy
            refused = http.post("/v1/completions", json={"model": other, "prompt": "hi", "max_tokens": 2})
            problem = assert_problem(refused, 503, "overloaded")
            assert "models.max_loaded (1)" in problem["detail"] and int(refused.headers["retry-after"]) >= 1
            assert live.engine.status().loaded == [slow_model]  # never over the limit
        # Once it is free, the other model takes its place.
        assert wait_until(lambda: not live.engine.status().active_jobs)
        answer = http.post("/v1/completions", json={"model": other, "prompt": "hi", "max_tokens": 2})
        assert answer.status_code == 200, answer.text
        assert live.engine.status().loaded == [other]
