"""POST /v1/chat/completions."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from mlx_manager.daemon.generation import Format, GenerationCall, respond, sampling_of
from mlx_manager.daemon.limits import check_messages, max_tokens_for
from mlx_manager.daemon.schemas import ChatChoice, ChatCompletion, ChatCompletionRequest, ChatMessage, Usage
from mlx_manager.daemon.state import Daemon, Outcome
from mlx_manager.engine.types import GenerationRequest

router = APIRouter(tags=["chat"])


class ChatFormat(Format):
    def _chunk(self, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": f"chatcmpl-{self.request_id}",
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self.include_usage:
            chunk["usage"] = None  # as OpenAI: every chunk has it, only the last one fills it
        return chunk

    def first_chunk(self) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""}, None)

    def delta_chunk(self, text: str) -> dict[str, Any]:
        return self._chunk({"content": text}, None)

    def final_chunk(self, finish_reason: str) -> dict[str, Any]:
        return self._chunk({}, finish_reason)

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        chunk = self._chunk({}, None)
        chunk["choices"] = []
        chunk["usage"] = usage
        return chunk

    def complete(self, text: str, finish_reason: str, usage: dict[str, int]) -> ChatCompletion:
        return ChatCompletion(
            id=f"chatcmpl-{self.request_id}",
            created=self.created,
            model=self.model,
            choices=[ChatChoice(message=ChatMessage(content=text), finish_reason=finish_reason)],
            usage=Usage(**usage),
        )


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatCompletionRequest, request: Request, daemon: Daemon, outcome: Outcome):
    """Chat completion, whole or streamed (`stream: true`) as server-sent events."""
    outcome.model, outcome.stream = body.model, body.stream
    settings = daemon.settings  # read once: a reload mid-request does not change this one's limits
    check_messages(len(body.messages), settings)
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    job_request = GenerationRequest(
        model=body.model,
        messages=body.engine_messages(),
        max_tokens=max_tokens_for(body.requested_max_tokens(), settings, param),
        stop=body.stop_list(),
        sampling=sampling_of(body),
        request_id=outcome.request_id,
    )
    call = GenerationCall(daemon, request, "chat", job_request)
    fmt = ChatFormat(outcome.request_id, body.model, body.include_usage(), int(time.time()))
    return await respond(call, fmt, body.stream)
