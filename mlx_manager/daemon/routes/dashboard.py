"""The admin dashboard's page, its files and its sign-in (see daemon/dashboard/access.py for the rules).

    GET  /admin                        the page (a sign-in form until a session exists)
    GET  /admin/ui/static/{file}       its scripts, styles and the vendored uPlot, from the package
    GET  /admin/ui/api/session         who is signed in, and the session's CSRF token
    POST /admin/ui/api/login           {"key": ...} or {"link": ...}: sets the session cookie
    POST /admin/ui/api/logout          ends the session (CSRF)
    POST /admin/ui/login-link          admin token: a one-time sign-in for `mlx-manager dashboard`

Nothing here is fetched from elsewhere: the files are read from the package once, and served
with a strict Content-Security-Policy. The page's own calls are not in the OpenAPI document.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.responses import JSONResponse, Response

from mlx_manager.audit.reader import AuditReader
from mlx_manager.audit.reader_process import ReaderProcess
from mlx_manager.auth import is_loopback_address
from mlx_manager.daemon.dashboard.access import (
    CONTENT_SECURITY_POLICY,
    COOKIE,
    SECURITY_HEADERS,
    Changing,
    Dashboard,
    SignedIn,
    check_login_rate,
    clear_session_cookie,
    foreign_origin_problem,
    get_dashboard,
    set_session_cookie,
)
from mlx_manager.daemon.dashboard.sessions import LINK_SECONDS, Session, digest
from mlx_manager.daemon.problems import Problem
from mlx_manager.daemon.routes.admin import require_admin
from mlx_manager.daemon.state import Daemon

STATIC = Path(__file__).resolve().parent.parent / "dashboard" / "static"
PAGE = "index.html"
# The page's references to its files: src="/admin/ui/static/NAME" or href="...", NAME in group 1.
_REFERENCE = re.compile(r'(?:(?<=src=")|(?<=href="))/admin/ui/static/([^"?#]+)')
# Its style sheets, inlined when it is served: the first paint waits for no request.
_STYLESHEET = re.compile(r'<link rel="stylesheet" href="/admin/ui/static/([^"?#]+)">\n?')
# A module's imports of its neighbours: from "./NAME.js", NAME.js in group 1.
_IMPORT = re.compile(r'(?<=from "\./)([^"?#]+\.js)(?=")')
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Runs inside the app's own lifespan: the audit log is open before and closed after."""
    path = app.state.daemon.settings.audit_path()
    dashboard = Dashboard(reader=AuditReader(path), figures=ReaderProcess(path))
    app.state.dashboard = dashboard
    try:
        yield
    finally:
        await dashboard.figures.close()
        await dashboard.reader.close()


router = APIRouter(tags=["admin"], lifespan=lifespan)


@dataclass(frozen=True)
class StaticFiles:
    """Every file the page may load: name -> (content, media type, ETag), and the page's policy.

    A request names a key of `files`, never a path on disk. The files' references to each other
    (the page's src/href, the modules' imports) carry the release (`?v=`, a digest of every
    file), so a browser keeps them all between loads and asks for none of them again; the page
    itself is revalidated. Its style sheets are inlined, allowed by their digest in its policy."""

    files: dict[str, tuple[bytes, str, str]]
    release: str
    page_policy: str


@cache
def static_files() -> StaticFiles:
    sources = {
        path.relative_to(STATIC).as_posix(): path.read_bytes()
        for path in sorted(STATIC.rglob("*"))
        if path.is_file() and path.suffix in _MEDIA_TYPES
    }
    release = hashlib.sha256(b"".join(name.encode() + b"\0" + content for name, content in sources.items()))
    version = release.hexdigest()[:12]
    files = {}
    for name, content in sources.items():
        if name.endswith(".js"):
            content = _IMPORT.sub(lambda found: f"{found[1]}?v={version}", content.decode()).encode()
        files[name] = (content, _MEDIA_TYPES[Path(name).suffix], _etag(content))
    page = sources[PAGE].decode()
    style = "".join(sources[found[1]].decode() for found in _STYLESHEET.finditer(page))
    page = _STYLESHEET.sub("", page).replace("</title>\n", f"</title>\n<style>{style}</style>\n", 1)
    page = _REFERENCE.sub(lambda found: f"{found[0]}?v={version}", page)
    files[PAGE] = (page.encode(), _MEDIA_TYPES[".html"], _etag(page.encode()))
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    page_policy = CONTENT_SECURITY_POLICY.replace("style-src 'self';", f"style-src 'self' 'sha256-{digest}';")
    return StaticFiles(files, version, page_policy)


def _etag(content: bytes) -> str:
    return '"' + hashlib.sha256(content).hexdigest()[:32] + '"'


def _file_response(request: Request, name: str) -> Response:
    static = static_files()
    found = static.files.get(name)
    if found is None:
        raise Problem("not_found", f"no dashboard file {name!r}")
    content, media_type, etag = found
    if request.query_params.get("v") == static.release and name != PAGE:
        # This very release, named by the page: it never changes, so the browser need not ask again.
        cache_control = "max-age=31536000, immutable"
    else:
        # Revalidated on every load (a cheap 304), so a new version's files are never mixed with old ones.
        cache_control = "no-cache"
    headers = {**SECURITY_HEADERS, "ETag": etag, "Cache-Control": cache_control}
    if name == PAGE:
        headers["Content-Security-Policy"] = static.page_policy
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(content, media_type=media_type, headers=headers)


@router.get("/admin", include_in_schema=False)
async def page(request: Request) -> Response:
    return _file_response(request, PAGE)


@router.get("/admin/ui/static/{name:path}", include_in_schema=False)
async def asset(request: Request, name: str) -> Response:
    return _file_response(request, name)


class SessionInfo(BaseModel):
    name: str = Field(description="the API key's name, or admin")
    role: Literal["admin", "key"]
    csrf_token: str = Field(description="send back as X-CSRF-Token with every state-changing call")


def _info(session: Session) -> SessionInfo:
    return SessionInfo(name=session.name, role=session.role, csrf_token=session.csrf)


def _private(response: Response) -> Response:
    response.headers.update({**SECURITY_HEADERS, "Cache-Control": "no-store"})
    return response


@router.get("/admin/ui/api/session", include_in_schema=False)
async def session_info(session: SignedIn) -> Response:
    return _private(JSONResponse(_info(session).model_dump()))


class Login(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str | None = Field(None, min_length=1, max_length=512, description="an API key or the admin token")
    link: str | None = Field(None, min_length=1, max_length=512, description="a one-time login link's token")

    @model_validator(mode="after")
    def one_credential(self) -> Login:
        if (self.key is None) == (self.link is None):
            raise ValueError("give either key or link")
        return self


@router.post("/admin/ui/api/login", include_in_schema=False, dependencies=[Depends(check_login_rate)])
async def login(body: Login, request: Request, daemon: Daemon) -> Response:
    problem = foreign_origin_problem(request)
    if problem is not None:
        raise problem
    outcome = request.scope["mlx_manager.outcome"]
    sessions = get_dashboard(request).sessions
    local = is_loopback_address(request.client.host if request.client else None)
    if body.link is not None:
        if not local:
            raise Problem("forbidden", "a login link works only in a browser on the daemon's machine")
        if not sessions.use_link(body.link):
            raise Problem(
                "unauthorized", "this login link was used already or has expired; run `mlx-manager dashboard` again"
            )
        session_id, session = sessions.start("admin", "admin", digest(daemon.admin_token))
    else:
        key = body.key or ""
        name = daemon.keyring.match(key) if daemon.keyring else None
        admin = bool(daemon.admin_token) and hmac.compare_digest(key.encode(), daemon.admin_token.encode())
        if name is not None:
            outcome.api_key = name
            session_id, session = sessions.start(name, "key", digest(key))
        elif admin and local:
            session_id, session = sessions.start("admin", "admin", digest(key))
        else:
            detail = "that key is not valid here (an API key, or the admin token on the daemon's machine)"
            raise Problem("unauthorized", detail)
    response = _private(JSONResponse(_info(session).model_dump()))
    set_session_cookie(response, request, session_id)
    return response


@router.post("/admin/ui/api/logout", include_in_schema=False)
async def logout(request: Request, _session: Changing) -> Response:
    get_dashboard(request).sessions.end(request.cookies.get(COOKIE))
    response = _private(Response(status_code=204))
    clear_session_cookie(response)
    return response


class LoginLink(BaseModel):
    path: str = Field(description="open this path of the daemon's URL in a browser on this machine")
    expires_in_seconds: float


@router.post("/admin/ui/login-link", response_model=LoginLink, dependencies=[Depends(require_admin)])
async def login_link(dashboard: Annotated[Dashboard, Depends(get_dashboard)]) -> LoginLink:
    """A one-time dashboard sign-in, good for two minutes (`mlx-manager dashboard` prints it).

    The token is in the URL's fragment, which browsers never send: it stays out of access logs."""
    return LoginLink(path=f"/admin#login={dashboard.sessions.new_link()}", expires_in_seconds=LINK_SECONDS)
