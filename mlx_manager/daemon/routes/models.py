"""GET /v1/models and /v1/models/{id}: the models that are loaded or allowed."""

from __future__ import annotations

from fastapi import APIRouter

from mlx_manager.daemon.problems import Problem
from mlx_manager.daemon.schemas import Model, ModelList
from mlx_manager.daemon.state import Daemon

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelList)
async def list_models(daemon: Daemon) -> ModelList:
    """Models that are loaded, then those on the allow-list."""
    created = daemon.started_at
    return ModelList(data=[Model(id=model_id, created=created) for model_id in daemon.engine.known_models()])


# `:path` because ids are folder paths or Hugging Face ids, both with slashes.
@router.get("/v1/models/{model_id:path}", response_model=Model)
async def get_model(model_id: str, daemon: Daemon) -> Model:
    """One model, if it is loaded or allowed."""
    if model_id not in daemon.engine.known_models():
        raise Problem("model_not_found", f"model {model_id!r} is neither loaded nor on models.allowed", param="model")
    return Model(id=model_id, created=daemon.started_at)
