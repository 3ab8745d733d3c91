"""`mlx-manager backends ...` and the routing settings as a user sees them: the config file keeps each
key only by reference, `config` shows that reference, bad entries are refused with what is wrong,
`check` asks a real server, and a running daemon reloads its routes."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mlx_manager.cli import app
from mlx_manager.daemon.app import create_app
from mlx_manager.engine.config import EngineConfig
from mlx_manager.runtime import admin_token
from mlx_manager.settings import config_path, load_settings
from tests.daemon_server import LiveServer, RecordingEngine, serving, wait_until

runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, list(args))


def add_mac2(*extra: str):
    return cli("backends", "add", "mac2", "--type", "openai", "--url", "http://mac2.local:10242/v1", *extra)


def test_add_keeps_the_key_as_a_reference_that_list_and_config_show(monkeypatch):
    monkeypatch.setenv("MAC2_KEY", "sk-the-key-itself-0123456789")
    result = add_mac2("--api-key", "env:MAC2_KEY")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == (
        "Added backend mac2 (openai, http://mac2.local:10242/v1) (no daemon running; takes effect at next start)\n"
    )
    text = config_path().read_text()
    assert text == (
        '[[routing.backends]]\nname = "mac2"\ntype = "openai"\nbase_url = "http://mac2.local:10242/v1"\n'
        'api_key = "env:MAC2_KEY"\n\n'
    )
    listed = cli("backends", "list")
    assert listed.stdout.splitlines()[1].split() == ["mac2", "openai", "http://mac2.local:10242/v1", "env:MAC2_KEY"]
    assert json.loads(cli("backends", "list", "--json").stdout)["backends"] == [
        {"name": "mac2", "type": "openai", "base_url": "http://mac2.local:10242/v1", "api_key": "env:MAC2_KEY"}
    ]
    got = json.loads(cli("config", "get", "routing.backends", "--json").stdout)
    assert got == {
        "key": "routing.backends",
        "origin": "file",
        "value": [
            {"name": "mac2", "type": "openai", "base_url": "http://mac2.local:10242/v1", "api_key": "env:MAC2_KEY"}
        ],
    }
    every = cli("config", "list", "--json").stdout
    assert "env:MAC2_KEY" in every and "sk-the-key-itself" not in every


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ["--api-key", "sk-ant-api03-abcdef"],
            "api_key: must be env:NAME (a variable of the daemon's environment) or"
            " the path of a file that holds it, never the key itself",
        ),
        (["--api-key", "relative/key.txt"], "never the key itself"),
    ],
)
def test_a_key_in_clear_is_refused_and_nothing_is_written(args, said):
    result = add_mac2(*args)
    assert result.exit_code == 2
    assert said in " ".join(result.stderr.split()) and "Nothing was written." in result.stderr
    assert not config_path().exists()


def test_bad_urls_names_and_duplicates_are_refused():
    bad_url = cli("backends", "add", "x", "--type", "openai", "--url", "ftp://host/v1")
    assert bad_url.exit_code == 2 and "'ftp://host/v1' is not an http:// or https:// URL with a host" in bad_url.stderr
    local = cli("backends", "add", "local", "--type", "openai", "--url", "http://h/v1")
    assert local.exit_code == 2 and "'local' is the local engine's name" in local.stderr
    assert add_mac2().exit_code == 0
    again = add_mac2()
    assert again.exit_code == 1 and "a backend or group named mac2 already exists" in again.stderr


def test_routes_and_groups_are_set_as_json_and_checked_against_the_backends():
    assert add_mac2().exit_code == 0
    routes = '[{"model": "llama-*", "to": "macs", "fallback": ["local"]}]'
    unknown = cli("config", "set", "routing.routes", routes)
    assert unknown.exit_code == 2 and "route 'llama-*': no backend or group named 'macs'" in unknown.stderr
    assert cli("config", "set", "routing.groups", '[{"name": "macs", "members": ["mac2", "local"]}]').exit_code == 0
    assert cli("config", "set", "routing.routes", routes).exit_code == 0
    routing = load_settings().routing
    assert [(r.model, r.to, r.fallback) for r in routing.routes] == [("llama-*", "macs", ["local"])]
    listed = cli("backends", "list").stdout
    assert "group macs: mac2, local" in listed and "route llama-* -> macs (then local)" in listed
    not_json = cli("config", "set", "routing.routes", "llama-*")
    assert not_json.exit_code == 2 and "JSON array" in not_json.stderr

    in_use = cli("backends", "remove", "mac2")
    assert in_use.exit_code == 1 and "backend mac2 is still used by group macs" in in_use.stderr
    assert cli("config", "unset", "routing.routes").exit_code == 0
    assert cli("config", "unset", "routing.groups").exit_code == 0
    assert cli("backends", "remove", "mac2").exit_code == 0
    assert config_path().read_text() == ""
    missing = cli("backends", "remove", "mac2")
    assert missing.exit_code == 1 and "no backend named mac2" in missing.stderr


def test_a_broken_entry_in_the_file_names_the_entry_and_its_line():
    config_path().parent.mkdir(parents=True, exist_ok=True)
    config_path().write_text('[timeouts]\nchat = 60\n\n[[routing.backends]]\nname = "a"\ntype = "openai"\n')
    result = cli("config", "list")
    assert result.exit_code == 1
    assert f"{config_path()}:4: routing.backends: entry 1 has no base_url." in " ".join(result.stderr.split())


def test_check_asks_each_backend_for_its_models(monkeypatch, fast_model):
    with serving(fast_model) as server:
        assert cli("backends", "add", "here", "--type", "openai", "--url", server.url + "/v1").exit_code == 0
        assert cli("backends", "add", "gone", "--type", "openai", "--url", "http://127.0.0.1:9/v1").exit_code == 0
        assert add_mac2("--api-key", "env:NOT_SET_ANYWHERE").exit_code == 0
        one = cli("backends", "check", "here")
        assert one.exit_code == 0, one.stderr
        assert one.stdout.startswith("here: ok in ") and one.stdout.rstrip().endswith(f"1 model(s): {fast_model}")
        every = cli("backends", "check", "--json")
    assert every.exit_code == 1
    results = {row["name"]: row for row in json.loads(every.stdout)}
    assert results["here"]["ok"] and results["here"]["models"] == [fast_model] and results["here"]["latency_ms"] > 0
    assert not results["gone"]["ok"] and results["gone"]["error"] == "unreachable (ConnectError)"
    assert results["mac2"]["error"] == "backend 'mac2': its api_key env:NOT_SET_ANYWHERE names an unset variable"


def test_a_running_daemon_reloads_its_routes_and_refuses_an_unreadable_key(tmp_path, fast_model):
    with serving(fast_model) as upstream:
        assert cli("backends", "add", "up", "--type", "openai", "--url", upstream.url + "/v1").exit_code == 0
        engine = RecordingEngine(EngineConfig(allow_any_path=True))
        with LiveServer(create_app(load_settings(), engine=engine)) as front:
            reload = {"Authorization": f"Bearer {admin_token()}"}
            body = {"model": "remote", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            with front.http() as http:
                assert http.post("/v1/chat/completions", json=body).status_code == 404  # no route yet: local
                route = json.dumps([{"model": "remote", "to": f"up:{fast_model}"}])
                assert cli("config", "set", "routing.routes", route).exit_code == 0
                assert http.post("/admin/reload", headers=reload).json()["applied"] == ["routing.routes"]
                routed = http.post("/v1/chat/completions", json=body)
                assert routed.status_code == 200 and routed.headers["x-mlx-manager-backend"] == "up"
                client = front.daemon.router.backends["up"].client

                # A key file that cannot be read: the reload is refused and the routes stay.
                key_file = f'api_key = "{tmp_path}/missing.key"\n'
                text = config_path().read_text().replace('base_url = "', key_file + 'base_url = "')
                config_path().write_text(text)
                refused = http.post("/admin/reload", headers=reload)
                assert refused.status_code == 422 and "cannot read its api_key file" in refused.json()["detail"]
                assert http.post("/v1/chat/completions", json=body).headers["x-mlx-manager-backend"] == "up"

                (tmp_path / "missing.key").write_text("sk-a-real-key-now\n")
                assert http.post("/admin/reload", headers=reload).json()["applied"] == ["routing.backends"]
                assert front.daemon.router.backends["up"].client is not client  # a new key: a new client
                assert wait_until(lambda: client.is_closed)  # the old one, once idle
                assert http.post("/v1/chat/completions", json=body).headers["x-mlx-manager-backend"] == "up"
