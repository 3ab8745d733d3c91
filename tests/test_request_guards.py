"""Who may reach the daemon and how (issue 24): DNS rebinding (item 2), forged X-Forwarded-For
(item 7), and the extras that show model paths and traffic while the API needs a key (item 16).

The daemon is the real app on the real uvicorn configuration (`serve`'s), on a free port.
"""

from __future__ import annotations

import contextlib
import json
import socket
from datetime import UTC, datetime

import httpx
import pytest

from mlx_manager.auth import key_digest, new_key
from mlx_manager.daemon.app import create_app
from mlx_manager.runtime import admin_token
from mlx_manager.supervisor import probe
from tests.daemon_server import LiveServer, assert_problem, settings_with

KEY = new_key()


def keyed(**sections: dict) -> dict:
    return {
        "auth": {
            "keys": [{"name": "team", "sha256": key_digest(KEY), "created": datetime.now(UTC)}],
            **sections.pop("auth", {}),
        },
        **sections,
    }


def browser(host: str, origin: str | None = None) -> dict[str, str]:
    """What a browser sends with a page's fetch() or form: the page's host and origin."""
    headers = {
        "Host": host,
        "User-Agent": "Mozilla/5.0 (Macintosh) Safari/605.1.15",
        "Accept": "*/*",
        "Sec-Fetch-Mode": "cors",
        "Sec-Fetch-Site": "same-origin",
    }
    if origin is not None:
        headers["Origin"] = origin
    return headers


# -- DNS rebinding --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_daemon(tmp_path_factory):
    """Default settings: loopback, no keys: the setting a rebinding page attacks."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLX_MANAGER_HOME", str(tmp_path_factory.mktemp("home")))
        with LiveServer(create_app(settings_with(server={"allowed_hosts": ["llm.lan", "*.box.example"]}))) as live:
            yield live


REQUESTS = [
    ("GET", "/health", None),
    ("GET", "/ready", None),
    ("GET", "/metrics", None),
    ("GET", "/v1/models", None),
    ("POST", "/v1/chat/completions", {"model": "org/none", "messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/v1/completions", {"model": "/etc", "prompt": "hi"}),
    ("POST", "/admin/models/load", {"model": "/tmp"}),
    ("GET", "/openapi.json", None),
]


@pytest.mark.parametrize(("method", "path", "body"), REQUESTS)
def test_a_page_on_a_rebound_domain_gets_421_on_every_route(open_daemon, method, path, body):
    evil = f"evil.example:{open_daemon.port}"
    with httpx.Client(base_url=open_daemon.url, timeout=30) as http:
        answer = http.request(method, path, json=body, headers=browser(evil, f"http://{evil}"))
    problem = assert_problem(answer, 421, "misdirected_request")
    assert "evil.example" in problem["detail"] and "server.allowed_hosts" in problem["detail"]


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:{port}",
        "localhost:{port}",
        "LOCALHOST.",
        "[::1]:{port}",
        "app.localhost:{port}",
        "192.0.2.7:{port}",
        "llm.lan:{port}",
        "a.box.example",
    ],
)
def test_loopback_names_addresses_and_allowed_hosts_are_served(open_daemon, host):
    headers = browser(host.format(port=open_daemon.port))
    assert httpx.get(open_daemon.url + "/v1/models", headers=headers).status_code == 200


@pytest.mark.parametrize("host", ["box.example", "llm.lan.evil.example", "localhost.evil.example"])
def test_names_close_to_allowed_ones_are_not(open_daemon, host):
    assert_problem(httpx.get(open_daemon.url + "/health", headers=browser(host)), 421, "misdirected_request")


def test_a_malformed_host_is_400(open_daemon):
    assert_problem(httpx.get(open_daemon.url + "/health", headers={"Host": "a b:1"}), 400, "bad_request")


def test_the_admin_feed_refuses_rebound_hosts_and_foreign_origins(open_daemon):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    url = open_daemon.url.replace("http://", "ws://") + "/admin/audit/feed"
    token = {"Authorization": f"Bearer {open_daemon.daemon.admin_token}"}
    # A rebound name: refused before the handshake completes (a client library sets Host from the
    # URL, so this handshake is written by hand).
    with socket.create_connection(("127.0.0.1", open_daemon.port), timeout=10) as sock:
        sock.sendall(
            f"GET /admin/audit/feed HTTP/1.1\r\nHost: evil.example:{open_daemon.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: {token['Authorization']}\r\nOrigin: http://evil.example:{open_daemon.port}\r\n\r\n".encode()
        )
        assert sock.recv(1024).startswith(b"HTTP/1.1 403 ")
    foreign = f"http://evil.example:{open_daemon.port}"
    with connect(url, additional_headers=token, origin=foreign) as ws:  # type: ignore[arg-type]
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
    close = closed.value.rcvd
    assert close is not None and close.code == 1008 and "origin" in close.reason
    # The daemon's own origin (a page it served) and a client without Origin (the CLI) are let in.
    for origin in (f"http://127.0.0.1:{open_daemon.port}", None):
        with connect(url, additional_headers=token, origin=origin) as ws:  # type: ignore[arg-type]
            with contextlib.suppress(TimeoutError):  # a row of an earlier test's request may come
                assert "request_id" in json.loads(ws.recv(timeout=0.5))
            assert ws.ping().wait(10)  # answered: still open (a closed one raises ConnectionClosed)


def test_cors_stays_off_unless_origins_are_configured(open_daemon, tmp_path):
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    answer = httpx.options(open_daemon.url + "/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in answer.headers
    plain = httpx.get(open_daemon.url + "/v1/models", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in plain.headers
    with LiveServer(create_app(settings_with(server={"cors_origins": ["https://app.example"]}))) as live:
        answer = httpx.options(live.url + "/v1/chat/completions", headers=preflight)
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.options(
            live.url + "/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in other.headers


# -- X-Forwarded-For ---------------------------------------------------------------------------------


def test_forwarded_for_from_loopback_is_not_believed(tmp_path):
    """uvicorn believes X-Forwarded-For from 127.0.0.1 by default: anyone on the machine could
    pose as a new address with each request and never meet the rate limit."""
    with LiveServer(create_app(settings_with(server={"rate_limit": 2}))) as live, live.http() as http:
        answers = [http.get("/v1/models", headers={"X-Forwarded-For": f"198.51.100.{i}"}) for i in range(3)]
        assert [a.status_code for a in answers[:2]] == [200, 200]
        assert_problem(answers[2], 429, "rate_limited")
        # Nor does it make a local admin call look remote (or a remote one local).
        reload = http.post("/admin/reload", headers={"X-Forwarded-For": "198.51.100.9"})
        assert_problem(reload, 401, "unauthorized")


def test_a_named_proxy_is_believed(tmp_path):
    settings = settings_with(server={"rate_limit": 2, "trusted_proxies": ["127.0.0.1"]})
    with LiveServer(create_app(settings)) as live, live.http() as http:
        answers = [http.get("/v1/models", headers={"X-Forwarded-For": f"198.51.100.{i}"}) for i in range(4)]
        assert [a.status_code for a in answers] == [200] * 4  # four clients behind the proxy, two each allowed
        reload = http.post("/admin/reload", headers={"X-Forwarded-For": "198.51.100.9"})
        assert_problem(reload, 403, "forbidden")  # a remote client, as the proxy says


# -- /metrics, /ready, /docs, /openapi.json ------------------------------------------------------------------------


EXTRAS = ["/metrics", "/ready", "/openapi.json"]


@pytest.mark.parametrize("path", EXTRAS)
def test_with_keys_the_extras_need_one(tmp_path, path):
    with LiveServer(create_app(settings_with(**keyed()))) as live, live.http() as http:
        refused = http.get(path)
        assert_problem(refused, 401, "unauthorized")
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert "auth.open_endpoints" in refused.json()["detail"]
        assert http.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert http.get(path, headers={"Authorization": f"Bearer {admin_token()}"}).status_code == 200
        assert_problem(http.get(path, headers={"Authorization": "Bearer mlxm-wrong"}), 401, "unauthorized")
        assert http.get("/health").status_code == 200  # liveness never needs one


def test_the_supervisor_and_status_probes_bring_the_admin_token(tmp_path):
    with LiveServer(create_app(settings_with(**keyed()))) as live:
        assert probe.ready(live.url, 5)
        answer = probe.fetch(live.url, "/metrics", 5)
        assert answer is not None and answer[0] == 200 and b"mlx_manager_requests" in answer[1]


def test_open_endpoints_and_probe_clients_open_them(tmp_path):
    opened = keyed(auth={"open_endpoints": ["/metrics"]})
    with LiveServer(create_app(settings_with(**opened))) as live, live.http() as http:
        assert http.get("/metrics").status_code == 200
        assert_problem(http.get("/ready"), 401, "unauthorized")
    scraper = keyed(auth={"probe_clients": ["127.0.0.0/8"]})
    with LiveServer(create_app(settings_with(**scraper))) as live, live.http() as http:
        assert http.get("/metrics").status_code == 200 and http.get("/ready").status_code == 200
        assert_problem(http.get("/openapi.json"), 401, "unauthorized")  # a scraper reads figures, not the schema


def test_without_keys_they_stay_open(open_daemon):
    for path in EXTRAS:
        assert httpx.get(open_daemon.url + path, timeout=60).status_code == 200  # /openapi.json is built on first use


def test_swagger_ui_is_off_unless_asked_for(open_daemon, tmp_path):
    assert_problem(httpx.get(open_daemon.url + "/docs"), 404, "not_found")
    with LiveServer(create_app(settings_with(server={"docs": True}, **keyed()))) as live, live.http() as http:
        assert_problem(http.get("/docs"), 401, "unauthorized")
        page = http.get("/docs", headers={"Authorization": f"Bearer {KEY}"})
        assert page.status_code == 200 and "swagger-ui" in page.text
