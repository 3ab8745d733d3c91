"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) through the official
`anthropic` SDK, against the scripted real models of the tool-calling tests.

Every streamed event is validated with the SDK's own event types (pydantic validation, not
the SDK's lenient construction), and the SDK's stream helper must accumulate it.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest
from anthropic.types import Message, MessageTokensCount, RawMessageStreamEvent
from anthropic.types.shared import ErrorResponse
from pydantic import TypeAdapter

from tests.daemon_server import LiveServer, serving
from tests.scripted_model import (
    HERMES_PARALLEL,
    HERMES_TOOL,
    MISTRAL_PARALLEL,
    QUESTION,
    WEATHER_RESULT,
    WEATHER_TOOL,
    Scripted,
)
from tests.test_daemon_audit import row_for
from tests.test_daemon_timeouts import sse_events

MESSAGES = "/v1/messages"
TOOL = {
    "name": "get_weather",
    "description": WEATHER_TOOL["function"]["description"],
    "input_schema": WEATHER_TOOL["function"]["parameters"],
}
STREAM_EVENT = TypeAdapter(RawMessageStreamEvent)
CLIENT_LOGGERS = ("anthropic", "openai", "httpx", "httpcore")
MARKUP = ("<tool_call>", "</tool_call>", "<think>", "</think>", "[TOOL_CALLS]", "[ARGS]")


@pytest.fixture(scope="module")
def models(hermes_tool_model, hermes_parallel_model, mistral_parallel_model):
    return {
        "hermes": (hermes_tool_model, HERMES_TOOL),
        "hermes_parallel": (hermes_parallel_model, HERMES_PARALLEL),
        "mistral_parallel": (mistral_parallel_model, MISTRAL_PARALLEL),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory, models, fast_model):
    with pytest.MonkeyPatch.context() as env:  # the audit log of this module's server, in its own home
        env.setenv("MLX_MANAGER_HOME", str(tmp_path_factory.mktemp("home")))
        with serving(*(path for path, _ in models.values()), fast_model, max_loaded=8) as live:
            yield live


@pytest.fixture(scope="module")
def client(server) -> anthropic.Anthropic:
    return anthropic_client(server)


def anthropic_client(server: LiveServer, **options) -> anthropic.Anthropic:
    return anthropic.Anthropic(**{"base_url": server.url, "api_key": "unused", "max_retries": 0, **options})


def question() -> list[dict]:
    return [{"role": "user", "content": QUESTION}]


def after_tool(content: list) -> list[dict]:
    """The question, the model's answer with its calls (the SDK's blocks), a result for each call."""
    results = [
        {"type": "tool_result", "tool_use_id": b.id, "content": WEATHER_RESULT} for b in content if b.type == "tool_use"
    ]
    return [*question(), {"role": "assistant", "content": content}, {"role": "user", "content": results}]


def expected_calls(scripted: Scripted) -> list[tuple[str, dict]]:
    return [(c.name, c.arguments) for c in scripted.calls]


def blocks(message: Message, kind: str) -> list:
    return [block for block in message.content if block.type == kind]


def raw_stream(server: LiveServer, body: dict) -> tuple[httpx.Response, list[tuple[str, dict]]]:
    """A streamed request's events as sent, each (name, data) checked against the SDK's types."""
    with server.http() as http, http.stream("POST", MESSAGES, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [(name, json.loads(data)) for name, data in sse_events(response)]
    for name, data in events:
        assert name == data["type"]  # the SSE event name is the event's type, as Anthropic sends it
        if name == "ping":
            assert data == {"type": "ping"}
        elif name == "error":
            ErrorResponse.model_validate(data)
        else:
            STREAM_EVENT.validate_python(data)
    return response, events


# -- answers and tool use ------------------------------------------------------------------------


def test_a_plain_answer(client, models):
    path, scripted = models["hermes"]
    message = client.messages.create(model=path, max_tokens=200, messages=question())
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == scripted.plain
    assert (message.role, message.stop_reason, message.stop_sequence) == ("assistant", "end_turn", None)
    assert message.model == path and message.id.startswith("msg_")
    usage = message.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0 and usage.cache_read_input_tokens == 0


@pytest.mark.parametrize("name", ["hermes", "hermes_parallel", "mistral_parallel"])
def test_tool_use_round_trip(client, models, name):
    path, scripted = models[name]
    first = client.messages.create(model=path, max_tokens=300, messages=question(), tools=[TOOL])
    assert first.stop_reason == "tool_use"
    calls = blocks(first, "tool_use")
    assert [(c.name, c.input) for c in calls] == expected_calls(scripted)
    assert len({c.id for c in calls}) == len(calls)
    assert blocks(first, "text") == []
    assert [b.thinking for b in blocks(first, "thinking")] == ([scripted.thinking] if scripted.thinking else [])

    # The SDK's own content blocks go back as the assistant turn, results as tool_result blocks.
    final = client.messages.create(model=path, max_tokens=300, messages=after_tool(first.content), tools=[TOOL])
    assert final.stop_reason == "end_turn"
    assert [b.text for b in blocks(final, "text")] == [scripted.answer]
    assert [b.thinking for b in blocks(final, "thinking")] == (
        [scripted.answer_thinking] if scripted.answer_thinking else []
    )
    assert blocks(final, "tool_use") == []


@pytest.mark.parametrize("name", ["hermes", "hermes_parallel", "mistral_parallel"])
def test_streamed_events_are_anthropics_and_build_the_same_message(server, client, models, name):
    path, scripted = models[name]
    body = {"model": path, "max_tokens": 300, "messages": question(), "tools": [TOOL]}
    whole = client.messages.create(**body)
    _, events = raw_stream(server, body)
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] > 0

    # Blocks open, fill and close one at a time, indexed from 0 in order.
    content: list[dict] = []
    json_text: dict[int, str] = {}
    open_index = None
    for name, data in events:
        if name == "content_block_start":
            assert open_index is None and data["index"] == len(content)
            open_index = data["index"]
            content.append(dict(data["content_block"]))
        elif name == "content_block_delta":
            assert data["index"] == open_index
            delta, block = data["delta"], content[open_index]
            if delta["type"] == "text_delta":
                assert not any(tag in delta["text"] for tag in MARKUP)
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            else:
                json_text[open_index] = json_text.get(open_index, "") + delta["partial_json"]
        elif name == "content_block_stop":
            assert data["index"] == open_index
            open_index = None
    for index, text in json_text.items():
        content[index]["input"] = json.loads(text)
    assert content == [
        block.model_dump(exclude_none=True) | {"id": content[i].get("id")}
        if block.type == "tool_use"
        else block.model_dump(exclude_none=True)
        for i, block in enumerate(whole.content)
    ]
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == whole.usage.output_tokens
    assert delta["usage"]["input_tokens"] == whole.usage.input_tokens


def test_the_sdk_stream_helper_accumulates_the_message(client, models):
    path, scripted = models["hermes"]
    with client.messages.stream(model=path, max_tokens=300, messages=question(), tools=[TOOL]) as stream:
        first = stream.get_final_message()
    assert [(c.name, c.input) for c in blocks(first, "tool_use")] == expected_calls(scripted)
    assert [b.thinking for b in blocks(first, "thinking")] == [scripted.thinking]
    with client.messages.stream(model=path, max_tokens=300, messages=after_tool(first.content), tools=[TOOL]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == scripted.answer == blocks(final, "text")[0].text
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0


def test_thinking_can_be_turned_off(client, models):
    path, scripted = models["hermes"]
    first = client.messages.create(model=path, max_tokens=300, messages=question(), tools=[TOOL])
    final = client.messages.create(
        model=path,
        max_tokens=300,
        messages=after_tool(blocks(first, "tool_use")),
        tools=[TOOL],
        thinking={"type": "disabled"},
    )
    assert [b.type for b in final.content] == ["text"] and final.content[0].text == scripted.answer


def test_thinking_shown_or_omitted(client, models):
    path, scripted = models["hermes"]
    shown = client.messages.create(
        model=path,
        max_tokens=2048,
        messages=question(),
        tools=[TOOL],
        thinking={"type": "enabled", "budget_tokens": 1024},
    )
    assert [b.thinking for b in blocks(shown, "thinking")] == [scripted.thinking]
    omitted = client.messages.create(
        model=path,
        max_tokens=2048,
        messages=question(),
        tools=[TOOL],
        thinking={"type": "adaptive", "display": "omitted"},
    )
    assert [b.thinking for b in blocks(omitted, "thinking")] == [""]
    assert [(c.name, c.input) for c in blocks(omitted, "tool_use")] == expected_calls(scripted)


def test_tool_choice_none_hides_the_tools(client, models):
    path, scripted = models["hermes"]
    message = client.messages.create(
        model=path, max_tokens=200, messages=question(), tools=[TOOL], tool_choice={"type": "none"}
    )
    assert [b.text for b in message.content] == [scripted.plain]


def test_disable_parallel_tool_use_stops_after_one_call(client, models):
    path, scripted = models["hermes_parallel"]
    message = client.messages.create(
        model=path,
        max_tokens=300,
        messages=question(),
        tools=[TOOL],
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
    )
    assert [(c.name, c.input) for c in blocks(message, "tool_use")] == expected_calls(scripted)[:1]


def test_a_stop_sequence_ends_the_answer_and_is_named(server, client, models):
    path, scripted = models["hermes"]
    message = client.messages.create(model=path, max_tokens=200, messages=question(), stop_sequences=["zzz", "look"])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "look"
    assert message.content[0].text == scripted.plain[: scripted.plain.index("look")]
    _, events = raw_stream(
        server, {"model": path, "max_tokens": 200, "messages": question(), "stop_sequences": ["look"]}
    )
    assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "look"}


def test_max_tokens_ends_the_answer(client, models):
    path, _ = models["hermes"]
    message = client.messages.create(model=path, max_tokens=2, messages=question())
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 2


def test_system_prompt_and_block_content_reach_the_template(server, client, models):
    path, scripted = models["hermes"]
    message = client.messages.create(
        model=path,
        max_tokens=300,
        tools=[TOOL],
        extra_headers={"X-Request-ID": "messages-system-1"},
        system=[{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Hello."}, {"type": "text", "text": QUESTION}]}
        ],
    )
    assert [(c.name, c.input) for c in blocks(message, "tool_use")] == expected_calls(scripted)
    sent = server.engine.job("messages-system-1").request.messages
    assert sent == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": f"Hello.\n\n{QUESTION}"},
    ]


def test_count_tokens_is_the_prompt_the_model_sees(client, models):
    path, _ = models["hermes"]
    counted = client.messages.count_tokens(model=path, messages=question(), tools=[TOOL])
    assert isinstance(counted, MessageTokensCount)
    message = client.messages.create(model=path, max_tokens=300, messages=question(), tools=[TOOL])
    # As Anthropic counts: tokens read from the prompt cache are not input_tokens.
    assert counted.input_tokens == message.usage.input_tokens + message.usage.cache_read_input_tokens
    assert client.messages.count_tokens(model=path, messages=question()).input_tokens < counted.input_tokens


# -- errors --------------------------------------------------------------------------------------


def test_an_unknown_model_is_the_sdks_not_found_error_with_our_message(client):
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="no/such-model", max_tokens=5, messages=question())
    error = caught.value
    assert error.type == "not_found_error" and "no/such-model" in error.api_message
    assert_anthropic_problem(error.response, 404, "model_not_found")


def assert_anthropic_problem(response: httpx.Response, status: int, kind: str) -> dict:
    """The body Anthropic's SDKs read, with the RFC 9457 members alongside."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    ErrorResponse.model_validate(body)
    assert body["type"] == "error" and body["error"]["code"] == kind
    assert body["status"] == status and body["title"] and body["instance"].startswith(MESSAGES)
    assert body["detail"] == body["error"]["message"]
    assert body["request_id"] == response.headers["x-request-id"]
    return body


@pytest.mark.parametrize(
    ("change", "param", "needs"),
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "x"}}]}]},
            "messages.0.content.0",
            "text models only",
        ),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0", "server tools"),
        ({"container": "container_1"}, "container", "not supported"),
        ({"thinking": {"type": "between_tools"}}, "thinking", "not supported"),
        ({"messages": [*question(), {"role": "assistant", "content": "It is"}]}, "messages", "prefilled"),
    ],
)
def test_what_this_server_cannot_do_is_a_400_naming_the_field(server, models, change, param, needs):
    path, _ = models["hermes"]
    body = {"model": path, "max_tokens": 50, "messages": question(), "tools": [TOOL], **change}
    with server.http() as http:
        response = http.post(MESSAGES, json=body)
    problem = assert_anthropic_problem(response, 400, "not_supported")
    assert problem["error"]["type"] == "invalid_request_error" and problem["error"]["param"] == param
    assert needs in problem["detail"] and problem["detail"].startswith(param)


def test_an_engine_refusal_is_the_sdks_bad_request_error(client, fast_model):
    with pytest.raises(anthropic.BadRequestError) as caught:  # a model with no tool-call format
        client.messages.create(model=fast_model, max_tokens=50, messages=question(), tools=[TOOL])
    assert "tool-call format" in caught.value.api_message and fast_model in caught.value.api_message


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"temperature": 1.5}, "temperature"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, ""),  # not under max_tokens
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}]}]},
            "messages.0.content",
        ),
    ],
)
def test_invalid_requests_are_422_naming_the_field(server, models, change, param):
    path, _ = models["hermes"]
    body = {"model": path, "max_tokens": 50, "messages": question(), **change}
    body = {k: v for k, v in body.items() if v is not None}
    with server.http() as http:
        problem = assert_anthropic_problem(http.post(MESSAGES, json=body), 422, "validation_error")
    assert problem["error"]["type"] == "invalid_request_error"
    assert (problem["error"]["param"] or "").startswith(param)


def test_an_x_api_key_is_accepted_and_a_wrong_one_is_an_authentication_error(tmp_path_factory, models):
    from mlx_manager.auth import key_digest, new_key
    from tests.daemon_server import settings_with

    path, scripted = models["hermes"]
    key = new_key()
    entry = {"name": "claude-code", "sha256": key_digest(key), "created": "2025-01-01T00:00:00Z"}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLX_MANAGER_HOME", str(tmp_path_factory.mktemp("home")))
        with serving(path, settings=settings_with(auth={"keys": [entry]})) as live:
            body = {"model": path, "max_tokens": 100, "messages": question()}
            headers = {"x-api-key": key, "anthropic-version": "2023-06-01", "X-Request-ID": "x-api-key-1"}
            with live.http() as http:
                answer = http.post(MESSAGES, json=body, headers=headers)
                assert answer.status_code == 200 and answer.json()["content"][0]["text"] == scripted.plain
                refused = http.post(
                    MESSAGES, json=body, headers={**headers, "x-api-key": "wrong", "X-Request-ID": "x-api-key-2"}
                )
            problem = assert_anthropic_problem(refused, 401, "unauthorized")
            assert problem["error"]["type"] == "authentication_error" and "x-api-key" not in refused.headers
            with pytest.raises(anthropic.AuthenticationError):  # the SDK's class, from the same body
                anthropic_client(live, api_key="wrong").messages.create(**body)
            assert row_for(live, "x-api-key-1")["api_key"] == "claude-code"
            assert row_for(live, "x-api-key-2")["error_type"] == "unauthorized"


# -- the audit row -------------------------------------------------------------------------------


def test_audit_rows_name_the_endpoint_model_and_tokens(server, client, models):
    path, _ = models["hermes"]
    message = client.messages.create(
        model=path,
        max_tokens=300,
        messages=question(),
        tools=[TOOL],
        extra_headers={"X-Request-ID": "messages-audit-1"},
    )
    with client.messages.stream(
        model=path, max_tokens=300, messages=question(), extra_headers={"X-Request-ID": "messages-audit-2"}
    ) as stream:
        stream.until_done()
    client.messages.count_tokens(model=path, messages=question(), extra_headers={"X-Request-ID": "messages-audit-3"})
    whole, streamed, counted = (row_for(server, f"messages-audit-{n}") for n in (1, 2, 3))
    assert (whole["endpoint"], whole["model"], whole["status"]) == (MESSAGES, path, "success")
    assert (whole["prompt_tokens"], whole["completion_tokens"], whole["cached_tokens"]) == (
        message.usage.input_tokens + message.usage.cache_read_input_tokens,  # Anthropic leaves cache reads out
        message.usage.output_tokens,
        message.usage.cache_read_input_tokens,
    )
    assert (streamed["endpoint"], streamed["status"]) == (MESSAGES, "success")
    assert streamed["completion_tokens"] > 0 and streamed["time_to_first_token_ms"] > 0
    assert (counted["endpoint"], counted["status"], counted["completion_tokens"]) == (
        MESSAGES + "/count_tokens",
        "success",
        0,
    )
    assert counted["prompt_tokens"] > 0


def test_prompts_tools_and_answers_never_reach_the_disk_or_the_log(server, client, models, caplog):
    import logging
    import uuid

    caplog.set_level(logging.DEBUG)
    marker = f"PRIVATE-{uuid.uuid4().hex}"
    path, scripted = models["hermes"]
    tool = {**TOOL, "description": marker}
    first = client.messages.create(
        model=path,
        max_tokens=300,
        messages=question(),
        tools=[tool],
        system=marker,
        extra_headers={"X-Request-ID": "messages-private-1"},
    )
    history = after_tool(first.content)
    history[-1]["content"][0]["content"] = marker
    with client.messages.stream(
        model=path, max_tokens=300, messages=history, tools=[tool], extra_headers={"X-Request-ID": "messages-private-2"}
    ) as stream:
        stream.until_done()
    for request_id in ("messages-private-1", "messages-private-2"):
        row_for(server, request_id)
    secrets = [marker, "get_weather", '"city"', scripted.answer, scripted.thinking]
    for file in [p for p in server.daemon.audit.path.parent.rglob("*") if p.is_file()]:
        data = file.read_bytes()
        assert not [s for s in secrets if s.encode() in data], file
    # The daemon's records (the client SDK in this process logs its own requests at DEBUG).
    daemon_records = [r for r in caplog.records if not r.name.startswith(CLIENT_LOGGERS)]
    logged = "\n".join(record.getMessage() for record in daemon_records)
    assert "messages-private-2" in logged
    assert not [s for s in secrets if s in logged]


# -- constrained: forced calls, strict tools, JSON output ----------------------------------------

UNITS = {
    "name": "set_units",
    "description": "Choose the units of the answer.",
    "input_schema": {
        "type": "object",
        "properties": {"system": {"enum": ["metric", "imperial"]}},
        "required": ["system"],
        "additionalProperties": False,
    },
}


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "set_units"}], ids=["any", "tool"])
def test_tool_choice_any_and_tool_force_a_call(client, models, choice):
    path, _ = models["hermes"]
    first = client.messages.create(model=path, max_tokens=300, messages=question(), tools=[TOOL])
    # After the tool result the model would answer in words: the grammar makes it call instead
    # (its thinking, which comes first, stays free).
    # A closed schema and greedy decoding: where the grammar overrules this model, its logits are
    # all alike, and sampling (or an open string) could wander to max_tokens.
    message = client.messages.create(
        model=path,
        max_tokens=300,
        messages=after_tool(first.content),
        tools=[UNITS],
        tool_choice=choice,
        extra_body={"temperature": 0},
    )
    assert message.stop_reason == "tool_use"
    [call] = blocks(message, "tool_use")
    assert call.name == "set_units" and call.input["system"] in ("metric", "imperial")


def test_a_strict_tool_holds_the_call_to_its_schema(client, models):
    path, _ = models["hermes"]
    only_london = {
        **TOOL,
        "strict": True,
        "input_schema": {
            "type": "object",
            "properties": {"city": {"enum": ["London"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    }
    message = client.messages.create(
        model=path, max_tokens=300, messages=question(), tools=[only_london], extra_body={"temperature": 0}
    )
    # The model says Paris; the schema allows London only.
    assert [(c.name, c.input) for c in blocks(message, "tool_use")] == [("get_weather", {"city": "London"})]


def test_output_config_format_gives_json_that_follows_the_schema(client, models):
    import jsonschema

    path, scripted = models["hermes"]
    schema = {
        "type": "object",
        "properties": {"sky": {"enum": ["sunny", "rain"]}, "temp": {"type": "integer", "minimum": -40, "maximum": 50}},
        "required": ["sky", "temp"],
        "additionalProperties": False,
    }
    message = client.messages.create(
        model=path,
        max_tokens=300,
        messages=question(),
        extra_body={"temperature": 0, "output_config": {"format": {"type": "json_schema", "schema": schema}}},
    )
    [text] = blocks(message, "text")
    jsonschema.validate(json.loads(text.text), schema)
    assert message.stop_reason == "end_turn"
