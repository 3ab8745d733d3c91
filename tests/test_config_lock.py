"""Commands that change config.toml at the same time lose nothing: real processes, one lock."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlx_manager.cli import app
from mlx_manager.settings import ConfigBusyError, config_lock, config_path
from mlx_manager.settings import file as settings_file
from tests.processes import Children

MLX_MANAGER = str(Path(sys.executable).with_name("mlx-manager"))
runner = CliRunner()


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([MLX_MANAGER, *args], capture_output=True, text=True, timeout=timeout, check=False)


def run_workers(children: Children, commands: list[list[list[str]]]) -> None:
    """One shell loop per worker, all started at once; each runs its commands one after another."""
    workers = [
        children.start(
            ["/bin/sh", "-c", " && ".join(" ".join([MLX_MANAGER, *args]) for args in todo)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for todo in commands
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=240)
        assert worker.returncode == 0, err


def test_concurrent_keys_add_keeps_every_key(children):
    names = [[f"name-{i}-{j}" for j in range(5)] for i in range(3)]
    run_workers(children, [[["keys", "add", name, "--json"] for name in todo] for todo in names])
    listed = cli("keys", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert sorted(row["name"] for row in json.loads(listed.stdout)) == sorted(name for todo in names for name in todo)


def test_concurrent_config_set_keeps_every_value(children):
    values = [
        [("timeouts.chat", "301"), ("timeouts.completions", "302"), ("timeouts.embeddings", "303")],
        [("server.max_messages", "401"), ("server.queue_limit", "402"), ("server.drain_timeout", "43")],
        [("log.level", "debug"), ("server.port", "12345"), ("server.max_batch_size", "7")],
    ]
    run_workers(children, [[["config", "set", key, value] for key, value in todo] for todo in values])
    data = tomllib.loads(config_path().read_text())
    for key, value in [pair for todo in values for pair in todo]:
        section, name = key.split(".")
        assert str(data[section][name]) == value, key


def test_config_set_waits_for_the_lock_then_succeeds(children):
    with config_lock():
        waiting = children.start(
            [MLX_MANAGER, "config", "set", "timeouts.chat", "777"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # It gets as far as the lock, finds it busy and says so, however slowly it starts...
        said = waiting.stderr.readline()
        assert said == f"Waiting for another mlx-manager command to finish changing {config_path()}...\n"
        # ...and stays there: a command that ignored the lock would have written the file within
        # these ten of its tries at the lock. (A pause for something that must not happen.)
        time.sleep(0.5)
        assert waiting.poll() is None, "config set did not wait for the lock"
        assert not config_path().exists()
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, said + err
    assert out.startswith("Set timeouts.chat = 777")
    assert tomllib.loads(config_path().read_text())["timeouts"]["chat"] == 777


def test_config_set_gives_up_with_a_clear_message(monkeypatch):
    monkeypatch.setattr(settings_file, "CONFIG_LOCK_TIMEOUT", 0.3)
    with config_lock():
        result = runner.invoke(app, ["config", "set", "timeouts.chat", "777"])
        keys = runner.invoke(app, ["keys", "add", "laptop", "--json"])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"Waiting for another mlx-manager command to finish changing {config_path()}...",
        f"Error: another mlx-manager command is changing {config_path()}; try again.",
    ]
    assert keys.exit_code == 1
    assert json.loads(keys.output) == {"error": f"another mlx-manager command is changing {config_path()}; try again."}
    assert not config_path().exists()


def test_lock_times_out_released_lock_is_free_and_lock_file_is_private(isolated_home):
    with config_lock() as path:
        assert path == config_path()
        begun = time.monotonic()
        busy = "another mlx-manager command is changing .*config.toml; try again"
        with pytest.raises(ConfigBusyError, match=busy), config_lock(timeout=0.2):
            pass
        assert time.monotonic() - begun >= 0.2
    with config_lock(timeout=0):
        pass
    lock = isolated_home / "config.toml.lock"
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600


def test_lock_creates_a_private_folder(isolated_home, monkeypatch):
    home = isolated_home / "new"
    monkeypatch.setenv("MLX_MANAGER_HOME", str(home))
    with config_lock():
        assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_edit_does_not_hold_the_lock_and_refuses_to_overwrite_a_concurrent_change(tmp_path, monkeypatch):
    """The editor runs unlocked, so a `config set` from inside it succeeds; then edit refuses to
    write over that change without asking (scripts get exit 1), and the set value stays."""
    config_path().write_text("[timeouts]\nchat = 300\n")
    script = tmp_path / "editor.py"
    script.write_text(
        "import subprocess, sys\n"
        f"subprocess.run([{MLX_MANAGER!r}, 'config', 'set', 'timeouts.embeddings', '61'], check=True)\n"
        "open(sys.argv[1], 'w').write('[timeouts]\\nchat = 900\\n')\n"
    )
    monkeypatch.setenv("EDITOR", f"{sys.executable} {script}")
    result = runner.invoke(app, ["config", "edit"])
    assert result.exit_code == 1, result.output
    assert "was changed by another command while you were editing it; nothing was saved." in result.output
    assert tomllib.loads(config_path().read_text())["timeouts"] == {"chat": 300, "embeddings": 61}


def test_lock_is_released_when_the_holder_dies():
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import time\nfrom mlx_manager.settings import config_lock\n"
                "with config_lock():\n    print('held', flush=True)\n    time.sleep(60)\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigBusyError), config_lock(timeout=0.1):
            pass
    finally:
        holder.kill()
        holder.wait()
    with config_lock(timeout=60):
        pass


def test_threads_in_one_process_are_serialised():
    """flock is per open file, so two holders in one process exclude each other too."""
    inside = []
    overlap = []

    def hold(n: int) -> None:
        with config_lock(timeout=60):
            if inside:
                overlap.append(n)
            inside.append(n)
            time.sleep(0.05)
            inside.remove(n)

    threads = [threading.Thread(target=hold, args=(n,)) for n in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlap == []
