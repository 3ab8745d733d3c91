"""POST /v1/responses, GET and DELETE /v1/responses/{id}: OpenAI's Responses API (dialects/responses)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from mlx_manager.daemon.dialects.responses import serving
from mlx_manager.daemon.dialects.responses.protocol import DeletedResponse, ResponseObject, ResponsesRequest
from mlx_manager.daemon.dialects.responses.store import StoredResponse
from mlx_manager.daemon.generation import GenerationCall, answer
from mlx_manager.daemon.json_body import StrictJsonRoute
from mlx_manager.daemon.problems import Problem
from mlx_manager.daemon.state import Daemon, DaemonState, Outcome

router = APIRouter(route_class=StrictJsonRoute, tags=["responses"])


@router.post("/v1/responses", response_model=ResponseObject)
async def create_response(body: ResponsesRequest, request: Request, daemon: Daemon, outcome: Outcome) -> Any:
    """A response from the model, whole or streamed (`stream: true`) as typed events; kept in
    memory for `previous_response_id` and retrieval unless `store` is false."""
    name = daemon.model(body.model)
    body.model, outcome.model, outcome.stream = name.sent, name.label, body.stream
    store, owner = daemon.responses, outcome.api_key
    parent = None
    if body.previous_response_id is not None:
        parent = stored(daemon, body.previous_response_id, owner, param="previous_response_id")
    history = parent.conversation() if parent is not None else []
    job_request, turns = serving.generation_request(body, history, outcome.request_id, daemon.settings)
    job_request.model = name.target

    def keep(response: ResponseObject, conversation: list[dict[str, Any]]) -> None:
        store.put(StoredResponse(response, conversation, owner, parent))

    fmt = serving.ResponseFormat(body, turns, keep)
    call = GenerationCall(daemon, request, "responses", job_request)
    return await answer(call, body.stream, fmt.complete, fmt.stream())


@router.get("/v1/responses/{response_id}", response_model=ResponseObject)
async def get_response(response_id: str, daemon: Daemon, outcome: Outcome, stream: bool = False) -> ResponseObject:
    """A stored response (made with the same API key, within the store's lifetime)."""
    if stream:
        raise Problem("not_supported", "stream: replaying a stored response as events is not supported", param="stream")
    return stored(daemon, response_id, outcome.api_key).response


@router.delete("/v1/responses/{response_id}", response_model=DeletedResponse)
async def delete_response(response_id: str, daemon: Daemon, outcome: Outcome) -> DeletedResponse:
    """Forget a stored response (a response that continued it still can be continued)."""
    stored(daemon, response_id, outcome.api_key)
    daemon.responses.delete(response_id, outcome.api_key)
    return DeletedResponse(id=response_id)


def stored(daemon: DaemonState, response_id: str, owner: str | None, param: str | None = None) -> StoredResponse:
    found = daemon.responses.get(response_id, owner)
    if found is None:
        where = f"{param}: " if param else ""
        ttl = daemon.responses.ttl
        raise Problem(
            "response_not_found",
            f"{where}no stored response {response_id!r} (unknown, not stored, deleted, older than {ttl:g} seconds, "
            "or made before the daemon restarted: responses are kept in memory only)",
            param=param,
        )
    return found
