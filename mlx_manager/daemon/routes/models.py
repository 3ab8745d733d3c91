"""GET /v1/models and /v1/models/{id}: the models that are loaded, allowed or aliased."""

from __future__ import annotations

from fastapi import APIRouter

from mlx_manager.daemon.problems import Problem
from mlx_manager.daemon.schemas import Model, ModelList
from mlx_manager.daemon.state import Daemon, DaemonState

router = APIRouter(tags=["models"])


def listed(daemon: DaemonState) -> list[Model]:
    """Each alias (with the model it stands for as `root`), then each loaded or allowed model
    that has no alias, by its id."""
    created = daemon.started_at
    aliases = daemon.aliases()
    models = [Model(id=alias, created=created, root=target) for alias, target in aliases.targets.items()]
    aliased = set(aliases.targets.values())
    known = daemon.engine.known_models()
    models += [Model(id=model_id, created=created) for model_id in known if model_id not in aliased]
    return models


@router.get("/v1/models", response_model=ModelList)
async def list_models(daemon: Daemon) -> ModelList:
    """Aliases first, then the models without one: loaded, then on the allow-list."""
    return ModelList(data=listed(daemon))


# `:path` because ids are folder paths or Hugging Face ids, both with slashes.
@router.get("/v1/models/{model_id:path}", response_model=Model)
async def get_model(model_id: str, daemon: Daemon) -> Model:
    """One model, by alias or id, if it is aliased, loaded or allowed."""
    target = daemon.model_id(model_id)
    if target != model_id:
        return Model(id=model_id, created=daemon.started_at, root=target)
    if model_id not in daemon.engine.known_models():
        raise Problem("model_not_found", f"model {model_id!r} is neither loaded nor on models.allowed", param="model")
    return Model(id=model_id, created=daemon.started_at)
