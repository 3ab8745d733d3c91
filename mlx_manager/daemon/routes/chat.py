"""POST /v1/chat/completions."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from mlx_manager.daemon.choices import Format, respond
from mlx_manager.daemon.generation import Answer, GenerationCall, Piece, constraint_of, penalties_of, sampling_of
from mlx_manager.daemon.json_body import StrictJsonRoute
from mlx_manager.daemon.limits import check_choices, check_messages, max_tokens_for
from mlx_manager.daemon.openai_fields import refuse_unsupported
from mlx_manager.daemon.problems import Problem
from mlx_manager.daemon.schemas import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatMessage,
    ChatUsage,
    CompletionTokensDetails,
    FunctionCallOut,
    NamedToolChoice,
    PromptTokensDetails,
    TokenLogprobOut,
    ToolCallOut,
    TopLogprobOut,
)
from mlx_manager.daemon.state import Daemon, Outcome
from mlx_manager.engine.types import Finished, GenerationRequest, ReasoningDelta, TextDelta, TokenLogprob
from mlx_manager.routing.relay import Relay

router = APIRouter(route_class=StrictJsonRoute, tags=["chat"])


class ChatFormat(Format):
    def _chunk(
        self, index: int, delta: dict[str, Any], finish_reason: str | None, logprobs: list[TokenLogprob] | None = None
    ) -> dict[str, Any]:
        shown = chat_logprobs(logprobs).model_dump() if logprobs else None
        chunk: dict[str, Any] = {
            "id": f"chatcmpl-{self.request_id}",
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": index, "delta": delta, "logprobs": shown, "finish_reason": finish_reason}],
        }
        if self.include_usage:
            chunk["usage"] = None  # as OpenAI: every chunk has it, only the last one fills it
        return chunk

    def first_chunk(self, index: int) -> dict[str, Any]:
        return self._chunk(index, {"role": "assistant", "content": ""}, None)

    def piece_chunks(self, index: int, piece: Piece, logprobs: list[TokenLogprob]) -> list[dict[str, Any]]:
        if isinstance(piece, TextDelta):
            return [self._chunk(index, {"content": piece.text}, None, logprobs)]
        if isinstance(piece, ReasoningDelta):
            return [self._chunk(index, {"reasoning_content": piece.text, "reasoning": piece.text}, None, logprobs)]
        # As OpenAI streams a call: its id, type and name first, then its arguments.
        function = {"name": piece.name, "arguments": ""}
        header = {"index": piece.index, "id": piece.id, "type": "function", "function": function}
        arguments = {"index": piece.index, "function": {"arguments": piece.arguments}}
        return [
            self._chunk(index, {"tool_calls": [header]}, None, logprobs),
            self._chunk(index, {"tool_calls": [arguments]}, None),
        ]

    def final_chunk(self, index: int, finished: Finished, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        return self._chunk(index, {}, finished.finish_reason, logprobs)

    def usage_chunk(self, total: Finished) -> dict[str, Any]:
        chunk = self._chunk(0, {}, None)
        chunk["choices"] = []
        chunk["usage"] = chat_usage(total).model_dump()
        return chunk

    def complete(self, answers: list[Answer], total: Finished) -> ChatCompletion:
        return ChatCompletion(
            id=f"chatcmpl-{self.request_id}",
            created=self.created,
            model=self.model,
            choices=[self._choice(index, answer) for index, answer in enumerate(answers)],
            usage=chat_usage(total),
        )

    def _choice(self, index: int, answer: Answer) -> ChatChoice:
        calls = [
            ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
            for c in answer.tool_calls
        ]
        message = ChatMessage(
            content=answer.text if answer.text or not calls else None,
            reasoning_content=answer.reasoning or None,
            reasoning=answer.reasoning or None,
            tool_calls=calls or None,
        )
        logprobs = chat_logprobs(answer.logprobs) if self.logprobs else None
        return ChatChoice(index=index, message=message, finish_reason=answer.finished.finish_reason, logprobs=logprobs)


def chat_logprobs(entries: list[TokenLogprob]) -> ChatLogprobs:
    """OpenAI's `logprobs.content`: each token, its bytes, and the most likely tokens at its step."""
    return ChatLogprobs(
        content=[
            TokenLogprobOut(
                token=e.token,
                logprob=e.logprob,
                bytes=list(e.bytes),
                top_logprobs=[TopLogprobOut(token=t.token, logprob=t.logprob, bytes=list(t.bytes)) for t in e.top],
            )
            for e in entries
        ]
    )


def chat_usage(finished: Finished) -> ChatUsage:
    return ChatUsage(
        prompt_tokens=finished.prompt_tokens,
        completion_tokens=finished.completion_tokens,
        total_tokens=finished.prompt_tokens + finished.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=finished.cached_tokens),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=finished.reasoning_tokens),
    )


def _tool_choice(body: ChatCompletionRequest) -> str | dict[str, Any] | None:
    choice = body.tool_choice
    return choice.model_dump() if isinstance(choice, NamedToolChoice) else choice


def template_kwargs(body: ChatCompletionRequest) -> dict[str, Any]:
    """Variables for the chat template: the request's own, and thinking on or off by
    `reasoning_effort` ("none" turns it off; templates that take an effort get it too)."""
    variables = dict(body.chat_template_kwargs or {})
    if body.reasoning_effort is not None:
        variables.setdefault("enable_thinking", body.reasoning_effort != "none")
        variables.setdefault("reasoning_effort", body.reasoning_effort)
    return variables


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatCompletionRequest, request: Request, daemon: Daemon, outcome: Outcome) -> Any:
    """Chat completion (`n` choices), whole or streamed (`stream: true`) as server-sent events."""
    name = daemon.model(body.model)
    outcome.model, outcome.stream = name.label, body.stream
    settings = daemon.settings  # read once: a reload mid-request does not change this one's limits
    refuse_unsupported("chat", body)
    check_messages(len(body.messages), settings)
    check_choices(body.choices(), settings)
    constraint = constraint_of(body)
    tools = body.offered_tools()
    if constraint is not None and tools is not None and body.tool_choice in (None, "auto"):
        raise Problem(
            "invalid_request",
            "response_format with tools the model may call (tool_choice 'auto') is not supported:"
            " the answer could not be both; force the call (tool_choice 'required') or drop the tools",
            param="response_format",
        )
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    requested = body.requested_max_tokens()
    job_request = GenerationRequest(
        model=name.target,
        messages=body.engine_messages(),
        max_tokens=max_tokens_for(requested, settings, param),
        max_tokens_is_default=requested is None,
        stop=body.stop_list(),
        sampling=sampling_of(body),
        penalties=penalties_of(body),
        logprobs=body.logprobs_count(),
        request_id=outcome.request_id,
        tools=tools,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        template_kwargs=template_kwargs(body),
        reasoning_effort=body.reasoning_effort,
        constraint=constraint,
        tool_choice=_tool_choice(body),
    )
    # Streamed to an `openai` backend, the upstream's chunks are relayed as they are, renamed so.
    relay = Relay(f"chatcmpl-{outcome.request_id}", name.sent, body.include_usage()) if body.stream else None
    call = GenerationCall(daemon, request, "chat", job_request, n=body.choices(), relay=relay)
    fmt = ChatFormat(outcome.request_id, name.sent, body.include_usage(), int(time.time()), bool(body.logprobs))
    return await respond(call, fmt, body.stream)
