"""POST /v1/completions."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from mlx_manager.daemon.generation import Answer, Format, GenerationCall, Piece, constraint_of, respond, sampling_of
from mlx_manager.daemon.json_body import StrictJsonRoute
from mlx_manager.daemon.limits import max_tokens_for
from mlx_manager.daemon.schemas import Completion, CompletionChoice, CompletionRequest, PromptTokensDetails, Usage
from mlx_manager.daemon.state import Daemon, Outcome
from mlx_manager.engine.types import Finished, GenerationRequest, TextDelta

router = APIRouter(route_class=StrictJsonRoute, tags=["completions"])


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

    def piece_chunks(self, piece: Piece) -> list[dict[str, Any]]:
        assert isinstance(piece, TextDelta)  # a plain completion has no reasoning or tool calls
        return [self._chunk(piece.text, None)]

    def final_chunk(self, finished: Finished) -> dict[str, Any]:
        return self._chunk("", finished.finish_reason)

    def usage_chunk(self, finished: Finished) -> dict[str, Any]:
        chunk = self._chunk("", None)
        chunk["choices"] = []
        chunk["usage"] = usage_of(finished).model_dump()
        return chunk

    def complete(self, answer: Answer) -> Completion:
        return Completion(
            id=f"cmpl-{self.request_id}",
            created=self.created,
            model=self.model,
            choices=[CompletionChoice(text=answer.text, finish_reason=answer.finished.finish_reason)],
            usage=usage_of(answer.finished),
        )


def usage_of(finished: Finished) -> Usage:
    return Usage(
        prompt_tokens=finished.prompt_tokens,
        completion_tokens=finished.completion_tokens,
        total_tokens=finished.prompt_tokens + finished.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=finished.cached_tokens),
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
        constraint=constraint_of(body),
    )
    call = GenerationCall(daemon, request, "completions", job_request)
    fmt = CompletionFormat(outcome.request_id, body.model, body.include_usage(), int(time.time()))
    return await respond(call, fmt, body.stream)
