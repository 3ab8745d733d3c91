"""GET /health (liveness: the process answers) and GET /ready (it can serve a request now)."""

from __future__ import annotations

import os

from fastapi import APIRouter

from mlx_manager import __version__
from mlx_manager.daemon.problems import Problem, retry_after
from mlx_manager.daemon.state import Daemon

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(daemon: Daemon) -> dict:
    """Always cheap: never touches the engine's thread."""
    return {"status": "draining" if daemon.draining else "ok", "version": __version__, "pid": os.getpid()}


@router.get("/ready")
async def ready(daemon: Daemon) -> dict:
    """200 when a request would be served now; 503 with the reason otherwise."""
    status = daemon.engine.status()
    if daemon.draining:
        raise Problem("not_ready", "the daemon is draining before it stops", headers=retry_after(5), reason="draining")
    if not status.running:
        raise Problem("not_ready", "the inference engine is not running", reason="engine_stopped")
    if daemon.fatal_error:  # stopping because a preload failed: never "ready" in the meantime
        raise Problem("not_ready", daemon.fatal_error, reason="failed")
    loading = status.loading or (daemon.preloading[0] if daemon.preloading else None)
    if loading:
        detail = f"loading model {loading!r}"
        raise Problem("not_ready", detail, headers=retry_after(1), reason="loading", loading=loading)
    return {
        "status": "ready",
        "loaded": status.loaded,
        "queue_depth": status.queue_depth,
        "active_jobs": status.active_jobs,
        "blas": status.blas or "bundled",
    }
