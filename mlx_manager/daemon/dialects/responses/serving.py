"""OpenAI's Responses onto the engine: a request (and the conversation it continues) becomes one
`GenerationRequest`; the engine's events become the response object or its typed events.

Input items go to the chat template as chat completions sends them: `instructions` and
system/developer messages as system messages, the assistant's reasoning, text and
`function_call` items of one turn as one assistant message (`reasoning_content`, `content`,
`tool_calls`), each `function_call_output` as a `tool` message. A `previous_response_id`
puts the stored conversation (its inputs and outputs, not its instructions) before the input.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from mlx_manager.daemon.dialects.responses.protocol import (
    ContentPartEvent,
    FunctionCall,
    FunctionCallArgumentsDeltaEvent,
    FunctionCallArgumentsDoneEvent,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionTool,
    FunctionToolParam,
    IncompleteDetails,
    InputItem,
    InputText,
    InputTokensDetails,
    LifecycleEvent,
    MessageItem,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    OutputTextDeltaEvent,
    OutputTextDoneEvent,
    OutputTokensDetails,
    Reasoning,
    ReasoningItem,
    ReasoningItemParam,
    ReasoningText,
    ReasoningTextDeltaEvent,
    ReasoningTextDoneEvent,
    ResponseError,
    ResponseObject,
    ResponsesRequest,
    ResponseStatus,
    ResponseUsage,
    Status,
    SummaryPartEvent,
    SummaryText,
    SummaryTextDeltaEvent,
    SummaryTextDoneEvent,
    ToolChoiceAllowed,
    ToolChoiceFunction,
    text_of,
)
from mlx_manager.daemon.generation import Answer, Piece, Translation
from mlx_manager.daemon.limits import check_messages, max_tokens_for
from mlx_manager.daemon.outcome import RequestOutcome
from mlx_manager.daemon.problems import Problem
from mlx_manager.daemon.sse import sse_event
from mlx_manager.engine.constraints import ConstraintError, GrammarSpec, json_schema_spec
from mlx_manager.engine.types import (
    Finished,
    GenerationRequest,
    ReasoningDelta,
    SamplingParams,
    ToolCall,
)
from mlx_manager.settings import Settings

# -- request -------------------------------------------------------------------------------------


def constraint(body: ResponsesRequest) -> GrammarSpec | None:
    """The grammar `text.format` asks for (json_schema or json_object), or None for text; a 400
    that names what cannot be enforced."""
    fmt = body.text.format if body.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    try:
        if fmt.type == "json_object":
            return json_schema_spec({"type": "object"}, kind="json_object")
        return json_schema_spec(fmt.schema_, name=fmt.name)
    except ConstraintError as exc:
        message = str(exc).replace("response_format", "text.format")
        raise Problem("invalid_request", message, param="text.format") from None


def tool_choice(body: ResponsesRequest) -> str | dict[str, Any] | None:
    """`required` (or allowed_tools in required mode) forces a call to one of the offered tools,
    a function choice to that one; the engine's grammar makes the model call."""
    choice = body.tool_choice
    if choice == "required" or (isinstance(choice, ToolChoiceAllowed) and choice.mode == "required"):
        return "required"
    if isinstance(choice, ToolChoiceFunction):
        return {"type": "function", "function": {"name": choice.name}}
    return None


def conversation(items: list[InputItem]) -> list[dict[str, Any]]:
    """Input items as chat-template messages (see the module doc)."""
    messages: list[dict[str, Any]] = []
    turn: dict[str, Any] | None = None  # the assistant turn being gathered
    for item in items:
        if isinstance(item, MessageItem) and item.role != "assistant":
            role = "user" if item.role == "user" else "system"
            messages.append({"role": role, "content": text_of(item.content)})
            turn = None
        elif isinstance(item, FunctionCallOutputItem):
            output = "".join(part.text for part in item.output if isinstance(part, InputText))
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
            turn = None
        else:
            if turn is None:
                turn = {"role": "assistant", "content": ""}
                messages.append(turn)
            if isinstance(item, MessageItem):
                turn["content"] = "\n\n".join(filter(None, (turn["content"], text_of(item.content))))
            elif isinstance(item, FunctionCallItem):
                call = {"name": item.name, "arguments": _arguments_object(item.arguments)}
                turn.setdefault("tool_calls", []).append({"id": item.call_id, "type": "function", "function": call})
            elif isinstance(item, ReasoningItemParam):
                turn["reasoning_content"] = "\n\n".join(filter(None, (turn.get("reasoning_content"), item.text())))
    return messages


def _arguments_object(arguments: str) -> Any:
    """Arguments as chat templates take them: an object (text that is not JSON stays text)."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def offered_tools(body: ResponsesRequest) -> list[dict[str, Any]] | None:
    """The function tools as chat templates take them: None with none, or with tool_choice
    none; only the allowed ones with an allowed_tools choice."""
    tools = [t for t in body.tools or [] if isinstance(t, FunctionToolParam)]
    if isinstance(body.tool_choice, ToolChoiceAllowed):
        allowed = {t.name for t in body.tool_choice.tools}
        tools = [t for t in tools if t.name in allowed]
    if not tools or body.tool_choice == "none":
        return None
    return [t.for_template() for t in tools]


def template_kwargs(body: ResponsesRequest) -> dict[str, Any]:
    """Thinking on or off by `reasoning.effort` ("none" turns it off; templates that take an
    effort get it too), as chat's `reasoning_effort`."""
    effort = body.reasoning.effort if body.reasoning is not None else None
    if effort is None:
        return {}
    return {"enable_thinking": effort != "none", "reasoning_effort": effort}


def generation_request(
    body: ResponsesRequest, history: list[dict[str, Any]], request_id: str, settings: Settings
) -> tuple[GenerationRequest, list[dict[str, Any]]]:
    """The generation, and the messages this request adds to the conversation (for the store)."""
    spec = constraint(body)
    tools = offered_tools(body)
    if spec is not None and tools is not None and tool_choice(body) is None:
        raise Problem(
            "invalid_request",
            "text.format with tools the model may call (tool_choice auto) is not supported: the answer could"
            " not be both; force the call (tool_choice required) or drop the tools",
            param="text.format",
        )
    turns = conversation(body.input)
    instructions = [{"role": "system", "content": body.instructions}] if body.instructions else []
    messages = [*instructions, *history, *turns]
    check_messages(len(messages), settings)
    defaults = SamplingParams()
    request = GenerationRequest(
        model=body.model or "",  # the route puts the model it names here
        messages=messages,
        max_tokens=max_tokens_for(body.max_output_tokens, settings, "max_output_tokens"),
        max_tokens_is_default=body.max_output_tokens is None,
        sampling=SamplingParams(
            temperature=defaults.temperature if body.temperature is None else body.temperature,
            top_p=defaults.top_p if body.top_p is None else body.top_p,
        ),
        request_id=request_id,
        tools=tools,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        template_kwargs=template_kwargs(body),
        reasoning_effort=body.reasoning.effort if body.reasoning is not None else None,
        constraint=spec,
        tool_choice=tool_choice(body),
    )
    return request, turns


# -- response ------------------------------------------------------------------------------------


class ResponseFormat:
    """The response object for one request: in progress, finished (then stored, if asked), or
    failed; and the stream of events that builds it."""

    def __init__(
        self,
        body: ResponsesRequest,
        turns: list[dict[str, Any]],
        on_finished: Callable[[ResponseObject, list[dict[str, Any]]], None],
    ) -> None:
        self.body = body
        self.turns = turns  # what the request added to the conversation
        self.on_finished = on_finished  # stores the response with the conversation it ends
        self.id = f"resp_{uuid.uuid4().hex}"  # not the request id: a client may reuse that
        self.created_at = int(time.time())

    def response(self, status: ResponseStatus, **fields: Any) -> ResponseObject:
        body = self.body
        tools = [t for t in body.tools or [] if isinstance(t, FunctionToolParam)]
        reasoning = None
        if body.reasoning is not None:
            reasoning = Reasoning(
                effort=body.reasoning.effort, summary=body.reasoning.summary or body.reasoning.generate_summary
            )
        return ResponseObject(
            id=self.id,
            created_at=self.created_at,
            status=status,
            model=body.model,
            instructions=body.instructions,
            parallel_tool_calls=body.parallel_tool_calls is not False,
            previous_response_id=body.previous_response_id,
            max_output_tokens=body.max_output_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            reasoning=reasoning,
            tool_choice=body.tool_choice if body.tool_choice is not None else "auto",
            tools=[
                FunctionTool(name=t.name, parameters=t.parameters, strict=t.strict, description=t.description)
                for t in tools
            ],
            store=body.store is not False,
            metadata=body.metadata or {},
            user=body.user,
            **fields,
        )

    def finished(self, output: list[OutputItem], finished: Finished) -> ResponseObject:
        """The final response object, stored (if asked) with the conversation it ends."""
        incomplete = finished.finish_reason == "length"
        response = self.response(
            "incomplete" if incomplete else "completed",
            completed_at=int(time.time()),
            output=output,
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if incomplete else None,
            usage=ResponseUsage(
                input_tokens=finished.prompt_tokens,
                input_tokens_details=InputTokensDetails(cached_tokens=finished.cached_tokens),
                output_tokens=finished.completion_tokens,
                output_tokens_details=OutputTokensDetails(reasoning_tokens=finished.reasoning_tokens),
                total_tokens=finished.prompt_tokens + finished.completion_tokens,
            ),
        )
        if response.store:
            self.on_finished(response, [*self.turns, assistant_turn(output)])
        return response

    def complete(self, answer: Answer) -> ResponseObject:
        status: Status = "incomplete" if answer.finished.finish_reason == "length" else "completed"
        output: list[OutputItem] = []
        if answer.reasoning:
            output.append(self.reasoning_item(0, answer.reasoning, status))
        if answer.text:
            output.append(
                OutputMessage(
                    id=self.item_id("msg", len(output)), status=status, content=[OutputText(text=answer.text)]
                )
            )
        for call in answer.tool_calls:
            output.append(self.function_call(len(output), call, "completed"))
        return self.finished(output, answer.finished)

    def stream(self) -> ResponseStream:
        return ResponseStream(self)

    def item_id(self, prefix: str, index: int) -> str:
        return f"{prefix}_{self.id.removeprefix('resp_')}_{index}"

    def reasoning_item(self, index: int, text: str, status: Status) -> ReasoningItem:
        summary = [SummaryText(text=text)] if self.body.wants_summary() else []
        return ReasoningItem(
            id=self.item_id("rs", index), content=[ReasoningText(text=text)], summary=summary, status=status
        )

    def function_call(self, index: int, call: ToolCall, status: Status) -> FunctionCall:
        return FunctionCall(
            id=self.item_id("fc", index), call_id=call.id, name=call.name, arguments=call.arguments, status=status
        )


def assistant_turn(output: list[OutputItem]) -> dict[str, Any]:
    """The output as the assistant message a later request's conversation holds."""
    turn: dict[str, Any] = {"role": "assistant", "content": ""}
    for item in output:
        if isinstance(item, OutputMessage):
            turn["content"] += "".join(part.text for part in item.content)
        elif isinstance(item, ReasoningItem):
            turn["reasoning_content"] = "".join(part.text for part in item.content)
        else:
            call = {"name": item.name, "arguments": _arguments_object(item.arguments)}
            turn.setdefault("tool_calls", []).append({"id": item.call_id, "type": "function", "function": call})
    return turn


class ResponseStream(Translation):
    """response.created and .in_progress; per output item: output_item.added, its content part
    (added, deltas, done) or its arguments (delta, done), output_item.done; then
    response.completed (or .incomplete at max_output_tokens). A failure is response.failed."""

    def __init__(self, fmt: ResponseFormat) -> None:
        self.fmt = fmt
        self.sequence = 0
        self.output: list[OutputItem] = []
        self.open: OutputMessage | ReasoningItem | None = None  # the item whose text is streaming
        self.text = ""  # its text so far

    def opening(self, prompt_tokens: int) -> list[str]:
        response = self.fmt.response("in_progress")
        return [self._lifecycle("response.created", response), self._lifecycle("response.in_progress", response)]

    def piece(self, piece: Piece) -> list[str]:
        if isinstance(piece, ToolCall):
            events = self._close("completed")
            index = len(self.output)
            item = self.fmt.function_call(index, piece, "in_progress")
            added = item.model_copy(update={"arguments": ""})
            self.output.append(item.model_copy(update={"status": "completed"}))
            events.append(
                self._event(OutputItemEvent, type="response.output_item.added", output_index=index, item=added)
            )
            where = {"item_id": item.id, "output_index": index}
            events.append(self._event(FunctionCallArgumentsDeltaEvent, **where, delta=item.arguments))
            events.append(
                self._event(FunctionCallArgumentsDoneEvent, **where, name=item.name, arguments=item.arguments)
            )
            return [
                *events,
                self._event(
                    OutputItemEvent, type="response.output_item.done", output_index=index, item=self.output[-1]
                ),
            ]
        kind = ReasoningItem if isinstance(piece, ReasoningDelta) else OutputMessage
        events = [] if isinstance(self.open, kind) else self._open(kind)
        self.text += piece.text
        where = {"item_id": self._open_item().id, "output_index": len(self.output), "content_index": 0}
        delta = ReasoningTextDeltaEvent if kind is ReasoningItem else OutputTextDeltaEvent
        return [*events, self._event(delta, **where, delta=piece.text)]

    def closing(self, finished: Finished) -> list[str]:
        events = self._close("incomplete" if finished.finish_reason == "length" else "completed")
        response = self.fmt.finished(self.output, finished)
        kind = "response.completed" if response.status == "completed" else "response.incomplete"
        return [*events, self._lifecycle(kind, response)]

    def failure(self, problem: Problem, outcome: RequestOutcome) -> list[str]:
        self._close("incomplete")
        code: Literal["server_error", "rate_limit_exceeded"] = (
            "rate_limit_exceeded" if problem.status == 429 else "server_error"
        )
        response = self.fmt.response(
            "failed", output=self.output, error=ResponseError(code=code, message=problem.detail)
        )
        return [self._lifecycle("response.failed", response)]

    def _open(self, kind: type[OutputMessage] | type[ReasoningItem]) -> list[str]:
        events = self._close("completed")
        index = len(self.output)
        item: OutputMessage | ReasoningItem
        part: OutputText | ReasoningText
        if kind is OutputMessage:
            item = OutputMessage(id=self.fmt.item_id("msg", index), status="in_progress", content=[])
            part = OutputText(text="")
        else:
            item = ReasoningItem(id=self.fmt.item_id("rs", index), status="in_progress")
            part = ReasoningText(text="")
        self.open, self.text = item, ""
        events.append(self._event(OutputItemEvent, type="response.output_item.added", output_index=index, item=item))
        where = {"item_id": item.id, "output_index": index, "content_index": 0}
        return [*events, self._event(ContentPartEvent, type="response.content_part.added", **where, part=part)]

    def _open_item(self) -> OutputMessage | ReasoningItem:
        assert self.open is not None
        return self.open

    def _close(self, status: Status) -> list[str]:
        """End the item whose text was streaming: its text, its part, its summary, the item."""
        item, text = self.open, self.text
        if item is None:
            return []
        self.open, self.text = None, ""
        index = len(self.output)
        where = {"item_id": item.id, "output_index": index}
        events: list[str] = []
        done: OutputMessage | ReasoningItem
        part: OutputText | ReasoningText
        if isinstance(item, OutputMessage):
            part = OutputText(text=text)
            events.append(self._event(OutputTextDoneEvent, **where, content_index=0, text=text))
            done = item.model_copy(update={"status": status, "content": [part]})
        else:
            part = ReasoningText(text=text)
            events.append(self._event(ReasoningTextDoneEvent, **where, content_index=0, text=text))
            done = self.fmt.reasoning_item(index, text, status)
        events.append(
            self._event(ContentPartEvent, type="response.content_part.done", **where, content_index=0, part=part)
        )
        if isinstance(done, ReasoningItem) and done.summary:
            events += self._summary(where, text)
        self.output.append(done)
        return [*events, self._event(OutputItemEvent, type="response.output_item.done", output_index=index, item=done)]

    def _summary(self, where: dict[str, Any], text: str) -> list[str]:
        """The reasoning's summary (the thinking itself: there is no summarizer here), in one delta."""
        where = {**where, "summary_index": 0}
        return [
            self._event(
                SummaryPartEvent, type="response.reasoning_summary_part.added", **where, part=SummaryText(text="")
            ),
            self._event(SummaryTextDeltaEvent, **where, delta=text),
            self._event(SummaryTextDoneEvent, **where, text=text),
            self._event(
                SummaryPartEvent, type="response.reasoning_summary_part.done", **where, part=SummaryText(text=text)
            ),
        ]

    def _lifecycle(self, kind: str, response: ResponseObject) -> str:
        return self._event(LifecycleEvent, type=kind, response=response)

    def _event(self, event: type[Any], **fields: Any) -> str:
        text = sse_event(event(sequence_number=self.sequence, **fields))
        self.sequence += 1
        return text
