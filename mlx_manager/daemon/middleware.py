"""The one ASGI middleware every HTTP request passes: request id, Host check, draining, API key,
rate limit, body limit, outcome. WebSocket handshakes pass its Host check too.

Pure ASGI (not BaseHTTPMiddleware) so that streaming responses pass through untouched and the
body limit can count the bytes of a chunked upload as they arrive.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
import uuid

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlx_manager.auth import ADD_KEY_HINT, bearer_token
from mlx_manager.daemon.hosts import header, host_refusal
from mlx_manager.daemon.outcome import RequestOutcome
from mlx_manager.daemon.problems import Problem, retry_after
from mlx_manager.daemon.state import DaemonState

log = logging.getLogger("mlx_manager.daemon")

# A client's id is kept only if it is short and plain: it ends up in logs and the audit table.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")
# Probes stay answerable while draining, so a supervisor can watch the drain.
_PROBES = ("/health", "/ready")
# They show model paths and traffic: while the API needs a key, so do they (auth.open_endpoints,
# auth.probe_clients open them); the admin token opens them to the supervisor and the CLI.
_EXTRAS = {
    "/ready": "/ready",
    "/metrics": "/metrics",
    "/docs": "/docs",
    "/docs/oauth2-redirect": "/docs",
    "/openapi.json": "/openapi.json",
}
_SCRAPED = ("/ready", "/metrics")
POLICY_VIOLATION = 1008
# Paths whose outcome is worth a record (the audit log): the API and the admin endpoints.
_RECORDED = ("/v1/", "/admin/")
# The dashboard's page, files and the reads it polls: browsing, not calls worth a row each.
_UNRECORDED_READS = "/admin/ui/"
# The OpenAI API: what API keys and the rate limit guard.
_API = "/v1/"
DRAIN_RETRY_AFTER = 5.0


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a body (chunked or not) outgrows server.max_body_bytes.

    An HTTPException, so FastAPI's body reading re-raises it unchanged and the problem
    handler answers 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes (server.max_body_bytes)")


def request_id_from(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1").strip()
            if _VALID_REQUEST_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


def _route_of(scope: Scope) -> str | None:
    """The matched route's template (/v1/responses/{response_id}); None before routing or for no route."""
    return getattr(scope.get("route"), "path_format", None)


class DaemonMiddleware:
    def __init__(self, app: ASGIApp, daemon: DaemonState) -> None:
        self.app = app
        self.daemon = daemon

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and host_refusal(scope, self.daemon.settings) is not None:
            log.warning("refused a WebSocket to %s for its Host header", scope["path"])
            await send({"type": "websocket.close", "code": POLICY_VIOLATION})  # before accept: a 403
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        daemon = self.daemon
        path = scope["path"]
        request_id = request_id_from(scope)
        outcome = RequestOutcome(request_id=request_id, endpoint=path, method=scope["method"])
        scope["mlx_manager.outcome"] = outcome
        status: int | None = None
        request_id_header = (b"x-request-id", request_id.encode())
        # The dashboard's reads are not API requests: they leave no audit row.
        recorded = path.startswith(_RECORDED) and not (path.startswith(_UNRECORDED_READS) and scope["method"] == "GET")

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                if outcome.backend is not None:  # a generation: the backend that served it (routing)
                    headers.append((b"x-mlx-manager-backend", outcome.backend.encode()))
                message = {**message, "headers": [*headers, request_id_header]}
            elif recorded and not message.get("more_body", False):
                outcome.route = _route_of(scope)  # the outcome may be emitted now: its route first
                await daemon.acknowledge(outcome, status)  # the last byte waits for its audit row (audit.durability)
            await send(message)

        # Only requests that do work count for the drain: probes and refusals end at once.
        counted = False
        try:
            refusal = self._refusal(scope, path, outcome)
            if refusal is not None:
                outcome.fail(refusal.kind)
                await refusal.response(instance=path, request_id=request_id)(scope, receive, send_with_id)
                return
            counted = path not in _PROBES
            if counted:
                daemon.request_started()
            limit = daemon.settings.server.max_body_bytes
            await self.app(scope, _limited(receive, limit), send_with_id)
        except Exception:
            # Nothing below handled it: log the details here, send none of them.
            log.exception("unhandled error in request %s %s (request_id=%s)", scope["method"], path, outcome.request_id)
            outcome.fail("internal_error")
            if status is None:
                detail = f"an unexpected error occurred; see request_id {outcome.request_id} in the daemon's log"
                problem = Problem("internal_error", detail)
                await problem.response(instance=path, request_id=request_id)(scope, receive, send_with_id)
        finally:
            outcome.route = outcome.route or _route_of(scope)
            if counted:
                daemon.request_ended()
            if recorded:
                outcome.finish(status)
                _log_outcome(outcome)
                daemon.emit(outcome)

    def _refusal(self, scope: Scope, path: str, outcome: RequestOutcome) -> Problem | None:
        """A problem to answer at once, before any routing or body reading. Names the API key
        on the outcome as soon as one matched, so a later refusal (429, 413) is still its."""
        problem = host_refusal(scope, self.daemon.settings)
        if problem is not None:
            return problem
        if path in _EXTRAS:
            problem = self._extras_refusal(scope, _EXTRAS[path])
            if problem is not None:
                return problem
        if self.daemon.draining and path not in _PROBES:
            detail = "the daemon is shutting down and takes no new requests"
            return Problem("draining", detail, headers=retry_after(DRAIN_RETRY_AFTER))
        if path.startswith(_API) or path == _API.rstrip("/"):
            key_name, problem = self._authenticate(scope)
            if problem is not None:
                return problem
            outcome.api_key = key_name
            problem = self._rate_limit(scope, key_name)
            if problem is not None:
                return problem
        limit = self.daemon.settings.server.max_body_bytes
        length = _content_length(scope)
        if length is not None and length > limit:
            return Problem("body_too_large", f"the request body is larger than {limit} bytes (server.max_body_bytes)")
        return None

    def _api_needs_key(self) -> bool:
        return bool(self.daemon.keyring) or self.daemon.require_key or self.daemon.settings.auth.required

    def _extras_refusal(self, scope: Scope, extra: str) -> Problem | None:
        """A 401 problem for /ready, /metrics, /docs or /openapi.json while the API needs a key,
        unless the endpoint is open (auth.open_endpoints), the client may scrape it
        (auth.probe_clients), or the request brings an API key or the admin token (the supervisor's
        and `status`'s probes: the daemon's own user reads it from admin.token)."""
        auth = self.daemon.settings.auth
        if not self._api_needs_key() or extra in auth.open_endpoints:
            return None
        client = (scope.get("client") or (None,))[0]
        if extra in _SCRAPED and _address_in(client, auth.probe_clients):
            return None
        token = _presented_key(scope)
        if token is not None:
            if self.daemon.keyring.match(token) is not None:
                return None
            admin = self.daemon.admin_token.encode()
            if admin and secrets.compare_digest(token.encode(), admin):
                return None
        detail = (
            f"{extra} needs an API key while the API does ('Authorization: Bearer <key>'); "
            "auth.open_endpoints and auth.probe_clients open it to everyone or to a scraper's address"
        )
        challenge = 'Bearer realm="mlx-manager"' + (', error="invalid_token"' if token else "")
        return Problem("unauthorized", detail, headers={"WWW-Authenticate": challenge})

    def _authenticate(self, scope: Scope) -> tuple[str | None, Problem | None]:
        """(name of the key the request presents, or a 401 problem). No keys at all: (None, None)."""
        keyring = self.daemon.keyring
        if not self._api_needs_key():
            return None, None
        token = _presented_key(scope)
        if not keyring and self.daemon.require_key:
            detail = f"this daemon listens on a network address and has no API key left. {ADD_KEY_HINT}."
        elif not keyring:
            detail = f"no API key is left and auth.required is true. {ADD_KEY_HINT}."
        elif token is None:
            detail = "this API needs a key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')"
        else:
            name = keyring.match(token)
            if name is not None:
                return name, None
            detail = "the API key is not valid (mistyped, revoked, or for another server)"
        # RFC 6750: a wrong token says invalid_token; a missing one only names the scheme.
        challenge = 'Bearer realm="mlx-manager"' + (', error="invalid_token"' if token else "")
        return None, Problem("unauthorized", detail, headers={"WWW-Authenticate": challenge})

    def _rate_limit(self, scope: Scope, key_name: str | None) -> Problem | None:
        per_minute = self.daemon.settings.server.rate_limit
        client = f"key {key_name}" if key_name else f"address {(scope.get('client') or ('?',))[0]}"
        wait = self.daemon.rate_limiter.take(client, per_minute)
        if wait is None:
            return None
        detail = f"more than {per_minute} requests per minute from this client (server.rate_limit); retry later"
        return Problem("rate_limited", detail, headers=retry_after(wait), limit=per_minute)


def _presented_key(scope: Scope) -> str | None:
    """The key a request brings: Anthropic's clients send it as `x-api-key`, everyone else as a bearer token."""
    token = bearer_token(header(scope, b"authorization") or "")
    return token or (header(scope, b"x-api-key") or "").strip() or None


def _address_in(address: str | None, networks: list[str]) -> bool:
    if not address or not networks:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in ipaddress.ip_network(network, strict=False) for network in networks)


def _log_outcome(outcome: RequestOutcome) -> None:
    """The access log line: uvicorn's own lacks the request id and the outcome."""
    log.info(
        "%s %s %s %s %.0fms model=%s tokens=%s+%s request_id=%s%s%s%s",
        outcome.method,
        outcome.endpoint,
        outcome.http_status if outcome.http_status is not None else "-",
        outcome.status,
        outcome.duration_ms or 0,
        outcome.model or "-",
        outcome.prompt_tokens or 0,
        outcome.completion_tokens or 0,
        outcome.request_id,
        f" key={outcome.api_key}" if outcome.api_key else "",
        f" error={outcome.error_type}" if outcome.error_type else "",
        f" backend={outcome.backend}" if outcome.backend not in (None, "local") else "",
    )


def _limited(receive: Receive, limit: int) -> Receive:
    total = 0

    async def receive_with_limit() -> Message:
        nonlocal total
        message = await receive()
        if message["type"] == "http.request":
            total += len(message.get("body", b""))
            if total > limit:
                raise BodyTooLarge(limit)
        return message

    return receive_with_limit


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
