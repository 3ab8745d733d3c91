"""POST /v1/embeddings: vectors from an embedding model, as floats or base64 float32."""

from __future__ import annotations

import base64
import json

from fastapi import APIRouter, Request
from starlette.responses import Response

from mlx_manager.daemon.call import EmbeddingCall
from mlx_manager.daemon.json_body import StrictJsonRoute
from mlx_manager.daemon.schemas import EmbeddingList, EmbeddingsRequest
from mlx_manager.daemon.state import Daemon, Outcome
from mlx_manager.engine.types import EmbeddingRequest, EmbeddingResult

router = APIRouter(route_class=StrictJsonRoute, tags=["embeddings"])


@router.post("/v1/embeddings", response_model=EmbeddingList)
async def embeddings(body: EmbeddingsRequest, request: Request, daemon: Daemon, outcome: Outcome) -> Response:
    """Embed one or more inputs (texts or token id lists). Inputs over the model's limit are a 400,
    unless `truncate` (an extension) is true."""
    name = daemon.model(body.model, "embed")
    body.model, outcome.model = name.sent, name.label  # the answer names the model as the request did
    job_request = EmbeddingRequest(
        model=name.target,
        inputs=body.inputs(),
        dimensions=body.dimensions,
        truncate=body.truncate,
        request_id=outcome.request_id,
    )
    result = await EmbeddingCall(daemon, request, job_request).result()
    return Response(_body(body, result), media_type="application/json")


def _body(body: EmbeddingsRequest, result: EmbeddingResult) -> bytes:
    """The response, serialised directly: thousands of floats through a response model cost more
    than the model's forward pass."""
    if body.encoding_format == "base64":
        vectors = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in result.vectors]
    else:
        vectors = result.vectors.tolist()
    return json.dumps(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
            "model": body.model,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
        },
        separators=(",", ":"),
    ).encode()
