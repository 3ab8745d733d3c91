"""Admin endpoints for models: what is loaded (`models ps`), load, unload, and pull from the
Hugging Face hub with progress as a stream (so a web page or a remote CLI can pull).

Protected like the other admin endpoints (the admin token, from this machine only), and also
open to an API key from any client; a client elsewhere without a key is refused. With
`models.allowed` set, only allowed models may be pulled.

    GET  /admin/models                                   the loaded models, queue depth
    POST /admin/models/load    {"model": ID}             load (or touch) one; its status
    POST /admin/models/unload  {"model": ID, "force": b} 409 while it has jobs, unless force
    POST /admin/models/pull    {"model": "org/name[@rev]"}  text/event-stream of the pull's events
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from mlx_manager.daemon.json_body import StrictJsonRoute
from mlx_manager.daemon.openapi import SSE_EVENT_SCHEMA
from mlx_manager.daemon.problems import Problem
from mlx_manager.daemon.routes.admin import require_admin_or_key
from mlx_manager.daemon.schemas import ModelId
from mlx_manager.daemon.sse import EventStream, sse_data, sse_error
from mlx_manager.daemon.state import Daemon, Outcome
from mlx_manager.engine.types import ModelStatus

log = logging.getLogger("mlx_manager.daemon")
router = APIRouter(route_class=StrictJsonRoute, tags=["admin"], dependencies=[Depends(require_admin_or_key)])


class ModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: ModelId


class UnloadRequest(ModelRequest):
    force: bool = Field(False, description="End the model's running and waiting jobs (they fail) and unload it.")


class LoadedModel(BaseModel):
    id: str
    path: str
    kind: str = Field(description="generate or embed")
    memory_bytes: int = Field(description="MLX memory its load took")
    active_jobs: int
    queued_jobs: int = Field(description="generations waiting for a batch slot")
    idle_seconds: float
    keep_alive_seconds: float = Field(description="idle seconds before it is unloaded; 0: never")
    expires_in_seconds: float | None = Field(
        description="seconds until keep-alive unloads it; null: not while busy, or never"
    )
    prompt_cache_bytes: int = Field(0, description="memory its prompt cache holds (KV state of earlier prompts)")
    prompt_cache_entries: int = Field(0, description="prompts its prompt cache holds")


class ModelsStatus(BaseModel):
    models: list[LoadedModel]
    loading: str | None
    queue_depth: int
    active_jobs: int


class Unloaded(BaseModel):
    unloaded: str


def loaded_model(status: ModelStatus) -> LoadedModel:
    busy = status.active_jobs or status.queued_jobs
    expires = None if busy or status.keep_alive <= 0 else max(status.keep_alive - status.idle_seconds, 0.0)
    return LoadedModel(
        id=status.model_id,
        path=status.path,
        kind=status.kind,
        memory_bytes=status.memory_bytes,
        active_jobs=status.active_jobs,
        queued_jobs=status.queued_jobs,
        idle_seconds=round(status.idle_seconds, 3),
        keep_alive_seconds=status.keep_alive,
        expires_in_seconds=None if expires is None else round(expires, 3),
        prompt_cache_bytes=status.cache.bytes,
        prompt_cache_entries=status.cache.entries,
    )


@router.get("/admin/models", response_model=ModelsStatus)
async def loaded_models(daemon: Daemon) -> ModelsStatus:
    """The models the engine has loaded, least recently used first: memory, jobs, keep-alive."""
    status = daemon.engine.status()
    return ModelsStatus(
        models=[loaded_model(m) for m in status.models],
        loading=status.loading,
        queue_depth=status.queue_depth,
        active_jobs=status.active_jobs,
    )


@router.post("/admin/models/load", response_model=LoadedModel)
async def load(body: ModelRequest, daemon: Daemon, outcome: Outcome) -> LoadedModel:
    """Load a model now (a loaded one is marked as just used). Errors as for a request naming it."""
    name = daemon.model(body.model)
    outcome.model = name.label
    return loaded_model(await daemon.engine.load(name.target))


@router.post("/admin/models/unload", response_model=Unloaded)
async def unload(body: UnloadRequest, daemon: Daemon, outcome: Outcome) -> Unloaded:
    """Unload a model now. 404 if it is not loaded; 409 while it has jobs, unless `force`."""
    name = daemon.model(body.model)
    outcome.model = name.label
    await daemon.engine.unload(name.target, force=body.force)
    return Unloaded(unloaded=body.model)


# How a failed pull reads as a problem document (in the stream's `error` event).
_PULL_STATUS = {"not_found": 404, "revision_not_found": 404, "not_mlx": 422, "disk_full": 507, "busy": 409}


@router.post(
    "/admin/models/pull",
    response_class=EventStream,
    status_code=200,  # EventStream's constructor takes no status for FastAPI to read it from
    responses={
        200: {
            "description": "The pull's events (see `mlx-manager models pull --json`), then the end of "
            "the stream; a failure is an `error` event with a problem document.",
            "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
        }
    },
)
async def pull(body: ModelRequest, daemon: Daemon, outcome: Outcome) -> EventStream:
    """Download a model from the Hugging Face hub into this machine's cache, streaming progress."""
    from mlx_manager.hub.cache import parse_model_ref
    from mlx_manager.hub.errors import HubError

    outcome.model = body.model
    try:
        parse_model_ref(body.model)
    except HubError as exc:
        raise Problem("bad_request", exc.message, param="model") from None
    allowed = daemon.settings.models.allowed
    if allowed and body.model not in allowed:
        raise Problem("model_not_allowed", f"model {body.model!r} is not in models.allowed", param="model")
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    cancel = threading.Event()

    def put(kind: str, value: Any) -> None:
        loop.call_soon_threadsafe(items.put_nowait, (kind, value))

    def work() -> None:  # on a worker thread: the hub, the disk and the check never block the loop
        from mlx_manager.hub.pull import download, make_plan

        try:
            plan = make_plan(body.model)
            put("event", plan.event())
            download(plan, lambda event: put("event", event), cancel)
        except HubError as exc:
            put("end", exc)
        except Exception as exc:  # a bug must still end the stream with an error event
            log.exception("pulling %s failed", body.model)
            put("end", exc)
        else:
            put("end", None)

    async def events() -> AsyncIterator[str]:
        loop.run_in_executor(None, work)
        try:
            while True:
                kind, value = await items.get()
                if kind == "event":
                    yield sse_data(value)
                    continue
                if value is not None:
                    outcome.fail("pull_failed")
                    yield sse_error(
                        _problem(value).document(instance="/admin/models/pull", request_id=outcome.request_id)
                    )
                return
        finally:
            cancel.set()  # the client left (or the pull ended): a running download stops at its next chunk

    return EventStream(events(), on_close=cancel.set)


def _problem(exc: Exception) -> Problem:
    from mlx_manager.hub.errors import HubError

    if isinstance(exc, HubError):
        status = _PULL_STATUS.get(exc.kind, 502)
        return Problem("pull_failed", exc.message, status=status, reason=exc.kind, hint=exc.hint)
    return Problem("internal_error", "the pull failed in an unexpected way; see the daemon's log")
