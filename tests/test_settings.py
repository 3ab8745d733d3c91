"""The Settings layer: precedence, origins, typed values, errors that name file/line/key, safe writes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from mlx_manager.settings import (
    Settings,
    SettingsError,
    changed_keys,
    check_config_text,
    config_path,
    key_infos,
    load_settings,
    load_settings_with_origins,
    parse_value,
    reload_changes,
    write_config_text,
)


def write(text: str) -> None:
    config_path().write_text(text)


def test_defaults_without_a_file():
    settings, origins = load_settings_with_origins()
    assert settings == Settings()
    assert (settings.timeouts.chat, settings.timeouts.completions, settings.timeouts.embeddings) == (900, 600, 120)
    assert set(origins.values()) == {"default"}


def test_precedence_flag_over_env_over_file_over_default(monkeypatch):
    write("[timeouts]\nchat = 10\ncompletions = 20\nembeddings = 30\n")
    monkeypatch.setenv("MLX_MANAGER_TIMEOUTS__COMPLETIONS", "21")
    monkeypatch.setenv("MLX_MANAGER_TIMEOUTS__EMBEDDINGS", "31")
    settings, origins = load_settings_with_origins({"timeouts.embeddings": 32, "server.port": None})

    assert settings.timeouts.chat == 10 and origins["timeouts.chat"] == "file"
    assert settings.timeouts.completions == 21 and origins["timeouts.completions"] == "env"
    assert settings.timeouts.embeddings == 32 and origins["timeouts.embeddings"] == "flag"
    assert settings.server.port == 10242 and origins["server.port"] == "default"  # None = flag not given


def test_env_lists_take_commas_or_json(monkeypatch):
    monkeypatch.setenv("MLX_MANAGER_MODELS__ALLOWED", "a, b")
    monkeypatch.setenv("MLX_MANAGER_MODELS__PRELOAD", '["c,d"]')
    settings = load_settings()
    assert settings.models.allowed == ["a", "b"]
    assert settings.models.preload == ["c,d"]


@pytest.mark.parametrize(("text", "seconds"), [("900", 900), ("90s", 90), ("15m", 900), ("2h", 7200), ("1h30m", 5400)])
def test_durations_for_seconds_keys(text, seconds):
    assert parse_value("timeouts.chat", text) == seconds


@pytest.mark.parametrize("text", ["abc", "-5", "0", "86401", "nan", "inf", "5ms", ""])
def test_bad_timeouts_never_pass(text):
    with pytest.raises(SettingsError) as caught:
        parse_value("timeouts.chat", text)
    assert caught.value.key == "timeouts.chat"
    assert "from 1 to 86400" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("2GiB", 2 * 1024**3),
        ("512 MiB", 512 * 1024**2),
        ("1.5GB", 1_500_000_000),
        ("750M", 750_000_000),
        ("0", 0),
        ("4096", 4096),
    ],
)
def test_sizes_for_bytes_keys(text, size):
    assert parse_value("cache.max_bytes", text) == size


@pytest.mark.parametrize("text", ["lots", "-1", "2PiB", "1.5 parsecs"])
def test_bad_sizes_never_pass(text):
    with pytest.raises(SettingsError) as caught:
        parse_value("cache.max_bytes", text)
    assert "a size like 512MiB" in str(caught.value)


def test_the_prompt_cache_default_follows_the_machine():
    import psutil

    assert Settings().cache.max_bytes == min(psutil.virtual_memory().total // 8, 8 * 1024**3)


def test_unknown_key_suggests_the_closest():
    with pytest.raises(SettingsError, match=r"unknown key timeouts\.chatt \(did you mean timeouts\.chat\?\)"):
        parse_value("timeouts.chatt", "5")


def test_toml_syntax_error_names_file_and_line():
    write("[timeouts]\nchat = 5\n[server\n")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    error = caught.value
    assert (error.file, error.line) == (config_path(), 3)
    assert str(error).startswith(f"{config_path()}:3: TOML syntax error:")


def test_unknown_key_in_file_names_file_line_and_key():
    write("# mine\n[timeouts]\nchat = 5\nembedings = 5\n")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert (caught.value.key, caught.value.line) == ("timeouts.embedings", 4)
    assert str(caught.value) == (
        f"{config_path()}:4: unknown key timeouts.embedings (did you mean timeouts.embeddings?)"
    )


def test_bad_value_in_file_names_the_key():
    write('[server]\nport = "eighty"\n')
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert (caught.value.key, caught.value.line) == ("server.port", 2)
    assert '"eighty" is not valid; expected a whole number from 1 to 65535' in str(caught.value)


def test_bad_environment_variable_is_named(monkeypatch):
    monkeypatch.setenv("MLX_MANAGER_TIMEOUTS__CHAT", "soon")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert caught.value.source == "MLX_MANAGER_TIMEOUTS__CHAT"
    assert str(caught.value).startswith("MLX_MANAGER_TIMEOUTS__CHAT: timeouts.chat:")

    monkeypatch.delenv("MLX_MANAGER_TIMEOUTS__CHAT")
    monkeypatch.setenv("MLX_MANAGER_TIMEOUT__CHAT", "5")
    with pytest.raises(SettingsError, match="did you mean MLX_MANAGER_TIMEOUTS__CHAT"):
        load_settings()


def test_duration_strings_in_the_file():
    assert check_config_text('[timeouts]\nchat = "15m"\n').timeouts.chat == 900


def test_changed_keys_and_restart_keys():
    old = Settings()
    new = Settings.model_validate({"timeouts": {"chat": 5}, "server": {"port": 9000}})
    assert changed_keys(old, new) == ["server.port", "timeouts.chat"]
    restart_keys = {key for key, info in key_infos().items() if info.restart}
    assert {"server.host", "server.port"} <= restart_keys <= set(key_infos())
    assert reload_changes(old, new) == (["timeouts.chat"], ["server.port"])


def test_every_key_has_a_description():
    assert all(info.description for info in key_infos().values())


def test_write_is_private_and_follows_symlinks(tmp_path, monkeypatch):
    home = tmp_path / "fresh" / "home"
    monkeypatch.setenv("MLX_MANAGER_HOME", str(home))
    written = write_config_text("[timeouts]\nchat = 5\n")
    assert stat.S_IMODE(os.stat(written).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700

    # A dotfile manager's symlink stays a symlink; the file it points at gets the new text.
    target = tmp_path / "dotfiles" / "config.toml"
    target.parent.mkdir()
    target.write_text("")
    config_path().unlink()
    config_path().symlink_to(target)
    write_config_text("[timeouts]\nchat = 6\n")
    assert config_path().is_symlink()
    assert target.read_text() == "[timeouts]\nchat = 6\n"
    assert [p.name for p in home.iterdir()] == ["config.toml"]  # no temp file left behind


def test_settings_and_config_cli_stay_light():
    """`config` commands must not pay for the daemon's heavy libraries."""
    code = (
        "import sys, mlx_manager.cli, mlx_manager.cli.config, mlx_manager.settings as s; s.load_settings();"
        "heavy = [m for m in ('fastapi', 'mlx', 'mlx_lm', 'logfire', 'sqlalchemy', 'httpx') if m in sys.modules];"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    assert out.stdout.strip() == "[]"
