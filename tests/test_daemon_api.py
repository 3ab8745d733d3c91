"""The OpenAI API against a real server and the fast test model, through the official client."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.daemon_server import serving

HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, fast_model):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLX_MANAGER_HOME", str(tmp_path_factory.mktemp("home")))
        with serving(fast_model) as live:
            yield live


@pytest.fixture
def client(server):
    return server.openai()


def test_chat_completion(server, client, fast_model):
    create = client.chat.completions.with_raw_response.create
    raw = create(model=fast_model, messages=HELLO, max_tokens=12, temperature=0)
    completion = raw.parse()
    request_id = raw.headers["x-request-id"]
    job = server.engine.job(request_id)
    assert completion.model == fast_model  # the id the client sent
    assert completion.id == f"chatcmpl-{request_id}"
    assert completion.object == "chat.completion"
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens == job.prompt_tokens > 0
    assert completion.usage.completion_tokens == job.completion_tokens
    assert 0 < completion.usage.completion_tokens <= 12
    assert completion.usage.total_tokens == job.prompt_tokens + job.completion_tokens


def test_request_fields_reach_the_engine(server, client, fast_model):
    raw = client.chat.completions.with_raw_response.create(
        model=fast_model,
        messages=HELLO,
        max_completion_tokens=5,
        temperature=0.5,
        top_p=0.9,
        seed=3,
        stop="zz",
        user="u1",
    )
    request = server.engine.job(raw.headers["x-request-id"]).request
    assert request.max_tokens == 5 and request.stop == ["zz"]
    assert (request.sampling.temperature, request.sampling.top_p, request.sampling.seed) == (0.5, 0.9, 3)
    assert request.messages == [{"role": "user", "content": "hello there"}]


def test_default_max_tokens_comes_from_settings(server, client, fast_model):
    raw = client.completions.with_raw_response.create(model=fast_model, prompt="x", temperature=0)
    job = server.engine.job(raw.headers["x-request-id"])
    assert job.request.max_tokens == server.daemon.settings.models.default_max_tokens
    assert raw.parse().usage.completion_tokens == job.completion_tokens


@pytest.mark.parametrize("prompt", ["def parse(text):", [5, 17, 42, 99]])
def test_completion(server, client, fast_model, prompt):
    raw = client.completions.with_raw_response.create(model=fast_model, prompt=prompt, max_tokens=8, temperature=0)
    completion = raw.parse()
    job = server.engine.job(raw.headers["x-request-id"])
    assert completion.object == "text_completion" and completion.model == fast_model
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens == job.prompt_tokens
    assert completion.usage.completion_tokens == job.completion_tokens <= 8
    if isinstance(prompt, list):
        assert job.prompt_tokens == len(prompt)


def test_chat_stream_matches_the_whole_answer(server, client, fast_model):
    whole = client.chat.completions.create(model=fast_model, messages=HELLO, max_tokens=16, temperature=0)
    stream = client.chat.completions.with_raw_response.create(
        model=fast_model,
        messages=HELLO,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert stream.headers["content-type"].startswith("text/event-stream")
    request_id = stream.headers["x-request-id"]
    chunks = list(stream.parse())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {f"chatcmpl-{request_id}"}
    assert all(c.model == fast_model and c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and all(c.usage is None for c in chunks[:-1])
    job = server.engine.job(request_id)
    assert usage_chunk.usage.completion_tokens == job.completion_tokens == whole.usage.completion_tokens
    assert usage_chunk.usage.prompt_tokens == job.prompt_tokens


def test_stream_wire_format(server, fast_model):
    body = {"model": fast_model, "prompt": "hello", "max_tokens": 4, "stream": True}
    with server.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "usage" not in chunks[0]  # only with stream_options.include_usage
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_string_ends_the_answer(client, fast_model):
    kwargs = {"model": fast_model, "prompt": "import os\n", "max_tokens": 40, "temperature": 0}
    text = client.completions.create(**kwargs).choices[0].text
    stop = text[len(text) // 2 :][:3]
    assert stop.strip(), f"no usable stop string in {text!r}"
    stopped = client.completions.create(**kwargs, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[: text.index(stop)]


def test_seed_makes_sampling_repeatable(client, fast_model):
    kwargs = {"model": fast_model, "prompt": "class ", "max_tokens": 12, "temperature": 1.0, "seed": 1234}
    first, second = (client.completions.create(**kwargs).choices[0].text for _ in range(2))
    assert first == second


def test_async_client(server, fast_model):
    async def main():
        async with server.async_openai() as client:
            whole = await client.completions.create(
                model=fast_model, prompt="while True:", max_tokens=10, temperature=0
            )
            stream = await client.completions.create(
                model=fast_model,
                prompt="while True:",
                max_tokens=10,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            return whole, [chunk async for chunk in stream]

    whole, chunks = asyncio.run(main())
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    streamed = chunks[-1].usage
    assert streamed.model_dump(exclude={"prompt_tokens_details"}) == whole.usage.model_dump(
        exclude={"prompt_tokens_details"}
    )
    # The same prompt again: all of it but the last token comes from the prompt cache.
    assert streamed.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 1


def test_eight_concurrent_streams(server, fast_model):
    results = asyncio.run(_eight_streams(server, fast_model))
    assert len({request_id for request_id, _ in results}) == 8
    jobs = [server.engine.job(request_id) for request_id, _ in results]
    for job, (_, chunks) in zip(jobs, results, strict=True):
        assert chunks[-1].usage.completion_tokens == job.completion_tokens > 0
        assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    # They ran together: each one was submitted before the first one finished.
    first_end = min(job.stopped_at for job in jobs)
    assert all(job.submitted_at < first_end for job in jobs)


async def _eight_streams(server, fast_model):
    client = server.async_openai()

    async def one(i: int):
        raw = await client.chat.completions.with_raw_response.create(
            model=fast_model,
            messages=[{"role": "user", "content": f"question number {i}"}],
            max_tokens=48,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in raw.parse()]
        return raw.headers["x-request-id"], chunks

    async with client:
        return await asyncio.gather(*(one(i) for i in range(8)))


def test_models(client, fast_model):
    assert fast_model in [m.id for m in client.models.list().data]
    model = client.models.retrieve(fast_model)
    assert model.id == fast_model and model.object == "model"


def test_ready_reports_loaded_models(server, fast_model):
    with server.http() as http:
        body = http.get("/ready").json()
    assert body["status"] == "ready" and fast_model in body["loaded"]
    assert body["blas"] == (server.engine.status().blas or "bundled")
