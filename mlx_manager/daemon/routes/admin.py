"""Admin endpoints: loopback clients with the admin token only (issue 11).

The token lives in `$MLX_MANAGER_HOME/admin.token` (mode 0600), so only the user who runs the
daemon can read it; the loopback check keeps the endpoint off the network even if it leaks.
"""

from __future__ import annotations

import logging
import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.requests import HTTPConnection

from mlx_manager.auth import bearer_token, is_loopback_address
from mlx_manager.daemon.hosts import origin_allowed
from mlx_manager.daemon.problems import Problem
from mlx_manager.daemon.reload import reload_settings
from mlx_manager.daemon.schemas import ReloadResult
from mlx_manager.daemon.state import Daemon, DaemonState, get_daemon

log = logging.getLogger("mlx_manager.daemon")


def admin_refusal(connection: HTTPConnection, daemon: DaemonState, *, or_key: bool = False) -> Problem | None:
    """Why this HTTP request or WebSocket may not use an admin endpoint, or None if it may.
    `or_key`: the endpoint also takes an API key, from any client (the refusal says so)."""
    client = connection.client.host if connection.client else None
    # A browser sends Origin and CORS does not cover WebSockets: a page elsewhere may not open one.
    if connection.scope["type"] == "websocket" and not origin_allowed(connection.scope, daemon.settings):
        log.warning("refused admin WebSocket %s from origin %s", connection.url.path, connection.headers.get("origin"))
        return Problem("forbidden", "this WebSocket comes from a web page of another origin (server.cors_origins)")
    if not is_loopback_address(client):
        log.warning("refused admin call %s from %s", connection.url.path, client)
        also = " (or, with an API key, from anywhere)" if or_key else ""
        return Problem("forbidden", f"admin endpoints answer only clients on this machine{also}")
    token = bearer_token(connection.headers.get("authorization", ""))
    expected = daemon.admin_token.encode()
    # An empty expected token (no token file could be made) must refuse everyone, not admit "".
    if token is None or not expected or not secrets.compare_digest(token.encode(), expected):
        return Problem(
            "unauthorized",
            "admin endpoints need 'Authorization: Bearer <token>' with the token in the admin.token file",
            headers={"WWW-Authenticate": 'Bearer realm="mlx-manager-admin"'},
        )
    return None


def require_admin(request: Request, daemon: Annotated[DaemonState, Depends(get_daemon)]) -> None:
    problem = admin_refusal(request, daemon)
    if problem is not None:
        raise problem


def require_admin_or_key(request: Request, daemon: Annotated[DaemonState, Depends(get_daemon)]) -> None:
    """The admin token from this machine, or an API key from anywhere (named on the audit row)."""
    token = bearer_token(request.headers.get("authorization", ""))
    key_name = daemon.keyring.match(token) if token is not None and daemon.keyring else None
    if key_name is not None:
        request.scope["mlx_manager.outcome"].api_key = key_name
        return
    problem = admin_refusal(request, daemon, or_key=True)
    if problem is not None:
        raise problem


router = APIRouter(tags=["admin"], dependencies=[Depends(require_admin)])


@router.post("/admin/reload", response_model=ReloadResult)
async def reload(daemon: Daemon) -> ReloadResult:
    """Re-read the settings (file and environment); apply what can change live.

    An invalid file changes nothing: the answer is a 422 problem saying why."""
    return reload_settings(daemon)
