"""`mlx-manager keys ...`, `config` keeping keys hidden, and the bind-safety refusal, as a user sees them:
exit codes, the lines printed, the config file on disk and its mode."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlx_manager.auth import key_digest
from mlx_manager.cli import app
from mlx_manager.settings import config_path
from mlx_manager.supervisor.__main__ import parse_args, serve_command
from mlx_manager.supervisor.control import supervisor_command
from mlx_manager.supervisor.options import SupervisorOptions

runner = CliRunner()
MLX_MANAGER = str(Path(sys.executable).with_name("mlx-manager"))
KEY = re.compile(r"mlxm-[A-Za-z0-9_-]{43}")
BIND_REFUSAL = (
    "Error: refusing to listen on 0.0.0.0 without an API key: anyone who can reach it could use the API. "
    "Add a key with `mlx-manager keys add NAME`, or pass --insecure-no-auth to allow it anyway."
)


def keys(*args: str):
    return runner.invoke(app, ["keys", *args])


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def added_key(name: str) -> str:
    result = keys("add", name)
    assert result.exit_code == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_add_prints_the_key_once_and_stores_only_its_hash(tmp_path, monkeypatch):
    home = tmp_path / "new-home"
    monkeypatch.setenv("MLX_MANAGER_HOME", str(home))
    result = keys("add", "laptop")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "Added key laptop (no daemon running; takes effect at next start)"
    assert lines[1] == "Copy it now; it is not shown again. Clients send it as 'Authorization: Bearer KEY':"
    assert KEY.fullmatch(lines[2])
    text = config_path().read_text()
    assert lines[2] not in text and f'sha256 = "{key_digest(lines[2])}"' in text
    assert text.startswith('[[auth.keys]]\nname = "laptop"\n')
    assert mode(config_path()) == 0o600 and mode(home) == 0o700


def test_add_json_and_refusals():
    result = keys("add", "ci", "--json")
    assert result.exit_code == 0
    answer = json.loads(result.stdout)
    assert answer["name"] == "ci" and KEY.fullmatch(answer["key"]) and answer["created"].endswith("+00:00")
    assert answer["daemon"] == {"running": False, "url": None, "applied": False, "error": None}
    before = config_path().read_text()

    again = keys("add", "ci")
    assert again.exit_code == 1
    assert again.stderr.strip() == (
        "Error: a key named ci already exists. Revoke it first (`mlx-manager keys revoke ci`) or choose another name."
    )
    bad = keys("add", "no spaces")
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and "not a valid key name" in bad.stderr
    as_json = keys("add", "ci", "--json")
    assert as_json.exit_code == 1 and json.loads(as_json.stderr)["error"] == "a key named ci already exists."
    assert config_path().read_text() == before


def test_add_keeps_the_rest_of_the_config_file():
    config_path().write_text("# mine\n[timeouts]\nchat = 300  # five minutes\n")
    added_key("a")
    added_key("b")
    text = config_path().read_text()
    assert text.startswith('# mine\n[timeouts]\nchat = 300  # five minutes\n\n[[auth.keys]]\nname = "a"\n')
    assert keys("revoke", "a").exit_code == 0
    assert keys("revoke", "b").exit_code == 0
    # The rest is untouched; the last revoke leaves the API closed (auth.required), not open.
    rest = "# mine\n[timeouts]\nchat = 300  # five minutes"
    assert config_path().read_text().rstrip() == rest + "\n\n[auth]\nrequired = true"


def test_list_shows_names_and_dates_never_keys(tmp_path, monkeypatch):
    empty = keys("list")
    assert empty.exit_code == 0 and empty.stdout.startswith("No API keys:")
    assert json.loads(keys("list", "--json").stdout) == []
    secrets = [added_key("laptop"), added_key("ci")]
    keys_file = tmp_path / "team.keys"
    keys_file.write_text("team-key-0123456789\n")
    runner.invoke(app, ["config", "set", "auth.keys_file", str(keys_file)])
    monkeypatch.setenv("MLX_MANAGER_API_KEY", "env-key-0123456789")

    table = keys("list")
    assert table.exit_code == 0
    lines = [line.rstrip() for line in table.stdout.strip().splitlines()]
    assert lines[0].split() == ["Name", "Created", "Source"]
    assert re.fullmatch(r"laptop +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC +config", lines[1])
    assert lines[2].startswith("ci ") and lines[3].split() == ["keys_file:1", "-", str(keys_file)]
    assert lines[4].split() == ["MLX_MANAGER_API_KEY", "-", "environment"]
    rows = json.loads(keys("list", "--json").stdout)
    assert [(r["name"], r["source"]) for r in rows] == [
        ("laptop", "config"),
        ("ci", "config"),
        ("keys_file:1", str(keys_file)),
        ("MLX_MANAGER_API_KEY", "environment"),
    ]
    for output in (table.stdout, json.dumps(rows)):
        assert not any(s in output or key_digest(s) in output for s in [*secrets, "team-key-0123456789"])


def test_revoke():
    added_key("laptop")
    added_key("ci")
    done = keys("revoke", "laptop")
    assert done.exit_code == 0
    assert done.stdout.strip() == "Revoked key laptop (no daemon running; takes effect at next start)"
    assert done.stderr == ""
    missing = keys("revoke", "laptop")
    assert missing.exit_code == 1
    assert missing.stderr.strip() == "Error: no key named laptop (keys: ci). `mlx-manager keys list` shows them."
    last = keys("revoke", "ci", "--json")
    assert last.exit_code == 0 and json.loads(last.stdout)["keys_left"] == 0
    # No `keys = []` is left behind, and the API stays closed: revoking never opens it.
    assert config_path().read_text().strip() == "[auth]\nrequired = true"
    assert keys("list", "--json").stdout.strip() == "[]"


def test_revoking_the_last_key_keeps_an_explicit_choice_to_serve_without_keys():
    runner.invoke(app, ["config", "set", "auth.required", "false"])
    added_key("laptop")
    done = keys("revoke", "laptop")
    assert done.exit_code == 0 and "auth.required is false" in done.stderr
    assert "required = false" in config_path().read_text()


def test_config_never_prints_a_key():
    secret = added_key("laptop")
    digest = key_digest(secret)
    outputs = []
    for args in (
        ["list"],
        ["list", "--json"],
        ["list", "--show-origin"],
        ["list", "--json", "--show-origin"],
        ["get", "auth.keys"],
        ["get", "auth.keys", "--json"],
    ):
        result = runner.invoke(app, ["config", *args])
        assert result.exit_code == 0, result.stderr
        outputs.append(result.stdout)
    assert not any(secret in out or digest in out or "laptop" in out for out in outputs)
    assert outputs[4].strip() == "(hidden: 1 key)"
    assert json.loads(outputs[5]) == {"key": "auth.keys", "value": "(hidden: 1 key)", "origin": "file"}
    assert json.loads(outputs[1])["auth.keys"] == "(hidden: 1 key)"

    before = config_path().read_text()
    for args in (["set", "auth.keys", "[]"], ["unset", "auth.keys"]):
        refused = runner.invoke(app, ["config", *args])
        assert refused.exit_code == 2
        assert refused.stderr.strip().startswith("Error: auth.keys cannot be ")
        assert "mlx-manager keys add NAME" in refused.stderr and refused.stderr.count("\n") == 1
    assert config_path().read_text() == before


# -- bind safety --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["serve", "--port", "9"], ["start", "--port", "9"], ["restart"]])
def test_a_network_address_without_a_key_is_refused_in_one_line(command):
    result = subprocess.run([MLX_MANAGER, *command, "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == BIND_REFUSAL
    assert result.stdout == ""


def test_the_setting_counts_like_the_flag(isolated_home):
    (isolated_home / "config.toml").write_text('[server]\nhost = "0.0.0.0"\n')
    result = subprocess.run([MLX_MANAGER, "serve"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip() == BIND_REFUSAL


def test_the_supervisor_passes_insecure_no_auth_to_the_daemon():
    flags = {"host": "0.0.0.0", "port": 8080, "model": None, "insecure_no_auth": True}
    command = supervisor_command(flags, SupervisorOptions())
    assert command[-1] == "--insecure-no-auth"
    assert "--insecure-no-auth" not in supervisor_command({}, SupervisorOptions())
    args, _ = parse_args(command[3:])
    assert args.insecure_no_auth and args.host == "0.0.0.0"
    assert serve_command(args.host, args.port, args.model, args.insecure_no_auth)[-3:] == [
        "--port",
        "8080",
        "--insecure-no-auth",
    ]
