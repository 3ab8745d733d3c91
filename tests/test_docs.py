"""The committed completions and man page are what the code generates, and the man page is clean roff."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from mlx_manager import docs


def test_generated_files_are_up_to_date():
    stale = [
        str(path.relative_to(docs.ROOT))
        for path, text in docs.generated_files().items()
        if not path.exists() or path.read_text() != text
    ]
    assert not stale, f"out of date: {stale}; refresh them with: python -m mlx_manager.docs"


def test_man_page_renders_without_warnings():
    page = docs.ROOT / "man" / "mlx-manager.1"
    if shutil.which("groff"):
        proc = subprocess.run(["groff", "-ww", "-man", "-z", str(page)], capture_output=True, text=True)
    elif shutil.which("mandoc"):
        proc = subprocess.run(["mandoc", "-T", "lint", "-W", "warning", str(page)], capture_output=True, text=True)
    else:
        pytest.fail("neither groff nor mandoc is installed to check the man page")
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def test_man_page_documents_every_command_and_setting():
    import typer

    from mlx_manager.cli import app

    page = (docs.ROOT / "man" / "mlx-manager.1").read_text().replace("\\-", "-")
    for path, _ in docs._commands(typer.main.get_command(app), []):
        assert f"mlx-manager {' '.join(path)}" in page
    for key, *_ in docs._settings_rows(docs.Settings):
        assert key in page
    for section in (
        "NAME",
        "SYNOPSIS",
        "DESCRIPTION",
        "CONFIGURATION",
        "ENVIRONMENT",
        "FILES",
        "EXIT STATUS",
        "EXAMPLES",
    ):
        assert f".SH {section}" in page


def test_completion_scripts_call_back_into_the_program():
    bash = (docs.ROOT / "completions" / "mlx-manager.bash").read_text()
    assert "_MLX_MANAGER_COMPLETE=complete_bash" in bash and "mlx-manager" in bash


def test_readme_names_every_command():
    import typer

    from mlx_manager.cli import app

    readme = (docs.ROOT / "README.md").read_text()
    missing = [
        " ".join(path)
        for path, _ in docs._commands(typer.main.get_command(app), [])
        if f"mlx-manager {' '.join(path)}" not in readme
    ]
    assert not missing, f"README.md does not mention: {missing}"


def test_readme_gives_the_two_set_up_commands_that_ci_runs():
    readme = (docs.ROOT / "README.md").read_text()
    ci = (docs.ROOT / ".ci" / "run").read_text()
    assert "python -m pip install --upgrade pip && pip install --no-compile . && mlx-manager serve" in readme
    test_command = "pip install '.[test]' && HF_HUB_OFFLINE=1 python -m pytest"
    assert test_command in readme and test_command in ci
