"""POST /v1/completions."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from mlx_manager.daemon.generation import Format, GenerationCall, respond, sampling_of
from mlx_manager.daemon.limits import max_tokens_for
from mlx_manager.daemon.schemas import Completion, CompletionChoice, CompletionRequest, Usage
from mlx_manager.daemon.state import Daemon, Outcome
from mlx_manager.engine.types import GenerationRequest

router = APIRouter(tags=["completions"])


class CompletionFormat(Format):
    def _chunk(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": f"cmpl-{self.request_id}",
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def delta_chunk(self, text: str) -> dict[str, Any]:
        return self._chunk(text, None)

    def final_chunk(self, finish_reason: str) -> dict[str, Any]:
        return self._chunk("", finish_reason)

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        chunk = self._chunk("", None)
        chunk["choices"] = []
        chunk["usage"] = usage
        return chunk

    def complete(self, text: str, finish_reason: str, usage: dict[str, int]) -> Completion:
        return Completion(
            id=f"cmpl-{self.request_id}",
            created=self.created,
            model=self.model,
            choices=[CompletionChoice(text=text, finish_reason=finish_reason)],
            usage=Usage(**usage),
        )


@router.post("/v1/completions", response_model=Completion)
async def completions(body: CompletionRequest, request: Request, daemon: Daemon, outcome: Outcome):
    """Text completion of one prompt (text or token ids), whole or streamed."""
    outcome.model, outcome.stream = body.model, body.stream
    job_request = GenerationRequest(
        model=body.model,
        prompt=body.prompt,
        max_tokens=max_tokens_for(body.requested_max_tokens(), daemon.settings),
        stop=body.stop_list(),
        sampling=sampling_of(body),
        request_id=outcome.request_id,
    )
    call = GenerationCall(daemon, request, "completions", job_request)
    fmt = CompletionFormat(outcome.request_id, body.model, body.include_usage(), int(time.time()))
    return await respond(call, fmt, body.stream)
