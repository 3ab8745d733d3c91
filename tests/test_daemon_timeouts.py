"""Deadlines that stop the model, cancellation on disconnect, and live reload of the settings.

The slow test model (tens of ms per token) makes a request with a large max_tokens outlive
a one-second deadline by far; the recording engine shows what the model did with the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import time

import httpx
import openai
import pytest

from mlx_manager.daemon.app import create_app
from mlx_manager.daemon.state import engine_config
from mlx_manager.engine.config import EngineConfig
from mlx_manager.runtime import admin_token
from mlx_manager.settings import Settings, config_path
from tests.daemon_server import LiveServer, RecordingEngine, assert_problem, settings_with, wait_until

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
LONG = 2000  # tokens: far more than any deadline here lets the slow model produce


def chat_body(model: str, max_tokens: int = LONG, **extra) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "tell me everything"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }


def make_server(model: str, settings: Settings | None = None) -> LiveServer:
    """The model is preloaded, not loaded by a first request: on a busy machine, loading it can
    outlast the short deadlines these tests set, and a request cut that way lingers in the queue."""
    settings = settings or Settings()
    # The tests' models live in temporary folders: requests may load any of them by path.
    engine = RecordingEngine(dataclasses.replace(engine_config(settings), preload=[model], allow_any_path=True))
    live = LiveServer(create_app(settings, engine=engine))
    live.outcomes = []
    live.daemon.outcome_sinks.append(live.outcomes.append)
    live.start()
    assert wait_until(lambda: model in engine.status().loaded, timeout=120)
    return live


def warm_up(live: LiveServer, model: str) -> None:
    """Load `model` and run it once, before a test sets a short deadline."""
    with live.http() as http:
        done = http.post("/v1/completions", json={"model": model, "prompt": "warm up", "max_tokens": 1})
    assert done.status_code == 200, done.text


@pytest.fixture
def server(slow_model):
    live = make_server(slow_model)
    yield live
    live.stop()


def reload(server: LiveServer, token: str | None = None) -> httpx.Response:
    token = admin_token() if token is None else token
    with server.http() as http:
        return http.post("/admin/reload", headers={"Authorization": f"Bearer {token}"})


def write_config(text: str) -> None:
    config_path().write_text(text)


def tokens_stay(server: LiveServer, job, model: str) -> bool:
    """Once the engine let go of the job, no token is produced for it while the engine runs
    another request from its start to its end: the model is not computing it any more."""
    assert wait_until(lambda: job.stopped_at is not None)
    before = job.completion_tokens
    with server.http() as http:
        meanwhile = http.post("/v1/completions", json={"model": model, "prompt": "meanwhile", "max_tokens": 8})
    assert meanwhile.json()["usage"]["completion_tokens"] == 8, meanwhile.text
    return job.completion_tokens == before


def sse_events(response: httpx.Response) -> list[tuple[str, str]]:
    """(event name, data) pairs of an SSE body; the name is "message" when the event has none."""
    events, name, data = [], "message", []
    for line in response.iter_lines():
        if not line:
            if data:
                events.append((name, "\n".join(data)))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    return events


def test_reload_applies_timeouts_live(server, slow_model, fast_model):
    # The streamed request below runs on the fast model: its first tokens come before the deadline
    # even on a busy machine, where the slow model's may not (and the answer is then a plain 504).
    warm_up(server, fast_model)
    # Before the reload: a request that will outlive the new deadline, and must not be cut by it.
    long_running = {}

    def before_reload():
        with server.http() as http:
            long_running["response"] = http.post("/v1/chat/completions", json=chat_body(slow_model, max_tokens=40))

    thread = threading.Thread(target=before_reload)
    thread.start()
    assert wait_until(lambda: server.engine.status().active_jobs == 1)

    write_config("[timeouts]\nchat = 1\n")
    answer = reload(server)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"applied": ["timeouts.chat"], "restart_needed": [], "error": None}
    assert server.daemon.settings.timeouts.chat == 1

    # Non-streaming: a 504 problem after about a second; the job left the batch at the deadline.
    # (How soon after the deadline, for the answer and for the job, is a figure of
    # benchmarks/bench_deadlines.py; here: not before it, and before the work was done.)
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as caught:
        server.openai().chat.completions.create(**chat_body(slow_model))
    elapsed = time.monotonic() - started
    error = caught.value
    assert error.status_code == 504 and error.code == "timeout"
    problem = error.response.json()
    assert error.response.headers["content-type"] == "application/problem+json"
    assert problem["type"] == "urn:mlx-manager:problem:timeout" and problem["timeout_seconds"] == 1
    assert elapsed > 0.9
    job = server.engine.job(problem["request_id"])
    assert job.cancelled and wait_until(lambda: job.stopped_at is not None)
    assert job.completion_tokens < LONG and tokens_stay(server, job, slow_model)

    # Streaming: the tokens so far, then an `error` event holding the same problem, then the end.
    with server.http() as http, http.stream("POST", CHAT, json=chat_body(fast_model, stream=True)) as response:
        assert response.status_code == 200
        events = sse_events(response)
    names = [name for name, _ in events]
    assert names[0] == "message" and names[-1] == "error" and names.count("error") == 1
    assert "[DONE]" not in [data for _, data in events]
    problem = json.loads(events[-1][1])
    assert problem["type"] == "urn:mlx-manager:problem:timeout" and problem["status"] == 504
    assert problem["timeout_seconds"] == 1 and problem["request_id"] == response.headers["x-request-id"]
    job = server.engine.job(problem["request_id"])
    assert job.cancelled and job.completion_tokens < LONG and tokens_stay(server, job, fast_model)

    # The request from before the reload ran to its end, beside the two cut ones.
    thread.join(120)
    completion = long_running["response"].json()
    assert long_running["response"].status_code == 200
    long_job = server.engine.job(completion["id"].removeprefix("chatcmpl-"))
    assert completion["usage"]["completion_tokens"] == long_job.completion_tokens
    assert completion["choices"][0]["finish_reason"] in ("length", "stop")

    # The audit hook saw each outcome as it was.
    # An outcome is emitted once its response has gone out: it may lag the client a little.
    assert wait_until(lambda: len([o for o in server.outcomes if o.endpoint == CHAT]) == 3)
    outcomes = {o.request_id: o for o in server.outcomes if o.endpoint == CHAT}
    assert [o.error_type for o in outcomes.values()].count("timeout") == 2
    assert [o.status for o in outcomes.values()].count("timeout") == 2
    done = outcomes[long_job.request.request_id]
    assert (done.status, done.http_status, done.model) == ("success", 200, slow_model)
    assert done.completion_tokens == long_job.completion_tokens and done.prompt_tokens == long_job.prompt_tokens
    assert 0 < done.time_to_first_token_ms < done.duration_ms


def test_openai_client_sees_the_stream_error(server, fast_model):
    warm_up(server, fast_model)  # its first tokens come before the deadline, even on a busy machine
    write_config("[timeouts]\nchat = 1\n")
    assert reload(server).status_code == 200
    stream = server.openai().chat.completions.create(**chat_body(fast_model, stream=True))
    with pytest.raises(openai.APIError) as caught:
        for _ in stream:
            pass
    assert "timeouts.chat = 1 seconds" in caught.value.message
    assert caught.value.code == "timeout"


def test_invalid_file_at_reload_keeps_the_old_timeouts(server, slow_model):
    write_config("[timeouts]\nchat = 1\n")
    assert reload(server).status_code == 200
    write_config("[timeouts]\nchat = -5\n")
    answer = reload(server)
    problem = assert_problem(answer, 422, "invalid_settings")
    assert "timeouts.chat" in problem["detail"] and "config.toml" in problem["detail"]
    assert server.daemon.settings.timeouts.chat == 1
    write_config("[timeouts\nchat = 5\n")  # a TOML syntax error
    problem = assert_problem(reload(server), 422, "invalid_settings")
    assert "TOML" in problem["detail"]
    # The old deadline still holds.
    with pytest.raises(openai.InternalServerError) as caught:
        server.openai().chat.completions.create(**chat_body(slow_model))
    assert caught.value.status_code == 504


def test_reload_reports_keys_that_need_a_restart(server):
    write_config("[server]\nport = 9\nqueue_limit = 7\n")
    answer = reload(server).json()
    assert answer == {"applied": ["server.queue_limit"], "restart_needed": ["server.port"], "error": None}
    assert server.engine.config.queue_limit == 7
    assert reload(server).json()["applied"] == []  # nothing changed since


def test_reload_needs_the_admin_token(server):
    for token in ("wrong", "Bearer"):
        response = reload(server, token=token)
        assert_problem(response, 401, "unauthorized")
        assert response.headers["www-authenticate"].startswith("Bearer")
    with server.http() as http:
        assert_problem(http.post("/admin/reload"), 401, "unauthorized")
    # An outcome is emitted once its response has gone out: the last one may lag the client.
    assert wait_until(lambda: len([o for o in server.outcomes if o.endpoint == "/admin/reload"]) == 3)
    refused = [o for o in server.outcomes if o.endpoint == "/admin/reload"]
    assert {(o.status, o.error_type, o.http_status) for o in refused} == {("error", "unauthorized", 401)}


def test_reload_refuses_remote_clients(tmp_path):
    # A non-loopback peer cannot be made on this machine's real sockets: the ASGI transport says
    # where the request comes from. The app is the real one.
    app = create_app(Settings())
    transport = httpx.ASGITransport(app=app, client=("192.0.2.10", 40000))

    async def call():
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            return await client.post("/admin/reload", headers={"Authorization": f"Bearer {admin_token()}"})

    response = asyncio.run(call())
    assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden"


def test_stream_disconnect_cancels_the_job(server, slow_model):
    with server.http() as http, http.stream("POST", CHAT, json=chat_body(slow_model, stream=True)) as response:
        request_id = response.headers["x-request-id"]
        lines = response.iter_lines()
        for _ in range(3):  # a few tokens in
            next(line for line in lines if line.startswith("data:"))
    # Leaving the block closed the connection mid-generation.
    job = server.engine.job(request_id)
    assert wait_until(lambda: job.cancelled and job.stopped_at is not None)
    assert job.completion_tokens < LONG and tokens_stay(server, job, slow_model)
    assert wait_until(lambda: server.engine.status().active_jobs == 0)
    assert wait_until(lambda: any(o.request_id == request_id for o in server.outcomes))
    outcome = next(o for o in server.outcomes if o.request_id == request_id)
    assert outcome.status == "cancelled" and outcome.model == slow_model


def test_disconnect_while_waiting_for_a_whole_answer_cancels_the_job(server, slow_model):
    # The client gives up waiting after a second and hangs up.
    with pytest.raises(httpx.ReadTimeout), server.http(timeout=httpx.Timeout(60, read=1.0)) as http:
        http.post("/v1/chat/completions", json=chat_body(slow_model), headers={"X-Request-ID": "gone-1"})
    job = server.engine.job("gone-1")
    assert wait_until(lambda: job.cancelled and job.stopped_at is not None)
    assert tokens_stay(server, job, slow_model)
    assert wait_until(lambda: any(o.request_id == "gone-1" for o in server.outcomes))
    assert next(o for o in server.outcomes if o.request_id == "gone-1").status == "cancelled"


def test_queue_full_is_503_and_a_queued_job_times_out(slow_model):
    settings = settings_with(server={"max_batch_size": 1, "queue_limit": 1}, timeouts={"completions": 5})
    live = make_server(slow_model, settings)

    def hold_the_slot() -> None:  # for the whole test: it is cut off when the server stops
        with contextlib.suppress(httpx.HTTPError), live.http(timeout=120) as http:
            http.post(CHAT, json=chat_body(slow_model))

    busy = threading.Thread(target=hold_the_slot)
    try:
        busy.start()
        assert wait_until(lambda: (s := live.engine.status()).active_jobs == 1 and s.queue_depth == 0)
        queued = {}

        def wait_in_queue():
            with live.http(timeout=120) as http:
                body = {"model": slow_model, "prompt": "queued", "max_tokens": 5}
                queued["response"] = http.post("/v1/completions", json=body)

        waiter = threading.Thread(target=wait_in_queue)
        waiter.start()
        assert wait_until(lambda: live.engine.status().queue_depth == 1)
        with pytest.raises(openai.InternalServerError) as caught:
            live.openai().completions.create(model=slow_model, prompt="one too many", max_tokens=5)
        assert caught.value.status_code == 503 and caught.value.code == "overloaded"
        assert int(caught.value.response.headers["retry-after"]) >= 1
        # The queued one never got a batch slot before its 5 s deadline: 504, and it never ran.
        waiter.join(120)
        problem = assert_problem(queued["response"], 504, "timeout")
        job = live.engine.job(problem["request_id"])
        assert job.cancelled and job.completion_tokens == 0
    finally:
        live.stop()
        busy.join(120)


def test_ready_says_loading_until_the_preload_is_in(slow_model):
    engine = RecordingEngine(EngineConfig(preload=[slow_model]))
    # A warm model loads in a blink; holding the inference thread at its start stands in for
    # a big one, so the test sees the loading phase every time.
    gate, run = threading.Event(), engine._worker.run
    engine._worker.run = lambda: (gate.wait(30), run())
    with LiveServer(create_app(Settings(), engine=engine)) as live, live.http() as http:
        problem = assert_problem(http.get("/ready"), 503, "not_ready")
        assert problem["reason"] == "loading" and problem["loading"] == slow_model
        assert http.get("/health").status_code == 200
        gate.set()
        assert wait_until(lambda: http.get("/ready").status_code == 200, timeout=120)
        assert slow_model in http.get("/ready").json()["loaded"]
        assert http.get("/health").status_code == 200
