"""GET /v1/models and /v1/models/{id}: the models that are loaded, allowed or aliased."""

from __future__ import annotations

from fastapi import APIRouter

from mlx_manager.daemon.problems import Problem
from mlx_manager.daemon.schemas import Model, ModelList
from mlx_manager.daemon.state import Daemon, DaemonState

router = APIRouter(tags=["models"])


def listed(daemon: DaemonState) -> list[Model]:
    """Each alias (with the id of the model it stands for as `root`), then each loaded or allowed
    model that has no alias, by its id: one entry per model, however the settings spell it."""
    created = daemon.started_at
    names = daemon.model_names()
    models, aliased = [], set()
    for alias in names.aliases.targets:
        root = names.of(alias).identity
        models.append(Model(id=alias, created=created, root=root))
        aliased.add(root)
    models += [Model(id=model_id, created=created) for model_id in known_ids(daemon) if model_id not in aliased]
    return models


def known_ids(daemon: DaemonState) -> list[str]:
    """The ids of the loaded and the allowed models, each once."""
    names = daemon.model_names()
    return list(dict.fromkeys(names.identity(model_id) or model_id for model_id in daemon.engine.known_models()))


@router.get("/v1/models", response_model=ModelList)
async def list_models(daemon: Daemon) -> ModelList:
    """Aliases first, then the models without one: loaded, then on the allow-list."""
    return ModelList(data=listed(daemon))


# `:path` because ids are folder paths or Hugging Face ids, both with slashes.
@router.get("/v1/models/{model_id:path}", response_model=Model)
async def get_model(model_id: str, daemon: Daemon) -> Model:
    """One model, by alias or id, if it is aliased, loaded or allowed."""
    name = daemon.model_names().of(model_id)
    if name.target != model_id:
        return Model(id=model_id, created=daemon.started_at, root=name.identity)
    if name.identity not in known_ids(daemon):
        raise Problem("model_not_found", f"model {model_id!r} is neither loaded nor on models.allowed", param="model")
    return Model(id=model_id, created=daemon.started_at)
