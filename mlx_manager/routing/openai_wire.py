"""OpenAI's Chat Completions and Completions on the wire: a `GenerationRequest` as the body an
OpenAI-compatible server takes (always streamed, with usage), and its chunks as engine events.

Any OpenAI-compatible server is an `openai` backend: OpenAI, another mlx-manager, mlx_lm.server,
vLLM. Sampling is sent in full (servers differ in their defaults: mlx_lm.server's is greedy);
`top_k`, `min_p` and `chat_template_kwargs` only when set (OpenAI itself has none of them).
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

HANDLED = frozenset(
    {
        "model",
        "prompt",
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
# What a message may hold on the wire. The thinking of earlier turns (`reasoning_content`) stays
# here: the Chat Completions API has no field to send it back in.
_MESSAGE_FIELDS = ("role", "content", "name", "tool_call_id")
_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
}


def request_body(request: GenerationRequest, model: str, backend: str) -> tuple[str, dict[str, Any]]:
    """(path under the backend's base_url, JSON body) for one generation."""
    refuse_unhandled(request, HANDLED, backend)
    sampling = request.sampling
    body: dict[str, Any] = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
    }
    if sampling.top_k:
        body["top_k"] = sampling.top_k
    if sampling.min_p:
        body["min_p"] = sampling.min_p
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if request.stop:
        body["stop"] = request.stop
    if request.constraint is not None:
        body["response_format"] = response_format(request, backend)
    if request.prompt is not None:
        body.update(prompt=request.prompt, max_tokens=request.max_tokens)
        return "/completions", body
    body["messages"] = [wire_message(m) for m in request.messages or []]
    body["max_completion_tokens"] = request.max_tokens
    if request.tools is not None:
        body["tools"] = request.tools
        body["parallel_tool_calls"] = request.parallel_tool_calls
        if request.tool_choice is not None:
            body["tool_choice"] = request.tool_choice
    effort, template = effort_and_template(request)
    if effort is not None:
        body["reasoning_effort"] = effort
    if template:
        body["chat_template_kwargs"] = template
    return "/chat/completions", body


def wire_message(message: dict[str, Any]) -> dict[str, Any]:
    """A chat template's message as the API takes it: call arguments as JSON text."""
    wire = {key: message[key] for key in _MESSAGE_FIELDS if key in message}
    if message.get("tool_calls"):
        wire["tool_calls"] = [
            {
                "id": call["id"],
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": _json_text(call["function"]["arguments"])},
            }
            for call in message["tool_calls"]
        ]
    return wire


def effort_and_template(request: GenerationRequest) -> tuple[str | None, dict[str, Any]]:
    """`reasoning_effort`, and the template variables left once those it implies are taken out
    (chat derives enable_thinking and reasoning_effort from it; an upstream does that itself)."""
    template = dict(request.template_kwargs)
    effort = request.reasoning_effort or template.get("reasoning_effort")
    if effort is not None:
        if template.get("reasoning_effort") == effort:
            del template["reasoning_effort"]
        if template.get("enable_thinking") == (effort != "none"):
            del template["enable_thinking"]
    return effort, template


def response_format(request: GenerationRequest, backend: str) -> dict[str, Any]:
    spec = request.constraint
    assert spec is not None
    if spec.kind == "json_object":
        return {"type": "json_object"}
    if spec.kind != "json_schema":
        raise not_translatable(backend, "response_format", "this kind of constraint cannot be sent upstream")
    schema = json_schema_of(spec, backend, "response_format")
    return {"type": "json_schema", "json_schema": {"name": spec.name or "response", "schema": schema, "strict": True}}


def _json_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


class ChunkDecoder(StreamDecoder):
    """Chat completion chunks (or text completion chunks) into engine events. A streamed tool call
    (its id and name, then pieces of its arguments) goes on whole, as the engine makes them."""

    def __init__(self, backend: str) -> None:
        super().__init__(backend)
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] = {}
        self._call: dict[str, Any] | None = None  # the call being streamed: upstream index, id, name, arguments

    def decode(self, event: ServerEvent) -> list[Event]:
        if event.data == "[DONE]":
            return self.done()
        return self.decode_chunk(json.loads(event.data), event.event)

    def done(self) -> list[Event]:
        """[DONE]: the answer's end."""
        return self._finished()

    def decode_chunk(self, chunk: Any, name: str | None = None) -> list[Event]:
        """The engine events of one parsed chunk (`name`: its SSE event name, if it had one)."""
        if name == "error" or (isinstance(chunk, dict) and "error" in chunk and not chunk.get("choices")):
            raise stream_error(self.backend, chunk)
        out: list[Event] = []
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if "text" in choice:  # a text completion
                if choice["text"]:
                    self._piece(out, TextDelta(choice["text"]))
            else:
                self._delta(out, choice.get("delta") or {})
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
                self._end_call(out)
        return out

    def end(self) -> list[Event]:
        """The stream closed: servers that skip [DONE] have said how the answer ended."""
        if self.finish_reason is None:
            raise self.early_end()
        return self._finished()

    def _delta(self, out: list[Event], delta: dict[str, Any]) -> None:
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if reasoning:
            self._piece(out, ReasoningDelta(reasoning))
        if delta.get("content"):
            self._piece(out, TextDelta(delta["content"]))
        for call in delta.get("tool_calls") or ():
            index = call.get("index", 0)
            if self._call is not None and self._call["index"] != index:
                self._end_call(out)
            function = call.get("function") or {}
            if self._call is None:
                self._call = {
                    "index": index,
                    "id": call.get("id") or "",
                    "name": function.get("name") or "",
                    "arguments": [],
                }
            self._call["id"] = self._call["id"] or call.get("id") or ""
            self._call["name"] = self._call["name"] or function.get("name") or ""
            if function.get("arguments"):
                self._call["arguments"].append(function["arguments"])

    def _end_call(self, out: list[Event]) -> None:
        call, self._call = self._call, None
        if call is None:
            return
        arguments = "".join(call["arguments"]) or "{}"
        self._piece(
            out,
            ToolCall(index=self.calls, id=call["id"] or f"call_{self.calls}", name=call["name"], arguments=arguments),
        )
        self.calls += 1

    def _finished(self) -> list[Event]:
        if self.finish_reason is None:
            raise self.early_end()
        out: list[Event] = []
        usage = self.usage
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, int) and isinstance(completion, int):
            self.upstream_usage = (prompt, completion)
        self.prompt_tokens = prompt or 0
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
        finished = Finished(
            finish_reason=_FINISH.get(self.finish_reason, "stop"),
            prompt_tokens=prompt or 0,
            completion_tokens=completion or 0,
            reasoning_tokens=reasoning,
            cached_tokens=cached,
        )
        self._piece(out, finished)
        return out
