"""The dashboard page's data and steering calls (a signed-in session; CSRF on every change).

    GET  /admin/ui/api/state            daemon, engine, models, prompt cache, figures since start
    GET  /admin/ui/api/series?window=   hour | day: charts and per-model / per-key breakdowns
    GET  /admin/ui/api/recent?limit=    the newest audit rows (the live feed's first page)
    GET  /admin/ui/api/settings         every key with its value and origin
    POST /admin/ui/api/settings         {"key", "value"}: `config set` and a reload (admin session)
    POST /admin/ui/api/models/unload    {"model", "force"}

Reads of the audit log run off the event loop: the live feed's rows through the dashboard's
AuditReader (aiosqlite), the charts in a child process (audit/reader_process.py). The GETs leave
no audit row (the page polls them), the POSTs do.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response

from mlx_manager import __version__
from mlx_manager.audit.errors import AuditError
from mlx_manager.audit.series import WINDOWS
from mlx_manager.daemon.dashboard.access import SECURITY_HEADERS, AdminChanging, Changing, SignedIn, get_dashboard
from mlx_manager.daemon.dashboard.settings_edit import override_note, settings_view, write_setting
from mlx_manager.daemon.problems import Problem
from mlx_manager.daemon.reload import reload_settings
from mlx_manager.daemon.routes.admin_models import UnloadRequest, loaded_model
from mlx_manager.daemon.state import Daemon

router = APIRouter(tags=["admin"], include_in_schema=False)


def _answer(body: Any) -> Response:
    return JSONResponse(body, headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})


@router.get("/admin/ui/api/state")
async def state(request: Request, daemon: Daemon, _session: SignedIn) -> Response:
    from mlx_manager.metrics import scrape_summary

    status = daemon.engine.status()
    models = []
    for model in status.models:
        cache = model.cache
        asked = cache.hits + cache.misses
        models.append(
            {
                **loaded_model(model).model_dump(),
                "cache": {
                    "hits": cache.hits,
                    "misses": cache.misses,
                    "hit_rate": cache.hits / asked if asked else None,
                    "cached_tokens": cache.cached_tokens,
                    "entries": cache.entries,
                    "bytes": cache.bytes,
                    "disk_entries": cache.disk_entries,
                    "disk_bytes": cache.disk_bytes,
                },
            }
        )
    body, _ = request.app.state.metrics.render()
    audit = daemon.audit
    return _answer(
        {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - daemon.started_at),
            **_supervision(),
            "blas": status.blas or "bundled",
            "draining": daemon.draining,
            "in_flight": daemon.in_flight,
            "queue_depth": status.queue_depth,
            "active_jobs": status.active_jobs,
            "loading": status.loading or (daemon.preloading[0] if daemon.preloading else None),
            "keep_alive_seconds": daemon.settings.models.keep_alive,
            "models": models,
            "audit": {
                "backlog": audit.backlog if audit else None,
                "written": audit.written if audit else None,
                "dropped": audit.dropped if audit else None,
            },
            "since_start": scrape_summary(body.decode()),
        }
    )


def _supervision() -> dict[str, Any]:
    """Restarts and the last exit, when a supervisor started this very process."""
    from mlx_manager.supervisor.state import read_state

    state = read_state() or {}
    if state.get("daemon_pid") != os.getpid():
        return {"supervised": False, "restarts": 0, "last_exit": None}
    return {"supervised": True, "restarts": int(state.get("restarts") or 0), "last_exit": state.get("last_exit")}


@router.get("/admin/ui/api/series")
async def series(
    request: Request, _session: SignedIn, window: Annotated[Literal["hour", "day"], Query()] = "hour"
) -> Response:
    try:
        figures = await get_dashboard(request).figures.series(WINDOWS[window])
    except AuditError as exc:
        raise Problem("internal_error", f"the audit log cannot be read: {exc}") from None
    return _answer(figures)


@router.get("/admin/ui/api/recent")
async def recent(request: Request, _session: SignedIn, limit: Annotated[int, Query(ge=1, le=500)] = 100) -> Response:
    try:
        rows = await get_dashboard(request).reader.recent(limit)
    except AuditError as exc:
        raise Problem("internal_error", f"the audit log cannot be read: {exc}") from None
    return _answer(rows)


@router.get("/admin/ui/api/settings")
async def settings(daemon: Daemon, session: SignedIn) -> Response:
    view = await asyncio.to_thread(settings_view, daemon.settings, daemon.flag_overrides)
    return _answer({**view, "can_edit": session.role == "admin"})


class SettingChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str = Field(min_length=1, max_length=200)
    value: str = Field(max_length=100_000, description="as `config set` takes it: 900, 15m, a,b, true...")


@router.post("/admin/ui/api/settings")
async def change_setting(body: SettingChange, daemon: Daemon, _session: AdminChanging) -> Response:
    typed = await asyncio.to_thread(write_setting, body.key, body.value)
    result = reload_settings(daemon)  # what `config set` asks a running daemon for, made here directly
    view = await asyncio.to_thread(settings_view, daemon.settings, daemon.flag_overrides)
    origin = next(item["origin"] for item in view["keys"] if item["key"] == body.key)
    return _answer(
        {
            "key": body.key,
            "value": typed,
            "applied": body.key in result.applied,
            "note": override_note(body.key, origin),
            "settings": view["keys"],
        }
    )


@router.post("/admin/ui/api/models/unload")
async def unload(body: UnloadRequest, request: Request, daemon: Daemon, _session: Changing) -> Response:
    name = daemon.model(body.model)
    request.scope["mlx_manager.outcome"].model = name.label
    await daemon.engine.unload(name.target, force=body.force)
    return _answer({"unloaded": body.model})
