"""OpenAI's Responses API (/v1/responses, GET and DELETE /v1/responses/{id}) through the official
`openai` SDK, against the scripted real models of the tool-calling tests.

Every streamed event is validated with the SDK's own event types (pydantic validation, not the
SDK's lenient construction), and the SDK's stream helper must accumulate it.
"""

from __future__ import annotations

import json
from typing import Literal

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel, TypeAdapter

from tests.daemon_server import LiveServer, assert_problem, serving, wait_until
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

RESPONSES = "/v1/responses"
TOOL = {"type": "function", **WEATHER_TOOL["function"], "strict": False}
STREAM_EVENT = TypeAdapter(ResponseStreamEvent)
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
def client(server) -> openai.OpenAI:
    return server.openai()


def expected_calls(scripted: Scripted) -> list[tuple[str, dict]]:
    return [(c.name, c.arguments) for c in scripted.calls]


def items(response: Response, kind: str) -> list:
    return [item for item in response.output if item.type == kind]


def calls_of(response: Response) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in items(response, "function_call")]


def results_for(response: Response) -> list[dict]:
    return [
        {"type": "function_call_output", "call_id": c.call_id, "output": WEATHER_RESULT}
        for c in items(response, "function_call")
    ]


def raw_stream(server: LiveServer, body: dict) -> list[dict]:
    """A streamed request's events as sent, each checked against the SDK's event types."""
    with server.http() as http, http.stream("POST", RESPONSES, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [(name, json.loads(data)) for name, data in sse_events(response)]
    for name, data in events:
        assert name == data["type"]
        STREAM_EVENT.validate_python(data)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    return [data for _, data in events]


# -- answers and function calls ------------------------------------------------------------------


def test_a_plain_answer(client, models):
    path, scripted = models["hermes"]
    response = client.responses.create(model=path, input=QUESTION)
    Response.model_validate(response.model_dump())  # every field as the SDK types it
    assert response.status == "completed" and response.output_text == scripted.plain
    assert [item.type for item in response.output] == ["message"]
    message = response.output[0]
    assert (message.role, message.status, message.content[0].type) == ("assistant", "completed", "output_text")
    usage = response.usage
    assert (
        usage.input_tokens > 0
        and usage.output_tokens > 0
        and usage.total_tokens == usage.input_tokens + usage.output_tokens
    )
    assert usage.input_tokens_details.cached_tokens == 0 and usage.output_tokens_details.reasoning_tokens == 0


@pytest.mark.parametrize("name", ["hermes", "hermes_parallel", "mistral_parallel"])
def test_a_function_call_round_trip_sending_the_whole_conversation(client, models, name):
    path, scripted = models[name]
    first = client.responses.create(model=path, input=QUESTION, tools=[TOOL], store=False)
    assert calls_of(first) == expected_calls(scripted)
    assert len({c.call_id for c in items(first, "function_call")}) == len(scripted.calls)
    assert [r.content[0].text for r in items(first, "reasoning")] == ([scripted.thinking] if scripted.thinking else [])
    if scripted.thinking:
        assert first.usage.output_tokens_details.reasoning_tokens > 0
    assert items(first, "message") == []

    # Stateless: the SDK's output items go back as input, with a result for each call.
    conversation = [{"role": "user", "content": QUESTION}, *first.output, *results_for(first)]
    final = client.responses.create(model=path, input=conversation, tools=[TOOL], store=False)
    assert final.output_text == scripted.answer and calls_of(final) == []
    assert [r.content[0].text for r in items(final, "reasoning")] == (
        [scripted.answer_thinking] if scripted.answer_thinking else []
    )


def test_previous_response_id_continues_the_stored_conversation(server, client, models):
    path, scripted = models["hermes"]
    first = client.responses.create(
        model=path,
        input=QUESTION,
        tools=[TOOL],
        instructions="Use the tools.",
        extra_headers={"X-Request-ID": "chain-1"},
    )
    final = client.responses.create(
        model=path,
        previous_response_id=first.id,
        input=results_for(first),
        tools=[TOOL],
        extra_headers={"X-Request-ID": "chain-2"},
    )
    assert final.output_text == scripted.answer and final.previous_response_id == first.id
    # The second prompt holds the first one's input and output, but not its instructions.
    sent = server.engine.job("chain-2").request.messages
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[1]["reasoning_content"] == scripted.thinking
    assert [c["function"]["arguments"] for c in sent[1]["tool_calls"]] == [c.arguments for c in scripted.calls]
    # A third turn continues the second.
    third = client.responses.create(model=path, previous_response_id=final.id, input="Thanks!", tools=[TOOL])
    assert third.status == "completed"


@pytest.mark.parametrize("name", ["hermes", "hermes_parallel", "mistral_parallel"])
def test_streamed_events_are_openais_and_build_the_same_response(server, client, models, name):
    path, scripted = models[name]
    body = {"model": path, "input": QUESTION, "tools": [TOOL], "store": False}
    whole = client.responses.create(**body)
    events = raw_stream(server, body)
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []

    # Each output item: added, its content or arguments, done; in order of output_index.
    added = [e for e in events if e["type"] == "response.output_item.added"]
    done = [e for e in events if e["type"] == "response.output_item.done"]
    assert [e["output_index"] for e in added] == [e["output_index"] for e in done] == list(range(len(whole.output)))
    final = events[-1]["response"]
    assert final["output"] == [e["item"] for e in done]
    arguments = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    assert arguments == "".join(c.arguments for c in items(whole, "function_call"))
    reasoning = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    assert reasoning == (scripted.thinking or "")

    def shape(output: list) -> list:
        return [(i["type"], i.get("name"), i.get("arguments"), i.get("content")) for i in output]

    assert shape(final["output"]) == shape([i.model_dump() for i in whole.output])
    assert final["usage"]["output_tokens"] == whole.usage.output_tokens


def test_the_sdk_stream_helper_accumulates_the_response(client, models):
    path, scripted = models["hermes"]
    with client.responses.stream(model=path, input=QUESTION, tools=[TOOL]) as stream:
        kinds = [event.type for event in stream]
        first = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    assert calls_of(first) == expected_calls(scripted)
    text = []
    with client.responses.stream(
        model=path, previous_response_id=first.id, input=results_for(first), tools=[TOOL]
    ) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                assert not any(tag in event.delta for tag in MARKUP)
                text.append(event.delta)
        final = stream.get_final_response()
    assert "".join(text) == final.output_text == scripted.answer


def test_reasoning_effort_none_turns_thinking_off(client, models):
    path, scripted = models["hermes"]
    first = client.responses.create(model=path, input=QUESTION, tools=[TOOL])
    final = client.responses.create(
        model=path, previous_response_id=first.id, input=results_for(first), tools=[TOOL], reasoning={"effort": "none"}
    )
    assert [item.type for item in final.output] == ["message"] and final.output_text == scripted.answer
    assert final.usage.output_tokens_details.reasoning_tokens == 0 and final.reasoning.effort == "none"


def test_a_reasoning_summary_is_the_thinking_itself(server, client, models):
    path, scripted = models["hermes"]
    response = client.responses.create(model=path, input=QUESTION, tools=[TOOL], reasoning={"summary": "auto"})
    (reasoning,) = items(response, "reasoning")
    assert [s.text for s in reasoning.summary] == [reasoning.content[0].text] == [scripted.thinking]
    events = raw_stream(server, {"model": path, "input": QUESTION, "tools": [TOOL], "reasoning": {"summary": "auto"}})
    summary = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_summary_text.delta")
    assert summary == scripted.thinking


def test_max_output_tokens_leaves_the_response_incomplete(server, client, models):
    path, _ = models["hermes"]
    response = client.responses.create(model=path, input=QUESTION, max_output_tokens=2)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete" and response.usage.output_tokens == 2
    events = raw_stream(server, {"model": path, "input": QUESTION, "max_output_tokens": 2})
    assert events[-1]["type"] == "response.incomplete" and events[-1]["response"]["status"] == "incomplete"


def test_tool_choice_none_and_allowed_tools(client, models):
    path, scripted = models["hermes"]
    hidden = client.responses.create(model=path, input=QUESTION, tools=[TOOL], tool_choice="none")
    assert hidden.output_text == scripted.plain and calls_of(hidden) == []
    other = {**TOOL, "name": "get_time", "description": "The time."}
    allowed = client.responses.create(
        model=path,
        input=QUESTION,
        tools=[TOOL, other],
        tool_choice={"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function", "name": "get_weather"}]},
    )
    assert calls_of(allowed) == expected_calls(scripted)
    assert allowed.tool_choice.type == "allowed_tools"


def test_parallel_tool_calls_false_stops_after_one_call(client, models):
    path, scripted = models["hermes_parallel"]
    response = client.responses.create(model=path, input=QUESTION, tools=[TOOL], parallel_tool_calls=False)
    assert calls_of(response) == expected_calls(scripted)[:1] and response.parallel_tool_calls is False


# -- the store -----------------------------------------------------------------------------------


def test_a_stored_response_can_be_retrieved_and_deleted(client, models):
    path, _ = models["hermes"]
    created = client.responses.create(model=path, input=QUESTION, metadata={"ticket": "42"})
    retrieved = client.responses.retrieve(created.id)
    assert retrieved.model_dump() == created.model_dump() and retrieved.metadata == {"ticket": "42"}
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.retrieve(created.id)
    assert caught.value.code == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(created.id)


def test_store_false_keeps_nothing(client, models):
    path, _ = models["hermes"]
    created = client.responses.create(model=path, input=QUESTION, store=False)
    assert created.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)


def test_an_unknown_previous_response_id_is_a_clear_404(server, client, models):
    path, _ = models["hermes"]
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model=path, input="hi", previous_response_id="resp_nope")
    body = assert_problem(caught.value.response, 404, "response_not_found")
    assert body["error"]["param"] == "previous_response_id" and "resp_nope" in body["detail"]
    assert "in memory only" in body["detail"]


def test_responses_expire_and_the_store_is_bounded(server, client, models):
    path, _ = models["hermes"]
    store = server.daemon.responses
    ttl, limit = store.ttl, store.max_responses
    try:
        store.ttl = 0.5
        created = client.responses.create(model=path, input=QUESTION)
        assert client.responses.retrieve(created.id).id == created.id
        assert wait_until(lambda: len(store) == 0, timeout=5)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(created.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.create(model=path, previous_response_id=created.id, input="and now?")
        store.ttl, store.max_responses = ttl, 2
        made = [client.responses.create(model=path, input=QUESTION, max_output_tokens=1).id for _ in range(3)]
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(made[0])  # the oldest went first
        assert [client.responses.retrieve(i).id for i in made[1:]] == made[1:]
    finally:
        store.ttl, store.max_responses = ttl, limit


# -- errors --------------------------------------------------------------------------------------


class Weather(BaseModel):
    city: Literal["Paris", "London"]
    sky: Literal["sunny", "rain"]


def test_text_format_gives_a_parsed_answer(client, models):
    path, _ = models["hermes"]
    parsed = client.responses.parse(
        model=path, input=QUESTION, text_format=Weather, max_output_tokens=300, temperature=0
    )
    assert isinstance(parsed.output_parsed, Weather)


UNITS = {
    "type": "function",
    "name": "set_units",
    "description": "Choose the units of the answer.",
    "parameters": {
        "type": "object",
        "properties": {"system": {"enum": ["metric", "imperial"]}},
        "required": ["system"],
        "additionalProperties": False,
    },
    "strict": True,
}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "set_units"}], ids=["required", "named"])
def test_tool_choice_required_and_named_force_a_call(client, models, choice):
    path, _ = models["hermes"]
    first = client.responses.create(model=path, input=QUESTION, tools=[TOOL])
    # After the tool result the model would answer in words: the grammar makes it call again.
    # A closed schema and greedy decoding: where the grammar overrules this model, its logits
    # are all alike, and an open string could take its answer in and run to the limit.
    again = client.responses.create(
        model=path,
        input=results_for(first),
        previous_response_id=first.id,
        tools=[UNITS],
        tool_choice=choice,
        temperature=0,
    )
    [(name, arguments)] = calls_of(again)
    assert name == "set_units" and arguments["system"] in ("metric", "imperial")


def test_a_strict_function_holds_the_call_to_its_schema(client, models):
    path, _ = models["hermes"]
    only_london = {
        **TOOL,
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["London"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    }
    response = client.responses.create(model=path, input=QUESTION, tools=[only_london], temperature=0)
    # The model says Paris; the schema allows London only.
    assert calls_of(response) == [("get_weather", {"city": "London"})]


@pytest.mark.parametrize(
    ("change", "param"),
    [
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
            "input.0.content.0",  # the path in the request, without pydantic's union tag
        ),
        ({"tools": [{"type": "web_search"}]}, "tools.0"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"background": True}, "background"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"truncation": "auto"}, "truncation"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
    ],
)
def test_what_this_server_cannot_do_is_a_400_naming_the_field(server, models, change, param):
    path, _ = models["hermes"]
    body = {"model": path, "input": QUESTION, "tools": [TOOL], **change}
    with server.http() as http:
        problem = assert_problem(http.post(RESPONSES, json=body), 400, "not_supported")
    assert problem["error"]["param"] == param and problem["detail"].startswith(param)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"unknown_field": 1}, "unknown_field"),
        ({"temperature": 3}, "temperature"),
        ({"input": []}, "input"),
        ({"tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ],
)
def test_invalid_requests_are_422_naming_the_field(server, models, change, param):
    path, _ = models["hermes"]
    body = {"model": path, "input": QUESTION, "tools": [TOOL], **change}
    with server.http() as http:
        problem = assert_problem(http.post(RESPONSES, json=body), 422, "validation_error")
    assert problem["error"]["param"].startswith(param)


def test_an_unknown_model_is_the_sdks_not_found_error(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model="no/such-model", input="hi")
    assert caught.value.code == "model_not_found" and "no/such-model" in caught.value.message


def test_audit_rows_name_the_endpoint_and_model(server, client, models):
    path, _ = models["hermes"]
    created = client.responses.create(model=path, input=QUESTION, extra_headers={"X-Request-ID": "responses-audit-1"})
    client.responses.retrieve(created.id, extra_headers={"X-Request-ID": "responses-audit-2"})
    row = row_for(server, "responses-audit-1")
    assert (row["endpoint"], row["model"], row["status"]) == (RESPONSES, path, "success")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (created.usage.input_tokens, created.usage.output_tokens)
    assert row_for(server, "responses-audit-2")["endpoint"] == f"{RESPONSES}/{created.id}"
    # Metrics count by route: one label for every retrieved response, none per id. (A request is
    # counted once its response has ended, which may be just after the client has it.)
    label = 'endpoint="/v1/responses/{response_id}"'
    with server.http() as http:
        assert wait_until(lambda: label in http.get("/metrics").text)
        assert created.id not in http.get("/metrics").text


def test_stored_responses_belong_to_the_key_that_made_them(tmp_path_factory, models):
    from mlx_manager.auth import key_digest, new_key
    from tests.daemon_server import settings_with

    path, _ = models["hermes"]
    alice, bob = new_key(), new_key()
    keys = [
        {"name": n, "sha256": key_digest(k), "created": "2025-01-01T00:00:00Z"}
        for n, k in (("alice", alice), ("bob", bob))
    ]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLX_MANAGER_HOME", str(tmp_path_factory.mktemp("home")))
        with serving(path, settings=settings_with(auth={"keys": keys})) as live:
            created = live.openai(api_key=alice).responses.create(model=path, input=QUESTION)
            assert live.openai(api_key=alice).responses.retrieve(created.id).id == created.id
            with pytest.raises(openai.NotFoundError):
                live.openai(api_key=bob).responses.retrieve(created.id)
            with pytest.raises(openai.NotFoundError):
                live.openai(api_key=bob).responses.create(model=path, input="hi", previous_response_id=created.id)
            with httpx.Client(base_url=live.url) as http:
                assert http.get(f"{RESPONSES}/{created.id}").status_code == 401


def test_prompts_tools_and_stored_answers_never_reach_the_disk_or_the_log(server, client, models, caplog):
    import logging
    import uuid

    caplog.set_level(logging.DEBUG)
    marker = f"PRIVATE-{uuid.uuid4().hex}"
    path, scripted = models["hermes"]
    tool = {**TOOL, "description": marker}
    first = client.responses.create(
        model=path,
        input=QUESTION,
        tools=[tool],
        instructions=marker,
        extra_headers={"X-Request-ID": "responses-private-1"},
    )
    results = [{**result, "output": marker} for result in results_for(first)]
    with client.responses.stream(
        model=path,
        previous_response_id=first.id,
        input=results,
        tools=[tool],
        extra_headers={"X-Request-ID": "responses-private-2"},
    ) as stream:
        stream.until_done()
    for request_id in ("responses-private-1", "responses-private-2"):
        row_for(server, request_id)
    assert len(server.daemon.responses) >= 2  # stored, in memory
    secrets = [marker, "get_weather", '"city"', scripted.answer, scripted.thinking]
    for file in [p for p in server.daemon.audit.path.parent.rglob("*") if p.is_file()]:
        data = file.read_bytes()
        assert not [s for s in secrets if s.encode() in data], file
    # The daemon's records (the client SDK in this process logs its own requests at DEBUG).
    daemon_records = [r for r in caplog.records if not r.name.startswith(CLIENT_LOGGERS)]
    logged = "\n".join(record.getMessage() for record in daemon_records)
    assert "responses-private-2" in logged
    assert not [s for s in secrets if s in logged]
