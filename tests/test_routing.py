"""Routing to upstream backends, with real servers on loopback and no HTTP mocks.

The upstreams are real daemons (the real app on a real uvicorn server): as an `openai` backend
through /v1/chat/completions, and as an `anthropic` backend through our own /v1/messages. The
official anthropic SDK speaks to that endpoint (tests/test_messages.py), so it stands in
faithfully for Anthropic's cloud API, which cannot be reached from here. mlx_lm.server, a foreign
implementation, and daemons in their own processes are in tests/test_routing_processes.py.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import anthropic
import httpx
import openai
import pytest

from mlx_manager.auth import key_digest
from mlx_manager.daemon.app import create_app
from mlx_manager.engine.config import EngineConfig
from tests.daemon_server import LiveServer, RecordingEngine, serving, settings_with, wait_until
from tests.scripted_model import HERMES_TOOL, QUESTION, WEATHER_RESULT, WEATHER_TOOL
from tests.test_daemon_audit import row_for
from tests.test_daemon_timeouts import sse_events

HELLO = [{"role": "user", "content": "hello there"}]
TOOL = {
    "name": "get_weather",
    "description": WEATHER_TOOL["function"]["description"],
    "input_schema": WEATHER_TOOL["function"]["parameters"],
}
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, fast_model, slow_model, hermes_tool_model):
    """The daemon requests are routed to (its audit log in its own home)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLX_MANAGER_HOME", str(tmp_path_factory.mktemp("upstream-home")))
        with serving(fast_model, slow_model, hermes_tool_model, max_loaded=4) as live:
            yield live


@contextlib.contextmanager
def router(
    tmp_path,
    backends: list[dict],
    routes: list[dict],
    groups: list[dict] | None = None,
    engine: EngineConfig | None = None,
    **sections: Any,
) -> Iterator[LiveServer]:
    """A daemon that routes: its own engine (nothing preloaded, unless `engine` says), its own audit log."""
    routing = {"backends": backends, "routes": routes, "groups": groups or [], **sections.pop("routing", {})}
    settings = settings_with(routing=routing, audit={"path": str(tmp_path / "router-audit.db")}, **sections)
    # The tests' models live in temporary folders: requests may load any of them by path.
    config = engine or EngineConfig(max_loaded=2, allow_any_path=True)
    with LiveServer(create_app(settings, engine=RecordingEngine(config))) as live:
        yield live


def openai_backend(server: LiveServer, name: str = "up", **entry: Any) -> dict:
    return {"name": name, "type": "openai", "base_url": server.url + "/v1", **entry}


def anthropic_backend(server: LiveServer, name: str = "claude", **entry: Any) -> dict:
    return {"name": name, "type": "anthropic", "base_url": server.url, **entry}


def anthropic_client(server: LiveServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


def chat_stream(client: openai.OpenAI, **body: Any) -> tuple[str, str, list[Any], Any]:
    """(text, reasoning, tool call deltas, usage) of a streamed chat completion."""
    text, reasoning, calls, usage = [], [], [], None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **body):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            reasoning.append(getattr(choice.delta, "reasoning_content", None) or "")
            calls += choice.delta.tool_calls or []
    return "".join(text), "".join(reasoning), calls, usage


# -- routes ----------------------------------------------------------------------------------


def test_a_route_sends_matching_models_upstream_and_the_rest_stays_local(tmp_path, upstream, fast_model):
    routes = [{"model": "remote-*", "to": f"up:{fast_model}"}]
    with router(tmp_path, [openai_backend(upstream)], routes) as front:
        body = {"messages": HELLO, "max_tokens": 12, **GREEDY}
        routed = front.openai().chat.completions.with_raw_response.create(model="remote-fast", **body)
        local = front.openai().chat.completions.with_raw_response.create(model=fast_model, **body)
        direct = upstream.openai().chat.completions.create(model=fast_model, **body)

        assert routed.headers["x-mlx-manager-backend"] == "up"
        assert local.headers["x-mlx-manager-backend"] == "local"
        answer = routed.parse()
        assert answer.model == "remote-fast"  # the client's name for it, not the upstream's
        assert answer.id == f"chatcmpl-{routed.headers['x-request-id']}"  # our request id
        assert (
            answer.choices[0].message.content
            == direct.choices[0].message.content
            == local.parse().choices[0].message.content
        )
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (
            direct.usage.prompt_tokens,
            direct.usage.completion_tokens,
        )
        assert front.engine.jobs and all(job.request.model == fast_model for job in front.engine.jobs)
        assert len(front.engine.jobs) == 1  # the routed request never reached the local engine

        row = row_for(front, routed.headers["x-request-id"])
        assert (row["backend"], row["backend_type"], row["model"], row["status"]) == (
            "up",
            "openai",
            "remote-fast",
            "success",
        )
        assert (row["upstream_prompt_tokens"], row["upstream_completion_tokens"]) == (
            direct.usage.prompt_tokens,
            direct.usage.completion_tokens,
        )
        assert (row["prompt_tokens"], row["completion_tokens"]) == (row["upstream_prompt_tokens"], 12)
        local_row = row_for(front, local.headers["x-request-id"])
        assert (local_row["backend"], local_row["backend_type"]) == ("local", "local")
        assert local_row["upstream_prompt_tokens"] is None
        # The upstream's own audit row carries the same request id: one id across both hops.
        upstream_row = row_for(upstream, routed.headers["x-request-id"])
        assert upstream_row["model"] == fast_model and upstream_row["backend"] == "local"


def test_the_first_matching_route_wins_and_names_the_upstream_model(tmp_path, upstream, fast_model, slow_model):
    routes = [{"model": "pick-slow", "to": f"up:{slow_model}"}, {"model": "pick-*", "to": f"up:{fast_model}"}]
    with router(tmp_path, [openai_backend(upstream)], routes) as front:
        for name in ("pick-slow", "pick-fast"):
            response = front.openai().completions.with_raw_response.create(model=name, prompt="x", max_tokens=2)
            assert response.headers["x-mlx-manager-backend"] == "up"
            upstream_row = row_for(upstream, response.headers["x-request-id"])
            assert upstream_row["model"] == (slow_model if name == "pick-slow" else fast_model)
            assert upstream_row["endpoint"] == "/v1/completions"


def test_requests_to_a_backend_reuse_one_kept_alive_connection(tmp_path, upstream, fast_model):
    """A connection is only kept for the next request once its response was read to the end: one
    left after the answer's last event is closed, and the next request waits for a new one."""
    with router(tmp_path, [openai_backend(upstream)], [{"model": "remote", "to": f"up:{fast_model}"}]) as front:
        backend = front.daemon.router.backends["up"]
        ports: set[int] = set()
        for stream in (True, False, True, False):
            if stream:
                chat_stream(front.openai(), model="remote", messages=HELLO, max_tokens=3)
            else:
                front.openai().chat.completions.create(model="remote", messages=HELLO, max_tokens=3)
            assert wait_until(lambda: backend.outstanding == 0)  # its end read (or given up)
            # The upstream's open connections from this router (the test's own clients are not open now).
            ports |= {c.client[1] for c in upstream.server.server_state.connections if c.client}
        assert len(ports) == 1, ports


# -- translation -----------------------------------------------------------------------------


def test_a_chat_stream_to_an_openai_backend_is_relayed_with_our_id_and_model_name(tmp_path, upstream, fast_model):
    """Same dialect: the upstream's chunks pass through (routing/relay.py), each with our request id
    and the client's model name; the usage chunk comes last and only when asked for; the audit row
    has the upstream's counts."""
    direct, _, _, usage = chat_stream(upstream.openai(), model=fast_model, messages=HELLO, max_tokens=12, **GREEDY)
    with router(tmp_path, [openai_backend(upstream)], [{"model": "remote", "to": f"up:{fast_model}"}]) as front:
        body = {"model": "remote", "messages": HELLO, "max_tokens": 12, "stream": True, **GREEDY}
        for include_usage in (True, False):
            with front.http() as http:
                response = http.post(
                    "/v1/chat/completions", json={**body, "stream_options": {"include_usage": include_usage}}
                )
            request_id = response.headers["x-request-id"]
            assert response.headers["x-mlx-manager-backend"] == "up"
            events = sse_events(response)
            assert events[-1] == ("message", "[DONE]")
            chunks = [json.loads(data) for _, data in events[:-1]]
            assert {(c["id"], c["model"]) for c in chunks} == {(f"chatcmpl-{request_id}", "remote")}
            answer = [c["choices"][0] for c in chunks if c["choices"]]
            assert "".join(choice["delta"].get("content") or "" for choice in answer) == direct
            assert [choice["finish_reason"] for choice in answer if choice["finish_reason"]] == ["length"]
            counted = [c for c in chunks if c.get("usage")]
            if include_usage:
                assert counted == [chunks[-1]] and chunks[-1]["choices"] == []
                assert (counted[0]["usage"]["prompt_tokens"], counted[0]["usage"]["completion_tokens"]) == (
                    usage.prompt_tokens,
                    12,
                )
            else:
                assert counted == []
            row = row_for(front, request_id)
            figures = (row["status"], row["backend"], row["completion_tokens"], row["tool_calls"])
            assert figures == ("success", "up", 12, 0)
            assert (row["upstream_prompt_tokens"], row["upstream_completion_tokens"]) == (usage.prompt_tokens, 12)
            assert row["time_to_first_token_ms"] is not None


def test_a_messages_stream_to_an_anthropic_backend_is_relayed_with_our_id_and_model_name(
    tmp_path, upstream, fast_model
):
    """Same dialect: the upstream's events pass through (routing/message_relay.py), its
    message_start with our message id and the client's model name; stop reason and usage are the
    upstream's; the audit row has its counts and the upstream's row our request id."""
    with anthropic_client(upstream).messages.stream(
        model=fast_model, max_tokens=12, messages=HELLO, extra_body=GREEDY
    ) as direct:
        expected = "".join(direct.text_stream)
        theirs = direct.get_final_message()
    with router(
        tmp_path, [anthropic_backend(upstream)], [{"model": "claude-*", "to": f"claude:{fast_model}"}]
    ) as front:
        with anthropic_client(front).messages.stream(
            model="claude-x", max_tokens=12, messages=HELLO, extra_body=GREEDY
        ) as stream:
            text = "".join(stream.text_stream)
            message = stream.get_final_message()
            response = stream.response
        request_id = response.headers["x-request-id"]
        assert response.headers["x-mlx-manager-backend"] == "claude"
        assert text == expected and text
        assert (message.id, message.model, message.stop_reason) == (f"msg_{request_id}", "claude-x", "max_tokens")
        prompt = message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)
        assert prompt == theirs.usage.input_tokens + (theirs.usage.cache_read_input_tokens or 0)
        assert message.usage.output_tokens == theirs.usage.output_tokens == 12
        row = row_for(front, request_id)
        figures = (row["status"], row["backend"], row["backend_type"], row["model"], row["completion_tokens"])
        assert figures == ("success", "claude", "anthropic", "claude-x", 12)
        assert (row["upstream_prompt_tokens"], row["upstream_completion_tokens"]) == (prompt, 12)
        assert row["tool_calls"] == 0 and row["time_to_first_token_ms"] is not None
        assert row_for(upstream, request_id)["endpoint"] == "/v1/messages"

        # Not streamed: the upstream's stream is held until whole (another backend could still take
        # over), then answered as one message.
        whole = anthropic_client(front).messages.with_raw_response.create(
            model="claude-x", max_tokens=12, messages=HELLO, extra_body=GREEDY
        )
        message = whole.parse()
        assert whole.headers["x-mlx-manager-backend"] == "claude"
        assert (message.id, message.model, message.stop_reason) == (
            f"msg_{whole.headers['x-request-id']}",
            "claude-x",
            "max_tokens",
        )
        assert [block.text for block in message.content] == [expected] and message.usage.output_tokens == 12


def test_a_relayed_messages_stream_keeps_thinking_and_the_tool_call_and_counts_it(
    tmp_path, upstream, hermes_tool_model
):
    """A tool call's input streams as the upstream sent it; thinking the client asks to have omitted
    comes as empty blocks (that stream is translated, as the upstream is not asked to omit it)."""
    routes = [{"model": "claude-tools", "to": f"claude:{hermes_tool_model}"}]
    with router(tmp_path, [anthropic_backend(upstream)], routes) as front:
        client = anthropic_client(front)
        question = [{"role": "user", "content": QUESTION}]
        for display in ("summarized", "omitted"):
            with client.messages.stream(
                model="claude-tools",
                max_tokens=300,
                messages=question,
                tools=[TOOL],
                extra_body={"thinking": {"type": "adaptive", "display": display}},
            ) as stream:
                message = stream.get_final_message()
                response = stream.response
            assert message.stop_reason == "tool_use" and message.model == "claude-tools"
            calls = [(b.name, b.input) for b in message.content if b.type == "tool_use"]
            assert calls == [(c.name, c.arguments) for c in HERMES_TOOL.calls]
            thinking = [b.thinking for b in message.content if b.type == "thinking"]
            assert thinking == [HERMES_TOOL.thinking if display == "summarized" else ""]
            assert row_for(front, response.headers["x-request-id"])["tool_calls"] == 1


def test_chat_streamed_through_an_anthropic_backend_keeps_every_token_and_the_usage(tmp_path, upstream, fast_model):
    routes = [{"model": "claude-*", "to": f"claude:{fast_model}"}]
    with router(tmp_path, [anthropic_backend(upstream)], routes) as front:
        text, _, _, usage = chat_stream(front.openai(), model="claude-x", messages=HELLO, max_tokens=40, **GREEDY)
        with anthropic_client(upstream).messages.stream(
            model=fast_model, max_tokens=40, messages=HELLO, extra_body=GREEDY
        ) as direct:
            expected = "".join(direct.text_stream)
            message = direct.get_final_message()
        assert text == expected and text
        assert usage.completion_tokens == message.usage.output_tokens == 40
        assert usage.prompt_tokens == message.usage.input_tokens + message.usage.cache_read_input_tokens
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

        whole = front.openai().chat.completions.create(model="claude-x", messages=HELLO, max_tokens=40, **GREEDY)
        assert whole.choices[0].message.content == expected
        assert whole.choices[0].finish_reason == "length"  # Anthropic's max_tokens


def test_messages_streamed_through_an_openai_backend_keep_every_token_and_the_usage(tmp_path, upstream, fast_model):
    with router(tmp_path, [openai_backend(upstream)], [{"model": "gpt-*", "to": f"up:{fast_model}"}]) as front:
        with anthropic_client(front).messages.stream(
            model="gpt-x", max_tokens=40, messages=HELLO, extra_body=GREEDY
        ) as stream:
            text = "".join(stream.text_stream)
            message = stream.get_final_message()
            response = stream.response
        direct, _, _, usage = chat_stream(upstream.openai(), model=fast_model, messages=HELLO, max_tokens=40, **GREEDY)
        assert text == direct and text
        assert response.headers["x-mlx-manager-backend"] == "up"
        assert message.model == "gpt-x" and message.stop_reason == "max_tokens"
        assert message.usage.output_tokens == usage.completion_tokens == 40
        assert message.usage.input_tokens + message.usage.cache_read_input_tokens == usage.prompt_tokens

        whole = anthropic_client(front).messages.create(model="gpt-x", max_tokens=40, messages=HELLO, extra_body=GREEDY)
        assert whole.content[0].text == direct


def test_tool_calls_cross_from_chat_to_an_anthropic_backend_and_back(tmp_path, upstream, hermes_tool_model):
    routes = [{"model": "claude-tools", "to": f"claude:{hermes_tool_model}"}]
    with router(tmp_path, [anthropic_backend(upstream)], routes) as front:
        client = front.openai()
        question = [{"role": "user", "content": QUESTION}]
        first = client.chat.completions.create(
            model="claude-tools", messages=question, tools=[WEATHER_TOOL], max_tokens=300
        )
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
            (c.name, c.arguments) for c in HERMES_TOOL.calls
        ]
        assert choice.message.reasoning_content == HERMES_TOOL.thinking

        # Streamed, the call arrives as OpenAI streams one: id and name, then the arguments.
        _, reasoning, deltas, _ = chat_stream(
            client, model="claude-tools", messages=question, tools=[WEATHER_TOOL], max_tokens=300
        )
        assert reasoning == HERMES_TOOL.thinking
        assert deltas[0].id and deltas[0].function.name == "get_weather"
        assert json.loads("".join(d.function.arguments or "" for d in deltas)) == HERMES_TOOL.calls[0].arguments

        call = choice.message.tool_calls[0]
        history = [
            *question,
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": WEATHER_RESULT},
        ]
        final = client.chat.completions.create(
            model="claude-tools", messages=history, tools=[WEATHER_TOOL], max_tokens=300
        )
        assert final.choices[0].message.content == HERMES_TOOL.answer
        assert final.choices[0].finish_reason == "stop"


def test_a_relayed_chat_stream_keeps_the_tool_call_and_counts_it(tmp_path, upstream, hermes_tool_model):
    routes = [{"model": "gpt-tools", "to": f"up:{hermes_tool_model}"}]
    with router(tmp_path, [openai_backend(upstream)], routes) as front:
        body = {"model": "gpt-tools", "messages": [{"role": "user", "content": QUESTION}], "tools": [WEATHER_TOOL]}
        with front.http() as http:
            response = http.post("/v1/chat/completions", json={**body, "max_tokens": 300, "stream": True})
        chunks = [json.loads(data) for _, data in sse_events(response)[:-1]]
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        assert "".join(d.get("reasoning_content") or "" for d in deltas) == HERMES_TOOL.thinking
        calls = [call for d in deltas for call in d.get("tool_calls") or ()]
        assert calls[0]["id"] and calls[0]["function"]["name"] == "get_weather"
        arguments = "".join(call["function"].get("arguments") or "" for call in calls)
        assert json.loads(arguments) == HERMES_TOOL.calls[0].arguments
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
        assert {c["model"] for c in chunks} == {"gpt-tools"}
        assert row_for(front, response.headers["x-request-id"])["tool_calls"] == 1


def test_tool_use_crosses_from_messages_to_an_openai_backend_and_back(tmp_path, upstream, hermes_tool_model):
    routes = [{"model": "gpt-tools", "to": f"up:{hermes_tool_model}"}]
    with router(tmp_path, [openai_backend(upstream)], routes) as front:
        client = anthropic_client(front)
        question = [{"role": "user", "content": QUESTION}]
        first = client.messages.create(model="gpt-tools", max_tokens=300, messages=question, tools=[TOOL])
        assert first.stop_reason == "tool_use"
        calls = [b for b in first.content if b.type == "tool_use"]
        assert [(c.name, c.input) for c in calls] == [(c.name, c.arguments) for c in HERMES_TOOL.calls]
        assert [b.thinking for b in first.content if b.type == "thinking"] == [HERMES_TOOL.thinking]

        results = [{"type": "tool_result", "tool_use_id": c.id, "content": WEATHER_RESULT} for c in calls]
        history = [*question, {"role": "assistant", "content": first.content}, {"role": "user", "content": results}]
        with client.messages.stream(model="gpt-tools", max_tokens=300, messages=history, tools=[TOOL]) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert text == HERMES_TOOL.answer and final.stop_reason == "end_turn"


def test_a_field_the_backends_dialect_cannot_say_is_a_400_that_names_it(tmp_path, upstream, fast_model):
    routes = [{"model": "claude-*", "to": f"claude:{fast_model}"}]
    with router(tmp_path, [anthropic_backend(upstream)], routes) as front:
        with front.http() as http:
            response = http.post(
                "/v1/chat/completions", json={"model": "claude-x", "messages": HELLO, "max_tokens": 4, "seed": 7}
            )
            completion = http.post("/v1/completions", json={"model": "claude-x", "prompt": "x", "max_tokens": 4})
    body = response.json()
    assert response.status_code == 400 and body["error"]["param"] == "seed" and body["backend"] == "claude"
    assert "seed" in body["detail"] and response.headers["x-mlx-manager-backend"] == "claude"
    assert completion.status_code == 400 and completion.json()["error"]["param"] == "prompt"


def test_several_choices_of_a_routed_model_are_a_400_that_names_n(tmp_path, upstream, fast_model):
    with router(tmp_path, [openai_backend(upstream)], [{"model": "remote", "to": f"up:{fast_model}"}]) as front:
        with front.http() as http:
            response = http.post(
                "/v1/chat/completions", json={"model": "remote", "messages": HELLO, "max_tokens": 2, "n": 2}
            )
    body = response.json()
    assert response.status_code == 400 and body["error"]["code"] == "not_supported"
    assert body["error"]["param"] == "n" and body["backend"] == "up"


# -- fallback --------------------------------------------------------------------------------


def test_a_local_model_that_cannot_load_falls_back_upstream(tmp_path, upstream, fast_model):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama"}))  # no weights: cannot load
    routes = [{"model": "team-model", "to": f"local:{broken}", "fallback": [f"up:{fast_model}"]}]
    with router(tmp_path, [openai_backend(upstream)], routes) as front:
        for stream in (False, True):
            with front.http() as http:
                response = http.post(
                    "/v1/chat/completions",
                    json={"model": "team-model", "messages": HELLO, "max_tokens": 5, "stream": stream},
                )
            assert response.status_code == 200, response.text
            assert response.headers["x-mlx-manager-backend"] == "up"
            row = row_for(front, response.headers["x-request-id"])
            assert (row["backend"], row["status"], row["completion_tokens"]) == ("up", "success", 5)
        metrics = front.http().get("/metrics").text
        assert 'mlx_manager_backend_failures_total{backend="local",error="model_load_failed"} 2.0' in metrics
        assert 'mlx_manager_backend_requests_total{backend="up",backend_type="openai",status="success"} 2.0' in metrics


def test_an_upstream_429_falls_back_and_the_backend_cools_down(tmp_path, fast_model):
    """The rate-limited daemon is real: server.rate_limit = 1 request a minute answers the second with 429."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLX_MANAGER_HOME", str(tmp_path / "limited-home"))
        (tmp_path / "limited-home").mkdir()
        limited_settings = settings_with(server={"rate_limit": 1})
        engine = RecordingEngine(EngineConfig(preload=[fast_model], allow_any_path=True))
        with LiveServer(create_app(limited_settings, engine=engine)) as limited, serving(fast_model) as spare:
            assert wait_until(lambda: fast_model in engine.status().loaded, timeout=60)
            backends = [openai_backend(limited, "limited"), openai_backend(spare, "spare")]
            routes = [{"model": "m", "to": f"limited:{fast_model}", "fallback": [f"spare:{fast_model}"]}]
            with router(tmp_path, backends, routes) as front:
                served = []
                for _ in range(3):
                    response = front.openai().completions.with_raw_response.create(model="m", prompt="x", max_tokens=2)
                    served.append(response.headers["x-mlx-manager-backend"])
                assert served == ["limited", "spare", "spare"]  # 429, then skipped while it cools down
                assert len(limited.engine.jobs) == 1
                metrics = front.http().get("/metrics").text
                assert 'backend_failures_total{backend="limited",error="upstream_rate_limited"} 1.0' in metrics
                assert 'mlx_manager_backend_up{backend="limited",backend_type="openai"} 0.0' in metrics


def test_an_upstream_503_without_a_fallback_keeps_its_status_and_with_one_falls_back(tmp_path, upstream, fast_model):
    """The 503 is real: a daemon that is shutting down (draining) answers every request with it."""
    stopping_settings = settings_with(audit={"path": str(tmp_path / "stopping-audit.db")})
    stopping = LiveServer(create_app(stopping_settings, engine=RecordingEngine(EngineConfig(allow_any_path=True))))
    with stopping:
        stopping.daemon.draining = True
        backends = [openai_backend(stopping, "stopping"), openai_backend(upstream)]
        routes = [
            {"model": "only", "to": f"stopping:{fast_model}"},
            {"model": "m", "to": f"stopping:{fast_model}", "fallback": [f"up:{fast_model}"]},
        ]
        with router(tmp_path, backends, routes) as front, front.http() as http:
            alone = http.post("/v1/chat/completions", json={"model": "only", "messages": HELLO, "max_tokens": 3})
            body = alone.json()
            assert alone.status_code == 503 and body["error"]["code"] == "upstream_unavailable"
            assert (body["backend"], body["upstream_status"], body["upstream_type"]) == ("stopping", 503, "draining")
            assert body["request_id"] == alone.headers["x-request-id"] and int(alone.headers["retry-after"]) >= 1

            stopping.daemon.draining = False  # it would answer now, but it cools down first: not asked
            moved = http.post("/v1/chat/completions", json={"model": "m", "messages": HELLO, "max_tokens": 3})
            assert moved.status_code == 200 and moved.headers["x-mlx-manager-backend"] == "up"
            metrics = http.get("/metrics").text
            assert 'mlx_manager_backend_failures_total{backend="stopping",error="upstream_unavailable"} 1.0' in metrics
            assert 'mlx_manager_backend_up{backend="stopping",backend_type="openai"} 0.0' in metrics
        assert stopping.engine.jobs == []


def test_a_backend_that_was_down_is_back_after_its_cooldown_and_a_health_check(tmp_path, fast_model):
    late_settings = settings_with(audit={"path": str(tmp_path / "late-audit.db")})
    late = LiveServer(create_app(late_settings, engine=RecordingEngine(EngineConfig(allow_any_path=True))))
    # Its port is bound but nothing listens on it yet: a connection to it is refused.
    with serving(fast_model) as spare:
        backends = [openai_backend(late, "late"), openai_backend(spare, "spare")]
        routes = [{"model": "m", "to": f"late:{fast_model}", "fallback": [f"spare:{fast_model}"]}]
        with router(tmp_path, backends, routes, routing={"cooldown": 1}) as front:
            up = 'mlx_manager_backend_up{backend="late",backend_type="openai"}'
            first = front.openai().completions.with_raw_response.create(model="m", prompt="x", max_tokens=2)
            assert first.headers["x-mlx-manager-backend"] == "spare"
            assert f"{up} 0.0" in front.http().get("/metrics").text
            with late:  # it starts listening: after the cooldown, a health check puts it back
                assert wait_until(lambda: f"{up} 1.0" in front.http().get("/metrics").text, timeout=60)
                again = front.openai().completions.with_raw_response.create(model="m", prompt="x", max_tokens=2)
                assert again.headers["x-mlx-manager-backend"] == "late"
                assert [job.request.request_id for job in late.engine.jobs] == [again.headers["x-request-id"]]
            metrics = front.http().get("/metrics").text
            assert 'mlx_manager_backend_failures_total{backend="late",error="upstream_unreachable"} 1.0' in metrics


def test_api_keys_and_rate_limits_apply_before_routing(tmp_path, upstream, fast_model):
    key = "sk-router-" + "k" * 32
    keys = [{"name": "alice", "sha256": key_digest(key), "created": datetime(2025, 1, 1, tzinfo=UTC)}]
    routes = [{"model": "remote", "to": f"up:{fast_model}"}]
    jobs_before = len(upstream.engine.jobs)
    with router(tmp_path, [openai_backend(upstream)], routes, auth={"keys": keys}, server={"rate_limit": 1}) as front:
        body = {"model": "remote", "messages": HELLO, "max_tokens": 2}
        with front.http() as http:
            anonymous = http.post("/v1/chat/completions", json=body)
            served = http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            limited = http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert anonymous.status_code == 401
    assert served.status_code == 200 and served.headers["x-mlx-manager-backend"] == "up"
    assert limited.status_code == 429
    assert len(upstream.engine.jobs) == jobs_before + 1  # only the request let through went upstream
    assert row_for(front, served.headers["x-request-id"])["api_key"] == "alice"


def test_an_unreachable_backend_with_no_fallback_is_a_problem_with_our_request_id(tmp_path, fast_model):
    with router(
        tmp_path,
        [{"name": "gone", "type": "openai", "base_url": "http://127.0.0.1:9/v1"}],
        [{"model": "far", "to": "gone"}],
    ) as front:
        with front.http() as http:
            first = http.post("/v1/chat/completions", json={"model": "far", "messages": HELLO})
            second = http.post("/v1/chat/completions", json={"model": "far", "messages": HELLO})
    body = first.json()
    assert first.status_code == 502 and body["error"]["code"] == "upstream_unreachable"
    assert body["backend"] == "gone" and body["request_id"] == first.headers["x-request-id"]
    # While it cools down it is not even tried: 503 at once, with when to come back.
    assert second.status_code == 503 and second.json()["error"]["code"] == "upstream_unavailable"
    assert int(second.headers["retry-after"]) >= 1


def test_an_upstream_refusal_keeps_its_status_and_type_but_not_its_text(tmp_path, upstream):
    with router(tmp_path, [openai_backend(upstream)], [{"model": "*", "to": "up"}]) as front:
        with front.http() as http:
            response = http.post("/v1/chat/completions", json={"model": "no-such-model-PURPLE", "messages": HELLO})
        own = upstream.http().post("/v1/chat/completions", json={"model": "no-such-model-PURPLE", "messages": HELLO})
    body = response.json()
    assert response.status_code == 404 and body["error"]["code"] == "upstream_rejected"
    assert (body["upstream_status"], body["upstream_type"], body["backend"]) == (404, "model_not_found", "up")
    assert own.json()["detail"] not in json.dumps(body)  # our words, never the upstream's text


# -- deadlines and disconnects ---------------------------------------------------------------


def upstream_idle(upstream: LiveServer) -> bool:
    return upstream.engine.status().active_jobs == 0 and upstream.engine.status().queue_depth == 0


def test_a_timeout_cancels_the_upstream_request(tmp_path, upstream, slow_model):
    with router(
        tmp_path, [openai_backend(upstream)], [{"model": "slow", "to": f"up:{slow_model}"}], timeouts={"chat": 1}
    ) as front:
        with front.http() as http:
            response = http.post(
                "/v1/chat/completions", json={"model": "slow", "messages": HELLO, "max_tokens": 5000, "stream": True}
            )
            request_id = response.headers["x-request-id"]
    if response.status_code == 200:  # the deadline came after the first token: the stream's error event
        name, data = sse_events(response)[-1]
        assert name == "error" and json.loads(data)["error"]["code"] == "timeout"
    else:  # or before it: the 504 problem
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    job = upstream.engine.job(request_id)  # the upstream ran it under our request id
    assert wait_until(lambda: job.done)  # stopped long before its 5000 tokens
    assert job.completion_tokens < 5000
    assert row_for(upstream, request_id)["status"] == "cancelled"


def test_a_client_that_goes_away_cancels_the_upstream_request(tmp_path, upstream, slow_model):
    with router(tmp_path, [openai_backend(upstream)], [{"model": "slow", "to": f"up:{slow_model}"}]) as front:
        with (
            front.http() as http,
            http.stream(
                "POST",
                "/v1/chat/completions",
                json={"model": "slow", "messages": HELLO, "max_tokens": 5000, "stream": True},
            ) as response,
        ):
            request_id = response.headers["x-request-id"]
            next(response.iter_lines())  # the stream has begun; then the client leaves
        job = upstream.engine.job(request_id)
        assert wait_until(lambda: job.done)
        assert job.cancelled and job.completion_tokens < 5000
        assert row_for(front, request_id)["status"] == "cancelled"

        # The same before the first byte: a whole answer the client stops waiting for.
        stop = threading.Event()

        def leave_early() -> None:
            with contextlib.suppress(httpx.HTTPError), httpx.Client(base_url=front.url, timeout=0.5) as http:
                http.post(
                    "/v1/chat/completions",
                    json={"model": "slow", "messages": HELLO, "max_tokens": 5000},
                    headers={"x-request-id": "leaves-early"},
                )
            stop.set()

        threading.Thread(target=leave_early).start()
        assert stop.wait(10)
        early = [job for job in upstream.engine.jobs if job.request.request_id == "leaves-early"]
        assert wait_until(lambda: all(job.done for job in early))
        assert len(early) == 1 and early[0].completion_tokens < 5000


def test_a_relayed_messages_stream_ends_with_anthropics_error_event_at_its_deadline_and_cancels_upstream(
    tmp_path, upstream, slow_model
):
    """After the first byte, the deadline is Anthropic's `error` event in our words (the relay's
    upstream events stop there); a client that leaves stops the upstream's work too."""
    routes = [{"model": "claude-slow", "to": f"claude:{slow_model}"}]
    body = {"model": "claude-slow", "max_tokens": 5000, "messages": HELLO, "stream": True}
    # 4 s: on a busy machine the slow model's first token has taken over 2 s (a 504 before the stream).
    with router(tmp_path, [anthropic_backend(upstream)], routes, timeouts={"messages": 4}) as front:
        assert wait_until(lambda: upstream_idle(upstream))  # the stream starts well within its deadline
        with front.http() as http, http.stream("POST", "/v1/messages", json=body) as response:
            assert response.status_code == 200 and response.headers["x-mlx-manager-backend"] == "claude"
            events = sse_events(response)
        request_id = response.headers["x-request-id"]
        names = [name for name, _ in events]
        assert names[0] == "message_start" and json.loads(events[0][1])["message"]["id"] == f"msg_{request_id}"
        assert "content_block_delta" in names and "message_stop" not in names
        assert names[-1] == "error" and names.count("error") == 1
        error = json.loads(events[-1][1])
        assert (error["type"], error["error"]["type"], error["error"]["code"]) == ("error", "timeout_error", "timeout")
        job = upstream.engine.job(request_id)  # the upstream ran it under our request id
        assert wait_until(lambda: job.done) and job.cancelled and job.completion_tokens < 5000
        assert row_for(front, request_id)["status"] == "timeout"

        with front.http() as http, http.stream("POST", "/v1/messages", json=body) as response:
            request_id = response.headers["x-request-id"]
            next(response.iter_lines())  # the stream has begun; then the client leaves
        job = upstream.engine.job(request_id)
        assert wait_until(lambda: job.done) and job.cancelled and job.completion_tokens < 5000
        assert row_for(front, request_id)["status"] == "cancelled"
