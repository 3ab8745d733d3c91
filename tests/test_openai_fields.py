"""Every field OpenAI defines, done or refused by name, through the official `openai` client
against a live daemon: log probabilities that agree with a direct mlx-lm forward pass of the same
model, penalties and logit_bias as their definitions say, n choices, batched prompts, the context
limit, aliases, and the 400 for each refused field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import openai
import pytest

from mlx_manager.daemon.openai_fields import FIELDS
from tests.daemon_server import assert_problem, serving, settings_with
from tests.test_daemon_audit import row_for

HELLO = [{"role": "user", "content": "hello there"}]
PROMPT_IDS = [40, 41, 50, 51, 60, 61, 70, 71, 80, 81]
EOS = 0  # the test models' <|end|>: biased away where a test needs its full length


@pytest.fixture(scope="module")
def small_context_model(tmp_path_factory) -> str:
    """The fast model's weights, declaring a context of 2,048 tokens (the issue's case)."""
    from tests.models import build_model

    return str(build_model(tmp_path_factory.mktemp("models") / "small-context", "fast", context=2048))


@pytest.fixture(scope="module")
def server(fast_model, small_context_model, tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLX_MANAGER_HOME", str(tmp_path_factory.mktemp("home")))
        settings = settings_with(models={"aliases": {"tiny": fast_model}})
        with serving(fast_model, small_context_model, settings=settings) as live:
            yield live


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


# -- a direct mlx-lm forward pass, the reference --------------------------------------------------


@pytest.fixture(scope="module")
def reference(fast_model):
    """The same model loaded by mlx-lm itself, and its tokenizer's byte table (transformers')."""
    from mlx_lm import load
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    model, tokenizer = load(fast_model)
    to_byte = {char: byte for byte, char in bytes_to_unicode().items()}

    def token_bytes(token: int) -> bytes:
        return bytes(to_byte[char] for char in tokenizer.convert_ids_to_tokens(token))

    return model, tokenizer, token_bytes


Adjust = Callable[[mx.array, list[int], list[int]], mx.array]


def greedy_steps(model: Any, prompt: list[int], steps: int, top: int, adjust: Adjust | None = None):
    """Greedy decoding with a full forward pass per step (no cache): each step's token, its log
    probability and the `top` most likely tokens, from log-softmax over the (adjusted) logits."""
    tokens, out = list(prompt), []
    for _ in range(steps):
        logits = model(mx.array(tokens)[None])[0, -1].astype(mx.float32)
        if adjust is not None:
            logits = adjust(logits, tokens, [t for t, _, _ in out])
        logprobs = logits - mx.logsumexp(logits)
        token = int(mx.argmax(logprobs).item())
        best = mx.argsort(-logprobs)[:top].tolist()
        out.append((token, float(logprobs[token].item()), best))
        tokens.append(token)
    return out


def assert_agrees(entries: list[dict], expected: list, token_bytes: Callable[[int], bytes]) -> None:
    """Chat-shaped entries (token, logprob, bytes, top_logprobs) against the reference steps."""
    assert len(entries) == len(expected)
    for entry, (token, logprob, best) in zip(entries, expected, strict=True):
        assert bytes(entry["bytes"]) == token_bytes(token)
        assert entry["logprob"] == pytest.approx(logprob, abs=2e-3)
        assert [bytes(t["bytes"]) for t in entry["top_logprobs"]] == [token_bytes(t) for t in best]
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(logprob, abs=2e-3)


def text_of(data: bytes) -> str:
    """A token's text as OpenAI writes it: bytes that are not whole characters as \\xNN."""
    return data.decode("utf-8", "backslashreplace")


def without_eos(logits: mx.array, context: list[int], generated: list[int]) -> mx.array:
    return logits + mx.array([-100.0 if i == EOS else 0.0 for i in range(logits.shape[0])])


# -- log probabilities ----------------------------------------------------------------------------


def test_chat_logprobs_agree_with_mlx_lm_alone_and_in_a_batch(client, fast_model, reference):
    model, tokenizer, token_bytes = reference
    prompt = list(tokenizer.apply_chat_template(HELLO, add_generation_prompt=True))
    options = {"logprobs": True, "top_logprobs": 3, "temperature": 0, "max_tokens": 8, "logit_bias": {EOS: -100}}
    alone = client.chat.completions.create(model=fast_model, messages=HELLO, **options)
    # n=2: two sequences in mlx-lm's BatchGenerator, not the lone-job loop.
    batched = client.chat.completions.create(model=fast_model, messages=HELLO, n=2, **options)
    expected = greedy_steps(model, prompt, 8, 3, without_eos)
    for choice in [*alone.choices, *batched.choices]:
        entries = [entry.model_dump() for entry in choice.logprobs.content]
        assert_agrees(entries, expected, token_bytes)
        assert all(isinstance(e["token"], str) for e in entries)


def test_streamed_chat_logprobs_are_the_same_entries(client, fast_model):
    options = {"logprobs": True, "top_logprobs": 2, "temperature": 0, "max_tokens": 10, "logit_bias": {EOS: -100}}
    whole = client.chat.completions.create(model=fast_model, messages=HELLO, **options)
    streamed = []
    for chunk in client.chat.completions.create(model=fast_model, messages=HELLO, stream=True, **options):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                streamed += choice.logprobs.content
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in whole.choices[0].logprobs.content]
    assert whole.choices[0].logprobs.refusal is None


def test_completions_logprobs_in_the_legacy_shape_agree_with_mlx_lm(client, fast_model, reference):
    model, _, token_bytes = reference
    done = client.completions.create(
        model=fast_model, prompt=PROMPT_IDS, max_tokens=6, temperature=0, logprobs=2, logit_bias={EOS: -100}
    )
    logprobs = done.choices[0].logprobs
    expected = greedy_steps(model, PROMPT_IDS, 6, 2, without_eos)
    assert logprobs.tokens == [text_of(token_bytes(t)) for t, _, _ in expected]
    assert logprobs.token_logprobs == pytest.approx([lp for _, lp, _ in expected], abs=2e-3)
    tops = [[text_of(token_bytes(t)) for t in best] for *_, best in expected]
    assert [list(top) for top in logprobs.top_logprobs] == tops
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(6)]
    streamed_tokens: list[str] = []
    for chunk in client.completions.create(
        model=fast_model,
        prompt=PROMPT_IDS,
        max_tokens=6,
        temperature=0,
        logprobs=2,
        logit_bias={EOS: -100},
        stream=True,
    ):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed_tokens += chunk.choices[0].logprobs.tokens
    assert streamed_tokens == logprobs.tokens


def test_without_logprobs_there_are_none(client, fast_model):
    done = client.chat.completions.create(model=fast_model, messages=HELLO, max_tokens=3)
    assert done.choices[0].logprobs is None
    assert client.completions.create(model=fast_model, prompt="x", max_tokens=3).choices[0].logprobs is None


# -- penalties and logit_bias ----------------------------------------------------------------------


def test_the_penalty_processor_does_what_openai_defines():
    from mlx_manager.engine.logits import PenaltyProcessor

    processor = PenaltyProcessor(8, frequency=0.5, presence=0.25, bias={3: 2.0, 7: -100.0})
    logits = mx.zeros((1, 8))
    first = processor(mx.array([5, 6]), logits)  # the prompt's call: nothing generated yet
    assert first.tolist() == [[0, 0, 0, 2.0, 0, 0, 0, -100.0]]
    for generated in ([1], [1, 1], [1, 1, 4]):  # each later call brings the last sampled token
        out = processor(mx.array([5, 6, *generated]), logits)
    # count(1) = 2, count(4) = 1: logit -= count * 0.5 + (count > 0) * 0.25, then the bias.
    assert out.tolist() == [[0, -1.25, 0, 2.0, -0.75, 0, 0, -100.0]]
    processor.resume([2, 2, 2])  # the same sequence going on in another batch
    assert processor(mx.array([5, 6, 2]), logits).tolist() == [[0, 0, -1.75, 2.0, 0, 0, 0, -100.0]]


def test_repetition_penalty_processor_keeps_its_window():
    from mlx_manager.engine.logits import RepetitionPenalty

    processor = RepetitionPenalty(2.0, prompt=[1], context_size=2)

    def logits() -> mx.array:
        return mx.array([[4.0, 4.0, -4.0, 4.0]])

    assert processor(mx.array([1]), logits()).tolist() == [[4.0, 2.0, -4.0, 4.0]]
    assert processor(mx.array([1, 2]), logits()).tolist() == [[4.0, 2.0, -8.0, 4.0]]  # window [1, 2]
    assert processor(mx.array([1, 2, 3]), logits()).tolist() == [[4.0, 4.0, -8.0, 2.0]]  # window [2, 3]
    processor.resume([3, 1])  # going on elsewhere: the window is the prompt and these, the last two
    assert processor(mx.array([1, 3, 1]), logits()).tolist() == [[4.0, 2.0, -4.0, 2.0]]


def penalized(frequency: float, presence: float, bias: dict[int, float]) -> Adjust:
    """The OpenAI definition, over the tokens generated so far."""

    def adjust(logits: mx.array, context: list[int], generated: list[int]) -> mx.array:
        row = [0.0] * logits.shape[0]
        for token, value in bias.items():
            row[token] += value
        for token in set(generated):
            row[token] -= generated.count(token) * frequency + presence
        return logits + mx.array(row)

    return adjust


def test_penalties_change_greedy_output_as_defined(client, fast_model, reference):
    model, _, token_bytes = reference
    options = {"model": fast_model, "prompt": PROMPT_IDS, "max_tokens": 12, "temperature": 0, "logprobs": 0}
    plain = client.completions.create(**options, logit_bias={EOS: -100})
    done = client.completions.create(
        **options, frequency_penalty=1.5, presence_penalty=0.5, logit_bias={EOS: -100, 100: 3}
    )
    expected = greedy_steps(model, PROMPT_IDS, 12, 1, penalized(1.5, 0.5, {EOS: -100, 100: 3}))
    assert done.choices[0].logprobs.tokens == [text_of(token_bytes(t)) for t, _, _ in expected]
    assert done.choices[0].logprobs.token_logprobs == pytest.approx([lp for _, lp, _ in expected], abs=2e-3)
    assert done.choices[0].text != plain.choices[0].text


def test_repetition_penalty_follows_mlx_lm(client, fast_model, reference):
    model, _, token_bytes = reference

    def repetition(logits: mx.array, context: list[int], generated: list[int]) -> mx.array:
        values = logits.tolist()
        for token in set(context[-20:]):
            values[token] = values[token] * 1.3 if values[token] < 0 else values[token] / 1.3
        values[EOS] -= 100
        return mx.array(values)

    done = client.completions.create(
        model=fast_model,
        prompt=PROMPT_IDS,
        max_tokens=10,
        temperature=0,
        logprobs=0,
        logit_bias={EOS: -100},
        extra_body={"repetition_penalty": 1.3},  # mlx-lm's, not OpenAI's
    )
    expected = greedy_steps(model, PROMPT_IDS, 10, 1, repetition)
    assert done.choices[0].logprobs.token_logprobs == pytest.approx([lp for _, lp, _ in expected], abs=2e-3)


def test_logit_bias_forces_and_forbids_tokens(client, fast_model, reference):
    _, tokenizer, token_bytes = reference
    forced = client.completions.create(
        model=fast_model, prompt="hello", max_tokens=5, temperature=0, logprobs=0, logit_bias={"65": 100}
    )
    assert forced.choices[0].logprobs.tokens == [text_of(token_bytes(65))] * 5
    options = {"model": fast_model, "prompt": PROMPT_IDS, "max_tokens": 1, "temperature": 0, "logprobs": 0}
    first = client.completions.create(**options).choices[0].logprobs.tokens[0]
    first_id = next(t for t in range(len(tokenizer)) if text_of(token_bytes(t)) == first)
    banned = client.completions.create(**options, logit_bias={first_id: -100}).choices[0].logprobs.tokens[0]
    assert banned != first


def test_logit_bias_outside_the_vocabulary_is_a_400_naming_it(client, fast_model):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=fast_model, messages=HELLO, max_tokens=2, logit_bias={"9999": 5})
    assert caught.value.param == "logit_bias" and "9999" in caught.value.message
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(model=fast_model, messages=HELLO, max_tokens=2, logit_bias={"5": 101})
    assert caught.value.param.startswith("logit_bias")


# -- n choices and several prompts -----------------------------------------------------------------


def test_n_gives_equal_choices_under_greedy_and_counts_them_all(client, fast_model):
    one = client.chat.completions.create(model=fast_model, messages=HELLO, max_tokens=12, temperature=0)
    three = client.chat.completions.create(model=fast_model, messages=HELLO, max_tokens=12, temperature=0, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {one.choices[0].message.content}
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens


def test_n_streams_each_choice_with_its_index(client, fast_model):
    whole = client.chat.completions.create(model=fast_model, messages=HELLO, max_tokens=10, temperature=0, n=2)
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    usage = None
    for chunk in client.chat.completions.create(
        model=fast_model,
        messages=HELLO,
        max_tokens=10,
        temperature=0,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    ):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert set(finishes) == {0, 1}
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_sampled_choices_differ_and_seeded_ones_repeat(client, fast_model):
    kwargs = {"model": fast_model, "prompt": "class ", "max_tokens": 16, "temperature": 1.0, "n": 3, "seed": 7}
    first = [c.text for c in client.completions.create(**kwargs).choices]
    again = [c.text for c in client.completions.create(**kwargs).choices]
    assert first == again
    assert len(set(first)) > 1


def test_four_prompts_are_one_batched_request(client, fast_model):
    prompts = ["import os\n", "def main():", "class Tree:", "while True:"]
    alone = [client.completions.create(model=fast_model, prompt=p, max_tokens=8, temperature=0) for p in prompts]
    batch = client.completions.create(model=fast_model, prompt=prompts, max_tokens=8, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [a.choices[0].text for a in alone]
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert batch.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    # With n: choice i * n + j is prompt i's j-th.
    doubled = client.completions.create(model=fast_model, prompt=prompts, max_tokens=8, temperature=0, n=2)
    assert [c.text for c in doubled.choices] == [a.choices[0].text for a in alone for _ in range(2)]
    # Token-id prompts, and streamed.
    ids = [PROMPT_IDS, PROMPT_IDS[:5]]
    texts: dict[int, str] = {}
    for chunk in client.completions.create(model=fast_model, prompt=ids, max_tokens=6, temperature=0, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    whole = client.completions.create(model=fast_model, prompt=ids, max_tokens=6, temperature=0)
    assert texts == {c.index: c.text for c in whole.choices}


def test_too_many_choices_are_refused(client, fast_model):
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.completions.create(model=fast_model, prompt=["a"] * 40, n=2, max_tokens=2)
    assert caught.value.param == "n" and "server.queue_limit" in caught.value.message


# -- the context -----------------------------------------------------------------------------------


def test_prompt_and_max_tokens_over_the_context_is_openais_400(client, small_context_model):
    prompt = [5 + i % 400 for i in range(1812)]
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=small_context_model, prompt=prompt, max_tokens=600)
    error = caught.value
    assert error.code == "context_length_exceeded"
    assert error.body["message"].startswith(
        "This model's maximum context length is 2048 tokens. However, you requested 2412 tokens"
        " (1812 in the prompt, 600 in the completion)."
    )
    messages = [{"role": "user", "content": "word " * 3000}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=small_context_model, messages=messages, max_tokens=5)
    assert caught.value.code == "context_length_exceeded" and caught.value.param == "messages"
    assert "maximum context length is 2048 tokens" in caught.value.message


def test_without_max_tokens_the_default_is_cut_to_what_fits(client, small_context_model):
    prompt = [5 + i % 400 for i in range(1812)]
    done = client.completions.create(model=small_context_model, prompt=prompt, logit_bias={EOS: -100})
    assert done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 2048 - 1812


# -- aliases ---------------------------------------------------------------------------------------


def test_an_alias_serves_lists_and_is_audited(server, client, fast_model):
    done = client.chat.completions.with_raw_response.create(model="tiny", messages=HELLO, max_tokens=3)
    assert done.parse().model == "tiny"
    listed = {m.id: m for m in client.models.list().data}
    assert listed["tiny"].root == fast_model and fast_model not in listed
    assert client.models.retrieve("tiny").root == fast_model
    assert row_for(server, done.headers["x-request-id"])["model"] == "tiny"


# -- refused fields --------------------------------------------------------------------------------

# A value each refused field is refused with; the test fails for a refused field without one.
REFUSED_VALUES: dict[str, Any] = {
    "stream_options.include_obfuscation": True,
    "functions": [{"name": "f", "parameters": {"type": "object"}}],
    "function_call": "auto",
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"},
    "web_search_options": {},
    "verbosity": "low",
    "store": True,
    "service_tier": "priority",
    "prompt_cache_retention": "24h",
    "best_of": 2,
    "echo": True,
    "suffix": "}",
}
REFUSED = [(field.name, endpoint) for field in FIELDS for endpoint in field.endpoints if field.status == "refused"]


def body_with(endpoint: str, model: str, dotted: str, value: Any) -> tuple[str, dict]:
    body: dict[str, Any] = {"model": model, "max_tokens": 2}
    if endpoint == "chat":
        path, body["messages"] = "/v1/chat/completions", HELLO
    else:
        path, body["prompt"] = "/v1/completions", "hi"
    head, _, rest = dotted.partition(".")
    body[head] = {rest: value} if rest else value
    if head == "stream_options":
        body["stream"] = True
    return path, body


@pytest.mark.parametrize(("name", "endpoint"), REFUSED, ids=[f"{e}-{n}" for n, e in REFUSED])
def test_each_refused_field_is_a_400_naming_it(server, fast_model, name, endpoint):
    path, body = body_with(endpoint, fast_model, name, REFUSED_VALUES[name])
    with server.http() as http:
        document = assert_problem(http.post(path, json=body), 400, "not_supported")
    assert document["error"]["param"] == name and document["detail"].startswith(f"{name}: ")


def test_values_that_change_nothing_pass(client, fast_model):
    client.completions.create(model=fast_model, prompt="hi", max_tokens=2, best_of=1, echo=False, suffix="")
    client.chat.completions.create(
        model=fast_model,
        messages=HELLO,
        max_tokens=2,
        store=False,
        modalities=["text"],
        service_tier="auto",
        user="someone",
        metadata={"k": "v"},
        prompt_cache_key="k",
    )


def test_the_sdk_raises_with_the_field_named(client, fast_model):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=fast_model, prompt="def f(", suffix="    return 1", max_tokens=5)
    assert caught.value.param == "suffix" and caught.value.code == "not_supported"
    assert caught.value.body["message"] == "suffix: suffix (fill in the middle) is not supported"


def test_a_message_name_the_template_drops_is_refused(client, fast_model):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=fast_model, messages=[{"role": "user", "content": "hi", "name": "ann"}], max_tokens=2
        )
    assert caught.value.param == "messages.0.name" and "does not use message names" in caught.value.message


# -- error text ------------------------------------------------------------------------------------


def test_messages_carry_no_pydantic_prefix(client, fast_model):
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(model=fast_model, messages=HELLO, top_logprobs=2)
    assert caught.value.body["message"] == "top_logprobs needs logprobs set to true"
    assert "Value error" not in json.dumps(caught.value.response.json())


def test_an_unknown_route_names_the_nearest_endpoint(server):
    with server.http() as http:
        document = assert_problem(http.post("/v1/chat/completion", json={}), 404, "not_found")
    assert document["detail"] == "no route POST /v1/chat/completion; did you mean POST /v1/chat/completions?"
