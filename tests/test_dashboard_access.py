"""Who may use the dashboard, as a client meets it over HTTP and WebSocket: a real daemon, real
cookies, the audit rows its calls leave. (The browser's view is test_dashboard_browser.py.)"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import sqlite3
from collections.abc import Iterator
from http.cookies import SimpleCookie

import httpx
import pytest
import tomlkit
from typer.testing import CliRunner
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from mlx_manager.auth import add_key_entry, key_digest, new_key, now_utc
from mlx_manager.cli import app as cli_app
from mlx_manager.daemon.app import create_app
from mlx_manager.daemon.dashboard.access import CONTENT_SECURITY_POLICY, LOGIN_ATTEMPTS_PER_MINUTE
from mlx_manager.daemon.dashboard.sessions import LINK_SECONDS, SessionStore
from mlx_manager.daemon.routes.dashboard import STATIC
from mlx_manager.daemon.run import write_daemon_file
from mlx_manager.engine.config import EngineConfig
from mlx_manager.settings import config_path, load_settings, write_config_text
from tests.daemon_server import LiveServer, RecordingEngine, assert_problem, wait_until

ALICE, BOB = new_key(), new_key()
DATA = (
    "/admin/ui/api/state",
    "/admin/ui/api/series",
    "/admin/ui/api/recent",
    "/admin/ui/api/settings",
    "/admin/ui/api/session",
)


@pytest.fixture
def server(isolated_home):
    """No model; alice and bob in config.toml; the CLI finds this daemon."""
    document = tomlkit.document()
    for name, key in (("alice", ALICE), ("bob", BOB)):
        add_key_entry(document, name, key_digest(key), now_utc())
    write_config_text(document.as_string())
    with LiveServer(create_app(load_settings(), engine=RecordingEngine(EngineConfig()))) as live:
        write_daemon_file("127.0.0.1", live.port, live.url)
        yield live


@contextlib.contextmanager
def signed_in(live: LiveServer, key: str = ALICE) -> Iterator[tuple[httpx.Client, str]]:
    """A client holding a session cookie, and the session's CSRF token."""
    with live.http() as client:
        answer = client.post("/admin/ui/api/login", json={"key": key})
        assert answer.status_code == 200, answer.text
        yield client, answer.json()["csrf_token"]


def rows(live: LiveServer, endpoint: str) -> list[dict]:
    with sqlite3.connect(live.daemon.audit.path) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM audit_logs WHERE endpoint = ? ORDER BY id", (endpoint,))]


def test_the_page_and_its_files_come_from_the_package_with_a_strict_policy(server):
    with server.http() as http:
        page = http.get("/admin")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        # The page's policy is the strict one, plus the digest of the one inline style it has.
        policy = page.headers["content-security-policy"]
        (style_digest,) = re.findall(r"style-src 'self' ('sha256-[A-Za-z0-9+/]+=*');", policy)
        assert policy == CONTENT_SECURITY_POLICY.replace("style-src 'self';", f"style-src 'self' {style_digest};")
        (style,) = re.findall(r"<style>(.*?)</style>", page.text, re.DOTALL)
        assert style_digest == f"'sha256-{base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()}'"
        assert "script-src 'self';" in CONTENT_SECURITY_POLICY and "'unsafe-inline'" not in CONTENT_SECURITY_POLICY
        assert "<script>" not in page.text and " style=" not in page.text
        assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
        # Everything the page loads is one of the package's files: nothing from the internet.
        loaded = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert loaded and all(
            url.startswith("/admin/ui/static/") or url in ("#live", "#charts", "#state", "#settings", "#main", "data:,")
            for url in loaded
        ), loaded
        for url in loaded:
            if url.startswith("/admin/"):
                # The page names each file's version: the browser keeps it and does not ask again.
                answer = http.get(url)
                assert answer.status_code == 200 and "?v=" in url, url
                assert answer.headers["cache-control"] == "max-age=31536000, immutable", url
                assert http.get(url.split("?")[0]).headers["cache-control"] == "no-cache", url
                # A module names its neighbours' version too: none of them is asked for again.
                for name in re.findall(r'from "\./([^"]+)"', answer.text):
                    assert name.endswith(f".js?{url.split('?')[1]}"), (url, name)
        modules = {path.name for path in (STATIC / "js").glob("*.js")}
        for path in (STATIC / "js").glob("*.js"):
            for name in re.findall(r'from "\./([^"]+)"', path.read_text()):
                assert name in modules, (path.name, name)
            assert "http://" not in path.read_text() and "https://" not in path.read_text()
        assert (STATIC / "vendor" / "uPlot.LICENSE").read_text().startswith("The MIT License")

        script = http.get("/admin/ui/static/vendor/uPlot.iife.min.js")
        assert script.headers["content-type"].startswith("text/javascript")
        again = http.get("/admin/ui/static/vendor/uPlot.iife.min.js", headers={"If-None-Match": script.headers["etag"]})
        assert again.status_code == 304 and not again.content
        assert_problem(http.get("/admin/ui/static/nothing.js"), 404, "not_found")
        assert_problem(http.get("/admin/ui/static/../../routes/dashboard.py"), 404, "not_found")


def test_without_a_session_no_data(server):
    with server.http() as http:
        for path in DATA:
            body = assert_problem(http.get(path), 401, "unauthorized")
            assert "sign in" in body["detail"]
        assert_problem(http.post("/admin/ui/api/login", json={"key": new_key()}), 401, "unauthorized")
        assert_problem(http.post("/admin/ui/api/login", json={"key": ALICE, "link": "x"}), 422, "validation_error")
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        assert_problem(http.post("/admin/ui/api/login", content=f"key={ALICE}", headers=form), 422, "validation_error")


def test_a_key_signs_in_with_an_httponly_strict_cookie(server):
    with server.http() as http:
        answer = http.post("/admin/ui/api/login", json={"key": BOB}, headers={"Origin": server.url})
        assert answer.status_code == 200 and answer.json()["name"] == "bob" and answer.json()["role"] == "key"
        morsel = SimpleCookie(answer.headers["set-cookie"])["mlxm_session"]
        assert morsel["httponly"] and morsel["samesite"].lower() == "strict" and morsel["path"] == "/admin"
        assert int(morsel["max-age"]) > 0 and not morsel["secure"]  # plain http on loopback
        assert http.get("/admin/ui/api/session").json()["csrf_token"] == answer.json()["csrf_token"]
        state = http.get("/admin/ui/api/state").json()
        assert state["pid"] and state["blas"] and state["models"] == [] and state["supervised"] is False
    # The sign-in is on the audit log, under the key's name; the page's polling is not.
    (login,) = wait_until(lambda: rows(server, "/admin/ui/api/login"))
    assert login["api_key"] == "bob" and login["status"] == "success"
    assert rows(server, "/admin/ui/api/state") == [] and rows(server, "/admin/ui/api/session") == []


def test_the_admin_token_signs_in_as_admin_from_this_machine(server):
    with server.http() as http:
        answer = http.post("/admin/ui/api/login", json={"key": server.daemon.admin_token})
        assert answer.status_code == 200 and answer.json() == {**answer.json(), "name": "admin", "role": "admin"}
        assert http.get("/admin/ui/api/settings").json()["can_edit"] is True


def test_a_state_changing_call_needs_the_csrf_token(server):
    with signed_in(server) as (client, csrf):
        for headers in ({}, {"X-CSRF-Token": "not-the-token"}):
            body = assert_problem(client.post("/admin/ui/api/logout", headers=headers), 403, "forbidden")
            assert "CSRF" in body["detail"]
            assert_problem(
                client.post("/admin/ui/api/models/unload", json={"model": "m"}, headers=headers), 403, "forbidden"
            )
        assert client.get("/admin/ui/api/state").status_code == 200  # still signed in
        assert_problem(
            client.post("/admin/ui/api/models/unload", json={"model": "m"}, headers={"X-CSRF-Token": csrf}),
            404,
            "model_not_loaded",
        )
        # Another site's page cannot call it even with the token (it could not read it anyway).
        foreign = {"X-CSRF-Token": csrf, "Origin": "http://127.0.0.1:9"}
        assert_problem(client.post("/admin/ui/api/logout", headers=foreign), 403, "forbidden")
        assert client.post("/admin/ui/api/logout", headers={"X-CSRF-Token": csrf}).status_code == 204
        assert_problem(client.get("/admin/ui/api/state"), 401, "unauthorized")
    with server.http() as http:
        assert_problem(
            http.post("/admin/ui/api/login", json={"key": ALICE}, headers={"Origin": "http://evil.example"}),
            403,
            "forbidden",
        )


def test_a_key_session_cannot_change_settings(server):
    with signed_in(server) as (client, csrf):
        body = assert_problem(
            client.post(
                "/admin/ui/api/settings", json={"key": "timeouts.chat", "value": "30"}, headers={"X-CSRF-Token": csrf}
            ),
            403,
            "forbidden",
        )
        assert "mlx-manager dashboard" in body["detail"]
    assert server.daemon.settings.timeouts.chat != 30


def test_settings_refusals_read_as_the_cli_says_them(server):
    config = config_path()
    before = config.read_bytes()
    with signed_in(server, server.daemon.admin_token) as (client, csrf):
        for key, value in (
            ("timeouts.chat", "soon"),
            ("timeouts.chat", "0"),
            ("timeout.chat", "5"),
            ("log.level", "loud"),
            ("models.max_loaded", "1.5"),
        ):
            cli = CliRunner().invoke(cli_app, ["config", "set", key, value])
            assert cli.exit_code == 2, cli.stdout
            said = cli.stderr.strip().removeprefix("Error: ")
            body = assert_problem(
                client.post(
                    "/admin/ui/api/settings", json={"key": key, "value": value}, headers={"X-CSRF-Token": csrf}
                ),
                422,
                "validation_error",
            )
            assert said.startswith(body["detail"]), (said, body["detail"])  # the CLI may add a hint after it
        body = assert_problem(
            client.post(
                "/admin/ui/api/settings", json={"key": "server.port", "value": "9"}, headers={"X-CSRF-Token": csrf}
            ),
            422,
            "validation_error",
        )
        assert "restart" in body["detail"]
        assert_problem(
            client.post(
                "/admin/ui/api/settings", json={"key": "auth.keys", "value": "[]"}, headers={"X-CSRF-Token": csrf}
            ),
            422,
            "validation_error",
        )
        assert config.read_bytes() == before

        answer = client.post(
            "/admin/ui/api/settings", json={"key": "timeouts.embeddings", "value": "2m"}, headers={"X-CSRF-Token": csrf}
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["value"] == 120 and answer.json()["applied"] is False  # 120 is its default
        answer = client.post(
            "/admin/ui/api/settings", json={"key": "timeouts.embeddings", "value": "3m"}, headers={"X-CSRF-Token": csrf}
        )
        assert answer.json()["applied"] is True and server.daemon.timeout_for("embeddings") == 180
        item = next(i for i in answer.json()["settings"] if i["key"] == "timeouts.embeddings")
        assert item["origin"] == "file" and item["value"] == item["running"] == 180
    assert tomlkit.parse(config.read_text())["auth"]["keys"][0]["name"] == "alice"  # the rest of the file kept


def test_a_revoked_key_ends_its_sessions(server):
    with signed_in(server, BOB) as (client, _):
        assert client.get("/admin/ui/api/state").status_code == 200
        assert CliRunner().invoke(cli_app, ["keys", "revoke", "bob"]).exit_code == 0  # the daemon reloads
        assert_problem(client.get("/admin/ui/api/state"), 401, "unauthorized")


def test_sign_in_attempts_are_limited_per_address(server):
    with server.http() as http:
        for _ in range(LOGIN_ATTEMPTS_PER_MINUTE):
            assert http.post("/admin/ui/api/login", json={"key": "mlxm-guess-" + "x" * 30}).status_code == 401
        assert_problem(http.post("/admin/ui/api/login", json={"key": ALICE}), 429, "rate_limited")


def test_a_login_link_is_made_for_the_admin_token_and_works_once(server):
    with server.http() as http:
        assert_problem(http.post("/admin/ui/login-link"), 401, "unauthorized")
        assert_problem(
            http.post("/admin/ui/login-link", headers={"Authorization": f"Bearer {ALICE}"}), 401, "unauthorized"
        )
    result = CliRunner().invoke(cli_app, ["dashboard", "--json"])
    assert result.exit_code == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["url"].startswith(f"{server.url}/admin#login=") and answer["expires_in_seconds"] == LINK_SECONDS
    link = answer["url"].split("#login=", 1)[1]
    with server.http() as first, server.http() as second:
        signed = first.post("/admin/ui/api/login", json={"link": link})
        assert signed.status_code == 200 and signed.json()["role"] == "admin"
        assert_problem(second.post("/admin/ui/api/login", json={"link": link}), 401, "unauthorized")
    # The token travels in the fragment, which browsers never send: no log line holds it.
    assert link not in server.daemon.audit.path.read_bytes().decode("latin-1")


def test_a_link_expires_and_goes_at_its_first_use():
    now = [1000.0]
    store = SessionStore(clock=lambda: now[0])
    late, wrong = store.new_link(), store.new_link()
    assert store.use_link(wrong + "x") is False
    now[0] += LINK_SECONDS + 1
    assert store.use_link(late) is False
    fresh = store.new_link()
    assert store.use_link(fresh) is True and store.use_link(fresh) is False


def test_the_dashboard_command_without_a_daemon(isolated_home):
    result = CliRunner().invoke(cli_app, ["dashboard"])
    assert result.exit_code == 1 and "no daemon is running" in result.stderr


def feed(live: LiveServer, **headers: str):
    return connect(live.url.replace("http://", "ws://") + "/admin/audit/feed", additional_headers=headers)


def received(ws, request_id: str) -> dict:
    """The feed's row for this request (rows of earlier calls may come first)."""
    while True:
        row = json.loads(ws.recv(timeout=10))
        if row["request_id"] == request_id:
            return row


def test_the_feed_takes_a_session_from_its_own_origin_only(server):
    with (
        signed_in(server) as (client, _),
        feed(server, Cookie=f"mlxm_session={client.cookies['mlxm_session']}", Origin=server.url) as ws,
    ):
        cookie = f"mlxm_session={client.cookies['mlxm_session']}"
        client.get("/v1/models", headers={"Authorization": f"Bearer {ALICE}", "X-Request-ID": "feed-by-cookie"})
        assert received(ws, "feed-by-cookie")
    refusals = (
        {"Cookie": cookie, "Origin": "http://127.0.0.1:9"},  # another port: the same site, not the same origin
        {"Cookie": cookie, "Origin": "null"},
        {"Cookie": cookie},  # a session is for browsers, which always send an Origin
        {"Authorization": f"Bearer {server.daemon.admin_token}", "Origin": "http://evil.example"},
        {"Cookie": "mlxm_session=made-up", "Origin": server.url},
    )
    for headers in refusals:
        with feed(server, **headers) as ws, pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd.code == 1008, headers
    # A CLI-like client (the admin token, no Origin) still gets the feed.
    with feed(server, Authorization=f"Bearer {server.daemon.admin_token}") as ws:
        with server.http() as http:
            http.get("/v1/models", headers={"Authorization": f"Bearer {ALICE}", "X-Request-ID": "feed-by-token"})
        assert received(ws, "feed-by-token")
