"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API (dialects/anthropic)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from mlx_manager.daemon.call import TokenCountCall
from mlx_manager.daemon.dialects.anthropic import serving
from mlx_manager.daemon.dialects.anthropic.protocol import CountTokensRequest, Message, MessagesRequest, TokenCount
from mlx_manager.daemon.generation import GenerationCall, answer
from mlx_manager.daemon.json_body import StrictJsonRoute
from mlx_manager.daemon.state import Daemon, Outcome
from mlx_manager.routing.relay import Relay

router = APIRouter(route_class=StrictJsonRoute, tags=["messages"])


@router.post("/v1/messages", response_model=Message)
async def messages(body: MessagesRequest, request: Request, daemon: Daemon, outcome: Outcome) -> Any:
    """A message from the model, whole or streamed (`stream: true`) as Anthropic's events."""
    name = daemon.model(body.model)
    body.model, outcome.model, outcome.stream = name.sent, name.label, body.stream
    job_request = serving.generation_request(body, outcome.request_id, daemon.settings)
    job_request.model = name.target
    message_id, shows_thinking = f"msg_{outcome.request_id}", serving.shows_thinking(body)
    # Streamed to an `anthropic` backend, the upstream's events are relayed as they are, renamed so
    # (not when the thinking is to be omitted: the upstream is not asked to omit it).
    relay = Relay(message_id, name.sent, True, "anthropic") if body.stream and shows_thinking else None
    call = GenerationCall(daemon, request, "messages", job_request, relay=relay)
    fmt = serving.MessageFormat(message_id, name.sent, shows_thinking)
    return await answer(call, body.stream, fmt.complete, fmt.stream())


@router.post("/v1/messages/count_tokens", response_model=TokenCount)
async def count_tokens(body: CountTokensRequest, request: Request, daemon: Daemon, outcome: Outcome) -> TokenCount:
    """How many tokens the prompt (system, messages and tools) is for the model, without generating."""
    name = daemon.model(body.model)
    body.model, outcome.model = name.sent, name.label
    job_request = serving.prompt_request(body, outcome.request_id, daemon.settings)
    job_request.model = name.target
    return TokenCount(input_tokens=await TokenCountCall(daemon, request, "messages", job_request).count())
