"""Who may use the dashboard: sign-in, the session cookie, CSRF tokens and the Origin check.

- Signing in takes an API key (from any client, like the other admin endpoints that take one),
  the admin token or a one-time login link (both from this machine only, like the admin token).
- The session id travels only in an HttpOnly, SameSite=Strict cookie scoped to /admin; the page
  gets the session's CSRF token from the sign-in answer (or GET session) and sends it as
  X-CSRF-Token with every state-changing call. SameSite does not separate two ports of one host
  (they are the same site), so the CSRF token and the Origin check do.
- A request that carries an Origin header must come from this daemon's own origin; the
  WebSocket feed, which browsers open with the cookie, must carry it.
- Only an admin session may change settings; a key session may watch and unload models, as that
  key may through /admin/models.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Request
from starlette.requests import HTTPConnection
from starlette.responses import Response

from mlx_manager.audit.reader import AuditReader
from mlx_manager.audit.reader_process import ReaderProcess
from mlx_manager.auth import is_loopback_address
from mlx_manager.daemon.dashboard.sessions import SESSION_SECONDS, Session, SessionStore, digest
from mlx_manager.daemon.problems import Problem, retry_after
from mlx_manager.daemon.ratelimit import RateLimiter
from mlx_manager.daemon.state import DaemonState

COOKIE = "mlxm_session"
COOKIE_PATH = "/admin"
CSRF_HEADER = "x-csrf-token"
# Sign-in attempts per minute from one client address: enough for a person, too few to guess a key.
LOGIN_ATTEMPTS_PER_MINUTE = 10

# Everything the page loads comes from here; no inline script or style (but the page's own style
# sheets, inlined and allowed by their digest: see routes/dashboard.py), no framing, no other host.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


@dataclass
class Dashboard:
    """The dashboard's own state: sessions, login links, its audit readers, its sign-in limit."""

    reader: AuditReader  # the live feed's first rows, read in the daemon
    figures: ReaderProcess  # the charts, read in a child process (see reader_process.py)
    sessions: SessionStore = field(default_factory=SessionStore)
    logins: RateLimiter = field(default_factory=RateLimiter)


def get_dashboard(connection: HTTPConnection) -> Dashboard:
    return connection.app.state.dashboard


def same_origin(connection: HTTPConnection) -> bool | None:
    """None without an Origin header; else whether it names this daemon's own host and port."""
    origin = connection.headers.get("origin")
    if origin is None:
        return None
    host = connection.headers.get("host", "")
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(host) and parts.netloc.lower() == host.lower()


def foreign_origin_problem(connection: HTTPConnection) -> Problem | None:
    if same_origin(connection) is False:
        return Problem("forbidden", "the dashboard answers only its own pages (the Origin header names another site)")
    return None


def session_of(connection: HTTPConnection, daemon: DaemonState) -> Session | None:
    """The connection's live session, if its credential is still good and its client may use it."""
    session = get_dashboard(connection).sessions.get(connection.cookies.get(COOKIE))
    if session is None:
        return None
    if session.role == "admin":
        expected = daemon.admin_token
        client = connection.client.host if connection.client else None
        good = bool(expected) and hmac.compare_digest(session.credential, digest(expected))
        return session if good and is_loopback_address(client) else None
    return session if any(hmac.compare_digest(session.credential, d) for _, d in daemon.keyring.entries) else None


def require_session(request: Request) -> Session:
    """The signed-in session (401 without one); its key's name goes on the request's audit row."""
    problem = foreign_origin_problem(request)
    if problem is not None:
        raise problem
    session = session_of(request, request.app.state.daemon)
    if session is None:
        raise Problem("unauthorized", "sign in to the dashboard first (an API key, or `mlx-manager dashboard`)")
    if session.role == "key":
        request.scope["mlx_manager.outcome"].api_key = session.name
    return session


SignedIn = Annotated[Session, Depends(require_session)]


def require_csrf(request: Request, session: SignedIn) -> Session:
    """A state-changing call: the session's CSRF token must come with it."""
    if not session.csrf_matches(request.headers.get(CSRF_HEADER)):
        raise Problem("forbidden", "this call needs the page's CSRF token (X-CSRF-Token); reload the dashboard")
    return session


Changing = Annotated[Session, Depends(require_csrf)]


def require_admin_session(session: Changing) -> Session:
    if session.role != "admin":
        raise Problem(
            "forbidden", "changing settings needs an admin sign-in: run `mlx-manager dashboard` on the daemon's machine"
        )
    return session


AdminChanging = Annotated[Session, Depends(require_admin_session)]


def check_login_rate(request: Request) -> None:
    client = request.client.host if request.client else "?"
    wait = get_dashboard(request).logins.take(client, LOGIN_ATTEMPTS_PER_MINUTE)
    if wait is not None:
        detail = f"more than {LOGIN_ATTEMPTS_PER_MINUTE} sign-in attempts per minute from this address; retry later"
        raise Problem("rate_limited", detail, headers=retry_after(wait))


def set_session_cookie(response: Response, request: Request, session_id: str) -> None:
    response.set_cookie(
        COOKIE,
        session_id,
        max_age=SESSION_SECONDS,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def clear_session_cookie(response: Response) -> None:
    response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")
