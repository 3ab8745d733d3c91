"""`timeouts.messages` and `timeouts.responses`: the deadline stops the model, whole or
mid-stream, and each dialect tells its client in its own way (a 504 problem; mid-stream,
Anthropic's `error` event or a `response.failed` event)."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest
from anthropic.types.shared import ErrorResponse
from openai.types.responses import ResponseFailedEvent

from tests.daemon_server import assert_problem, settings_with, wait_until
from tests.test_daemon_timeouts import LONG, make_server, sse_events, tokens_stay

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "tell me everything"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, slow_model):
    with pytest.MonkeyPatch.context() as env:  # the audit log of this module's server, in its own home
        env.setenv("MLX_MANAGER_HOME", str(tmp_path_factory.mktemp("home")))
        live = make_server(slow_model, settings_with(timeouts={"messages": 2, "responses": 2}))
        yield live
        live.stop()


@pytest.fixture(autouse=True)
def idle(server):
    """Each test starts with the model free: a stream must start within its deadline."""
    assert wait_until(lambda: server.engine.status().active_jobs == 0, timeout=10)


def test_a_message_past_its_deadline_is_a_504_and_the_model_stops(server, slow_model):
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as caught:
        client.messages.create(model=slow_model, max_tokens=LONG, messages=QUESTION)
    error = caught.value
    assert error.status_code == 504 and error.type == "timeout_error"
    assert "timeouts.messages = 2 seconds" in error.api_message
    body = error.response.json()
    assert body["type"] == "error" and body["error"]["code"] == "timeout" and body["timeout_seconds"] == 2
    job = server.engine.job(body["request_id"])
    assert job.cancelled and tokens_stay(server, job, slow_model)


def test_a_message_stream_past_its_deadline_ends_with_anthropics_error_event(server, slow_model):
    body = {"model": slow_model, "max_tokens": LONG, "messages": QUESTION, "stream": True}
    with server.http() as http, http.stream("POST", "/v1/messages", json=body) as response:
        assert response.status_code == 200
        events = sse_events(response)
    names = [name for name, _ in events]
    assert names[0] == "message_start"
    assert names[-1] == "error" and names.count("error") == 1 and "message_stop" not in names
    error = ErrorResponse.model_validate(json.loads(events[-1][1]))
    assert error.error.type == "timeout_error" and "timeouts.messages = 2 seconds" in error.error.message
    job = server.engine.job(response.headers["x-request-id"])
    assert job.cancelled and tokens_stay(server, job, slow_model)

    # The SDK raises it as an API error with our message.
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as caught:
        with client.messages.stream(model=slow_model, max_tokens=LONG, messages=QUESTION) as stream:
            stream.until_done()
    assert caught.value.type == "timeout_error"


def test_a_response_past_its_deadline_is_a_504(server, slow_model):
    with pytest.raises(openai.InternalServerError) as caught:
        server.openai().responses.create(model=slow_model, input="tell me everything", max_output_tokens=LONG)
    problem = assert_problem(caught.value.response, 504, "timeout")
    assert "timeouts.responses = 2 seconds" in problem["detail"]
    assert server.engine.job(problem["request_id"]).cancelled


def test_a_response_stream_past_its_deadline_ends_with_response_failed(server, slow_model):
    stream = server.openai().responses.create(
        model=slow_model, input="tell me everything", max_output_tokens=LONG, stream=True, store=False
    )
    events = list(stream)
    assert events[0].type == "response.created" and events[-1].type == "response.failed"
    failed = ResponseFailedEvent.model_validate(events[-1].model_dump())
    assert failed.response.status == "failed" and failed.response.error.code == "server_error"
    assert "timeouts.responses = 2 seconds" in failed.response.error.message
    job = server.engine.job(stream.response.headers["x-request-id"])
    assert job.cancelled and tokens_stay(server, job, slow_model)
