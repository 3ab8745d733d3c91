"""The scripted models say exactly their scripts through mlx-lm, and mlx-lm reads them as it
reads the real families: parser, think tokens, detokenizer."""

from __future__ import annotations

import functools
import re
from typing import Any

import pytest

from tests.scripted_model import (
    HERMES,
    HERMES_PARALLEL,
    HERMES_SPLIT_TAGS,
    HERMES_TOOL,
    LONDON,
    MISTRAL_PARALLEL,
    MISTRAL_TOOL,
    PARIS,
    WEATHER_TOOL,
    Scripted,
    build_scripted_model,
)

CASES = {
    "hermes_tool_model": HERMES_TOOL,
    "hermes_parallel_model": HERMES_PARALLEL,
    "hermes_split_tags_model": HERMES_SPLIT_TAGS,
    "mistral_tool_model": MISTRAL_TOOL,
    "mistral_parallel_model": MISTRAL_PARALLEL,
}
# (name, after_tool, tools): the question with tools, the turn after the tool result, the question without tools
TURNS = [("first", False, True), ("after-tool", True, True), ("no-tools", False, False)]
TURN_PARAMS = [
    pytest.param(after_tool, tools, thinking, id=f"{name}-thinking-{'on' if thinking else 'off'}")
    for name, after_tool, tools in TURNS
    for thinking in (True, False)
]


@functools.cache
def load(path: str) -> tuple[Any, Any]:
    import mlx_lm

    loaded = mlx_lm.load(path)
    return loaded[0], loaded[1]


@pytest.fixture(params=list(CASES))
def scripted(request) -> tuple[Scripted, Any, Any]:
    model, tokenizer = load(request.getfixturevalue(request.param))
    return CASES[request.param], model, tokenizer


def prompt(
    tokenizer: Any, spec: Scripted, *, after_tool: bool = False, thinking: bool = True, tools: bool = True
) -> list[int]:
    return tokenizer.apply_chat_template(
        spec.messages(after_tool=after_tool),
        tools=[WEATHER_TOOL] if tools else None,
        add_generation_prompt=True,
        enable_thinking=thinking,
    )


def parsed_calls(tokenizer: Any, text: str) -> list[dict[str, Any]]:
    """The calls in `text`, read by mlx-lm's own parser for this tokenizer (as mlx_lm.server does)."""
    start, end = tokenizer.tool_call_start, tokenizer.tool_call_end
    if end:
        bodies = re.findall(re.escape(start) + "(.*?)" + re.escape(end), text, re.DOTALL)
    else:  # no end tag: everything after the first start tag
        bodies = [text.split(start, 1)[1]]
    calls: list[dict[str, Any]] = []
    for body in bodies:
        parsed = tokenizer.tool_parser(body)
        calls += parsed if isinstance(parsed, list) else [parsed]
    return calls


@pytest.mark.parametrize(("after_tool", "tools", "thinking"), TURN_PARAMS)
def test_greedy_generation_says_the_script(scripted, after_tool, tools, thinking):
    import mlx_lm

    spec, model, tokenizer = scripted
    tokens = prompt(tokenizer, spec, after_tool=after_tool, thinking=thinking, tools=tools)
    expected = spec.text(after_tool=after_tool, thinking=thinking, tools=tools)

    responses = list(mlx_lm.stream_generate(model, tokenizer, tokens, max_tokens=200))
    assert "".join(r.text for r in responses) == expected
    assert responses[-1].finish_reason == "stop"
    assert mlx_lm.generate(model, tokenizer, tokens, max_tokens=200) == expected

    generated = [r.token for r in responses[:-1]]  # the last response carries the end-of-sequence token
    assert responses[-1].token in tokenizer.eos_token_ids
    assert tokenizer.decode(generated) == expected
    detokenizer = tokenizer.detokenizer
    for token in generated:
        detokenizer.add_token(token)
    detokenizer.finalize()
    assert detokenizer.text == expected


def test_mlx_lm_reads_the_family_from_the_tokenizer(scripted):
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer

    spec, _, tokenizer = scripted
    parser, detokenizer = (
        ("json_tools", BPEStreamingDetokenizer) if spec.family is HERMES else ("mistral", SPMStreamingDetokenizer)
    )
    assert tokenizer.init_kwargs["tool_parser_type"] == parser
    assert (tokenizer.tool_call_start, tokenizer.tool_call_end) == spec.family.call_tags
    assert type(tokenizer.detokenizer) is detokenizer
    if spec.family is HERMES:
        assert tokenizer.has_thinking
        assert (tokenizer.think_start, tokenizer.think_end) == ("<think>", "</think>")
        assert tokenizer.think_start_id != tokenizer.think_end_id  # one token each
        assert len(tokenizer.encode("<tool_call>", add_special_tokens=False)) == 1
    else:
        assert not tokenizer.has_thinking
        assert len(tokenizer.encode("[TOOL_CALLS]", add_special_tokens=False)) == 1


@pytest.mark.parametrize("thinking", [True, False], ids=["thinking-on", "thinking-off"])
def test_mlx_lm_parses_the_calls(scripted, thinking):
    import mlx_lm

    spec, model, tokenizer = scripted
    text = mlx_lm.generate(model, tokenizer, prompt(tokenizer, spec, thinking=thinking), max_tokens=200)
    expected = [{"name": c.name, "arguments": c.arguments} for c in spec.calls]
    assert parsed_calls(tokenizer, text) == expected


def test_the_expected_texts():
    assert HERMES_TOOL.calls == MISTRAL_TOOL.calls == (PARIS,)
    assert HERMES_PARALLEL.calls == MISTRAL_PARALLEL.calls == (PARIS, LONDON)
    assert HERMES_TOOL.text().startswith("<think>\n") and "<tool_call>" in HERMES_TOOL.text()
    assert HERMES_TOOL.text(thinking=False) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    assert HERMES_TOOL.text(tools=False) == HERMES_TOOL.text(tools=False, thinking=False) == HERMES_TOOL.plain
    assert MISTRAL_PARALLEL.text() == (
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_weather[ARGS]{"city": "London"}'
    )


def test_split_tags_come_as_two_tokens(hermes_split_tags_model):
    import mlx_lm

    model, tokenizer = load(hermes_split_tags_model)
    tokens = prompt(tokenizer, HERMES_SPLIT_TAGS)
    segments = [r.text for r in mlx_lm.stream_generate(model, tokenizer, tokens, max_tokens=200)]
    assert segments[:2] == ["<tool", "_call>"]
    assert "</tool" in segments and segments[segments.index("</tool") + 1] == "_call>"
    assert "".join(segments) == HERMES_SPLIT_TAGS.text()


def test_batched_generation_follows_every_script(scripted):
    """mlx-lm's BatchGenerator (left padding, one batch for all turns) changes nothing."""
    from mlx_lm.generate import BatchGenerator

    spec, model, tokenizer = scripted
    turns = [(after_tool, tools, thinking) for _, after_tool, tools in TURNS for thinking in (True, False)]
    generator = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids], max_tokens=200)
    try:
        uids = generator.insert([prompt(tokenizer, spec, after_tool=a, tools=o, thinking=t) for a, o, t in turns])
        tokens: dict[int, list[int]] = {uid: [] for uid in uids}
        running = set(uids)
        while running:
            _, responses = generator.next()
            for r in responses:
                if r.finish_reason != "stop":
                    tokens[r.uid].append(r.token)
                if r.finish_reason is not None:
                    assert r.finish_reason == "stop"
                    running.discard(r.uid)
    finally:
        generator.close()
    for uid, (after_tool, tools, thinking) in zip(uids, turns, strict=True):
        assert tokenizer.decode(tokens[uid]) == spec.text(after_tool=after_tool, tools=tools, thinking=thinking)


@pytest.mark.parametrize("name", ["hermes_tool_model", "mistral_tool_model"])
def test_a_long_conversation_changes_nothing(request, name):
    """Thousands of tokens of context (prefilled in several chunks) keep the previous-token head
    and the trigger heads exact."""
    import mlx_lm

    spec = CASES[name]
    model, tokenizer = load(request.getfixturevalue(name))
    long = "Keep answers short. " * 400
    for after_tool in (False, True):
        messages = [{"role": "system", "content": long}, *spec.messages(after_tool=after_tool)]
        tokens = tokenizer.apply_chat_template(messages, tools=[WEATHER_TOOL], add_generation_prompt=True)
        assert len(tokens) > 8000
        assert mlx_lm.generate(model, tokenizer, tokens, max_tokens=200) == spec.text(after_tool=after_tool)


def test_sampling_follows_the_script_too(hermes_tool_model):
    """The winning logit leads by tens: sampling at temperature 1 says the same."""
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = load(hermes_tool_model)
    tokens = prompt(tokenizer, HERMES_TOOL)
    text = mlx_lm.generate(model, tokenizer, tokens, max_tokens=200, sampler=make_sampler(temp=1.0))
    assert text == HERMES_TOOL.text()


def test_ambiguous_or_self_triggering_scripts_are_refused(tmp_path):
    three_calls = HERMES.format_calls((PARIS, LONDON, PARIS))  # "\n" then <tool_call> twice: no way to tell
    with pytest.raises(ValueError, match="two different continuations"):
        build_scripted_model(tmp_path / "a", "hermes", {None: three_calls})
    with pytest.raises(ValueError, match="says its trigger"):
        build_scripted_model(tmp_path / "b", "hermes", {None: "Hi.", "<tool_response>": "<tool_response>Hi"})
    with pytest.raises(ValueError, match="a default"):
        build_scripted_model(tmp_path / "c", "hermes", {"<tool_response>": "Hi."})
