"""Every command explains itself, and the shell completion offers what a user would type next."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import typer

from mlx_manager import docs
from mlx_manager.cli import app

MLX_MANAGER = str(Path(sys.executable).with_name("mlx-manager"))


def test_every_command_has_help_examples_and_option_help():
    for path, command in docs._commands(typer.main.get_command(app), []):
        name = " ".join(path)
        assert (command.help or "").strip(), f"{name} has no help"
        assert "Examples:" in (command.epilog or ""), f"{name} has no examples in its epilog"
        assert f"mlx-manager {name}" in command.epilog, f"{name}'s examples do not show it"
        for option in docs._options(command):
            assert (option.help or "").strip(), f"{name} {option.opts[0]} has no help"


def complete(words: str, env: dict[str, str] | None = None) -> list[str]:
    """What bash completion offers after `words` (the same call completions/mlx-manager.bash makes)."""
    parts = words.split(" ")
    done = subprocess.run(
        [MLX_MANAGER],
        env={
            **os.environ,
            **(env or {}),
            "_MLX_MANAGER_COMPLETE": "complete_bash",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(parts) - 1),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_model_ids_complete_from_settings_and_the_hugging_face_cache(isolated_home, tmp_path):
    (isolated_home / "config.toml").write_text('[models]\nallowed = ["org-a/allowed-model"]\n')
    cache = tmp_path / "hub"
    (cache / "models--org-b--cached-model").mkdir(parents=True)
    env = {"HF_HUB_CACHE": str(cache)}
    assert complete("mlx-manager serve --model ", env) == ["org-a/allowed-model", "org-b/cached-model"]
    assert complete("mlx-manager start --model org-b", env) == ["org-b/cached-model"]
    assert complete("mlx-manager bench --model org-a", env) == ["org-a/allowed-model"]


def test_config_keys_and_audit_statuses_complete():
    keys = complete("mlx-manager config set timeouts.")
    assert {"timeouts.chat", "timeouts.completions", "timeouts.embeddings"} <= set(keys)
    assert complete("mlx-manager audit query --status ") == ["success", "error", "timeout", "cancelled"]


def test_flags_show_no_value_placeholder_in_help():
    # As a person reads it in a terminal (rich help): `--follow -f  Keep printing...`, not
    # `--follow -f <bool>`, which reads as if the flag took a value. Options with a value keep theirs.
    env = {**os.environ, "COLUMNS": "160", "TERM": "xterm"}
    shown = subprocess.run([MLX_MANAGER, "audit", "tail", "--help"], capture_output=True, text=True, env=env)
    assert shown.returncode == 0, shown.stderr
    follow = next(line for line in shown.stdout.splitlines() if "--follow" in line and "Keep printing" in line)
    assert "<bool>" not in shown.stdout and "bool" not in follow.split("Keep printing")[0]
    limit = next(line for line in shown.stdout.splitlines() if "--limit" in line)
    assert "<int range>" in limit
