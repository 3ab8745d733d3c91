"""`mlx-manager service show | install | uninstall`: the systemd unit and launchd agent it writes.

systemd's own checker (`systemd-analyze verify`) judges the unit when it is installed; launchd
cannot run here, so the agent is checked by reading it back as a property list."""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlx_manager.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def user_dirs(tmp_path, monkeypatch):
    """A private HOME and XDG_CONFIG_HOME, and no systemctl/launchctl on PATH: `install` and
    `uninstall` must never touch the real service manager of the machine running the tests."""
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "user" / ".config"))
    empty = tmp_path / "no-tools"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    return tmp_path / "user"


def show(*args: str) -> str:
    result = runner.invoke(app, ["service", "show", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def verify(unit_text: str, folder: Path) -> None:
    """systemd-analyze's verdict when it is installed; the essentials by hand otherwise."""
    tool = shutil.which("systemd-analyze", path="/usr/bin:/bin:/usr/local/bin")
    path = folder / "mlx-manager.service"
    path.write_text(unit_text)
    if tool:
        done = subprocess.run([tool, "verify", str(path)], capture_output=True, text=True)
        assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    for line in ("[Service]", "Restart=on-failure", "KillSignal=SIGTERM", "[Install]", "WantedBy=default.target"):
        assert line in unit_text.splitlines()


def exec_start(unit_text: str) -> str:
    return next(line for line in unit_text.splitlines() if line.startswith("ExecStart="))


def test_systemd_unit_runs_serve_and_restarts_on_failure(tmp_path, isolated_home):
    unit = show("--platform", "linux", "--port", "8080")
    verify(unit, tmp_path)
    command = exec_start(unit).removeprefix("ExecStart=").split()
    assert command[-3:] == ["serve", "--port", "8080"]
    assert Path(command[0]).is_absolute()
    assert f"Environment=MLX_MANAGER_HOME={isolated_home.resolve()}" in unit.splitlines()


def test_systemd_unit_quotes_awkward_paths(tmp_path):
    model = tmp_path / "my models" / "100% llama"
    model.mkdir(parents=True)
    unit = show("--platform", "linux", "--model", str(model))
    verify(unit, tmp_path)
    quoted = str(model.resolve()).replace("%", "%%")
    assert exec_start(unit).endswith(f'serve --model "{quoted}"')


def test_launchd_agent_runs_serve_and_restarts_on_failure(isolated_home):
    agent = plistlib.loads(show("--platform", "macos", "--host", "0.0.0.0", "--model", "mlx-community/tiny").encode())
    assert agent["Label"] == "io.github.mlx-manager"
    assert agent["ProgramArguments"][1:] == ["serve", "--host", "0.0.0.0", "--model", "mlx-community/tiny"]
    assert agent["KeepAlive"] == {"SuccessfulExit": False}
    assert agent["RunAtLoad"] is True
    assert agent["EnvironmentVariables"]["MLX_MANAGER_HOME"] == str(isolated_home.resolve())
    assert agent["StandardErrorPath"] == str(isolated_home.resolve() / "logs" / "service.log")


def test_show_refuses_an_unknown_platform():
    result = runner.invoke(app, ["service", "show", "--platform", "windows"])
    assert result.exit_code == 2
    assert "not a platform" in result.output


@pytest.mark.skipif(
    sys.platform == "darwin", reason="checks the systemd path; the launchd one is ~/Library/LaunchAgents"
)
def test_install_writes_the_unit_and_uninstall_removes_it(user_dirs, tmp_path):
    unit_path = user_dirs / ".config" / "systemd" / "user" / "mlx-manager.service"
    written = runner.invoke(app, ["service", "install", "--no-enable", "--port", "8080"])
    assert written.exit_code == 0, written.output
    assert f"Wrote {unit_path}." in written.stdout
    assert "systemctl --user enable --now mlx-manager.service" in written.stdout
    assert unit_path.read_text() == show("--port", "8080")
    verify(unit_path.read_text(), tmp_path)

    enabled = runner.invoke(app, ["service", "install"])  # no systemctl here: written, with a warning
    assert enabled.exit_code == 0
    assert "systemctl not found" in enabled.stderr

    removed = runner.invoke(app, ["service", "uninstall"])
    assert removed.exit_code == 0
    assert f"Removed {unit_path}." in removed.stdout
    assert not unit_path.exists()
    again = runner.invoke(app, ["service", "uninstall"])
    assert again.exit_code == 0 and "Not installed" in again.stdout


# -- bind safety: the same refusal as `serve` and `start`, at install time --------------------------------

BIND_REFUSAL = (
    "Error: refusing to listen on 0.0.0.0 without an API key: anyone who can reach it could use the API. "
    "Add a key with `mlx-manager keys add NAME`, or pass --insecure-no-auth to allow it anyway."
)


def service_path() -> Path:
    from mlx_manager.supervisor import service as files

    return files.launchd_path() if files.current_platform() == "macos" else files.systemd_path()


def serve_arguments(text: str) -> list[str]:
    """The words after `serve` in the unit's ExecStart= or the agent's ProgramArguments."""
    if text.lstrip().startswith("<?xml"):
        words = plistlib.loads(text.encode())["ProgramArguments"]
    else:
        words = exec_start(text).removeprefix("ExecStart=").split()
    return words[words.index("serve") + 1 :]


def add_key(home: Path) -> None:
    from mlx_manager.auth import key_digest, new_key

    (home / "config.toml").write_text(
        f'[[auth.keys]]\nname = "laptop"\nsha256 = "{key_digest(new_key())}"\ncreated = 2025-01-01T00:00:00Z\n'
    )


def test_install_refuses_a_network_address_without_a_key_and_writes_nothing():
    result = runner.invoke(app, ["service", "install", "--no-enable", "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert result.stderr.strip() == BIND_REFUSAL
    assert result.stdout == ""
    assert not service_path().exists()


def test_install_refuses_a_network_host_from_the_config_file(isolated_home):
    (isolated_home / "config.toml").write_text('[server]\nhost = "0.0.0.0"\n')
    result = runner.invoke(app, ["service", "install", "--no-enable"])
    assert result.exit_code == 2 and result.stderr.strip() == BIND_REFUSAL
    assert not service_path().exists()


def test_install_refuses_a_broken_config_file_and_writes_nothing(isolated_home):
    (isolated_home / "config.toml").write_text("[server\nport = 1\n")
    result = runner.invoke(app, ["service", "install", "--no-enable"])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: the settings cannot be read: {isolated_home / 'config.toml'}:1")
    assert "nothing was installed" in result.stderr
    assert not service_path().exists()


def test_a_key_only_in_this_shell_does_not_count(monkeypatch):
    """The service does not get MLX_MANAGER_API_KEY (a secret is not written into the unit): it would
    start without the key, and refuse to."""
    monkeypatch.setenv("MLX_MANAGER_API_KEY", "a-long-enough-shell-only-key")
    result = runner.invoke(app, ["service", "install", "--no-enable", "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert result.stderr.strip() == BIND_REFUSAL + " (MLX_MANAGER_API_KEY in this shell: not passed to the service.)"
    assert not service_path().exists()
    assert os.environ["MLX_MANAGER_API_KEY"] == "a-long-enough-shell-only-key"  # restored


@pytest.mark.parametrize("platform", ["linux", "macos"])
def test_insecure_no_auth_installs_and_goes_on_the_command_line(platform, monkeypatch, tmp_path):
    import mlx_manager.supervisor.service as files

    monkeypatch.setattr(files, "current_platform", lambda: platform)
    result = runner.invoke(app, ["service", "install", "--no-enable", "--host", "0.0.0.0", "--insecure-no-auth"])
    assert result.exit_code == 0, result.output
    text = service_path().read_text()
    assert serve_arguments(text) == ["--host", "0.0.0.0", "--insecure-no-auth"]
    assert text == show("--platform", platform, "--host", "0.0.0.0", "--insecure-no-auth")
    if platform == "linux":
        verify(text, tmp_path)


def test_loopback_needs_no_flag():
    for host in ("127.0.0.1", "localhost", "::1"):
        result = runner.invoke(app, ["service", "install", "--no-enable", "--host", host])
        assert result.exit_code == 0, result.output
        assert serve_arguments(service_path().read_text()) == ["--host", host]


def test_with_a_key_configured_no_flag_is_needed(isolated_home):
    add_key(isolated_home)
    result = runner.invoke(app, ["service", "install", "--no-enable", "--host", "0.0.0.0"])
    assert result.exit_code == 0, result.output
    assert serve_arguments(service_path().read_text()) == ["--host", "0.0.0.0"]
