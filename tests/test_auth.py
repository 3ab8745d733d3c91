"""API keys, admin protection, bind safety and the per-client rate limit, as a client meets them:
a real server, the official `openai` client, and the audit rows the refusals leave."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime

import httpx
import openai
import pytest
from typer.testing import CliRunner

from mlx_manager.auth import KeyRing, key_digest, load_keyring, new_key, unsafe_bind
from mlx_manager.cli import app as cli_app
from mlx_manager.daemon.app import create_app
from mlx_manager.daemon.ratelimit import RateLimiter
from mlx_manager.daemon.run import write_daemon_file
from mlx_manager.settings import Settings, SettingsError
from tests.daemon_server import LiveServer, assert_problem, serving, settings_with, wait_until

ALICE, BOB = new_key(), new_key()
HELLO = [{"role": "user", "content": "hello"}]


def key_entry(name: str, key: str) -> dict:
    return {"name": name, "sha256": key_digest(key), "created": datetime(2025, 1, 1, tzinfo=UTC)}


def audit_row(server: LiveServer, request_id: str) -> dict:
    """The audit row of one request, once the batched writer has committed it."""
    found: list[dict] = []

    def look() -> bool:
        with sqlite3.connect(server.daemon.audit.path) as db:
            db.row_factory = sqlite3.Row
            found[:] = [dict(r) for r in db.execute("SELECT * FROM audit_logs WHERE request_id = ?", (request_id,))]
        return bool(found)

    assert wait_until(look), f"no audit row for {request_id}"
    return found[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory, fast_model):
    """Two keys (alice, bob), the fast model loaded, the rate limit off."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLX_MANAGER_HOME", str(tmp_path_factory.mktemp("home")))
        env.delenv("MLX_MANAGER_API_KEY", raising=False)
        settings = settings_with(auth={"keys": [key_entry("alice", ALICE), key_entry("bob", BOB)]})
        with serving(fast_model, settings=settings) as live:
            yield live


def test_a_valid_key_is_served(server, fast_model):
    client = server.openai(api_key=ALICE)
    answer = client.chat.completions.create(model=fast_model, messages=HELLO, max_tokens=3)
    assert answer.usage.completion_tokens >= 1
    assert [m.id for m in server.openai(api_key=BOB).models.list().data] == [fast_model]


def test_a_missing_key_is_401_with_www_authenticate(server, fast_model):
    with server.http() as http:
        response = http.post(
            "/v1/chat/completions", json={"model": fast_model, "messages": HELLO}, headers={"X-Request-ID": "no-key-1"}
        )
    body = assert_problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == 'Bearer realm="mlx-manager"'
    assert "Authorization: Bearer" in body["detail"]
    assert not any(job.request.request_id == "no-key-1" for job in server.engine.jobs)  # never reached the model
    row = audit_row(server, "no-key-1")
    assert (row["status"], row["error_type"], row["http_status"]) == ("error", "unauthorized", 401)


@pytest.mark.parametrize(
    "key",
    ["wrong-" + "x" * 40, ALICE[:-1], ALICE + "x", BOB.upper()],
    ids=["unknown", "one-character-short", "one-character-long", "upper-case"],  # keys are random: stable ids
)
def test_a_wrong_key_is_an_authentication_error(server, fast_model, key):
    with pytest.raises(openai.AuthenticationError) as caught:
        server.openai(api_key=key).chat.completions.create(
            model=fast_model, messages=HELLO, extra_headers={"X-Request-ID": "wrong-key"}
        )
    error = caught.value
    assert error.status_code == 401 and error.code == "unauthorized"
    assert error.response.headers["content-type"] == "application/problem+json"
    assert error.response.headers["www-authenticate"].startswith("Bearer")
    assert audit_row(server, "wrong-key")["error_type"] == "unauthorized"


def test_each_audit_row_names_the_key_that_made_it_never_the_key_itself(server, fast_model):
    server.openai(api_key=ALICE).chat.completions.create(
        model=fast_model, messages=HELLO, max_tokens=2, extra_headers={"X-Request-ID": "by-alice-1"}
    )
    for _ in server.openai(api_key=BOB).completions.create(
        model=fast_model, prompt="hi", max_tokens=2, stream=True, extra_headers={"X-Request-ID": "by-bob-1"}
    ):
        pass
    server.openai(api_key=BOB).models.list(extra_headers={"X-Request-ID": "by-bob-2"})
    with pytest.raises(openai.NotFoundError):  # a refusal after the key matched is still that key's
        server.openai(api_key=ALICE).chat.completions.create(
            model="no/such-model", messages=HELLO, extra_headers={"X-Request-ID": "by-alice-404"}
        )
    with pytest.raises(openai.AuthenticationError):
        server.openai(api_key=ALICE + "x").models.list(extra_headers={"X-Request-ID": "wrong-key-null"})
    with server.http() as http:
        assert http.get("/v1/models", headers={"X-Request-ID": "no-key-null"}).status_code == 401

    assert audit_row(server, "by-alice-1")["api_key"] == "alice"
    assert audit_row(server, "by-bob-1")["api_key"] == "bob"
    assert audit_row(server, "by-bob-2")["api_key"] == "bob"
    assert (audit_row(server, "by-alice-404")["api_key"], audit_row(server, "by-alice-404")["http_status"]) == (
        "alice",
        404,
    )
    for refused in ("wrong-key-null", "no-key-null"):
        row = audit_row(server, refused)
        assert (row["http_status"], row["error_type"], row["api_key"]) == (401, "unauthorized", None)

    secrets = [ALICE.encode(), BOB.encode(), b"mlxm-"]
    for key in (ALICE, BOB):
        secrets += [key_digest(key).encode(), key_digest(key).upper().encode(), bytes.fromhex(key_digest(key))]
    files = [p for p in server.daemon.audit.path.parent.glob("audit.db*") if p.is_file()]
    assert {p.name for p in files} >= {"audit.db", "audit.db-wal"}
    assert any(b"alice" in p.read_bytes() for p in files)  # the rows are in what is scanned
    for path in files:
        data = path.read_bytes()
        for secret in secrets:
            assert secret not in data, (path, secret[:8])


def test_other_schemes_and_every_v1_route_need_the_key(server):
    with server.http() as http:
        for path in ("/v1/models", "/v1/models/some-model", "/v1/nope"):
            assert_problem(http.get(path), 401, "unauthorized")
        basic = http.get("/v1/models", headers={"Authorization": f"Basic {ALICE}"})
        assert_problem(basic, 401, "unauthorized")
        assert http.get("/health").status_code == 200  # probes stay open for the supervisor
        assert http.get("/v1/models", headers={"Authorization": f"bearer {BOB}"}).status_code == 200


def test_an_api_key_does_not_open_the_admin_endpoints(server):
    with server.http() as http:
        response = http.post("/admin/reload", headers={"Authorization": f"Bearer {ALICE}", "X-Request-ID": "admin-1"})
    assert_problem(response, 401, "unauthorized")
    row = audit_row(server, "admin-1")
    assert (row["endpoint"], row["status"], row["error_type"]) == ("/admin/reload", "error", "unauthorized")
    assert row["api_key"] is None  # API keys are not admin credentials: none is recorded


def test_a_refused_audit_feed_leaves_an_audit_row(server):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    url = server.url.replace("http://", "ws://") + "/admin/audit/feed"
    headers = {"Authorization": f"Bearer {ALICE}", "X-Request-ID": "feed-refused-1"}
    with connect(url, additional_headers=headers) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=60)
    assert closed.value.rcvd.code == 1008
    row = audit_row(server, "feed-refused-1")
    assert (row["endpoint"], row["status"], row["error_type"]) == ("/admin/audit/feed", "error", "unauthorized")


def test_the_schema_describes_keys_and_problems(server):
    with server.http(headers={"Authorization": f"Bearer {ALICE}"}) as http:  # with keys set, it needs one too
        schema = http.get("/openapi.json").json()
    scheme = schema["components"]["securitySchemes"]["apiKey"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert {"apiKey": []} in chat["security"]
    assert "application/problem+json" in chat["responses"]["default"]["content"]
    assert "422" not in chat["responses"] and "HTTPValidationError" not in schema["components"]["schemas"]
    assert "security" not in schema["paths"]["/health"]["get"]


# -- where keys come from, and their changes -----------------------------------------------------------


def test_keys_from_a_file_and_the_environment(tmp_path, monkeypatch):
    from_env, from_file = new_key(), "file-key-0123456789"
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"# team keys\n\n{from_file}\n")
    monkeypatch.setenv("MLX_MANAGER_API_KEY", from_env)
    with LiveServer(create_app(settings_with(auth={"keys_file": str(keys_file)}))) as live, live.http() as http:
        for key, request_id in ((from_env, "from-env-1"), (from_file, "from-file-1")):
            headers = {"Authorization": f"Bearer {key}", "X-Request-ID": request_id}
            assert http.get("/v1/models", headers=headers).status_code == 200
        assert_problem(http.get("/v1/models", headers={"Authorization": "Bearer team keys"}), 401, "unauthorized")
        # The audit log names them as the keyring does: the variable's name, the file's line.
        assert audit_row(live, "from-env-1")["api_key"] == "MLX_MANAGER_API_KEY"
        assert audit_row(live, "from-file-1")["api_key"] == "keys_file:3"
    assert [name for name, _ in load_keyring(settings_with(auth={"keys_file": str(keys_file)})).entries] == [
        "keys_file:3",
        "MLX_MANAGER_API_KEY",
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read"), ("# only a comment\n", "holds no key"), ("short\n", "at least 16 characters")],
)
def test_a_keys_file_that_cannot_be_used_is_an_error_not_an_open_api(tmp_path, content, message):
    keys_file = tmp_path / "keys.txt"
    if content is not None:
        keys_file.write_text(content)
    with pytest.raises(SettingsError, match=message):
        load_keyring(settings_with(auth={"keys_file": str(keys_file)}))


def test_key_changes_apply_live_through_the_cli(isolated_home):
    runner = CliRunner()
    with LiveServer(create_app(Settings())) as live, live.http() as http:
        write_daemon_file("127.0.0.1", live.port, live.url)  # this process: how the CLI finds a daemon
        assert http.get("/v1/models").status_code == 200  # no key yet: open on loopback

        added = runner.invoke(cli_app, ["keys", "add", "laptop", "--json"])
        assert added.exit_code == 0, added.stderr
        answer = json.loads(added.stdout)
        assert answer["daemon"] == {"running": True, "url": live.url, "applied": True, "error": None}
        assert_problem(http.get("/v1/models"), 401, "unauthorized")
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {answer['key']}"}).status_code == 200

        revoked = runner.invoke(cli_app, ["keys", "revoke", "laptop"])
        assert revoked.exit_code == 0, revoked.stderr
        assert revoked.stdout.startswith(f"Revoked key laptop (running daemon at {live.url} applied it)")
        revoked_key = http.get("/v1/models", headers={"Authorization": f"Bearer {answer['key']}"})
        assert_problem(revoked_key, 401, "unauthorized")
        # The last key is gone, and the API stays closed (issue 24.15): revoking never opens it.
        body = assert_problem(http.get("/v1/models"), 401, "unauthorized")
        assert "auth.required is true" in body["detail"] and "mlx-manager keys add NAME" in body["detail"]
        assert "auth.required = true" in revoked.stderr
        reopened = runner.invoke(cli_app, ["config", "set", "auth.required", "false"])
        assert reopened.exit_code == 0, reopened.stderr
        assert http.get("/v1/models").status_code == 200  # open again, as asked: loopback, no key left


def test_a_network_daemon_with_no_key_left_closes_v1():
    with LiveServer(create_app(Settings(), require_key=True)) as live, live.http() as http:
        body = assert_problem(http.get("/v1/models"), 401, "unauthorized")
        assert "mlx-manager keys add NAME" in body["detail"]


@pytest.mark.parametrize(
    ("host", "refused"),
    [
        ("127.0.0.1", False),
        ("127.0.0.2", False),
        ("::1", False),
        ("[::1]", False),
        ("localhost", False),
        ("0.0.0.0", True),
        ("::", True),
        ("192.0.2.10", True),
    ],
)
def test_bind_safety(host, refused):
    message = unsafe_bind(host, KeyRing(), insecure_no_auth=False)
    assert (message is not None) == refused
    if refused:
        assert message.startswith(f"refusing to listen on {host} without an API key")
        assert "mlx-manager keys add NAME" in message and "--insecure-no-auth" in message
    with_key = KeyRing((("alice", bytes.fromhex(key_digest(ALICE))),))
    assert unsafe_bind(host, with_key, insecure_no_auth=False) is None
    assert unsafe_bind(host, KeyRing(), insecure_no_auth=True) is None


# -- limits ----------------------------------------------------------------------------------------------


def test_the_rate_limit_is_429_with_retry_after_per_client(tmp_path):
    keys = [key_entry("alice", ALICE), key_entry("bob", BOB)]
    settings = settings_with(server={"rate_limit": 3}, auth={"keys": keys})
    with LiveServer(create_app(settings)) as live:
        alice = live.openai(api_key=ALICE)
        for _ in range(3):
            alice.models.list()
        with pytest.raises(openai.RateLimitError) as caught:
            alice.models.list(extra_headers={"X-Request-ID": "too-many-1"})
        error = caught.value
        assert error.status_code == 429 and error.code == "rate_limited"
        assert 1 <= int(error.response.headers["retry-after"]) <= 20  # one request's worth at 3 per minute
        assert "3 requests per minute" in error.message and error.response.json()["limit"] == 3
        assert error.response.headers["content-type"] == "application/problem+json"
        live.openai(api_key=BOB).models.list()  # another key has its own allowance
        with live.http() as http:
            assert http.get("/health").status_code == 200  # only /v1 is limited
        assert wait_until(lambda: live.daemon.audit is not None)
        row = audit_row(live, "too-many-1")
        assert (row["status"], row["error_type"], row["http_status"]) == ("error", "rate_limited", 429)
        assert row["api_key"] == "alice"  # the key matched before the limit refused it


def test_the_rate_limiter_refills_and_forgets_idle_clients():
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    assert [limiter.take("a", 2) for _ in range(2)] == [None, None]
    assert limiter.take("a", 2) == pytest.approx(30.0)  # 2 per minute: one more in 30 s
    assert limiter.take("b", 2) is None
    now[0] = 29.0
    assert limiter.take("a", 2) == pytest.approx(1.0)
    now[0] = 30.0
    assert limiter.take("a", 2) is None
    assert limiter.take("a", 0) is None  # 0 turns it off


def test_limits_are_422_with_the_limit_and_413_for_the_body(fast_model):
    settings = settings_with(server={"max_messages": 2, "max_body_bytes": 2048}, models={"max_tokens": 8})
    with serving(fast_model, settings=settings) as live:
        client = live.openai()
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            client.chat.completions.create(model=fast_model, messages=HELLO * 3)
        assert caught.value.code == "limit_exceeded" and caught.value.param == "messages"
        assert caught.value.message.endswith("messages: 3 messages is more than the limit of 2 (server.max_messages)")
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            client.completions.create(model=fast_model, prompt="hi", max_tokens=9)
        assert caught.value.message.endswith("max_tokens: 9 is more than the limit of 8 tokens (models.max_tokens)")
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            client.chat.completions.create(model=fast_model, messages=HELLO, max_completion_tokens=100)
        assert caught.value.param == "max_completion_tokens" and caught.value.response.json()["limit"] == 8
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model=fast_model, messages=[{"role": "user", "content": "x" * 3000}])
        assert caught.value.status_code == 413 and caught.value.code == "body_too_large"
        # No max_tokens given: the default (512) is held to the ceiling.
        answer = client.completions.create(model=fast_model, prompt="count", temperature=0)
        assert live.engine.jobs[-1].request.max_tokens == 8 and answer.usage.completion_tokens <= 8
        with httpx.Client(base_url=live.url) as http:
            body = {"model": fast_model, "prompt": "a", "max_tokens": 8}
            assert http.post("/v1/completions", json=body).status_code == 200
