"""POST /v1/embeddings: vectors from an embedding model, as floats or base64 float32."""

from __future__ import annotations

import asyncio
import base64
import json

from fastapi import APIRouter, Request
from starlette.responses import Response

from mlx_manager.daemon.generation import CLIENT_CLOSED_REQUEST, ClientGone, timeout_problem, unless_disconnected
from mlx_manager.daemon.schemas import EmbeddingList, EmbeddingsRequest
from mlx_manager.daemon.state import Daemon, Outcome
from mlx_manager.engine import EmbeddingRequest, EmbeddingResult
from mlx_manager.telemetry import embedding_span

router = APIRouter(tags=["embeddings"])


@router.post("/v1/embeddings", response_model=EmbeddingList)
async def embeddings(body: EmbeddingsRequest, request: Request, daemon: Daemon, outcome: Outcome):
    """Embed one or more inputs (texts or token id lists). Inputs over the model's limit are a 400,
    unless `truncate` (an extension) is true."""
    outcome.model = body.model
    timeout = daemon.timeout_for("embeddings")
    job = daemon.engine.submit_embedding(  # Overloaded / EngineStopped: at once
        EmbeddingRequest(
            model=body.model,
            inputs=body.input,
            dimensions=body.dimensions,
            truncate=body.truncate,
            request_id=outcome.request_id,
        )
    )
    span = embedding_span(body.model, outcome.request_id).start()
    span.finish_reason = "error"
    try:
        async with asyncio.timeout(timeout):
            result = await unless_disconnected(request, job.result())
        span.finish_reason = "stop"
    except TimeoutError:
        span.finish_reason = "timeout"
        raise timeout_problem("embeddings", timeout) from None
    except ClientGone:
        span.finish_reason = "cancelled"
        outcome.cancel(nothing_sent=True)
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        job.cancel()  # no-op once finished; otherwise the inference thread drops it
        outcome.prompt_tokens = span.prompt_tokens = job.prompt_tokens or None
        outcome.completion_tokens = span.completion_tokens = 0
        span.end()
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
