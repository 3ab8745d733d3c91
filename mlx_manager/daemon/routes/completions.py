"""POST /v1/completions."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from mlx_manager.daemon.choices import Format, respond
from mlx_manager.daemon.generation import Answer, GenerationCall, Piece, constraint_of, penalties_of, sampling_of
from mlx_manager.daemon.json_body import StrictJsonRoute
from mlx_manager.daemon.limits import check_choices, max_tokens_for
from mlx_manager.daemon.openai_fields import refuse_unsupported
from mlx_manager.daemon.schemas import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    PromptTokensDetails,
    Usage,
)
from mlx_manager.daemon.state import Daemon, Outcome
from mlx_manager.engine.types import Finished, GenerationRequest, TextDelta, TokenLogprob

router = APIRouter(route_class=StrictJsonRoute, tags=["completions"])


class CompletionFormat(Format):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._offsets: dict[int, int] = {}  # choice -> the text offset of its next token

    def _chunk(
        self, index: int, text: str, finish_reason: str | None, logprobs: list[TokenLogprob] | None = None
    ) -> dict[str, Any]:
        shown = self._logprobs(index, logprobs).model_dump() if logprobs else None
        chunk: dict[str, Any] = {
            "id": f"cmpl-{self.request_id}",
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": index, "text": text, "logprobs": shown, "finish_reason": finish_reason}],
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _logprobs(self, index: int, entries: list[TokenLogprob]) -> CompletionLogprobs:
        """The legacy shape; `text_offset` counts the characters of the tokens before each one."""
        offset = self._offsets.get(index, 0)
        offsets = []
        for entry in entries:
            offsets.append(offset)
            offset += len(entry.token)
        self._offsets[index] = offset
        return CompletionLogprobs(
            tokens=[e.token for e in entries],
            token_logprobs=[e.logprob for e in entries],
            top_logprobs=[{t.token: t.logprob for t in e.top} for e in entries],
            text_offset=offsets,
        )

    def piece_chunks(self, index: int, piece: Piece, logprobs: list[TokenLogprob]) -> list[dict[str, Any]]:
        assert isinstance(piece, TextDelta)  # a plain completion has no reasoning or tool calls
        return [self._chunk(index, piece.text, None, logprobs)]

    def final_chunk(self, index: int, finished: Finished, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        return self._chunk(index, "", finished.finish_reason, logprobs)

    def usage_chunk(self, total: Finished) -> dict[str, Any]:
        chunk = self._chunk(0, "", None)
        chunk["choices"] = []
        chunk["usage"] = usage_of(total).model_dump()
        return chunk

    def complete(self, answers: list[Answer], total: Finished) -> Completion:
        choices = [
            CompletionChoice(
                index=index,
                text=answer.text,
                finish_reason=answer.finished.finish_reason,
                logprobs=self._logprobs(index, answer.logprobs) if self.logprobs else None,
            )
            for index, answer in enumerate(answers)
        ]
        return Completion(
            id=f"cmpl-{self.request_id}", created=self.created, model=self.model, choices=choices, usage=usage_of(total)
        )


def usage_of(finished: Finished) -> Usage:
    return Usage(
        prompt_tokens=finished.prompt_tokens,
        completion_tokens=finished.completion_tokens,
        total_tokens=finished.prompt_tokens + finished.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=finished.cached_tokens),
    )


@router.post("/v1/completions", response_model=Completion)
async def completions(body: CompletionRequest, request: Request, daemon: Daemon, outcome: Outcome) -> Any:
    """Text completion of one or more prompts (text or token ids), `n` choices each, whole or
    streamed; choice `i * n + j` is prompt i's j-th."""
    name = daemon.model(body.model)
    outcome.model, outcome.stream = name.label, body.stream
    settings = daemon.settings
    refuse_unsupported("completions", body)
    prompts = body.prompts()
    check_choices(len(prompts) * body.choices(), settings)
    requested = body.requested_max_tokens()
    constraint = constraint_of(body)
    job_requests = [
        GenerationRequest(
            model=name.target,
            prompt=prompt,
            max_tokens=max_tokens_for(requested, settings),
            max_tokens_is_default=requested is None,
            stop=body.stop_list(),
            sampling=sampling_of(body),
            penalties=penalties_of(body),
            logprobs=body.logprobs,
            request_id=outcome.request_id,
            constraint=constraint,
        )
        for prompt in prompts
    ]
    call = GenerationCall(daemon, request, "completions", job_requests, n=body.choices())
    fmt = CompletionFormat(
        outcome.request_id, name.sent, body.include_usage(), int(time.time()), body.logprobs is not None
    )
    return await respond(call, fmt, body.stream)
