"""Tool calling and reasoning through the official `openai` client, against scripted real models.

The scripted models (tests/scripted_model.py) are real mlx-lm models whose greedy output is a
known script: a thinking section and tool calls in the Qwen/Hermes format, or calls in the
Mistral format. mlx-lm picks the parser and think tokens from their tokenizers, as it would for
the real families; these tests check what a client sees of them.
"""

from __future__ import annotations

import json
from typing import Literal

import openai
import pytest

from tests.daemon_server import serving
from tests.scripted_model import (
    HERMES_PARALLEL,
    HERMES_SPLIT_TAGS,
    HERMES_TOOL,
    MISTRAL_PARALLEL,
    MISTRAL_TOOL,
    QUESTION,
    WEATHER_TOOL,
    Scripted,
)

# Every piece of markup the families use: none of it may reach `content`.
MARKUP = ("<tool_call>", "</tool_call>", "<tool", "_call>", "<think>", "</think>", "[TOOL_CALLS]", "[ARGS]")


@pytest.fixture(scope="module")
def models(
    hermes_tool_model, hermes_parallel_model, hermes_split_tags_model, mistral_tool_model, mistral_parallel_model
):
    return {
        "hermes": (hermes_tool_model, HERMES_TOOL),
        "hermes_parallel": (hermes_parallel_model, HERMES_PARALLEL),
        "hermes_split": (hermes_split_tags_model, HERMES_SPLIT_TAGS),
        "mistral": (mistral_tool_model, MISTRAL_TOOL),
        "mistral_parallel": (mistral_parallel_model, MISTRAL_PARALLEL),
    }


@pytest.fixture(scope="module")
def server(models, fast_model, tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLX_MANAGER_HOME", str(tmp_path_factory.mktemp("home")))
        with serving(*(path for path, _ in models.values()), fast_model, max_loaded=8) as live:
            yield live


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


def expected_calls(scripted: Scripted) -> list[tuple[str, dict]]:
    return [(c.name, c.arguments) for c in scripted.calls]


def calls_of(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


@pytest.mark.parametrize("name", ["hermes", "hermes_parallel", "hermes_split", "mistral", "mistral_parallel"])
def test_a_tool_call_comes_back_as_tool_calls(client, models, name):
    path, scripted = models[name]
    response = client.chat.completions.create(
        model=path, messages=scripted.messages(), tools=[WEATHER_TOOL], temperature=0, max_tokens=200
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert calls_of(choice.message) == expected_calls(scripted)
    ids = [c.id for c in choice.message.tool_calls]
    assert len(set(ids)) == len(ids) and all(c.type == "function" for c in choice.message.tool_calls)
    assert choice.message.content is None  # nothing but calls (and thinking)
    thinking = getattr(choice.message, "reasoning_content", None)
    assert thinking == scripted.thinking
    assert choice.message.model_extra.get("reasoning") == scripted.thinking
    if scripted.thinking:
        assert response.usage.completion_tokens_details.reasoning_tokens > 0
    else:
        assert response.usage.completion_tokens_details.reasoning_tokens == 0


@pytest.mark.parametrize("name", ["hermes", "hermes_parallel", "hermes_split", "mistral", "mistral_parallel"])
def test_streamed_tool_calls_arrive_as_openai_sends_them_and_no_markup_leaks(client, models, name):
    path, scripted = models[name]
    stream = client.chat.completions.create(
        model=path, messages=scripted.messages(), tools=[WEATHER_TOOL], temperature=0, max_tokens=200, stream=True
    )
    calls: dict[int, dict] = {}
    content, reasoning, finish = "", "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for text in (delta.content or "",):
            assert not any(tag in text for tag in MARKUP), text
            content += text
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        for call in delta.tool_calls or []:
            if call.index not in calls:  # the first delta of a call carries its id, type and name
                assert call.id and call.type == "function" and call.function.name
                calls[call.index] = {"name": call.function.name, "arguments": call.function.arguments or ""}
            else:
                assert call.id is None and call.function.name is None
                calls[call.index]["arguments"] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert content == ""
    assert reasoning == (scripted.thinking or "")
    assert sorted(calls) == list(range(len(scripted.calls)))
    assert [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)] == expected_calls(scripted)


@pytest.mark.parametrize("name", ["hermes", "mistral_parallel"])
def test_a_round_trip_call_result_answer(client, models, name):
    path, scripted = models[name]
    first = client.chat.completions.create(
        model=path, messages=[{"role": "user", "content": QUESTION}], tools=[WEATHER_TOOL], temperature=0
    )
    message = first.choices[0].message
    history = [{"role": "user", "content": QUESTION}, message.model_dump(exclude_none=True)]
    history += [
        {"role": "tool", "tool_call_id": call.id, "content": '{"city": "Paris", "sky": "sunny", "temperature_c": 22}'}
        for call in message.tool_calls
    ]
    final = client.chat.completions.create(model=path, messages=history, tools=[WEATHER_TOOL], temperature=0)
    choice = final.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content == scripted.answer
    assert choice.message.tool_calls is None
    assert getattr(choice.message, "reasoning_content", None) == scripted.answer_thinking


def test_reasoning_streams_apart_from_the_answer(client, models):
    path, scripted = models["hermes"]
    stream = client.chat.completions.create(
        model=path, messages=scripted.messages(after_tool=True), tools=[WEATHER_TOOL], temperature=0, stream=True
    )
    content, reasoning = "", ""
    for chunk in stream:
        delta = chunk.choices[0].delta if chunk.choices else None
        if delta is None:
            continue
        assert not any(tag in (delta.content or "") for tag in MARKUP)
        content += delta.content or ""
        extra = delta.model_extra or {}
        reasoning += extra.get("reasoning_content") or ""
        assert extra.get("reasoning_content") == extra.get("reasoning")
    assert content == scripted.answer
    assert reasoning == scripted.answer_thinking


@pytest.mark.parametrize(
    "options",
    [{"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}, {"reasoning_effort": "none"}],
    ids=["chat_template_kwargs", "reasoning_effort"],
)
def test_thinking_can_be_turned_off(client, models, options):
    path, scripted = models["hermes"]
    response = client.chat.completions.create(
        model=path, messages=scripted.messages(after_tool=True), tools=[WEATHER_TOOL], temperature=0, **options
    )
    message = response.choices[0].message
    assert message.content == scripted.answer
    assert getattr(message, "reasoning_content", None) is None
    assert response.usage.completion_tokens_details.reasoning_tokens == 0


def test_tool_choice_none_hides_the_tools_from_the_model(client, models):
    path, scripted = models["hermes"]
    response = client.chat.completions.create(
        model=path, messages=scripted.messages(), tools=[WEATHER_TOOL], tool_choice="none", temperature=0
    )
    message = response.choices[0].message
    assert message.tool_calls is None and response.choices[0].finish_reason == "stop"
    assert message.content == scripted.plain  # what it says when no tools are offered


def test_parallel_tool_calls_false_stops_after_the_first_call(client, models):
    path, scripted = models["hermes_parallel"]
    response = client.chat.completions.create(
        model=path, messages=scripted.messages(), tools=[WEATHER_TOOL], parallel_tool_calls=False, temperature=0
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert calls_of(choice.message) == expected_calls(scripted)[:1]


def test_tools_for_a_model_without_a_tool_format_are_refused(client, fast_model):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=fast_model, messages=[{"role": "user", "content": "hi"}], tools=[WEATHER_TOOL], max_tokens=4
        )
    body = caught.value.body
    assert caught.value.status_code == 400 and body["code"] == "tools_not_supported" and body["param"] == "tools"
    assert fast_model in body["message"]


def test_reasoning_effort_on_a_model_that_does_not_think_is_refused(client, models):
    path, scripted = models["mistral"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=path, messages=scripted.messages(), reasoning_effort="high")
    assert "reasoning_effort" in caught.value.body["message"]


# Closed choices only: a model whose logits ignore the grammar picks among what it allows, and a
# free string could run on to max_tokens.
UNITS_TOOL = {
    "type": "function",
    "function": {
        "name": "set_units",
        "description": "Choose the units of the answer.",
        "parameters": {
            "type": "object",
            "properties": {"system": {"enum": ["metric", "imperial"]}, "precise": {"type": "boolean"}},
            "required": ["system", "precise"],
            "additionalProperties": False,
        },
    },
}


# The Hermes family only: llguidance misreads the test Mistral tokenizer's byte-fallback tokens (a
# SentencePiece vocabulary with no bare "▁"), which a model that ignores the grammar then samples.
@pytest.mark.parametrize("name", ["hermes", "hermes_split"])
@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "set_units"}}], ids=["required", "named"]
)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_forced_call_is_always_made(client, models, name, choice, stream):
    import jsonschema

    path, scripted = models[name]
    # After the tool result the model would answer in words: the grammar makes it call instead.
    # The Hermes model thinks first (its script): its thinking stays free, the call comes after.
    # The other has no thinking in its script: with thinking on, the grammar's choice between
    # opening a think section and calling would be a tie of the model's logits.
    request = dict(
        model=path,
        messages=scripted.messages(after_tool=True),
        tools=[UNITS_TOOL],
        tool_choice=choice,
        temperature=0,
        max_tokens=120,
    )
    if not scripted.answer_thinking:
        request["extra_body"] = {"chat_template_kwargs": {"enable_thinking": False}}
    if stream:
        calls: dict[int, dict] = {}
        finish = None
        for chunk in client.chat.completions.create(**request, stream=True):
            for call in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
                entry = calls.setdefault(call.index, {"name": call.function.name, "arguments": ""})
                entry["arguments"] += call.function.arguments or ""
            finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
        made = [(c["name"], json.loads(c["arguments"])) for c in calls.values()]
    else:
        choice_ = client.chat.completions.create(**request).choices[0]
        finish, made = choice_.finish_reason, calls_of(choice_.message)
    assert finish == "tool_calls"
    [(called, arguments)] = made
    assert called == "set_units"
    jsonschema.validate(arguments, UNITS_TOOL["function"]["parameters"])


def test_a_named_choice_calls_that_tool_among_several(client, models):
    path, scripted = models["hermes"]
    named = {"type": "function", "function": {"name": "set_units"}}
    response = client.chat.completions.create(
        model=path, messages=scripted.messages(), tools=[WEATHER_TOOL, UNITS_TOOL], tool_choice=named, temperature=0
    )
    # Its script would call get_weather: the named choice makes it call set_units.
    assert [name for name, _ in calls_of(response.choices[0].message)] == ["set_units"]


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools.0"),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages.0"),
    ],
)
def test_malformed_tool_fields_are_named(server, models, body, where):
    path, _ = models["hermes"]
    request = {"model": path, "messages": [{"role": "user", "content": QUESTION}], **body}
    with server.http() as http:
        response = http.post("/v1/chat/completions", json=request)
    assert response.status_code == 422
    assert response.json()["error"]["param"].startswith(where)


def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return '{"city": "Paris", "sky": "sunny", "temperature_c": 22}'


def test_langchain_bind_tools_runs_a_tool_loop(server, models):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    path, scripted = models["hermes"]
    weather = tool(get_weather)
    llm = ChatOpenAI(model=path, base_url=server.url + "/v1", api_key="unused", temperature=0, max_retries=0)
    bound = llm.bind_tools([weather])
    history = [HumanMessage(QUESTION)]
    reply = bound.invoke(history)
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == expected_calls(scripted)
    history += [reply] + [ToolMessage(weather.invoke(c["args"]), tool_call_id=c["id"]) for c in reply.tool_calls]
    final = bound.invoke(history)
    assert final.content == scripted.answer and not final.tool_calls


def test_openai_agents_runs_a_one_tool_agent(server, models):
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # its traces would go to OpenAI's servers
    path, scripted = models["hermes"]
    calls: list[str] = []

    # openai-agents makes its tools strict: the call's arguments are held to the schema by the
    # grammar. A closed one: where the grammar overrules this scripted model, its logits are all
    # alike, and an open string would run on.
    @function_tool
    def weather(city: Literal["Paris"]) -> str:
        """Get the current weather in a city."""
        calls.append(city)
        return get_weather(city)

    weather.name = "get_weather"
    model = OpenAIChatCompletionsModel(model=path, openai_client=server.async_openai())
    agent = Agent(
        name="forecaster",
        instructions="Answer with the weather tool.",
        model=model,
        tools=[weather],
        model_settings=ModelSettings(temperature=0),
    )
    result = Runner.run_sync(agent, QUESTION)
    assert calls == ["Paris"]
    assert result.final_output == scripted.answer


def test_tool_definitions_calls_and_results_never_reach_the_disk_or_the_log(server, models, caplog):
    import logging
    import uuid

    from tests.test_daemon_audit import row_for

    caplog.set_level(logging.DEBUG)
    marker = f"PRIVATE-{uuid.uuid4().hex}"
    path, scripted = models["hermes"]
    tool = json.loads(json.dumps(WEATHER_TOOL))
    tool["function"]["description"] = marker
    client = server.openai()
    client.chat.completions.create(
        model=path, messages=scripted.messages(), tools=[tool], extra_headers={"X-Request-ID": "tools-private-1"}
    )
    history = scripted.messages(after_tool=True)
    history[-1]["content"] = marker
    for _ in client.chat.completions.create(
        model=path, messages=history, tools=[tool], stream=True, extra_headers={"X-Request-ID": "tools-private-2"}
    ):
        pass
    called, answered = (row_for(server, request_id) for request_id in ("tools-private-1", "tools-private-2"))
    # The row says that tools were offered and how many calls came back, and the thinking's size.
    assert (called["tools_offered"], called["tool_calls"], called["constrained"]) == (1, 1, 0)
    assert (answered["tools_offered"], answered["tool_calls"]) == (1, 0)
    assert called["reasoning_tokens"] > 0 and answered["reasoning_tokens"] > 0
    secrets = [marker, "get_weather", '"city"', scripted.answer, scripted.thinking]
    for file in [p for p in server.daemon.audit.path.parent.rglob("*") if p.is_file()]:
        data = file.read_bytes()
        assert not [s for s in secrets if s and s.encode() in data], file
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "tools-private-2" in logged  # the access log line of the request is there, its text is not
    assert not [s for s in secrets if s and s in logged]


def test_a_strict_tool_in_auto_mode_holds_the_call_to_its_schema(client, models):
    path, scripted = models["hermes"]
    only_london = json.loads(json.dumps(WEATHER_TOOL))
    only_london["function"]["strict"] = True
    only_london["function"]["parameters"]["properties"]["city"] = {"enum": ["London"]}
    only_london["function"]["parameters"]["additionalProperties"] = False  # as OpenAI's strict mode requires
    response = client.chat.completions.create(
        model=path, messages=scripted.messages(), tools=[only_london], temperature=0
    )
    # The model says Paris; the schema allows London only. Its thinking stays free.
    assert calls_of(response.choices[0].message) == [("get_weather", {"city": "London"})]
    assert response.choices[0].message.reasoning_content == scripted.thinking
