"""WS /admin/audit/feed: the audit log's new rows as JSON, as they are committed (the admin panel's feed).

Protected like every admin endpoint: loopback clients with the admin token (from no web page, or
one of an origin in server.cors_origins); or a signed-in dashboard session (its cookie), only from
the dashboard's own page: a browser sends the cookie with a WebSocket from any page of the same
site (another port of this host, say), so the Origin is what tells the dashboard apart. A refused
client is accepted and closed at once with code 1008 (policy violation) and the reason, so it
learns why instead of seeing a bare failed handshake.
"""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, WebSocket

from mlx_manager.daemon.dashboard.access import same_origin, session_of
from mlx_manager.daemon.middleware import request_id_from
from mlx_manager.daemon.outcome import RequestOutcome
from mlx_manager.daemon.problems import Problem
from mlx_manager.daemon.routes.admin import admin_refusal
from mlx_manager.daemon.state import DaemonState

router = APIRouter(tags=["admin"])
POLICY_VIOLATION, GOING_AWAY, INTERNAL_ERROR = 1008, 1001, 1011


@router.websocket("/admin/audit/feed")
async def audit_feed(websocket: WebSocket) -> None:
    daemon = websocket.app.state.daemon
    await websocket.accept()
    problem = _refusal(websocket, daemon)
    if problem is not None:
        await websocket.close(code=POLICY_VIOLATION, reason=problem.detail)
        # The middleware records HTTP requests only: a refused feed leaves its audit row here.
        outcome = RequestOutcome(request_id=request_id_from(websocket.scope), endpoint=websocket.url.path, method="GET")
        outcome.fail(problem.kind)
        outcome.finish(problem.status)
        daemon.emit(outcome)
        return
    if daemon.audit is None:
        await websocket.close(code=INTERNAL_ERROR, reason="the audit log is not open")
        return
    # Rows go out while another task listens: the client leaving (or the server closing the
    # connection at shutdown) must end the feed even when no row is coming.
    sender = asyncio.create_task(_send_rows(websocket, daemon.audit))
    try:
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender


def _refusal(websocket: WebSocket, daemon: DaemonState) -> Problem | None:
    """A dashboard session from the dashboard's own page; else as every admin WebSocket: the admin
    token from this machine, from no web page or one of an origin the daemon allows."""
    if same_origin(websocket) and session_of(websocket, daemon) is not None:
        return None
    return admin_refusal(websocket, daemon)


async def _send_rows(websocket: WebSocket, writer) -> None:
    async with writer.subscribe() as feed:
        async for row in feed:
            await websocket.send_json(row)
    await websocket.close(code=GOING_AWAY, reason="the audit log closed")
