"""What a generation must obey, for one job on one model: a JSON schema (`response_format`) or
a forced tool call (`tool_choice` "required" or a named function), as a logits processor.

The grammar is compiled for the model's tokenizer (constraints.py, through its cache) and
enforced token by token by the job's own processor (constraints_mask.py), on the lone-job path
and inside a batch alike. A forced call is the call's JSON body wrapped in the family's own
markup, so mlx-lm's parser reads it like any call the model makes. A model that thinks keeps its
thinking section free: only the answer after it is constrained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlx_manager.engine.constraints import (
    GrammarSpec,
    UnsupportedTokenizer,
    compile_constraint,
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
    if request.tools is not None and request.tool_choice not in (None, "auto", "none"):
        spec = _forced_call(entry, request)
    if spec is None:
        return None
    try:
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


def _forced_call(entry: LoadedModel, request: GenerationRequest) -> GrammarSpec:
    tokenizer = entry.tokenizer
    parser = getattr(tokenizer.tool_parser, "__module__", "").rsplit(".", 1)[-1]
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
    vocab = tokenizer.get_vocab()
    special = {marker: vocab[marker] for marker in (start, end) if marker and marker in vocab}
    return tool_call_spec(schema, prefix=prefix, suffix=suffix, special_tokens=special)
