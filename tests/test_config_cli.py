"""`mlx-manager config ...` as a user sees it: exit codes, the printed line, the file on disk."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlx_manager.cli import app
from mlx_manager.runtime import admin_token, daemon_file
from mlx_manager.settings import config_path

runner = CliRunner()

COMMENTED = """\
# My settings: keep this comment.
[timeouts]
chat = 300  # five minutes for long chats
embeddings = 60

[log]
level = "info"
"""


def run(*args: str, **kwargs):
    return runner.invoke(app, ["config", *args], **kwargs)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture
def commented_file():
    config_path().write_text(COMMENTED)
    return config_path()


# --- set -------------------------------------------------------------------------------------


def test_set_keeps_comments_and_layout(commented_file):
    result = run("set", "timeouts.chat", "15m")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == "Set timeouts.chat = 900s (15m) (no daemon running; takes effect at next start)"
    assert commented_file.read_text() == COMMENTED.replace("chat = 300 ", "chat = 900 ")


def test_set_adds_a_section_and_creates_a_private_file(tmp_path, monkeypatch):
    home = tmp_path / "new-home"
    monkeypatch.setenv("MLX_MANAGER_HOME", str(home))
    assert run("set", "models.allowed", "./a, org/b").exit_code == 0
    assert run("set", "telemetry.enabled", "false").exit_code == 0
    a = Path.cwd().resolve() / "a"  # a relative folder is stored absolute
    assert config_path().read_text() == f'[models]\nallowed = ["{a}", "org/b"]\n\n[telemetry]\nenabled = false\n'
    assert stat.S_IMODE(config_path().stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("timeouts.chat", "abc", 'timeouts.chat: "abc" is not valid; expected seconds from 1 to 86400'),
        ("timeouts.chat", "-5", 'timeouts.chat: "-5" is not valid; expected seconds from 1 to 86400'),
        ("timeouts.chat", "0", 'timeouts.chat: "0" is not valid'),
        ("timeouts.chatt", "5", "unknown key timeouts.chatt (did you mean timeouts.chat?)."),
        ("server.port", "70000", 'server.port: "70000" is not valid; expected a whole number from 1 to 65535'),
        ("log.level", "loud", 'log.level: "loud" is not valid; expected one of debug, info, warning, error'),
        ("telemetry.enabled", "maybe", 'telemetry.enabled: "maybe" is not valid; expected true or false'),
        ("timeouts", "5", "timeouts is a section, not a key; its keys are timeouts.chat,"),
    ],
)
def test_set_refusals_exit_2_and_leave_the_file_untouched(commented_file, key, value, message):
    before = commented_file.read_bytes()
    result = run("set", key, value)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert one_line(result.stderr).startswith("Error: " + message)
    assert commented_file.read_bytes() == before


def test_set_refusal_without_a_close_key_points_at_list():
    result = run("set", "nonsense", "1")
    assert result.exit_code == 2
    assert one_line(result.stderr) == "Error: unknown key nonsense. `mlx-manager config list` shows every key."
    assert not config_path().exists()


def test_set_on_a_broken_file_names_file_and_line():
    config_path().write_text("[timeouts]\nchat = 5\nchat = 6\n")
    before = config_path().read_bytes()
    result = run("set", "timeouts.chat", "7")
    assert result.exit_code == 1
    assert one_line(result.stderr).startswith(f"Error: {config_path()}:3: TOML syntax error")
    assert "config edit" in result.stderr
    assert config_path().read_bytes() == before


def test_set_warns_when_the_environment_overrides(monkeypatch):
    monkeypatch.setenv("MLX_MANAGER_TIMEOUTS__CHAT", "30")
    result = run("set", "timeouts.chat", "60")
    assert result.exit_code == 0
    assert "MLX_MANAGER_TIMEOUTS__CHAT is set in this environment" in result.stderr


# --- get / list / path -----------------------------------------------------------------------


def test_get_prints_the_effective_value(commented_file, monkeypatch):
    assert run("get", "timeouts.chat").stdout == "300s (5m)\n"  # durations with their unit
    assert run("get", "timeouts.completions").stdout == "600s (10m)\n"
    monkeypatch.setenv("MLX_MANAGER_TIMEOUTS__CHAT", "2h")
    result = run("get", "timeouts.chat", "--json")
    assert json.loads(result.stdout) == {"key": "timeouts.chat", "value": 7200, "origin": "env"}


def test_get_unknown_key_exits_2():
    result = run("get", "server.prot")
    assert result.exit_code == 2
    assert one_line(result.stderr) == "Error: unknown key server.prot (did you mean server.port?)."


def test_list_json_and_origins(commented_file, monkeypatch):
    monkeypatch.setenv("MLX_MANAGER_SERVER__PORT", "9000")
    plain = json.loads(run("list", "--json").stdout)
    assert plain["timeouts.chat"] == 300 and plain["server.port"] == 9000 and plain["models.allowed"] == []

    with_origin = json.loads(run("list", "--json", "--show-origin").stdout)
    assert with_origin["timeouts.chat"] == {"value": 300, "origin": "file"}
    assert with_origin["server.port"] == {"value": 9000, "origin": "env"}
    assert with_origin["timeouts.completions"] == {"value": 600, "origin": "default"}


def test_list_table_shows_origin_column(commented_file):
    result = run("list", "--show-origin")
    assert result.exit_code == 0
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert rows["timeouts.chat"][1:4] == ["300s", "(5m)", "file"]
    assert rows["timeouts.completions"][1:4] == ["600s", "(10m)", "default"]
    assert result.stdout.splitlines()[0].split()[:3] == ["Key", "Value", "Origin"]


def test_list_on_broken_file_is_one_line_json_error_with_json():
    config_path().write_text("[server]\nport = 0\n")
    result = run("list", "--json")
    assert result.exit_code == 1
    error = json.loads(one_line(result.stderr))
    assert error["error"].startswith(f"{config_path()}:2: server.port:")


def test_path_prints_the_file():
    assert run("path").stdout == f"{config_path()}\n"


def test_every_command_has_help_with_examples():
    for command in ("get", "set", "unset", "list", "path", "edit"):
        result = run(command, "--help")
        assert result.exit_code == 0 and "Examples" in result.stdout, command


# --- unset -----------------------------------------------------------------------------------


def test_unset_removes_only_that_key(commented_file):
    result = run("unset", "timeouts.embeddings")
    assert result.exit_code == 0
    assert result.stdout.startswith("Unset timeouts.embeddings; the default 120s (2m) applies")
    assert commented_file.read_text() == COMMENTED.replace("embeddings = 60\n", "")


def test_unset_of_a_key_not_in_the_file_changes_nothing(commented_file):
    before = commented_file.read_bytes()
    result = run("unset", "server.port")
    assert result.exit_code == 0
    assert "not set" in result.stdout
    assert commented_file.read_bytes() == before


def test_unset_unknown_key_exits_2(commented_file):
    before = commented_file.read_bytes()
    result = run("unset", "timeouts.cht")
    assert result.exit_code == 2
    assert one_line(result.stderr) == "Error: unknown key timeouts.cht (did you mean timeouts.chat?)."
    assert commented_file.read_bytes() == before


def test_unset_removes_a_stray_key_so_a_bad_file_can_be_fixed():
    config_path().write_text("[timeouts]\nchat = 5\nchatt = 6\n")
    assert run("get", "timeouts.chat").exit_code == 1
    result = run("unset", "timeouts.chatt")
    assert result.exit_code == 0
    assert result.stdout.startswith(f"Removed unknown key timeouts.chatt from {config_path()} (no daemon running")
    assert config_path().read_text() == "[timeouts]\nchat = 5\n"
    assert run("get", "timeouts.chat").stdout == "5s\n"


# --- edit ------------------------------------------------------------------------------------


@pytest.fixture
def editor(tmp_path, monkeypatch):
    """A scripted $EDITOR: replaces the file's text with whatever the test puts in `new_text`."""
    script = tmp_path / "editor.py"
    new_text = tmp_path / "new_text.toml"
    script.write_text(
        f"import sys, pathlib\npathlib.Path(sys.argv[1]).write_text(pathlib.Path({str(new_text)!r}).read_text())\n"
    )
    monkeypatch.delenv("VISUAL", raising=False)
    monkeypatch.setenv("EDITOR", f"{sys.executable} {script}")
    return new_text


def test_edit_keeps_a_valid_result(commented_file, editor):
    editor.write_text(COMMENTED + "\n[server]\nport = 9000\n")
    result = run("edit")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"Saved {commented_file}; changed server.port (no daemon running")
    assert commented_file.read_text() == COMMENTED + "\n[server]\nport = 9000\n"
    assert stat.S_IMODE(commented_file.stat().st_mode) == 0o600


def test_edit_refuses_an_invalid_result(commented_file, editor):
    before = commented_file.read_bytes()
    editor.write_text(COMMENTED.replace("chat = 300", "chat = -1"))
    result = run("edit")
    assert result.exit_code == 2
    line = one_line(result.stderr)
    assert line.startswith(f"Error: {commented_file}:3: timeouts.chat: -1 is not valid")
    assert line.endswith("Nothing was saved; " + f"{commented_file} is unchanged.")
    assert commented_file.read_bytes() == before
    assert sorted(p.name for p in commented_file.parent.iterdir()) == ["config.toml"]  # temp draft removed


def test_edit_that_fixes_a_broken_file_reloads_the_daemon(daemon, editor):
    config_path().write_text("[timeouts]\nchat = 5\nchatt = 6\n")
    daemon.body = {"applied": ["timeouts.chat"], "restart_needed": [], "error": None}
    editor.write_text("[timeouts]\nchat = 5\n")
    result = run("edit")
    assert result.exit_code == 0
    assert result.stdout == f"Saved {config_path()} (running daemon at {daemon.url} applied timeouts.chat)\n"


def test_edit_without_changes_writes_nothing(commented_file, editor):
    editor.write_text(COMMENTED)
    result = run("edit")
    assert result.exit_code == 0
    assert result.stdout.startswith("No changes")


def test_edit_with_a_failing_editor(commented_file, monkeypatch):
    before = commented_file.read_bytes()
    monkeypatch.setenv("EDITOR", f"{sys.executable} -c 'raise SystemExit(3)'")
    result = run("edit")
    assert result.exit_code == 1
    assert "exited with status 3" in one_line(result.stderr)
    assert commented_file.read_bytes() == before


# --- live apply --------------------------------------------------------------------------------


class FakeDaemon:
    """A real HTTP server on 127.0.0.1 that stands in for the daemon's /admin/reload endpoint
    (the daemon's own reload tests live with the daemon). It records each call and answers
    with whatever status and JSON body the test sets."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.status, self.body = 200, {"applied": [], "restart_needed": [], "error": None}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                fake.calls.append({"path": self.path, "authorization": self.headers.get("Authorization")})
                payload = json.dumps(fake.body).encode()
                self.send_response(fake.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def daemon():
    """The fake daemon, advertised the way the real one is: daemon.json (a live pid) and admin.token."""
    fake = FakeDaemon()
    port = fake.server.server_port
    daemon_file().write_text(json.dumps({"pid": os.getpid(), "host": "127.0.0.1", "port": port, "url": fake.url}))
    admin_token(create=True)
    yield fake
    fake.close()


def test_running_daemon_applies_a_set(daemon):
    daemon.body = {"applied": ["timeouts.chat"], "restart_needed": [], "error": None}
    result = run("set", "timeouts.chat", "900")
    assert result.exit_code == 0
    assert result.stdout == f"Set timeouts.chat = 900s (15m) (running daemon at {daemon.url} applied it)\n"
    assert daemon.calls == [{"path": "/admin/reload", "authorization": f"Bearer {admin_token()}"}]


def test_running_daemon_needs_a_restart_for_the_port(daemon):
    daemon.body = {"applied": [], "restart_needed": ["server.port"], "error": None}
    result = run("set", "server.port", "9000")
    assert result.stdout == f"Set server.port = 9000 (running daemon at {daemon.url}: restart needed for server.port)\n"


def test_unset_and_edit_also_reload(daemon, editor):
    daemon.body = {"applied": ["timeouts.chat"], "restart_needed": ["server.port"], "error": None}
    editor.write_text("[timeouts]\nchat = 5\n[server]\nport = 9000\n")
    result = run("edit")
    assert result.stdout == (
        f"Saved {config_path()}; changed server.port, timeouts.chat "
        f"(running daemon at {daemon.url} applied timeouts.chat; restart needed for server.port)\n"
    )
    result = run("unset", "timeouts.chat")
    assert "applied it" in result.stdout
    assert len(daemon.calls) == 2


def test_daemon_that_changed_nothing_says_so(daemon):
    result = run("set", "timeouts.chat", "900")
    said = f"running daemon at {daemon.url} reloaded; no value it uses changed"
    assert result.stdout == f"Set timeouts.chat = 900s (15m) ({said})\n"


def test_daemon_refusing_the_reload_is_a_warning(daemon):
    daemon.status, daemon.body = 401, {"title": "Unauthorized", "status": 401, "detail": "bad admin token"}
    result = run("set", "timeouts.chat", "60")
    assert result.exit_code == 0  # the file was written; only the live part failed
    assert result.stdout == "Set timeouts.chat = 60s (1m)\n"
    assert one_line(result.stderr) == (
        f"Warning: the running daemon at {daemon.url} did not confirm the change: "
        "it answered 401: bad admin token. Restart it to apply the change."
    )
    assert config_path().read_text() == "[timeouts]\nchat = 60\n"


def test_daemon_keeping_old_settings_is_a_warning(daemon):
    daemon.body = {"applied": [], "restart_needed": [], "error": "MLX_MANAGER_TIMEOUTS__CHAT: bad"}
    result = run("set", "timeouts.chat", "60")
    assert "it kept its old settings: MLX_MANAGER_TIMEOUTS__CHAT: bad" in result.stderr


def test_unreachable_daemon_is_a_warning(daemon):
    daemon.close()
    result = run("set", "timeouts.chat", "60")
    assert result.exit_code == 0
    assert "did not confirm the change: could not reach it" in one_line(result.stderr)


def test_stale_daemon_file_means_no_daemon():
    # A dead pid (the daemon crashed without cleaning up) must not be mistaken for a running daemon.
    dead = 2**22 + 12345
    daemon_file().write_text(json.dumps({"pid": dead, "host": "127.0.0.1", "port": 1, "url": "http://127.0.0.1:1"}))
    result = run("set", "timeouts.chat", "60")
    assert result.stdout == "Set timeouts.chat = 60s (1m) (no daemon running; takes effect at next start)\n"


def test_edit_of_comments_only_saves_without_a_reload(commented_file, editor, daemon):
    editor.write_text("# a new comment\n" + COMMENTED)
    result = run("edit")
    assert result.stdout == f"Saved {commented_file} (no setting changed value)\n"
    assert daemon.calls == []


# --- shell completion ------------------------------------------------------------------------


def complete(words: str) -> list[str]:
    """What bash completion offers for `words` (the real console script, the way a shell calls it)."""
    script = Path(sys.executable).with_name("mlx-manager")
    env = {**os.environ, "_MLX_MANAGER_COMPLETE": "complete_bash", "COMP_WORDS": words}
    env["COMP_CWORD"] = str(len(words.split()) - 1)  # completing the last word
    out = subprocess.run([str(script)], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_keys_and_choices_complete():
    assert complete("mlx-manager config set timeouts.c") == ["timeouts.chat", "timeouts.completions"]
    assert complete("mlx-manager config get log.") == ["log.level", "log.file"]
    assert complete("mlx-manager config set log.level d") == ["debug"]


def test_relative_model_folders_are_stored_absolute(tmp_path, monkeypatch):
    (tmp_path / "models" / "mid").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    done = run("set", "models.preload", "./models/mid,mlx-community/Qwen3-4B-4bit")
    assert done.exit_code == 0, done.stderr
    absolute = str(tmp_path.resolve() / "models" / "mid")
    assert f"./models/mid is stored as {absolute}" in done.stdout
    preload = json.loads(run("get", "models.preload", "--json").stdout)["value"]
    assert preload == [absolute, "mlx-community/Qwen3-4B-4bit"]
    done = run("set", "models.folders", "models")  # an existing folder, even without ./
    assert done.exit_code == 0
    monkeypatch.chdir("/")  # another folder: the settings still name the same folders
    assert json.loads(run("get", "models.preload", "--json").stdout)["value"][0] == absolute
    assert json.loads(run("get", "models.folders", "--json").stdout)["value"] == [str(tmp_path.resolve() / "models")]


def test_the_default_model_and_alias_folders_are_stored_absolute(tmp_path, monkeypatch):
    (tmp_path / "models" / "mid").mkdir(parents=True)
    (tmp_path / "fast").mkdir()
    monkeypatch.chdir(tmp_path)
    absolute = str(tmp_path.resolve() / "models" / "mid")
    done = run("set", "models.default", "./models/mid")
    assert done.exit_code == 0 and f"./models/mid is stored as {absolute}" in done.stdout, done.output
    assert json.loads(run("get", "models.default", "--json").stdout)["value"] == absolute
    done = run("set", "models.aliases.mid", "models/mid")
    assert done.exit_code == 0 and f"models/mid is stored as {absolute}" in done.stdout, done.output
    assert json.loads(run("get", "models.aliases.mid", "--json").stdout)["value"] == absolute
    # A bare name may be an alias: it stays as written, even with a folder of that name here.
    assert run("set", "models.default", "fast").exit_code == 0
    assert json.loads(run("get", "models.default", "--json").stdout)["value"] == "fast"
    assert run("set", "models.aliases.qwen", "mlx-community/Qwen3-4B-4bit").exit_code == 0
    assert json.loads(run("get", "models.aliases.qwen", "--json").stdout)["value"] == "mlx-community/Qwen3-4B-4bit"


def test_unset_of_the_last_key_leaves_no_empty_table():
    assert run("set", "timeouts.chat", "20m").exit_code == 0
    assert run("set", "server.port", "9000").exit_code == 0
    assert run("unset", "timeouts.chat").exit_code == 0
    assert config_path().read_text().strip() == "[server]\nport = 9000"
    assert run("unset", "server.port").exit_code == 0
    assert config_path().read_text().strip() == ""
