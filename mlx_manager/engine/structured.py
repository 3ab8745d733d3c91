"""What a generation must obey, for one job on one model: a JSON schema (`response_format`),
a forced tool call (`tool_choice` "required" or a named function), or well-formed calls of
strict tools (`strict: true`) in free text, as a logits processor.

The grammar is compiled for the model's tokenizer (constraints.py, through its cache) and
enforced token by token by the job's own processor (constraints_mask.py), on the lone-job path
and inside a batch alike. A forced call is the call's JSON body wrapped in the family's own
markup, so mlx-lm's parser reads it like any call the model makes. A model that thinks keeps its
thinking section free: only the answer after it is constrained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mlx_manager.engine.constraints import (
    GrammarSpec,
    UnsupportedTokenizer,
    compile_constraint,
    free_calls_spec,
    tokenizer_view,
    tool_call_schema,
    tool_call_spec,
)
from mlx_manager.engine.errors import InvalidRequest
from mlx_manager.engine.pool import LoadedModel
from mlx_manager.engine.types import GenerationRequest

# How a forced call is written, by mlx-lm's parser for the family: its JSON body
# ({"name": ..., "arguments": {...}}) between these, around the family's start and end markers.
CALL_MARKUP = {
    "json_tools": ("{start}\n", "\n{end}"),  # Hermes, Qwen: <tool_call>\n{...}\n</tool_call>
    "mistral": ("{start}[", "]"),  # [TOOL_CALLS][{...}]: the JSON form mistral's parser reads
}
# How one call to a named tool reads after the family's start marker, up to its arguments and
# after them: strict tools' arguments are checked in free text.
FREE_CALL_MARKUP = {
    "json_tools": ('\n{{"name": {name}, "arguments": ', "}}\n{end}"),
    "mistral": ("{bare_name}[ARGS]", ""),  # [TOOL_CALLS]get_weather[ARGS]{...}
}
ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class Constraint:
    processor: Any  # a ConstrainedLogits: one per sequence
    compile_ms: float
    kind: str  # "json_schema", "json_object" or "tool_call"


def constraint_for(entry: LoadedModel, request: GenerationRequest, prompt: list[int]) -> Constraint | None:
    """The job's constraint, or None when it has none. Raises InvalidRequest (a 400) for one
    this model cannot enforce."""
    spec = request.constraint
    tokenizer = entry.tokenizer
    try:
        if request.tools is not None and request.tool_choice not in (None, "auto", "none"):
            spec = _forced_call(entry, request)
        elif request.tools is not None and spec is None and any(_strict(tool) for tool in request.tools):
            spec = _strict_calls(entry, request)
        if spec is None:
            return None
        compiled = compile_constraint(spec, tokenizer)
    except UnsupportedTokenizer as exc:
        raise InvalidRequest(f"model {request.model!r} cannot do structured output: {exc}") from None
    after: tuple[int, ...] = ()
    opens = None
    if request.messages is not None and tokenizer.has_thinking:
        after = tuple(tokenizer.think_end_tokens)
        inside = tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt)
        thinking = request.template_kwargs.get("enable_thinking") is not False
        if not inside:  # the model may open a thinking section with its first token, or answer at once
            start = tuple(tokenizer.think_start_tokens)
            opens = start[0] if thinking and len(start) == 1 else None
            after = after if opens is not None else ()
    return Constraint(compiled.processor(after=after, opens=opens), compiled.compile_ms, spec.kind)


def _parser(entry: LoadedModel) -> str:
    return str(getattr(entry.tokenizer.tool_parser, "__module__", "")).rsplit(".", 1)[-1]


def _strict(tool: dict[str, Any]) -> bool:
    return bool((tool.get("function") or {}).get("strict"))


def _special(tokenizer: Any, *texts: str) -> dict[str, int]:
    """The special tokens (to the grammar engine: text cannot spell them) that the markup `texts`
    hold, such as `<tool_call>` or Mistral's `[ARGS]`: the grammar must demand those tokens."""
    view = tokenizer_view(tokenizer).tokenizer
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    return {
        marker: token
        for marker, token in added.items()
        if marker and any(marker in text for text in texts) and view.is_special_token(token)
    }


def _strict_calls(entry: LoadedModel, request: GenerationRequest) -> GrammarSpec:
    """Free text whose tool calls must follow their tools' schemas (any object for a tool that
    is not strict: a call is JSON whatever the tool)."""
    tokenizer = entry.tokenizer
    parser = _parser(entry)
    markup = FREE_CALL_MARKUP.get(parser)
    if markup is None:
        raise InvalidRequest(
            f"tools: model {request.model!r} writes tool calls in a format ({parser or 'unknown'}) whose"
            " arguments cannot be held to their schema yet; send the tools without 'strict'"
        )
    start, end = tokenizer.tool_call_start or "", tokenizer.tool_call_end or ""
    calls = []
    for tool in request.tools or []:
        function = tool.get("function") or {}
        name = str(function.get("name", ""))
        opening, closing = (part.format(name=json.dumps(name), bare_name=name, end=end) for part in markup)
        schema = (function.get("parameters") or ANY_OBJECT) if _strict(tool) else ANY_OBJECT
        calls.append((opening, closing, schema))
    special = _special(tokenizer, start, *(f"{opening}{closing}" for opening, closing, _ in calls))
    return free_calls_spec(calls, trigger=start, special_tokens=special)


def _forced_call(entry: LoadedModel, request: GenerationRequest) -> GrammarSpec:
    tokenizer = entry.tokenizer
    parser = _parser(entry)
    markup = CALL_MARKUP.get(parser)
    if markup is None:
        raise InvalidRequest(
            f"tool_choice: model {request.model!r} writes tool calls in a format ({parser or 'unknown'}) that"
            " cannot be forced yet; use tool_choice 'auto'"
        )
    schema = tool_call_schema(request.tools or [], request.tool_choice or "auto")
    assert schema is not None
    start, end = tokenizer.tool_call_start or "", tokenizer.tool_call_end or ""
    prefix, suffix = (part.format(start=start, end=end) for part in markup)
    return tool_call_spec(schema, prefix=prefix, suffix=suffix, special_tokens=_special(tokenizer, prefix, suffix))
