"""Structured output through the real daemon: JSON valid by construction, from a random model.

The fast test model has random weights: left alone it writes noise. Every schema here is bounded
(lengths, ranges, enums), so under the grammar it must finish a valid document within max_tokens.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.daemon_server import serving
from tests.json_schemas import SCHEMAS

MAX_TOKENS = 300


@pytest.fixture(scope="module")
def server(fast_model, tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLX_MANAGER_HOME", str(tmp_path_factory.mktemp("home")))
        with serving(fast_model) as live:
            yield live


def response_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def fifty_requests() -> list[tuple[str, dict, str, float]]:
    """50 (schema name, schema, prompt, temperature): every schema, several prompts and samplings."""
    names = list(SCHEMAS)
    cases = []
    for i in range(50):
        name = names[i % len(names)]
        cases.append((name, SCHEMAS[name], f"request {i}: describe item {i * 7}", 0.0 if i % 2 else 0.8))
    return cases


def test_fifty_schemas_give_valid_json_whole_and_streamed(server, fast_model):
    async def one(client, index, name, schema, prompt, temperature):
        slug = "".join(c if c.isalnum() else "_" for c in name)
        request = dict(
            model=fast_model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=MAX_TOKENS,
            temperature=temperature,
            seed=index,
            response_format=response_format(slug, schema),
        )
        if index % 2:  # every other one streamed
            text, finish = "", None
            async for chunk in await client.chat.completions.create(**request, stream=True):
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
            return name, schema, text, finish
        choice = (await client.chat.completions.create(**request)).choices[0]
        return name, schema, choice.message.content, choice.finish_reason

    async def main():
        async with server.async_openai() as client:
            cases = fifty_requests()
            return [await one(client, i, *case) for i, case in enumerate(cases)]

    results = asyncio.run(main())
    assert len({name for name, *_ in results}) == len(SCHEMAS)
    for name, schema, text, finish in results:
        assert finish == "stop", (name, finish, text)
        jsonschema.validate(json.loads(text), schema)


def test_eight_schemas_and_four_free_requests_decode_together(server, fast_model):
    names = list(SCHEMAS)[:8]

    async def one(client, name):
        request = dict(
            model=fast_model,
            messages=[{"role": "user", "content": f"about {name}"}],
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        if name is not None:
            request["response_format"] = response_format("s" + str(names.index(name)), SCHEMAS[name])
        choice = (await client.chat.completions.create(**request)).choices[0]
        return name, choice.message.content, choice.finish_reason

    async def main():
        async with server.async_openai() as client:
            together = await asyncio.gather(*(one(client, n) for n in [*names, None, None, None, None]))
            free_alone = await one(client, None)
            return together, free_alone

    together, free_alone = asyncio.run(main())
    for name, text, finish in together:
        if name is None:
            assert text == free_alone[1]  # the free requests are untouched by their neighbours' grammars
        else:
            assert finish == "stop"
            jsonschema.validate(json.loads(text), SCHEMAS[name])
    # The batch really ran them together.
    jobs = server.engine.jobs[-13:-1]
    assert max(j.submitted_at for j in jobs) < min(j.stopped_at for j in jobs)


def test_json_object_mode_and_completions(server, fast_model):
    client = server.openai()
    chat = client.chat.completions.create(
        model=fast_model,
        messages=[{"role": "user", "content": "json please"}],
        max_tokens=MAX_TOKENS,
        response_format={"type": "json_object"},
        temperature=0,
    )
    # A random model may write any object; it may run to max_tokens before closing it.
    text, finish = chat.choices[0].message.content, chat.choices[0].finish_reason
    if finish == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert finish == "length" and text.startswith("{")
    completion = client.completions.create(
        model=fast_model,
        prompt="The answer:",
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"response_format": response_format("age", SCHEMAS["object"])},
    )
    jsonschema.validate(json.loads(completion.choices[0].text), SCHEMAS["object"])


def test_max_tokens_cutting_the_json_short_says_length(server, fast_model):
    choice = (
        server.openai()
        .chat.completions.create(
            model=fast_model,
            messages=[{"role": "user", "content": "x"}],
            max_tokens=3,
            temperature=0,
            response_format=response_format("nested", SCHEMAS["nested"]),
        )
        .choices[0]
    )
    assert choice.finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice.message.content)


class Pet(BaseModel):
    species: Literal["cat", "dog", "parrot"]
    age: int = Field(ge=0, le=30)
    name: str = Field(max_length=12)


def test_the_openai_sdk_parse_helper_gets_a_parsed_model(server, fast_model):
    completion = server.openai().chat.completions.parse(
        model=fast_model,
        messages=[{"role": "user", "content": "describe a pet"}],
        response_format=Pet,
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    pet = completion.choices[0].message.parsed
    assert isinstance(pet, Pet)


def test_langchain_with_structured_output(server, fast_model):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=fast_model,
        base_url=server.url + "/v1",
        api_key="unused",
        temperature=0,
        max_retries=0,
        max_tokens=MAX_TOKENS,
    )
    pet = llm.with_structured_output(Pet, method="json_schema").invoke("describe a pet")
    assert isinstance(pet, Pet)


@pytest.mark.parametrize(
    ("response_format", "named"),
    [
        (
            {"type": "json_schema", "json_schema": {"name": "u", "schema": {"type": "array", "uniqueItems": True}}},
            "'uniqueItems'",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "f", "schema": {"type": "string", "format": "idn-email"}}},
            "idn-email",
        ),
        ({"type": "yaml"}, "'yaml'"),
        ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, "name"),
    ],
    ids=["uniqueItems", "unknown format", "unknown type", "bad name"],
)
def test_what_cannot_be_enforced_is_a_400_that_names_it(server, fast_model, response_format, named):
    with pytest.raises(openai.BadRequestError) as caught:
        server.openai().chat.completions.create(
            model=fast_model, messages=[{"role": "user", "content": "x"}], response_format=response_format
        )
    body = caught.value.body
    assert body["param"] == "response_format" and named in body["message"]


def test_response_format_with_tools_the_model_may_call_is_refused(server, fast_model):
    from tests.scripted_model import WEATHER_TOOL

    with pytest.raises(openai.BadRequestError) as caught:
        server.openai().chat.completions.create(
            model=fast_model,
            messages=[{"role": "user", "content": "x"}],
            tools=[WEATHER_TOOL],
            response_format={"type": "json_object"},
        )
    assert caught.value.body["param"] == "response_format"


def test_the_audit_row_says_a_constraint_was_used_and_never_the_schema(server, fast_model):
    from tests.test_daemon_audit import row_for

    marker = "unicorn_field_73"
    raw = server.openai().chat.completions.with_raw_response.create(
        model=fast_model,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        response_format=response_format(
            "marked",
            {
                "type": "object",
                "properties": {marker: {"type": "boolean"}},
                "required": [marker],
                "additionalProperties": False,
            },
        ),
    )
    row = row_for(server, raw.headers["x-request-id"])
    assert row["constrained"] == 1
    for file in itertools.chain(server.daemon.audit.path.parent.glob("audit.db*")):
        assert marker.encode() not in file.read_bytes()
