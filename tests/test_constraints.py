"""Structured output enforced token by token, with the real fast model and mlx-lm's own decoders.

The constraint module (mlx_manager.engine.constraints*) is driven here exactly as the engine
drives mlx-lm: `generate_step` for a lone job, `BatchGenerator` for several, one processor per
sequence. The model has random weights, so whatever it writes is valid only because of the
grammar. Such a model never chooses to close a free-form string or to stop adding digits, so
the schemas bound their strings and numbers (maxLength, pattern, enum, format, maximum) to
finish within max_tokens; the unbounded case is the max_tokens test.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any, cast

import jsonschema
import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import BatchGenerator, StopSequences, generate_step
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_manager.engine import constraints
from mlx_manager.engine.constraints import (
    CompiledConstraint,
    InvalidSchema,
    UnsupportedResponseFormat,
    UnsupportedSchemaFeature,
    UnsupportedTokenizer,
    compile_constraint,
    grammar_for_response_format,
    tool_call_schema,
    tool_call_spec,
)
from mlx_manager.engine.constraints_mask import ConstrainedLogits
from mlx_manager.engine.errors import InvalidRequest
from tests.json_schemas import AGE, SCHEMAS, _obj, _s

MAX_TOKENS = 256


@pytest.fixture(scope="module")
def lm(fast_model: str) -> tuple[Any, TokenizerWrapper]:
    model, tokenizer = load(fast_model)[:2]
    return model, tokenizer


def _row(logits: mx.array) -> list[float]:
    return cast(list[float], logits[0].tolist())


def _prompt(tokenizer: TokenizerWrapper, text: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))


def _compiled(tokenizer: TokenizerWrapper, schema: dict[str, Any]) -> CompiledConstraint:
    spec = grammar_for_response_format(
        {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    )
    assert spec is not None
    return compile_constraint(spec, tokenizer)


def _solo(
    lm: tuple[Any, TokenizerWrapper], prompt: list[int], processor: Any, max_tokens: int = MAX_TOKENS, temp: float = 0.0
) -> tuple[str, str]:
    """Decode on mlx-lm's single-sequence path the way the engine does: (text, finish reason)."""
    model, tokenizer = lm
    out: list[int] = []
    steps = generate_step(
        mx.array(prompt),
        model,
        max_tokens=max_tokens,
        sampler=make_sampler(temp=temp),
        logits_processors=[processor] if processor else None,
    )
    for token, _ in steps:
        if token in tokenizer.eos_token_ids:
            return tokenizer.decode(out), "stop"
        out.append(cast(int, token))
    return tokenizer.decode(out), "length"


def _batch(
    lm: tuple[Any, TokenizerWrapper],
    rows: list[tuple[list[int], Any]],
    *,
    max_tokens: int = MAX_TOKENS,
    remove: dict[int, int] | None = None,
    temp: float = 0.8,
    steps: list[int] | None = None,
    endless: frozenset[int] = frozenset(),
    generated: list[list[int]] | None = None,
) -> list[tuple[str, str | None]]:
    """Decode rows (prompt, processor or None) in one BatchGenerator: [(text, finish reason)].

    `remove` maps a row to the step after which it is taken out of the batch (reason None);
    `steps`, if given, receives the step at which each row ended; rows in `endless` ignore
    the end-of-sequence token and run to max_tokens; `generated` receives each row's tokens.
    """
    model, tokenizer = lm
    generator = BatchGenerator(
        model, stop_tokens=[[t] for t in tokenizer.eos_token_ids], completion_batch_size=8, prefill_batch_size=8
    )
    sampler = make_sampler(temp=temp)
    ended = [0] * len(rows)
    uids = []
    stop = StopSequences([[t] for t in tokenizer.eos_token_ids])
    for i, (prompt, processor) in enumerate(rows):
        (uid,) = generator.insert(
            [prompt],
            max_tokens=[max_tokens],
            samplers=[sampler],
            logits_processors=[[processor] if processor else []],
            stop_sequences=[StopSequences() if i in endless else stop],
        )
        uids.append(uid)
    row_of = {uid: i for i, uid in enumerate(uids)}
    tokens: list[list[int]] = [[] for _ in rows]
    reasons: list[str | None] = [None] * len(rows)
    running = set(uids)
    step = 0
    try:
        while running:
            _, responses = generator.next()
            step += 1
            for r in responses:
                i = row_of[r.uid]
                if r.finish_reason != "stop":
                    tokens[i].append(r.token)
                if r.finish_reason is not None:
                    reasons[i], ended[i] = r.finish_reason, step
                    running.discard(r.uid)
            for i, at in (remove or {}).items():
                if step == at and uids[i] in running:
                    generator.remove([uids[i]])
                    running.discard(uids[i])
                    ended[i] = step
    finally:
        generator.close()
    if steps is not None:
        steps[:] = ended
    if generated is not None:
        generated[:] = tokens
    return [(tokenizer.decode(t), reason) for t, reason in zip(tokens, reasons, strict=True)]


# -- JSON that validates, by construction ----------------------------------------------------------
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_each_schema_gives_valid_json_on_the_single_sequence_path(lm: tuple[Any, TokenizerWrapper], name: str) -> None:
    schema = SCHEMAS[name]
    processor = _compiled(lm[1], schema).processor()
    text, reason = _solo(lm, _prompt(lm[1], f"Answer with JSON: {name}"), processor)
    assert reason == "stop", f"no end of sequence within {MAX_TOKENS} tokens: {text!r}"
    jsonschema.validate(json.loads(text), schema)
    assert processor.complete and processor.error is None


def test_json_object_gives_a_json_object(lm: tuple[Any, TokenizerWrapper]) -> None:
    spec = grammar_for_response_format({"type": "json_object"})
    assert spec is not None and spec.kind == "json_object"
    processor = compile_constraint(spec, lm[1]).processor()
    text, reason = _solo(lm, _prompt(lm[1], "{}"), processor, max_tokens=60)
    # A random model rarely closes a free-form key, so the output may be cut: it is then a
    # prefix of an object, and complete says so.
    assert text.startswith("{")
    if reason == "stop":
        assert isinstance(json.loads(text), dict) and processor.complete
    else:
        assert not processor.complete


def test_text_format_needs_no_grammar() -> None:
    assert grammar_for_response_format(None) is None
    assert grammar_for_response_format({"type": "text"}) is None


def test_sampled_outputs_validate_too(lm: tuple[Any, TokenizerWrapper]) -> None:
    mx.random.seed(3)
    for name in ("nested", "array of objects", "string pattern", "anyOf"):
        processor = _compiled(lm[1], SCHEMAS[name]).processor()
        text, reason = _solo(lm, _prompt(lm[1], name), processor, temp=1.0)
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMAS[name])


# -- inside a batch ------------------------------------------------------------------------------------
MIXED = ["nested", "enum of strings", "string pattern", "array of objects"]  # each 10+ tokens at least


def test_different_schemas_and_unconstrained_sequences_share_a_batch(lm: tuple[Any, TokenizerWrapper]) -> None:
    tokenizer = lm[1]
    prompts = [_prompt(tokenizer, f"request {i}") for i in range(6)]
    plain: list[list[int]] = []
    _batch(lm, [(p, None) for p in prompts], max_tokens=40, temp=0.0, endless=frozenset(range(6)), generated=plain)
    processors = [_compiled(tokenizer, SCHEMAS[name]).processor() for name in MIXED]
    ended: list[int] = []
    rows = [(p, processors[i] if i < 4 else None) for i, p in enumerate(prompts)]
    tokens: list[list[int]] = []
    mixed = _batch(lm, rows, temp=0.0, steps=ended, endless=frozenset({4, 5}), generated=tokens)
    for i, name in enumerate(MIXED):
        text, reason = mixed[i]
        assert reason == "stop", (name, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name])
    # The unconstrained rows are free text, untouched by their neighbours' masks: token for
    # token what they write in a batch of unconstrained rows, as long as both batches hold the
    # same rows (after that, a smaller batch may round differently).
    same_rows = min(ended[:4]) - 1
    assert same_rows >= 8
    for i in (4, 5):
        assert tokens[i][:same_rows] == plain[i][:same_rows]


def test_a_sequence_leaving_mid_batch_does_not_disturb_the_others(lm: tuple[Any, TokenizerWrapper]) -> None:
    tokenizer = lm[1]
    names = ["enum of strings", "string pattern", "array of objects", "integer range"]
    processors = [_compiled(tokenizer, SCHEMAS[name]).processor() for name in names]
    rows = [(_prompt(tokenizer, f"leave {i}"), p) for i, p in enumerate(processors)]
    results = _batch(lm, rows, remove={0: 3, 2: 5})  # two leave mid-way, at different steps
    for i in (1, 3):
        text, reason = results[i]
        assert reason == "stop", (names[i], text)
        jsonschema.validate(json.loads(text), SCHEMAS[names[i]])
        assert processors[i].error is None
    assert results[0][1] is None and results[2][1] is None


def test_a_sequence_joining_mid_batch_gets_its_own_mask(lm: tuple[Any, TokenizerWrapper]) -> None:
    model, tokenizer = lm
    generator = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids])
    first, second = (_compiled(tokenizer, SCHEMAS[n]).processor() for n in ("nested", "tuple (prefixItems)"))
    texts: dict[int, list[int]] = {}
    (a,) = generator.insert([_prompt(tokenizer, "first")], max_tokens=[MAX_TOKENS], logits_processors=[[first]])
    b = None
    done: set[int] = set()
    try:
        for step in range(2 * MAX_TOKENS):
            if step == 4:
                (b,) = generator.insert(
                    [_prompt(tokenizer, "second")], max_tokens=[MAX_TOKENS], logits_processors=[[second]]
                )
            _, responses = generator.next()
            for r in responses:
                if r.finish_reason == "stop":
                    done.add(r.uid)
                else:
                    texts.setdefault(r.uid, []).append(r.token)
            if b is not None and {a, b} <= done:
                break
    finally:
        generator.close()
    assert b is not None and {a, b} <= done
    jsonschema.validate(json.loads(tokenizer.decode(texts[a])), SCHEMAS["nested"])
    jsonschema.validate(json.loads(tokenizer.decode(texts[b])), SCHEMAS["tuple (prefixItems)"])


def test_a_lone_sequence_moved_into_a_batch_carries_on(lm: tuple[Any, TokenizerWrapper]) -> None:
    """The engine's hand-over: generate_step alone, then a BatchGenerator takes the sequence over."""
    model, tokenizer = lm
    from mlx_lm.models.cache import make_prompt_cache

    schema = SCHEMAS["array of objects"]
    processor = _compiled(tokenizer, schema).processor()
    prompt = _prompt(tokenizer, "hand over")
    cache = make_prompt_cache(model)
    steps = generate_step(
        mx.array(prompt), model, max_tokens=MAX_TOKENS, logits_processors=[processor], prompt_cache=cache
    )
    generated = [cast(int, next(steps)[0]) for _ in range(6)]
    steps.close()
    for layer in cache:  # generate_step ran one step ahead: drop it, and give the last token again
        layer.trim(1)
    processor.resume(generated)
    generator = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids])
    generator.insert([[generated[-1]]], max_tokens=[MAX_TOKENS], caches=[cache], logits_processors=[[processor]])
    out = list(generated)
    try:
        while True:
            _, responses = generator.next()
            if responses and responses[0].finish_reason == "stop":
                break
            out.extend(r.token for r in responses)
            assert len(out) < MAX_TOKENS
    finally:
        generator.close()
    jsonschema.validate(json.loads(tokenizer.decode(out)), schema)


def test_resume_rolls_back_tokens_the_sequence_never_kept(lm: tuple[Any, TokenizerWrapper]) -> None:
    tokenizer = lm[1]
    processor = _compiled(tokenizer, SCHEMAS["object"]).processor()
    logits = mx.zeros((1, 512))
    tokens = tokenizer.encode('{"name": "ab", "age": 7}', add_special_tokens=False)
    processor(mx.array([1]), logits)
    for token in tokens[:5]:
        processor(mx.array([token]), logits)
    processor.resume(tokens[:3])  # as after a failed step: the last two never reached the client
    processor(mx.array([*tokens[:3]]), logits)  # rebuilt: its prompt ends with the last kept token
    for token in tokens[3:]:
        processor(mx.array([token]), logits)
    assert processor.error is None and processor.complete


# -- the ends: length, EOS, errors ---------------------------------------------------------------------
def test_max_tokens_cuts_the_json_and_it_shows(lm: tuple[Any, TokenizerWrapper]) -> None:
    schema = _obj({"story": {"type": "string"}})
    processor = _compiled(lm[1], schema).processor()
    text, reason = _solo(lm, _prompt(lm[1], "a long story"), processor, max_tokens=12)
    assert reason == "length"  # the engine reports finish_reason "length"
    assert text.startswith('{"story": "')
    assert not processor.complete
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    results = _batch(lm, [(_prompt(lm[1], "a long story"), _compiled(lm[1], schema).processor())], max_tokens=12)
    assert results[0][1] == "length"


def test_end_of_sequence_is_masked_until_the_json_is_complete_then_forced(lm: tuple[Any, TokenizerWrapper]) -> None:
    tokenizer = lm[1]
    (eos,) = tokenizer.eos_token_ids
    processor = _compiled(tokenizer, SCHEMAS["const"]).processor()
    logits = mx.zeros((1, 512))
    logits[0, eos] = 100.0  # the model wants to stop right away
    allowed = processor(mx.array([1]), logits)
    assert allowed[0, eos].item() == float("-inf")
    body = tokenizer.encode('{"version": "v1", "kind": 7}', add_special_tokens=False)
    for token in body:
        out = processor(mx.array([token]), mx.zeros((1, 512)))
    finite = [i for i, v in enumerate(_row(out)) if v != float("-inf")]
    assert finite == [eos]  # complete: only the end may follow
    assert processor.complete


def test_a_model_with_more_rows_than_tokens_never_gets_the_extra_ones(lm: tuple[Any, TokenizerWrapper]) -> None:
    processor = _compiled(lm[1], SCHEMAS["const"]).processor()
    out = processor(mx.array([1]), mx.zeros((1, 600)))
    assert out.shape == (1, 600) and all(v == float("-inf") for v in _row(out)[512:])


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "'uniqueItems'"),
        (_obj({"a": {"not": {"type": "string"}}}), "'not'"),
        ({"if": {"type": "integer"}, "then": {"minimum": 1}}, "'if', 'then'"),
        ({"type": "object", "propertyNames": {"pattern": "^a"}}, "'propertyNames'"),
        ({"type": "string", "format": "hostname-ish"}, "'format: hostname-ish'"),
    ],
)
def test_an_unsupported_feature_is_an_error_that_names_it(schema: dict[str, Any], named: str) -> None:
    with pytest.raises(UnsupportedSchemaFeature) as caught:
        grammar_for_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert named in str(caught.value)
    assert isinstance(caught.value, InvalidRequest)  # the daemon's 400


def test_a_schema_cannot_ask_the_engine_to_skip_what_it_cannot_enforce() -> None:
    schema = {"type": "array", "uniqueItems": True, "x-guidance": {"lenient": True}}
    with pytest.raises(UnsupportedSchemaFeature, match="'uniqueItems'"):
        grammar_for_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})


@pytest.mark.parametrize(
    ("response_format", "error", "says"),
    [
        ({"type": "xml"}, UnsupportedResponseFormat, "'xml'"),
        ({"type": "json_schema"}, UnsupportedResponseFormat, "json_schema"),
        ({"type": "json_schema", "json_schema": {"schema": {}}}, UnsupportedResponseFormat, "name"),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(["}}},
            InvalidSchema,
            "regex",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}},
            InvalidSchema,
            "missing",
        ),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}},
            },
            InvalidSchema,
            "minimum",
        ),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}, InvalidSchema, "wat"),
    ],
)
def test_malformed_requests_are_refused_with_a_reason(
    response_format: dict[str, Any], error: type[Exception], says: str
) -> None:
    with pytest.raises(error) as caught:
        grammar_for_response_format(response_format)
    assert says in str(caught.value)


def test_a_tokenizer_the_engine_cannot_use_is_an_error_that_says_so(tmp_path: Any) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    from tokenizers import decoders

    wordpiece.decoder = decoders.WordPiece()
    wordpiece.train_from_iterator(
        ['some words to learn from, with {json} and "quotes"'] * 10,
        trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", "[SEP]"]),
    )
    tokenizer = TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_object=wordpiece, eos_token="[SEP]"))
    spec = grammar_for_response_format({"type": "json_object"})
    assert spec is not None
    with pytest.raises(UnsupportedTokenizer, match="cannot use this model's tokenizer.*WordPiece"):
        compile_constraint(spec, tokenizer)


# -- compiling once ------------------------------------------------------------------------------------
def test_a_compiled_grammar_is_cached_and_a_hit_is_fast(lm: tuple[Any, TokenizerWrapper]) -> None:
    tokenizer = lm[1]
    schema = {**SCHEMAS["nested"], "title": "cache test"}
    first = _compiled(tokenizer, schema)
    assert not first.cache_hit and first.compile_ms > 0
    hits = [_compiled(tokenizer, schema) for _ in range(20)]
    assert all(h.cache_hit for h in hits)
    assert statistics.median(h.compile_ms for h in hits) < 1.0
    assert all(h.matcher is first.matcher for h in hits)


def test_the_cache_is_bounded(lm: tuple[Any, TokenizerWrapper], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constraints, "CACHE_SIZE", 2)
    tokenizer = lm[1]
    schemas = [{"const": i} for i in range(3)]
    for schema in schemas:
        _compiled(tokenizer, schema)
    assert _compiled(tokenizer, schemas[2]).cache_hit
    assert not _compiled(tokenizer, schemas[0]).cache_hit  # the oldest went first
    assert len(constraints.tokenizer_view(tokenizer).compiled) == 2


def test_compiling_a_typical_schema_is_quick(lm: tuple[Any, TokenizerWrapper]) -> None:
    constraints.tokenizer_view(lm[1])
    start = time.perf_counter()
    compiled = _compiled(lm[1], {**SCHEMAS["nested"], "title": "typical"})
    assert not compiled.cache_hit
    assert compiled.compile_ms <= (time.perf_counter() - start) * 1e3 < 2000  # generous: a busy CI machine


# -- reasoning models: constrain only the answer ------------------------------------------------------
def test_constraint_starts_after_the_think_close_tokens(lm: tuple[Any, TokenizerWrapper]) -> None:
    tokenizer = lm[1]
    think_close = [2, 3]  # two special tokens stand in for a model's "</think>"
    processor = _compiled(tokenizer, SCHEMAS["const"]).processor(after=think_close)
    logits = mx.random.normal((1, 512))
    assert mx.array_equal(processor(mx.array([1]), logits), logits)
    for token in tokenizer.encode("some free thoughts [not json] 2", add_special_tokens=False) + [2]:
        assert mx.array_equal(processor(mx.array([token]), logits), logits)
        assert not processor.active
    masked = processor(mx.array([3]), logits)  # the close is complete: the answer starts now
    assert processor.active
    (brace,) = tokenizer.encode("{", add_special_tokens=False)
    assert masked[0, brace].item() == logits[0, brace].item()
    assert sum(v != float("-inf") for v in _row(masked)) < 10
    for token in tokenizer.encode('{"version": "v1", "kind": 7}', add_special_tokens=False):
        processor(mx.array([token]), logits)
    assert processor.complete


# -- tool calls -------------------------------------------------------------------------------------------
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": _obj({"city": _s(8), "unit": {"enum": ["C", "F"]}})},
    },
    {"type": "function", "function": {"name": "add", "parameters": _obj({"a": AGE, "b": AGE})}},
    {"type": "function", "function": {"name": "now"}},
]


def _check_call(call: dict[str, Any], allowed: list[str]) -> None:
    assert call["name"] in allowed
    params = next(t["function"].get("parameters") for t in TOOLS if t["function"]["name"] == call["name"])
    jsonschema.validate(call["arguments"], params or {"type": "object", "maxProperties": 0})


@pytest.mark.parametrize(
    "choice",
    ["required", {"type": "function", "function": {"name": "add"}}, {"type": "function", "function": {"name": "now"}}],
)
def test_tool_choice_forces_a_valid_call(lm: tuple[Any, TokenizerWrapper], choice: Any) -> None:
    schema = tool_call_schema(TOOLS, choice)
    assert schema is not None
    spec = grammar_for_response_format({"type": "json_schema", "json_schema": {"name": "call", "schema": schema}})
    assert spec is not None
    processor = compile_constraint(spec, lm[1]).processor()
    text, reason = _solo(lm, _prompt(lm[1], "call a tool"), processor)
    assert reason == "stop", text
    allowed = [t["function"]["name"] for t in TOOLS] if choice == "required" else [choice["function"]["name"]]
    _check_call(json.loads(text), allowed)


def test_tool_choice_auto_and_none_demand_nothing_and_bad_names_are_refused() -> None:
    assert tool_call_schema(TOOLS, "auto") is None and tool_call_schema(TOOLS, "none") is None
    with pytest.raises(InvalidRequest, match="'nope'"):
        tool_call_schema(TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(InvalidRequest):
        tool_call_schema([], "required")


def test_a_tool_call_can_sit_inside_the_models_own_markup(lm: tuple[Any, TokenizerWrapper]) -> None:
    tokenizer = lm[1]
    schema = tool_call_schema(TOOLS, "required")
    assert schema is not None
    # "<|assistant|>" is one special token of this model: the grammar demands that token.
    spec = tool_call_spec(
        schema, prefix="<|assistant|><call>\n", suffix="\n</call>", special_tokens={"<|assistant|>": 3}
    )
    processor = compile_constraint(spec, tokenizer).processor()
    model = lm[0]
    out: list[int] = []
    for token, _ in generate_step(
        mx.array(_prompt(tokenizer, "tool")), model, max_tokens=MAX_TOKENS, logits_processors=[processor]
    ):
        if token in tokenizer.eos_token_ids:
            break
        out.append(cast(int, token))
    assert out[0] == 3
    text = tokenizer.decode(out[1:])
    assert text.startswith("<call>\n") and text.endswith("\n</call>")
    _check_call(json.loads(text[len("<call>\n") : -len("\n</call>")]), [t["function"]["name"] for t in TOOLS])


def test_processors_are_independent_objects(lm: tuple[Any, TokenizerWrapper]) -> None:
    compiled = _compiled(lm[1], SCHEMAS["const"])
    one, two = compiled.processor(), compiled.processor()
    assert isinstance(one, ConstrainedLogits) and one is not two
    logits = mx.zeros((1, 512))
    one(mx.array([1]), logits)
    two(mx.array([1]), logits)
    for token in lm[1].encode('{"version": "v1", "kind": 7}', add_special_tokens=False):
        one(mx.array([token]), logits)
    assert one.complete and not two.complete
