"""Every error the daemon sends is an RFC 9457 problem with an OpenAI error inside.

Real server, official `openai` client where it can send the request; raw httpx where it
cannot (malformed JSON, chunked bodies, unknown routes).
"""

from __future__ import annotations

import json
import logging

import httpx
import openai
import pytest

from mlx_manager.daemon.app import create_app
from tests.daemon_server import LiveServer, assert_problem, settings_with

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """No model loaded: these paths never reach one. A 4 KiB body limit for the 413 tests. Model
    folders (temporary ones) load by path."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLX_MANAGER_HOME", str(tmp_path_factory.mktemp("home")))
        app = create_app(settings_with(server={"max_body_bytes": 4096}, models={"allow_any_path": True}))

        @app.post("/v1/test-only/crash")  # a route that fails the way a bug would
        async def crash():
            raise RuntimeError("secret internal detail 42")

        with LiveServer(app) as live:
            yield live


@pytest.fixture
def http(server):
    with server.http() as client:
        yield client


def test_health_is_cheap_and_ready_without_a_model(http):
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    ready = http.get("/ready")
    assert ready.status_code == 200 and ready.json()["loaded"] == []


def test_request_id_is_kept_when_valid_and_made_otherwise(http):
    kept = http.get("/health", headers={"X-Request-ID": "client-id.123"})
    assert kept.headers["x-request-id"] == "client-id.123"
    replaced = http.get("/health", headers={"X-Request-ID": "bad id\twith spaces"})
    made = http.get("/health")
    for response in (replaced, made):
        assert len(response.headers["x-request-id"]) == 32
    assert replaced.headers["x-request-id"] != made.headers["x-request-id"]
    problem = http.get("/nope", headers={"X-Request-ID": "trace-7"}).json()
    assert problem["request_id"] == "trace-7"


def test_unknown_route_is_a_problem(server, http):
    body = assert_problem(http.get("/v1/nope"), 404, "not_found")
    assert body["detail"] == (
        "no route GET /v1/nope; /v1 serves chat/completions, completions, embeddings, models, messages and responses"
    )
    with pytest.raises(openai.NotFoundError) as caught:
        server.openai().post("/nope", cast_to=object, body={})
    assert caught.value.status_code == 404
    assert caught.value.code == "not_found"
    assert caught.value.response.headers["content-type"] == "application/problem+json"


def test_wrong_method_is_a_problem_with_allow(server, http):
    response = http.get(CHAT)
    body = assert_problem(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"
    assert "use POST" in body["detail"]
    with pytest.raises(openai.APIStatusError) as caught:
        server.openai().get("/chat/completions", cast_to=object)
    assert caught.value.status_code == 405


def test_malformed_json(http):
    response = http.post(CHAT, content=b'{"model": "m", "messages": [', headers={"content-type": "application/json"})
    body = assert_problem(response, 422, "invalid_json")
    assert "not valid JSON" in body["detail"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": HELLO, "temperature": 3}, "temperature"),
        ({"messages": HELLO, "n": 0}, "n"),
        ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content"),
        ({"messages": HELLO, "stop": "x" * 513}, "stop"),
        ({"messages": HELLO, "stop": ["ok", "y" * 600]}, "stop"),
        ({"messages": HELLO, "stop": [str(i) for i in range(17)]}, "stop"),
    ],
)
def test_invalid_values_are_422_with_field_errors(server, fields, param):
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        server.openai().chat.completions.create(model="m", **fields)
    error = caught.value
    assert error.status_code == 422
    assert error.code == "validation_error" and error.param.startswith(param)
    body = error.response.json()
    assert error.response.headers["content-type"] == "application/problem+json"
    assert body["request_id"] == error.response.headers["x-request-id"]
    assert body["detail"].startswith(param) and body["error"]["message"] == body["detail"]
    assert "errors" not in body  # one wrong field is said whole by detail and param
    assert list(body)[0] == "error"  # what clients that print the whole body show first


def test_several_wrong_fields_are_all_listed_without_their_values(server):
    secret = "a prompt that must not come back"
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        server.openai().chat.completions.create(
            model="m", messages=[{"role": "wizard", "content": secret}], temperature=3, n=0
        )
    body = caught.value.response.json()
    assert body["detail"].endswith("(and 2 more)")
    assert sorted(".".join(map(str, e["loc"][1:])) for e in body["errors"]) == ["messages.0.role", "n", "temperature"]
    assert secret not in caught.value.response.text  # never echo the request back


def test_unknown_fields_are_ignored(server):
    # It gets past validation (to the engine, which does not know the model): not a 422.
    with pytest.raises(openai.NotFoundError):
        server.openai().chat.completions.create(model="/no/such/model", messages=HELLO, extra_body={"future_field": 1})


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as caught:
        server.openai().chat.completions.create(model="/no/such/model", messages=HELLO)
    error = caught.value
    assert error.code == "model_not_found" and error.param == "model"
    assert "/no/such/model" in error.message
    body = error.response.json()
    assert body["type"] == "urn:mlx-manager:problem:model_not_found"
    assert body["request_id"] == error.response.headers["x-request-id"]
    with pytest.raises(openai.NotFoundError) as caught:
        server.openai().models.retrieve("org/not-here")
    assert caught.value.code == "model_not_found"


def test_body_over_the_limit_is_413(server, http):
    big = "x" * 5000
    with pytest.raises(openai.APIStatusError) as caught:
        server.openai().chat.completions.create(model="m", messages=[{"role": "user", "content": big}])
    assert caught.value.status_code == 413
    assert caught.value.code == "body_too_large"
    # Chunked upload, no Content-Length: counted as it arrives.
    chunks = iter([b'{"model": "m", "messages": [{"role": "user", "content": "', b"y" * 5000, b'"}]}'])
    response = http.post(CHAT, content=chunks, headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_problem(response, 413, "body_too_large")


def test_unexpected_error_is_500_without_details(server, http, caplog):
    with caplog.at_level(logging.ERROR, logger="mlx_manager.daemon"):
        response = http.post("/v1/test-only/crash", headers={"X-Request-ID": "crash-1"})
    body = assert_problem(response, 500, "internal_error")
    assert "secret" not in response.text and "Traceback" not in response.text and "RuntimeError" not in response.text
    assert "crash-1" in body["detail"]
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert "crash-1" in logged
    assert any(r.exc_info and "secret internal detail 42" in str(r.exc_info[1]) for r in caplog.records)


def test_draining_refuses_new_requests(server, http):
    server.daemon.draining = True
    try:
        response = http.post(CHAT, json={"model": "m", "messages": HELLO})
        assert_problem(response, 503, "draining")
        assert int(response.headers["retry-after"]) >= 1
        ready = http.get("/ready")
        assert_problem(ready, 503, "not_ready")
        assert ready.json()["reason"] == "draining"
        assert http.get("/health").status_code == 200  # liveness still answers
    finally:
        server.daemon.draining = False


def test_disallowed_model_is_404(tmp_path, fast_model):
    with LiveServer(create_app(settings_with(models={"allowed": [fast_model]}))) as live:
        with pytest.raises(openai.NotFoundError) as caught:
            live.openai().chat.completions.create(model=str(tmp_path), messages=HELLO)
        assert caught.value.code == "model_not_allowed"
        # Listed by its default alias (its folder's name), which stands for the allowed model.
        assert [(m.id, m.root) for m in live.openai().models.list().data] == [("fast", fast_model)]


def test_model_that_fails_to_load_is_500(server, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(openai.InternalServerError) as caught:
        server.openai().completions.create(model=str(broken), prompt="hi", max_tokens=2)
    assert caught.value.status_code == 500
    assert caught.value.response.headers["content-type"] == "application/problem+json"


def test_openapi_schema_is_served(http):
    schema = http.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/ready"} <= set(schema["paths"])


def test_problem_for_non_json_content_type(http):
    response = http.post(CHAT, content=b"model=m", headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code in (415, 422)
    assert response.headers["content-type"] == "application/problem+json"


def test_request_body_that_is_not_an_object(http):
    response = http.post(CHAT, json=["not", "an", "object"])
    assert_problem(response, 422, "validation_error")


def test_plain_client_reads_the_openai_error_message(server):
    # A plain client that only looks at `error.message` (as many OpenAI wrappers do) gets a sentence.
    response = httpx.post(server.url + CHAT, json={"model": "m"})
    assert response.json()["error"]["message"] == "messages: Field required"


# Found by the fuzz test (tests/test_fuzz.py): each of these once crashed MLX or answered 500.
@pytest.mark.parametrize("prompt", [[600], [1, 2**65], [10**12]])  # the fast model knows 512 token ids
def test_prompt_token_ids_outside_the_vocabulary_are_refused(server, fast_model, prompt):
    with pytest.raises(openai.BadRequestError) as caught:
        server.openai().completions.create(model=fast_model, prompt=prompt, max_tokens=2)
    assert caught.value.code == "invalid_request"
    assert caught.value.message.endswith("prompt token ids must be between 0 and 511")


def test_a_negative_token_id_is_a_validation_error(server, fast_model):
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        server.openai().completions.create(model=fast_model, prompt=[1, -1], max_tokens=2)
    assert caught.value.code == "validation_error"


def test_any_top_k_and_any_seed_are_served(server, fast_model):
    for top_k, seed in ((10**7, -5), (512, 2**70), (3, None)):
        answer = server.openai().completions.create(
            model=fast_model, prompt="hi", max_tokens=2, seed=seed, extra_body={"top_k": top_k}
        )
        assert answer.usage.completion_tokens >= 1
