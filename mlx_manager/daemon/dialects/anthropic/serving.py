"""Anthropic's Messages onto the engine: a request becomes one `GenerationRequest`, the engine's
events become Anthropic's message or its stream of events.

The conversation goes to the chat template as chat completions sends it: the system prompt
first, tool results (`tool_result` blocks) as `tool` messages right after the call they answer,
calls the assistant made (`tool_use`) as its `tool_calls`, its thinking as `reasoning_content`.
Consecutive turns of one role are one turn, as Anthropic reads them.
"""

from __future__ import annotations

import json
from typing import Any

from mlx_manager.daemon.dialects.anthropic.protocol import (
    ContentBlock,
    ContentBlockDeltaEvent,
    ContentBlockStartEvent,
    ContentBlockStopEvent,
    InputJsonDelta,
    Message,
    MessageDelta,
    MessageDeltaEvent,
    MessageDeltaUsage,
    MessagesRequest,
    MessageStartEvent,
    MessageStopEvent,
    PingEvent,
    PromptFields,
    StopReason,
    TextBlock,
    TextBlockParam,
    TextDelta,
    ThinkingAdaptive,
    ThinkingBlock,
    ThinkingBlockParam,
    ThinkingDelta,
    ThinkingDisabled,
    ThinkingEnabled,
    ToolChoiceAny,
    ToolChoiceAuto,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolParam,
    ToolResultBlockParam,
    ToolUseBlock,
    ToolUseBlockParam,
    Usage,
)
from mlx_manager.daemon.generation import Answer, Piece, Translation
from mlx_manager.daemon.limits import check_messages, max_tokens_for
from mlx_manager.daemon.problems import Problem
from mlx_manager.daemon.sse import sse_event
from mlx_manager.engine.constraints import ConstraintError, GrammarSpec, json_schema_spec
from mlx_manager.engine.types import (
    Finished,
    GenerationRequest,
    ReasoningDelta,
    SamplingParams,
)
from mlx_manager.engine.types import TextDelta as EngineText
from mlx_manager.engine.types import ToolCall as EngineCall
from mlx_manager.settings import Settings

PING_EVERY = 10.0  # seconds of silence before a `ping`, so proxies keep a slow stream open


# -- request -------------------------------------------------------------------------------------


def constraint(body: PromptFields) -> GrammarSpec | None:
    """The grammar `output_config.format` asks for (JSON that follows a schema), or None; a
    400 that names what cannot be enforced."""
    if body.output_config is None or body.output_config.format is None:
        return None
    try:
        return json_schema_spec(body.output_config.format.schema_)
    except ConstraintError as exc:
        raise Problem(
            "invalid_request", str(exc).replace("response_format", "output_config.format"), param="output_config.format"
        ) from None


def tool_choice(body: PromptFields) -> str | dict[str, Any] | None:
    """`any` forces a call to one of the tools, `tool` to the one named (the engine's grammar
    makes the model call); `auto` and `none` leave it to the model."""
    choice = body.tool_choice
    if isinstance(choice, ToolChoiceAny):
        return "required"
    if isinstance(choice, ToolChoiceTool):
        return {"type": "function", "function": {"name": choice.name}}
    return None


def engine_messages(body: PromptFields) -> list[dict[str, Any]]:
    """The conversation as chat templates take it (see the module doc)."""
    messages: list[dict[str, Any]] = []
    system = body.system_text()
    if system:
        messages.append({"role": "system", "content": system})
    for message in body.messages:
        texts = [b.text for b in message.content if isinstance(b, TextBlockParam)]
        if message.role == "system":
            _append(messages, {"role": "system", "content": "\n\n".join(texts)})
        elif message.role == "user":
            results = [b for b in message.content if isinstance(b, ToolResultBlockParam)]
            for result in results:
                messages.append({"role": "tool", "tool_call_id": result.tool_use_id, "content": result.text()})
            if texts or not results:
                _append(messages, {"role": "user", "content": "\n\n".join(texts)})
        else:
            turn: dict[str, Any] = {"role": "assistant", "content": "\n\n".join(texts)}
            calls = [b for b in message.content if isinstance(b, ToolUseBlockParam)]
            if calls:
                turn["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.input}} for c in calls
                ]
            thinking = "\n\n".join(b.thinking for b in message.content if isinstance(b, ThinkingBlockParam))
            if thinking:
                turn["reasoning_content"] = thinking
            _append(messages, turn)
    return messages


def _append(messages: list[dict[str, Any]], turn: dict[str, Any]) -> None:
    """Add a turn, joined to the one before if it has the same role (user or assistant)."""
    last = messages[-1] if messages else None
    if last is None or last["role"] != turn["role"] or turn["role"] not in ("user", "assistant"):
        messages.append(turn)
        return
    last["content"] = "\n\n".join(filter(None, (last["content"], turn["content"])))
    if turn.get("tool_calls"):
        last["tool_calls"] = [*last.get("tool_calls", []), *turn["tool_calls"]]
    if turn.get("reasoning_content"):
        last["reasoning_content"] = "\n\n".join(
            filter(None, (last.get("reasoning_content"), turn["reasoning_content"]))
        )


def offered_tools(body: PromptFields) -> list[dict[str, Any]] | None:
    """The tools as chat templates take them; None with no tools or tool_choice none."""
    tools = [t.for_template() for t in body.tools or [] if isinstance(t, ToolParam)]
    if not tools or isinstance(body.tool_choice, ToolChoiceNone):
        return None
    return tools


def template_kwargs(body: PromptFields) -> dict[str, Any]:
    """Thinking on or off where the template supports it (`enable_thinking`, and the budget as
    `thinking_budget` for templates that take one); `output_config.effort` as `reasoning_effort`.
    Adaptive or unset thinking leaves the template's default."""
    variables: dict[str, Any] = {}
    if isinstance(body.thinking, ThinkingEnabled):
        variables.update(enable_thinking=True, thinking_budget=body.thinking.budget_tokens)
    elif isinstance(body.thinking, ThinkingDisabled):
        variables["enable_thinking"] = False
    if body.output_config is not None and body.output_config.effort is not None:
        variables["reasoning_effort"] = body.output_config.effort
    return variables


def prompt_request(body: PromptFields, request_id: str, settings: Settings) -> GenerationRequest:
    """The prompt part of a generation: what count_tokens counts and messages generates from."""
    check_messages(len(body.messages), settings)
    spec = constraint(body)
    tools = offered_tools(body)
    if spec is not None and tools is not None and tool_choice(body) is None:
        raise Problem(
            "invalid_request",
            "output_config.format with tools the model may call (tool_choice auto) is not supported: the"
            " answer could not be both; force the call (tool_choice any or tool) or drop the tools",
            param="output_config.format",
        )
    return GenerationRequest(
        model=body.model or "",  # the route puts the model it names here
        messages=engine_messages(body),
        request_id=request_id,
        tools=tools,
        template_kwargs=template_kwargs(body),
        constraint=spec,
        tool_choice=tool_choice(body),
    )


def generation_request(body: MessagesRequest, request_id: str, settings: Settings) -> GenerationRequest:
    request = prompt_request(body, request_id, settings)
    defaults = SamplingParams()
    request.max_tokens = max_tokens_for(body.max_tokens, settings)
    request.stop = list(body.stop_sequences or [])
    request.sampling = SamplingParams(
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        top_p=defaults.top_p if body.top_p is None else body.top_p,
        top_k=defaults.top_k if body.top_k is None else body.top_k,
    )
    choice = body.tool_choice
    request.parallel_tool_calls = not (isinstance(choice, ToolChoiceAuto) and choice.disable_parallel_tool_use)
    return request


def shows_thinking(body: MessagesRequest) -> bool:
    """False when the client asked for thinking `display: omitted` (the blocks come, empty)."""
    return not (isinstance(body.thinking, (ThinkingEnabled, ThinkingAdaptive)) and body.thinking.display == "omitted")


# -- response ------------------------------------------------------------------------------------


def stop_reason(finished: Finished) -> StopReason:
    if finished.finish_reason == "tool_calls":
        return "tool_use"
    if finished.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if finished.stop_sequence is not None else "end_turn"


def usage(finished: Finished) -> Usage:
    return Usage(
        input_tokens=finished.prompt_tokens - finished.cached_tokens,
        output_tokens=finished.completion_tokens,
        cache_read_input_tokens=finished.cached_tokens,
    )


def tool_use(call: EngineCall) -> ToolUseBlock:
    return ToolUseBlock(id=call.id, name=call.name, input=json.loads(call.arguments))  # the engine's is an object


class MessageFormat:
    """Anthropic's message for a whole answer, and the stream of events for one as it comes."""

    def __init__(self, message_id: str, model: str, show_thinking: bool) -> None:
        self.message_id, self.model, self.show_thinking = message_id, model, show_thinking

    def complete(self, answer: Answer) -> Message:
        content: list[ContentBlock] = []
        if answer.reasoning:
            content.append(ThinkingBlock(thinking=answer.reasoning if self.show_thinking else ""))
        if answer.text:
            content.append(TextBlock(text=answer.text))
        content += [tool_use(call) for call in answer.tool_calls]
        finished = answer.finished
        return Message(
            id=self.message_id,
            model=self.model,
            content=content,
            stop_reason=stop_reason(finished),
            stop_sequence=finished.stop_sequence,
            usage=usage(finished),
        )

    def stream(self) -> MessageStream:
        return MessageStream(self)


class MessageStream(Translation):
    """message_start, then one content block per run of text, thinking or a tool call (start,
    deltas, stop), then message_delta with the stop reason and usage, and message_stop. A failure
    is Anthropic's `error` event (the problem document in Anthropic's shape)."""

    keepalive_every = PING_EVERY

    def __init__(self, fmt: MessageFormat) -> None:
        self.fmt = fmt
        self.index = -1
        self.open: str | None = None  # the type of the block being streamed

    def opening(self, prompt_tokens: int) -> list[str]:
        message = Message(
            id=self.fmt.message_id,
            model=self.fmt.model,
            content=[],
            stop_reason=None,
            usage=Usage(input_tokens=prompt_tokens, output_tokens=0),
        )
        return [sse_event(MessageStartEvent(message=message)), self.keepalive()]

    def piece(self, piece: Piece) -> list[str]:
        if isinstance(piece, EngineCall):
            block = tool_use(piece)
            start = ToolUseBlock(id=block.id, name=block.name, input={})  # the input follows as JSON
            events = self._start(start)
            events.append(self._delta(InputJsonDelta(partial_json=piece.arguments)))
            return [*events, *self._close()]
        if isinstance(piece, ReasoningDelta):
            events = self._start(ThinkingBlock(thinking="")) if self.open != "thinking" else []
            if self.fmt.show_thinking:
                events.append(self._delta(ThinkingDelta(thinking=piece.text)))
            return events
        assert isinstance(piece, EngineText)
        events = self._start(TextBlock(text="")) if self.open != "text" else []
        return [*events, self._delta(TextDelta(text=piece.text))]

    def closing(self, finished: Finished) -> list[str]:
        delta = MessageDelta(stop_reason=stop_reason(finished), stop_sequence=finished.stop_sequence)
        figures = usage(finished)
        totals = MessageDeltaUsage(
            output_tokens=figures.output_tokens,
            input_tokens=figures.input_tokens,
            cache_read_input_tokens=figures.cache_read_input_tokens,
        )
        return [*self._close(), sse_event(MessageDeltaEvent(delta=delta, usage=totals)), sse_event(MessageStopEvent())]

    def keepalive(self) -> str:
        return sse_event(PingEvent())

    def _start(self, block: ContentBlock) -> list[str]:
        events = self._close()
        self.index += 1
        self.open = block.type
        return [*events, sse_event(ContentBlockStartEvent(index=self.index, content_block=block))]

    def _delta(self, delta: TextDelta | ThinkingDelta | InputJsonDelta) -> str:
        return sse_event(ContentBlockDeltaEvent(index=self.index, delta=delta))

    def _close(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        return [sse_event(ContentBlockStopEvent(index=self.index))]
