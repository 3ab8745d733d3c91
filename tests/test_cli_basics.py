"""The program starts fast: --help and --version never import the heavy libraries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mlx_manager import __version__

HEAVY = ("mlx", "mlx_lm", "fastapi", "uvicorn", "logfire", "sqlalchemy", "sqlmodel", "transformers", "httpx")


def _modules_after(*argv: str) -> tuple[int, str, set[str]]:
    """Run the CLI in a fresh interpreter and report which top-level modules it imported."""
    code = (
        "import sys, json\n"
        "from mlx_manager.cli import app\n"
        "try:\n"
        f"    app({list(argv)!r}, standalone_mode=True)\n"
        "except SystemExit as exit:\n"
        "    code = exit.code or 0\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})), file=sys.stderr)\n"
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


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("mlx-manager")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"mlx-manager {__version__}"


def test_audit_read_commands_stay_light(isolated_home):
    from tests.audit_rows import ago, fill, record

    fill(isolated_home / "audit.db", [record(), record(timestamp=ago(days=2), status="error")])
    for argv in (["audit", "tail", "-n", "20"], ["audit", "query", "--limit", "50"], ["audit", "stats"],
                 ["audit", "stats", "--since", "1d", "--by", "model"], ["audit", "query", "--json"],
                 ["audit", "tail", "--help"], ["audit", "query", "--help"], ["audit", "stats", "--help"]):
        code, out, modules = _modules_after(*argv)
        assert code == 0, out
        assert not modules & set(HEAVY), f"{' '.join(argv)} imported {sorted(modules & set(HEAVY))}"
