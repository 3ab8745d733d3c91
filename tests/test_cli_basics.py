"""The program starts fast: --help, --version and the read commands never import the heavy libraries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_manager import __version__
from mlx_manager.settings import config_path

HEAVY = ("mlx", "mlx_lm", "fastapi", "uvicorn", "logfire", "sqlalchemy", "sqlmodel", "transformers", "httpx")


def _modules_after(*argv: str) -> tuple[int, str, set[str]]:
    """Run the CLI in a fresh interpreter and report which modules it imported (a submodule's
    package is always among them, so `"sqlalchemy" in modules` holds whenever any part was)."""
    code = (
        "import sys, json\n"
        "from mlx_manager.cli import app\n"
        "try:\n"
        f"    app({list(argv)!r}, standalone_mode=True)\n"
        "except SystemExit as exit:\n"
        "    code = exit.code or 0\n"
        "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    modules = set(json.loads(proc.stderr.strip().splitlines()[-1]))
    return proc.returncode, proc.stdout, modules


def test_version_prints_the_version():
    code, out, modules = _modules_after("--version")
    assert code == 0
    assert out.strip() == f"mlx-manager {__version__}"
    assert not modules & set(HEAVY)


def test_help_lists_commands_without_heavy_imports():
    code, out, modules = _modules_after("--help")
    assert code == 0
    assert "serve" in out and "config" in out and "audit" in out
    assert not modules & set(HEAVY), f"--help imported {sorted(modules & set(HEAVY))}"


def test_each_group_help_stays_light():
    for group in ("serve", "config", "audit", "keys"):
        code, out, modules = _modules_after(group, "--help")
        assert code == 0, out
        assert not modules & set(HEAVY), f"{group} --help imported {sorted(modules & set(HEAVY))}"


# Commands people type many times a day, and what they exit with here (no daemon runs in tests).
READ_COMMANDS = [
    (("config", "get", "timeouts.chat"), 0, "300"),
    (("config", "list"), 0, "timeouts.chat"),
    (("config", "path"), 0, "config.toml"),
    (("status",), 3, "Not running."),
    (("keys", "list"), 0, "laptop"),
]


@pytest.mark.parametrize(("argv", "exit_code", "shown"), READ_COMMANDS, ids=[" ".join(c[0]) for c in READ_COMMANDS])
def test_read_commands_stay_light(argv, exit_code, shown):
    config_path().write_text(
        '[timeouts]\nchat = 300\n\n[[auth.keys]]\nname = "laptop"\n'
        f'sha256 = "{"0" * 64}"\ncreated = 2026-05-01T00:00:00Z\n'
    )
    code, out, modules = _modules_after(*argv)
    assert code == exit_code, out
    assert shown in out
    assert not modules & set(HEAVY), f"{' '.join(argv)} imported {sorted(modules & set(HEAVY))}"


@pytest.mark.parametrize("argv", [("--help",), ("config", "path"), ("status",)], ids=" ".join)
def test_commands_that_need_no_setting_do_not_build_the_settings_model(argv):
    _, _, modules = _modules_after(*argv)
    assert "mlx_manager.settings.schema" not in modules


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("mlx-manager")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"mlx-manager {__version__}"


def test_audit_read_commands_stay_light(isolated_home):
    from tests.audit_rows import ago, fill, record

    fill(isolated_home / "audit.db", [record(), record(timestamp=ago(days=2), status="error")])
    for argv in (
        ["audit", "tail", "-n", "20"],
        ["audit", "query", "--limit", "50"],
        ["audit", "stats"],
        ["audit", "stats", "--since", "1d", "--by", "model"],
        ["audit", "query", "--json"],
        ["audit", "tail", "--help"],
        ["audit", "query", "--help"],
        ["audit", "stats", "--help"],
    ):
        code, out, modules = _modules_after(*argv)
        assert code == 0, out
        assert not modules & set(HEAVY), f"{' '.join(argv)} imported {sorted(modules & set(HEAVY))}"
