"""The daemon's admin endpoints for models, on a real server with real tiny models: what is
loaded, load, unload (refused while busy, forced through a running stream), who may call them,
and the pull stream's errors."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import httpx

from mlx_manager.auth import key_digest, new_key
from mlx_manager.daemon.app import create_app
from mlx_manager.runtime import admin_token
from tests.daemon_server import assert_problem, serving, settings_with, wait_until


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {admin_token()}"}


def test_ps_load_and_unload(fast_model, no_template_model):
    with serving(fast_model) as server, server.http(headers=admin()) as http:
        ps = http.get("/admin/models")
        assert ps.status_code == 200, ps.text
        body = ps.json()
        assert (body["queue_depth"], body["active_jobs"], body["loading"]) == (0, 0, None)
        (model,) = body["models"]
        assert (model["id"], model["path"], model["kind"]) == (fast_model, fast_model, "generate")
        assert model["memory_bytes"] > 100_000 and (model["active_jobs"], model["queued_jobs"]) == (0, 0)
        assert model["keep_alive_seconds"] == 1800
        assert abs(model["expires_in_seconds"] + model["idle_seconds"] - 1800) < 0.01

        loaded = http.post("/admin/models/load", json={"model": no_template_model})
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["id"] == no_template_model and loaded.json()["memory_bytes"] > 100_000
        assert [m["id"] for m in http.get("/admin/models").json()["models"]] == [fast_model, no_template_model]

        assert http.post("/admin/models/unload", json={"model": no_template_model}).json() == {
            "unloaded": no_template_model
        }
        assert server.engine.status().loaded == [fast_model]
        again = assert_problem(
            http.post("/admin/models/unload", json={"model": no_template_model}), 404, "model_not_loaded"
        )
        assert again["detail"] == f"model {no_template_model!r} is not loaded"
        assert_problem(http.post("/admin/models/load", json={"model": "org/not-here"}), 404, "model_not_found")
        assert_problem(http.post("/admin/models/load", json={"model": fast_model, "extra": 1}), 422, "validation_error")


def test_unload_is_refused_while_a_stream_runs_and_forced_it_ends_the_stream(fast_model):
    chat = {"model": fast_model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000, "stream": True}
    with serving(fast_model) as server, server.http() as streaming, server.http(headers=admin()) as http:
        with streaming.stream("POST", "/v1/chat/completions", json=chat) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data:"))  # generating
            busy = assert_problem(http.post("/admin/models/unload", json={"model": fast_model}), 409, "model_busy")
            assert busy["detail"] == (
                f"model {fast_model!r} has 1 job(s) running or waiting; force the unload to end them"
            )
            forced = http.post("/admin/models/unload", json={"model": fast_model, "force": True})
            assert forced.status_code == 200, forced.text
            rest = list(lines)
        error = rest[rest.index("event: error") + 1]
        document = json.loads(error.removeprefix("data: "))
        assert (document["status"], document["error"]["code"]) == (503, "model_unloaded")
        assert document["detail"] == f"model {fast_model!r} was unloaded by an administrator"
        assert wait_until(lambda: server.engine.status().active_jobs == 0)
        assert server.engine.status().loaded == []


def call(app, client: str, method: str, path: str, token: str | None = None, **kwargs) -> httpx.Response:
    """A request from `client` (an address): a non-loopback peer cannot be made on this machine's
    real sockets, so the ASGI transport says where it comes from. The app is the real one."""
    transport = httpx.ASGITransport(app=app, client=(client, 40000))
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
            return await http.request(method, path, headers=headers, **kwargs)

    return asyncio.run(go())


def test_model_admin_takes_the_admin_token_here_and_an_api_key_from_anywhere():
    key = new_key()
    app = create_app(
        settings_with(auth={"keys": [{"name": "laptop", "sha256": key_digest(key), "created": datetime.now(UTC)}]})
    )
    here, remote = "127.0.0.1", "192.0.2.10"
    assert call(app, here, "GET", "/admin/models", admin_token()).status_code == 200
    assert call(app, here, "GET", "/admin/models", key).status_code == 200
    assert call(app, remote, "GET", "/admin/models", key).status_code == 200
    refused = call(app, remote, "GET", "/admin/models", admin_token())
    assert_problem(refused, 403, "forbidden")
    assert refused.json()["detail"] == (
        "admin endpoints answer only clients on this machine (or, with an API key, from anywhere)"
    )
    assert_problem(call(app, remote, "POST", "/admin/models/pull", json={"model": "org/x"}), 403, "forbidden")
    assert_problem(call(app, here, "GET", "/admin/models"), 401, "unauthorized")
    assert_problem(call(app, here, "GET", "/admin/models", "mlxm-wrong"), 401, "unauthorized")
    # The other admin endpoints stay with the admin token, from this machine only.
    assert_problem(call(app, remote, "POST", "/admin/reload", key), 403, "forbidden")
    assert_problem(call(app, here, "POST", "/admin/reload", key), 401, "unauthorized")


def test_pull_stream_reports_a_failure_as_an_error_event():
    # HF_HUB_OFFLINE=1 (as in every test): the pull cannot start, and says so in the stream.
    with serving() as server, server.http(headers=admin()) as http:
        with http.stream("POST", "/admin/models/pull", json={"model": "org/tiny"}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in response.iter_lines() if line]
        assert lines[0] == "event: error"
        document = json.loads(lines[1].removeprefix("data: "))
        assert (document["type"], document["status"], document["reason"]) == (
            "urn:mlx-manager:problem:pull_failed",
            502,
            "offline",
        )
        assert document["detail"] == "HF_HUB_OFFLINE is set, so nothing can be downloaded"
        assert document["hint"] == "Unset it to pull." and document["request_id"] == response.headers["x-request-id"]
        bad = assert_problem(http.post("/admin/models/pull", json={"model": "../etc"}), 400, "bad_request")
        assert bad["detail"] == "'../etc' is not a Hugging Face repo id"


def test_pull_keeps_to_models_allowed():
    settings = settings_with(models={"allowed": ["org/tiny"]})
    with serving(settings=settings) as server, server.http(headers=admin()) as http:
        refused = assert_problem(http.post("/admin/models/pull", json={"model": "org/other"}), 404, "model_not_allowed")
        assert refused["detail"] == "model 'org/other' is not in models.allowed"
