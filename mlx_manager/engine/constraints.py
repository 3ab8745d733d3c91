"""Structured output: what a request asks the decoder to obey, compiled for a model's tokenizer.

`grammar_for_response_format` turns an OpenAI `response_format` into a `GrammarSpec` (checked
without any model, so the daemon can refuse a bad schema before queueing it);
`compile_constraint` compiles a spec for one mlx-lm tokenizer, through a bounded cache per
tokenizer; `CompiledConstraint.processor()` gives each sequence its own logits processor
(constraints_mask.py). The engine is llguidance (see benchmarks/grammar_engines.py for why).

    spec = grammar_for_response_format(request.response_format)     # None for "text"
    compiled = compile_constraint(spec, entry.tokenizer)             # compiled.compile_ms -> span
    processor = compiled.processor()          # one per sequence; after=tokenizer.think_end_tokens
                                              # when generation starts inside a thinking section
    generate_step(..., logits_processors=[processor]) / batch.insert(..., logits_processors=[[processor]])

No MLX here (the processor module imports it), and llguidance is imported on first use.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from mlx_manager.engine.errors import InvalidRequest

if TYPE_CHECKING:
    from llguidance import LLMatcher, LLTokenizer

    from mlx_manager.engine.constraints_mask import ConstrainedLogits

# Compact JSON with json.dumps's separators and no other whitespace: a model cannot spend its
# tokens on blank space (a random or confused model otherwise emits newlines until max_tokens),
# and the output reads like `json.dumps`. Only the whitespace is fixed, never a value.
# `lenient: False` is pinned too: these options override a schema's own "x-guidance", which
# could otherwise ask llguidance to skip the keywords it cannot enforce.
JSON_OPTIONS: dict[str, Any] = {
    "item_separator": ", ",
    "key_separator": ": ",
    "whitespace_flexible": False,
    "lenient": False,
}
CACHE_SIZE = 128  # compiled grammars kept per tokenizer (they go with it when its model unloads)
SPEC_CACHE_SIZE = 1024  # validated specs, tokenizer-independent

Kind = Literal["json_object", "json_schema", "tool_call", "lark"]


# -- errors --------------------------------------------------------------------------------------
class ConstraintError(InvalidRequest):
    """A constraint that cannot be enforced as asked; the daemon answers 400."""


class UnsupportedSchemaFeature(ConstraintError):
    """The schema uses a JSON-schema keyword (or format) the grammar engine cannot enforce."""

    def __init__(self, features: Sequence[str]) -> None:
        self.features = list(features)
        named = ", ".join(repr(f) for f in self.features)
        super().__init__(f"response_format: the JSON schema uses {named}, which constrained decoding does not support")


class InvalidSchema(ConstraintError):
    """The schema (or grammar) is not valid, or no JSON value can satisfy it."""


class UnsupportedResponseFormat(ConstraintError):
    """A response_format that is malformed or of a type this server does not know."""


class UnsupportedTokenizer(ConstraintError):
    """The grammar engine cannot map this model's tokenizer to bytes (e.g. WordPiece)."""


# -- specs: what to enforce, independent of any model ------------------------------------------
@dataclass(frozen=True)
class GrammarSpec:
    """A validated grammar in llguidance's format, and its hash (the cache key)."""

    kind: Kind
    grammar: str
    key: str
    name: str | None = None  # json_schema's name, for logs and spans


_spec_cache: OrderedDict[str, GrammarSpec] = OrderedDict()
_spec_lock = threading.Lock()


def grammar_for_response_format(response_format: Mapping[str, Any] | None) -> GrammarSpec | None:
    """The grammar an OpenAI `response_format` asks for; None when it asks for plain text."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise UnsupportedResponseFormat("response_format must be an object")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_spec({"type": "object"}, kind="json_object")
    if kind == "json_schema":
        body = response_format.get("json_schema")
        if not isinstance(body, Mapping):
            raise UnsupportedResponseFormat("response_format.json_schema must be an object with 'name' and 'schema'")
        name = body.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise UnsupportedResponseFormat("response_format.json_schema.name must be 1-64 letters, digits, '_' or '-'")
        schema = body.get("schema", {})
        if not isinstance(schema, Mapping):
            raise UnsupportedResponseFormat("response_format.json_schema.schema must be a JSON schema object")
        # `strict` changes nothing: the schema is always enforced in full, and a keyword that
        # cannot be enforced is refused whether strict is true or false (never silently dropped).
        return json_schema_spec(schema, name=name)
    raise UnsupportedResponseFormat(
        f"response_format type {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'"
    )


def json_schema_spec(schema: Mapping[str, Any], *, kind: Kind = "json_schema", name: str | None = None) -> GrammarSpec:
    """A spec for JSON that validates against `schema`."""
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)  # type: ignore[arg-type]
    except ValueError as exc:  # not a JSON object where one is needed, e.g. "schema": [1]
        raise InvalidSchema(f"response_format: invalid JSON schema: {exc}") from None
    return _validated(kind, grammar, name)


def lark_spec(lark: str, *, kind: Kind = "lark") -> GrammarSpec:
    """A spec from a Lark grammar in llguidance's dialect (`%json {...}` embeds a JSON schema)."""
    from llguidance import LLMatcher

    return _validated(kind, LLMatcher.grammar_from_lark(lark), None)


def _validated(kind: Kind, grammar: str, name: str | None) -> GrammarSpec:
    from llguidance import LLMatcher

    key = hashlib.sha256(f"{kind}\0{grammar}".encode()).hexdigest()
    with _spec_lock:
        spec = _spec_cache.get(key)
        if spec is not None:
            _spec_cache.move_to_end(key)
            return spec if spec.name == name else GrammarSpec(kind, grammar, key, name)
    _raise_for(LLMatcher.validate_grammar(grammar, None, limits=_limits()))
    spec = GrammarSpec(kind, grammar, key, name)
    with _spec_lock:
        _spec_cache[key] = spec
        while len(_spec_cache) > SPEC_CACHE_SIZE:
            _spec_cache.popitem(last=False)
    return spec


def _raise_for(error: str) -> None:
    """Turn an llguidance error message into the typed error that names the problem."""
    if not error:
        return
    error = " ".join(error.split())
    if match := re.search(r"Unimplemented keys: \[(.*?)\]", error):
        raise UnsupportedSchemaFeature(json.loads(f"[{match.group(1)}]"))
    if match := re.search(r"Unknown format: (\S+)", error):
        raise UnsupportedSchemaFeature([f"format: {match.group(1)}"])
    raise InvalidSchema(f"response_format: the schema cannot be enforced: {error}")


def _limits() -> Any:
    from llguidance import LLParserLimits

    return LLParserLimits(verbose_errors=False)  # short messages that never echo grammar internals


# -- tool calls ------------------------------------------------------------------------------------
def tool_call_schema(tools: Sequence[Mapping[str, Any]], tool_choice: str | Mapping[str, Any]) -> dict[str, Any] | None:
    """The JSON body of the one call `tool_choice` demands: `{"name": ..., "arguments": {...}}`.

    "required" allows any of `tools`; `{"type": "function", "function": {"name": N}}` only N;
    "auto" and "none" demand nothing (None). The tool-calling code wraps the body in the
    model's own call markup (see `tool_call_spec`).
    """
    if tool_choice in ("auto", "none"):
        return None
    functions = {}
    for tool in tools:
        function = tool.get("function") if tool.get("type", "function") == "function" else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise InvalidRequest("every tool needs type 'function' and a function with a 'name'")
        functions[function["name"]] = function.get("parameters") or {
            "type": "object",
            "properties": {},
            "additionalProperties": False,
        }
    if tool_choice == "required":
        names = list(functions)
        if not names:
            raise InvalidRequest("tool_choice 'required' needs at least one tool")
    elif isinstance(tool_choice, Mapping) and isinstance((tool_choice.get("function") or {}).get("name"), str):
        names = [tool_choice["function"]["name"]]
        if names[0] not in functions:
            raise InvalidRequest(f"tool_choice names function {names[0]!r}, which is not among the tools")
    else:
        raise InvalidRequest(
            "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}"
        )
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": functions[name]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name in names
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def tool_call_spec(
    schema: Mapping[str, Any], *, prefix: str = "", suffix: str = "", special_tokens: Mapping[str, int] | None = None
) -> GrammarSpec:
    """A call body that must sit between literal `prefix` and `suffix` (the model's call markup).

    `special_tokens` maps a marker such as "<tool_call>" to its token id when the model has it
    as one special token: the grammar then demands that token, not the marker spelled out.
    """
    body = {**schema, "x-guidance": JSON_OPTIONS}
    parts = [*_lark_literals(prefix, special_tokens or {}), "call", *_lark_literals(suffix, special_tokens or {})]
    return lark_spec(f"start: {' '.join(parts)}\ncall: %json {json.dumps(body)}\n", kind="tool_call")


def free_calls_spec(
    calls: Sequence[tuple[str, str, Mapping[str, Any]]],
    *,
    trigger: str,
    special_tokens: Mapping[str, int] | None = None,
) -> GrammarSpec:
    """Free text in which every tool call must be well formed (strict tools, tool_choice "auto").

    `calls` are (after the trigger: the call's opening up to its arguments, after them: its
    closing, the arguments' JSON schema). The model writes what it likes until it writes the
    family's `trigger` (its call marker); from there the call must be one of `calls`, and after
    it, text again (llguidance's lazy triggers, as its StructTag does it). A trigger that is one
    special token is demanded as that token.
    """
    special = special_tokens or {}
    lines = [
        "%llguidance {}",
        "start: (" + " | ".join(f"call_{i}" for i in range(len(calls))) + ")* text",
        "text: TEXT",
        "TEXT: /(.|\\n)*/",
    ]
    for i, (opening, closing, schema) in enumerate(calls):
        arguments = f"%json {json.dumps({**schema, 'x-guidance': JSON_OPTIONS})}"
        body = " ".join([*_lark_literals(opening, special), arguments, *_lark_literals(closing, special)])
        if trigger in special:
            lines.append(f"call_{i}: TEXT <[{special[trigger]}]> {body}")
        else:
            lines.append(f"call_{i}_trigger[lazy]: TEXT {json.dumps(trigger)}")
            lines.append(f"call_{i}: call_{i}_trigger {body}")
    return lark_spec("\n".join(lines) + "\n", kind="tool_call")


def _lark_literals(text: str, special_tokens: Mapping[str, int]) -> list[str]:
    if not text:
        return []
    markers = sorted((m for m in special_tokens if m), key=len, reverse=True)
    pieces = re.split("(" + "|".join(map(re.escape, markers)) + ")", text) if markers else [text]
    return [f"<[{special_tokens[p]}]>" if p in special_tokens else json.dumps(p) for p in pieces if p]


# -- compiling for a tokenizer -------------------------------------------------------------------
@dataclass(eq=False)
class TokenizerView:
    """llguidance's view of one loaded tokenizer, and the grammars compiled for it."""

    tokenizer: LLTokenizer
    eos: tuple[int, ...]
    serial: int
    compiled: OrderedDict[str, LLMatcher] = field(default_factory=OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class CompiledConstraint:
    """A grammar ready for one tokenizer: make one processor per sequence from it."""

    spec: GrammarSpec
    compile_ms: float  # building the grammar, or the cache lookup on a hit (not the tokenizer view)
    cache_hit: bool
    view: TokenizerView
    matcher: LLMatcher  # pristine; never advanced, only copied

    def processor(self, *, after: Sequence[int] = (), opens: int | None = None) -> ConstrainedLogits:
        """A fresh logits processor for one sequence.

        `after`: constrain only once these tokens have been generated (a reasoning model's
        think-close tokens), leaving the thinking section free: when generation starts inside
        the thinking section. With `opens` (the think-open token), the section is optional: the
        model may open it with its first token, or answer at once.
        """
        from mlx_manager.engine.constraints_mask import ConstrainedLogits

        return ConstrainedLogits(
            self.matcher.deep_copy(), self.view.eos, self.view.tokenizer.vocab_size, after=after, opens=opens
        )


_views: weakref.WeakKeyDictionary[Any, TokenizerView] = weakref.WeakKeyDictionary()
_views_lock = threading.Lock()
_serials = itertools.count()


def tokenizer_view(tokenizer: Any) -> TokenizerView:
    """llguidance's view of an mlx-lm `TokenizerWrapper`, built once per tokenizer object.

    Building it walks the vocabulary (~0.1 s per 10k tokens here), so it is worth calling
    when a model loads rather than on its first constrained request.
    """
    with _views_lock:
        view = _views.get(tokenizer)
    if view is not None:
        return view
    view = TokenizerView(_ll_tokenizer(tokenizer), tuple(sorted(tokenizer.eos_token_ids)), next(_serials))
    with _views_lock:
        return _views.setdefault(tokenizer, view)


def _ll_tokenizer(tokenizer: Any) -> LLTokenizer:
    from llguidance import LLTokenizer

    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise UnsupportedTokenizer(
            f"constrained decoding needs a Hugging Face fast tokenizer; this model's is {type(hf).__name__}"
        )
    eos = sorted(tokenizer.eos_token_ids)
    if not eos:
        raise UnsupportedTokenizer(
            "constrained decoding needs the model's end-of-sequence token; the tokenizer has none"
        )
    try:
        return LLTokenizer(backend.to_str(), eos_token=eos)
    except Exception as exc:  # llguidance says why, e.g. "can't determine decoder type: WordPiece"
        raise UnsupportedTokenizer(f"the grammar engine cannot use this model's tokenizer: {exc}") from None


def compile_constraint(spec: GrammarSpec, tokenizer: Any) -> CompiledConstraint:
    """Compile `spec` for an mlx-lm tokenizer; a grammar seen before comes from the cache."""
    from llguidance import LLMatcher

    view = tokenizer_view(tokenizer)
    start = time.perf_counter()
    with view.lock:
        matcher = view.compiled.get(spec.key)
        if matcher is not None:
            view.compiled.move_to_end(spec.key)
    if matcher is not None:
        return CompiledConstraint(spec, (time.perf_counter() - start) * 1e3, True, view, matcher)
    matcher = LLMatcher(view.tokenizer, spec.grammar, log_level=0, limits=_limits())
    _raise_for(matcher.get_error())
    with view.lock:
        view.compiled[spec.key] = matcher
        while len(view.compiled) > CACHE_SIZE:
            view.compiled.popitem(last=False)
    return CompiledConstraint(spec, (time.perf_counter() - start) * 1e3, False, view, matcher)
