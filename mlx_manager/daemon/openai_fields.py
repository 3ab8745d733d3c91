"""Every request field OpenAI defines for chat and completions, and what this server does with it.

The one list: the routes refuse what it marks refused (a 400 `not_supported` problem naming the
field), and the README's table of fields is generated from it (`python -m mlx_manager.docs`).
A field is supported, refused (or refused but for the values that change nothing, such as
`best_of: 1`), an extension OpenAI does not define, or accepted with nothing to act on here
(`user`: there is no abuse monitoring to feed). Fields OpenAI does not define are ignored, as
OpenAI ignores them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from mlx_manager.daemon.problems import Problem

Endpoint = Literal["chat", "completions"]
Status = Literal["supported", "refused", "extension", "no effect"]
ENDPOINTS: tuple[Endpoint, ...] = ("chat", "completions")
BOTH: tuple[Endpoint, ...] = ENDPOINTS
CHAT: tuple[Endpoint, ...] = ("chat",)
COMPLETIONS: tuple[Endpoint, ...] = ("completions",)


@dataclass(frozen=True)
class RequestField:
    name: str  # dotted for a nested field: stream_options.include_obfuscation
    endpoints: tuple[Endpoint, ...]
    status: Status
    note: str
    # A refused field: the values that still pass (null always does), described in `passes`.
    accepts: Callable[[Any], bool] | None = None
    passes: str = ""
    # Endpoints where OpenAI does not define the field and this server takes it all the same.
    extension_on: tuple[Endpoint, ...] = ()

    def status_on(self, endpoint: Endpoint) -> Status | None:
        if endpoint in self.extension_on:
            return "extension"
        return self.status if endpoint in self.endpoints else None


FIELDS: tuple[RequestField, ...] = (
    RequestField(
        "model",
        BOTH,
        "supported",
        "a folder path, a Hugging Face id, or an alias (`models.aliases`); when left out: `models.default`,"
        " else the one loaded model",
    ),
    RequestField("messages", CHAT, "supported", "text content; a `name` only for templates that write it"),
    RequestField("prompt", COMPLETIONS, "supported", "a string, token ids, or a list of either (batched)"),
    RequestField("max_tokens", BOTH, "supported", "prompt + max_tokens over the context is a 400"),
    RequestField("max_completion_tokens", CHAT, "supported", "as max_tokens"),
    RequestField("temperature", BOTH, "supported", "0 is greedy"),
    RequestField("top_p", BOTH, "supported", ""),
    RequestField("n", BOTH, "supported", "choices decoded together, the prompt read once"),
    RequestField("stop", BOTH, "supported", "up to 16 strings"),
    RequestField("seed", BOTH, "supported", "choice i of n uses seed + i"),
    RequestField("stream", BOTH, "supported", ""),
    RequestField("stream_options.include_usage", BOTH, "supported", ""),
    RequestField(
        "stream_options.include_obfuscation",
        BOTH,
        "refused",
        "stream obfuscation is not implemented",
        accepts=lambda v: v is False,
        passes="false",
    ),
    RequestField("logprobs", BOTH, "supported", "chat: true/false; completions: 0-20 alternatives"),
    RequestField("top_logprobs", CHAT, "supported", "0-20; needs logprobs"),
    RequestField("frequency_penalty", BOTH, "supported", "over the generated tokens"),
    RequestField("presence_penalty", BOTH, "supported", "over the generated tokens"),
    RequestField("logit_bias", BOTH, "supported", "token ids of the model's own vocabulary"),
    RequestField("tools", CHAT, "supported", "function tools"),
    RequestField("tool_choice", CHAT, "supported", "auto, none, required, a named function"),
    RequestField("parallel_tool_calls", CHAT, "supported", ""),
    RequestField("response_format", CHAT, "supported", "text, json_object, json_schema", extension_on=COMPLETIONS),
    RequestField("reasoning_effort", CHAT, "supported", "`none` turns thinking off"),
    RequestField("functions", CHAT, "refused", "the deprecated functions API is not supported; send tools instead"),
    RequestField(
        "function_call", CHAT, "refused", "the deprecated functions API is not supported; send tool_choice instead"
    ),
    RequestField("audio", CHAT, "refused", "audio output is not supported; the models here write text"),
    RequestField(
        "modalities",
        CHAT,
        "refused",
        "only text output is supported",
        accepts=lambda v: v == ["text"],
        passes='["text"]',
    ),
    RequestField("prediction", CHAT, "refused", "predicted outputs are not supported"),
    RequestField("web_search_options", CHAT, "refused", "web search is not supported; offer a search tool instead"),
    RequestField("verbosity", CHAT, "refused", "verbosity is not supported; ask for it in the prompt"),
    RequestField(
        "store",
        CHAT,
        "refused",
        "this server keeps no completions (prompts and answers never go to disk)",
        accepts=lambda v: v is False,
        passes="false",
    ),
    RequestField("metadata", CHAT, "no effect", "tags stored completions, and none are stored"),
    RequestField(
        "service_tier",
        CHAT,
        "refused",
        "there is one service tier",
        accepts=lambda v: v in ("auto", "default"),
        passes="auto, default",
    ),
    RequestField("prompt_cache_key", CHAT, "no effect", "the prompt cache finds shared prefixes by itself"),
    RequestField(
        "prompt_cache_retention",
        CHAT,
        "refused",
        "the prompt cache keeps entries by the cache.* settings",
        accepts=lambda v: v == "in_memory",
        passes="in_memory",
    ),
    RequestField("user", BOTH, "no effect", "an end-user id for abuse monitoring, which this server does not do"),
    RequestField("safety_identifier", CHAT, "no effect", "as user"),
    RequestField(
        "best_of",
        COMPLETIONS,
        "refused",
        "best_of > 1 is not supported; ask for n choices and pick",
        accepts=lambda v: v == 1,
        passes="1",
    ),
    RequestField(
        "echo",
        COMPLETIONS,
        "refused",
        "echo is not supported (prompt log probabilities are not computed)",
        accepts=lambda v: v is False,
        passes="false",
    ),
    RequestField(
        "suffix",
        COMPLETIONS,
        "refused",
        "suffix (fill in the middle) is not supported",
        accepts=lambda v: v == "",
        passes='""',
    ),
    RequestField("top_k", BOTH, "extension", "sample from the k most likely tokens; 0: off"),
    RequestField("min_p", BOTH, "extension", "drop tokens below min_p times the top token's probability"),
    RequestField("repetition_penalty", BOTH, "extension", "mlx-lm's: divides the logits of the last 20 tokens"),
    RequestField("chat_template_kwargs", CHAT, "extension", "variables for the chat template"),
)


def _value(body: BaseModel, dotted: str) -> tuple[bool, Any]:
    """(present, value) of a field of a request model, declared or kept as an extra."""
    node: Any = body
    for part in dotted.split("."):
        if not isinstance(node, BaseModel):
            return False, None
        if part in type(node).model_fields:
            if part not in node.model_fields_set:
                return False, None
            node = getattr(node, part)
        else:
            extra = node.model_extra or {}
            if part not in extra:
                return False, None
            node = extra[part]
    return True, node


def refuse_unsupported(endpoint: Endpoint, body: BaseModel) -> None:
    """Raise the 400 `not_supported` problem for the first refused field the request sets."""
    for spec in FIELDS:
        if spec.status_on(endpoint) != "refused":
            continue
        present, value = _value(body, spec.name)
        if not present or value is None or (spec.accepts is not None and spec.accepts(value)):
            continue
        raise Problem("not_supported", f"{spec.name}: {spec.note}", param=spec.name)


def _cell(spec: RequestField, endpoint: Endpoint) -> str:
    status = spec.status_on(endpoint)
    if status is None:
        return "—"
    if status == "refused" and spec.passes:
        return f"refused unless `{spec.passes}`"
    return status


def fields_table() -> str:
    """The README's table of request fields, in Markdown."""
    rows = ["| field | chat | completions | notes |", "| --- | --- | --- | --- |"]
    for spec in FIELDS:
        rows.append(f"| `{spec.name}` | {_cell(spec, 'chat')} | {_cell(spec, 'completions')} | {spec.note} |")
    return "\n".join(rows)
