"""Anthropic's Messages API on the wire: a `GenerationRequest` as the body of POST /v1/messages
(always streamed), and its events as engine events.

The chat template's conversation becomes Anthropic's: system messages join the top-level system
prompt, `tool` messages become `tool_result` blocks of a user turn, assistant calls `tool_use`
blocks, and consecutive turns of one role one turn. The thinking of earlier turns stays here
(Anthropic takes back only the signed blocks Claude made). Sampling that equals the API's
default is left out: some models refuse `temperature` and `top_p` together.
"""

from __future__ import annotations

import json
from typing import Any

from mlx_manager.engine.types import (
    Event,
    Finished,
    FinishReason,
    GenerationRequest,
    ReasoningDelta,
    TextDelta,
    ToolCall,
)
from mlx_manager.routing.errors import not_translatable
from mlx_manager.routing.sse import ServerEvent
from mlx_manager.routing.wire import StreamDecoder, json_schema_of, refuse_unhandled, stream_error

PATH = "/v1/messages"
VERSION = "2023-06-01"  # the anthropic-version header every request carries
HANDLED = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "stop",
        "sampling",
        "request_id",
        "tools",
        "parallel_tool_calls",
        "template_kwargs",
        "reasoning_effort",
        "constraint",
        "tool_choice",
        "max_tokens_is_default",  # the default max_tokens is sent as it is: the backend cuts it to its context
    }
)
EFFORTS = ("low", "medium", "high", "xhigh", "max")
_STOP: dict[str, FinishReason] = {"max_tokens": "length", "tool_use": "tool_calls"}


def request_body(request: GenerationRequest, model: str, backend: str) -> tuple[str, dict[str, Any]]:
    """(path under the backend's base_url, JSON body) for one generation."""
    if request.prompt is not None:
        raise not_translatable(backend, "prompt", "text completions cannot go to an anthropic backend; use chat")
    refuse_unhandled(request, HANDLED, backend)
    system, turns = conversation(request.messages or [], backend)
    body: dict[str, Any] = {"model": model, "max_tokens": request.max_tokens, "messages": turns, "stream": True}
    if system:
        body["system"] = system
    if request.stop:
        body["stop_sequences"] = request.stop
    body.update(sampling(request, backend))
    if request.tools is not None:
        body["tools"] = [tool(t) for t in request.tools]
        choice = tool_choice(request)
        if choice is not None:
            body["tool_choice"] = choice
    body.update(thinking(request, backend))
    if request.constraint is not None:
        if request.constraint.kind not in ("json_schema", "json_object"):
            raise not_translatable(backend, "response_format", "this kind of constraint cannot be sent upstream")
        schema = json_schema_of(request.constraint, backend, "response_format")
        body.setdefault("output_config", {})["format"] = {"type": "json_schema", "schema": schema}
    return PATH, body


def conversation(messages: list[dict[str, Any]], backend: str) -> tuple[str, list[dict[str, Any]]]:
    """(system prompt, turns) from a chat template's messages (see the module doc)."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for message in messages:
        role = message["role"]
        if message.get("name"):
            raise not_translatable(backend, "messages.name", "Anthropic's messages have no participant names")
        text = message.get("content") or ""
        if role == "system":
            if text:
                system.append(text)
            continue
        blocks: list[dict[str, Any]] = []
        if role == "tool":
            role = "user"
            blocks.append({"type": "tool_result", "tool_use_id": message.get("tool_call_id") or "", "content": text})
        elif text:
            blocks.append({"type": "text", "text": text})
        for call in message.get("tool_calls") or ():
            arguments = call["function"]["arguments"]
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    detail = "call arguments must be a JSON object"
                    raise not_translatable(backend, "messages.tool_calls", detail) from None
            blocks.append({"type": "tool_use", "id": call["id"], "name": call["function"]["name"], "input": arguments})
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += blocks
        else:
            turns.append({"role": role, "content": blocks})
    for turn in turns:
        if not turn["content"]:  # an empty user or assistant message
            turn["content"] = [{"type": "text", "text": ""}]
    return "\n\n".join(system), turns


def sampling(request: GenerationRequest, backend: str) -> dict[str, Any]:
    params = request.sampling
    if params.min_p:
        raise not_translatable(backend, "min_p", "Anthropic's API has no min_p")
    if params.seed is not None:
        raise not_translatable(backend, "seed", "Anthropic's API has no seed")
    if params.temperature > 1:
        raise not_translatable(backend, "temperature", "Anthropic's API takes a temperature from 0 to 1")
    body: dict[str, Any] = {}
    if params.temperature != 1:
        body["temperature"] = params.temperature
    if params.top_p != 1:
        body["top_p"] = params.top_p
    if params.top_k:
        body["top_k"] = params.top_k
    return body


def tool(definition: dict[str, Any]) -> dict[str, Any]:
    function = definition["function"]
    out = {"name": function["name"], "input_schema": function.get("parameters") or {"type": "object"}}
    if function.get("description"):
        out["description"] = function["description"]
    if function.get("strict"):
        out["strict"] = True
    return out


def tool_choice(request: GenerationRequest) -> dict[str, Any] | None:
    choice = request.tool_choice
    if choice == "required":
        out: dict[str, Any] = {"type": "any"}
    elif isinstance(choice, dict):
        out = {"type": "tool", "name": choice["function"]["name"]}
    elif choice == "none":
        out = {"type": "none"}
    elif not request.parallel_tool_calls:
        out = {"type": "auto"}
    else:
        return None
    if not request.parallel_tool_calls and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    return out


def thinking(request: GenerationRequest, backend: str) -> dict[str, Any]:
    """Thinking and effort from the template variables and `reasoning_effort`, as Anthropic says them."""
    variables = dict(request.template_kwargs)
    effort = request.reasoning_effort or variables.pop("reasoning_effort", None)
    if request.reasoning_effort is not None and variables.get("reasoning_effort") == effort:
        del variables["reasoning_effort"]
    enable = variables.pop("enable_thinking", None)
    budget = variables.pop("thinking_budget", None)
    if variables:
        name = sorted(variables)[0]
        raise not_translatable(backend, f"chat_template_kwargs.{name}", "Anthropic's API has no template variables")
    out: dict[str, Any] = {}
    if effort == "none" or enable is False:
        out["thinking"] = {"type": "disabled"}
    elif budget is not None:
        out["thinking"] = {"type": "enabled", "budget_tokens": budget}
    elif enable:
        out["thinking"] = {"type": "adaptive"}
    if effort not in (None, "none"):
        if effort not in EFFORTS:
            raise not_translatable(backend, "reasoning_effort", f"Anthropic's efforts are {', '.join(EFFORTS)}")
        out["output_config"] = {"effort": effort}
    return out


class EventDecoder(StreamDecoder):
    """Anthropic's stream events into engine events; a `tool_use` block goes on whole at its end."""

    def __init__(self, backend: str) -> None:
        super().__init__(backend)
        self.cached = 0
        self.output_tokens = 0
        self.stop_reason: str | None = None
        self.stop_sequence: str | None = None
        self._call: dict[str, Any] | None = None

    def decode(self, event: ServerEvent) -> list[Event]:
        data = json.loads(event.data)
        kind = data.get("type") if isinstance(data, dict) else None
        out: list[Event] = []
        if kind == "message_start":
            self._usage(data["message"].get("usage") or {})
        elif kind == "content_block_start":
            block = data["content_block"]
            if block["type"] == "tool_use":
                given = block.get("input") or {}
                self._call = {"id": block["id"], "name": block["name"], "json": [json.dumps(given)] if given else []}
            elif block["type"] == "text" and block.get("text"):
                self._piece(out, TextDelta(block["text"]))
            elif block["type"] == "thinking" and block.get("thinking"):
                self._piece(out, ReasoningDelta(block["thinking"]))
        elif kind == "content_block_delta":
            delta = data["delta"]
            if delta["type"] == "text_delta" and delta["text"]:
                self._piece(out, TextDelta(delta["text"]))
            elif delta["type"] == "thinking_delta" and delta["thinking"]:
                self._piece(out, ReasoningDelta(delta["thinking"]))
            elif delta["type"] == "input_json_delta" and self._call is not None:
                self._call["json"].append(delta["partial_json"])
            # signature_delta and citations_delta have no engine event: Claude's signature stays upstream
        elif kind == "content_block_stop" and self._call is not None:
            call, self._call = self._call, None
            self._piece(
                out,
                ToolCall(index=self.calls, id=call["id"], name=call["name"], arguments="".join(call["json"]) or "{}"),
            )
            self.calls += 1
        elif kind == "message_delta":
            self.stop_reason = data["delta"].get("stop_reason")
            self.stop_sequence = data["delta"].get("stop_sequence")
            self._usage(data.get("usage") or {})
        elif kind == "message_stop":
            return self._finished()
        elif kind == "error" or event.event == "error":
            raise stream_error(self.backend, data)
        return out

    def end(self) -> list[Event]:
        raise self.early_end()  # message_stop ends every whole answer

    def _usage(self, usage: dict[str, Any]) -> None:
        """Anthropic counts fresh input, cache reads and cache writes apart; a prompt is all three."""
        parts = [usage.get(k) for k in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")]
        if any(isinstance(p, int) for p in parts):
            self.prompt_tokens = sum(p for p in parts if isinstance(p, int))
            self.cached = usage.get("cache_read_input_tokens") or 0
        if isinstance(usage.get("output_tokens"), int):
            self.output_tokens = usage["output_tokens"]

    def _finished(self) -> list[Event]:
        if self.stop_reason is None:
            raise self.early_end()
        self.upstream_usage = (self.prompt_tokens, self.output_tokens)
        out: list[Event] = []
        self._piece(
            out,
            Finished(
                finish_reason=_STOP.get(self.stop_reason, "stop"),
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.output_tokens,
                stop_sequence=self.stop_sequence if self.stop_reason == "stop_sequence" else None,
                cached_tokens=self.cached,
            ),
        )
        return out
