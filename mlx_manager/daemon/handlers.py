"""Exception handlers: every error that reaches FastAPI leaves as a problem document.

Also the mapping from the engine's typed errors to problem kinds, shared with the SSE path.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from mlx_manager.daemon.call import CLIENT_CLOSED_REQUEST, ClientGone
from mlx_manager.daemon.dialects.common import NOT_SUPPORTED, UNSUPPORTED
from mlx_manager.daemon.problems import Problem, kind_for_status, retry_after
from mlx_manager.engine.errors import (
    ChatTemplateMissing,
    ContextLengthExceeded,
    EngineError,
    EngineStopped,
    ExtraNotInstalled,
    GenerationFailed,
    InvalidRequest,
    ModelBusy,
    ModelLoadFailed,
    ModelNotAllowed,
    ModelNotFound,
    ModelNotLoaded,
    ModelUnloaded,
    Overloaded,
    ToolsNotSupported,
    WrongModelKind,
)
from mlx_manager.routing.errors import RoutingError

log = logging.getLogger("mlx_manager.daemon")

_ENGINE_KINDS: list[tuple[type[EngineError], str]] = [
    (ModelNotFound, "model_not_found"),
    (ModelNotAllowed, "model_not_allowed"),
    (ModelLoadFailed, "model_load_failed"),
    (ModelNotLoaded, "model_not_loaded"),
    (ModelBusy, "model_busy"),
    (ModelUnloaded, "model_unloaded"),
    (ChatTemplateMissing, "chat_template_missing"),
    (WrongModelKind, "wrong_model_kind"),
    (ToolsNotSupported, "tools_not_supported"),
    (ContextLengthExceeded, "context_length_exceeded"),
    (InvalidRequest, "invalid_request"),
    (GenerationFailed, "generation_failed"),
]


def problem_from_engine(exc: EngineError, *, model: str | None = None) -> Problem:
    """The engine's messages are written for clients (no internals), so they become the detail."""
    if isinstance(exc, Overloaded):
        return Problem("overloaded", str(exc), headers=retry_after(exc.retry_after))
    if isinstance(exc, EngineStopped):
        return Problem("draining", str(exc), headers=retry_after(5))
    if isinstance(exc, ExtraNotInstalled):  # a retry fails the same way until the extra is installed
        headers = {"x-should-retry": "false"}
        problem = Problem("extra_not_installed", str(exc), headers=headers, param="model")
        problem.extra.update(extra=exc.extra, install=exc.install)  # extension members
        return problem
    for cls, kind in _ENGINE_KINDS:
        if isinstance(exc, cls):
            param = {"wrong_model_kind": "model", "tools_not_supported": "tools"}.get(kind)
            if kind.startswith("model_"):
                param = "model"
            if isinstance(exc, InvalidRequest):
                param = exc.param
            return Problem(kind, str(exc), param=param)
    log.error("unmapped engine error %s: %s", type(exc).__name__, exc)
    return Problem("internal_error", "the engine failed in an unexpected way")


def problem_from_routing(exc: RoutingError) -> Problem:
    """A routed request's failure: our detail, and what the upstream said as extension members."""
    extra: dict[str, Any] = {
        name: value
        for name, value in (
            ("backend", exc.backend),
            ("upstream_status", exc.upstream_status),
            ("upstream_type", exc.upstream_type),
        )
        if value is not None
    }
    headers = retry_after(exc.retry_after) if exc.retry_after is not None else None
    return Problem(exc.kind, exc.detail, status=exc.status, headers=headers, param=exc.param, **extra)


def problem_for(exc: EngineError | RoutingError) -> Problem:
    """The problem of a generation's failure, from the engine here or from the backend it was routed to."""
    return problem_from_routing(exc) if isinstance(exc, RoutingError) else problem_from_engine(exc)


def problem_response(request: Request, problem: Problem):
    outcome = request.scope["mlx_manager.outcome"]
    outcome.fail(problem.kind)
    return problem.response(instance=request.url.path, request_id=outcome.request_id)


def _field_errors(errors: list[dict[str, Any]], body: Any) -> list[dict[str, Any]]:
    """Pydantic's errors as a client can act on them: without `input` (it may hold a whole prompt)
    or `ctx` internals, without the "Value error, " pydantic puts before a validator's own message,
    and with one error per wrong field where pydantic tried several types (`stop` as a string, then
    as a list): the union's tags leave the location, and "should be a valid list" goes when the
    value failed as what it is (a string too long)."""
    fields = [
        {"loc": _located(list(e.get("loc", ())), body), "msg": _message(e.get("msg", "")), "type": e.get("type", "")}
        for e in errors
    ]
    kept: list[dict[str, Any]] = []
    for field in fields:
        if _is_type_mismatch(field) and any(_explains(other, field) for other in fields if other is not field):
            continue
        same = next((k for k in kept if k["loc"] == field["loc"] and _is_type_mismatch(k)), None)
        if same is not None and _is_type_mismatch(field):  # every type tried failed: say them all
            same["msg"] += " or " + field["msg"].removeprefix("Input should be ")
            continue
        kept.append(field)
    return kept


def _located(loc: list[Any], body: Any) -> list[Any]:
    """`loc` with the parts that are not in the request taken out (pydantic's union tags such as
    `constrained-str`), keeping a missing field's name at the end."""
    if not loc or loc[0] != "body":
        return loc
    out: list[Any] = ["body"]
    current = body
    for i, part in enumerate(loc[1:], start=1):
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current):
            current = current[part]
        elif isinstance(current, dict) and i == len(loc) - 1:
            current = None  # a missing field
        else:
            continue
        out.append(part)
    return out


def _is_type_mismatch(field: dict[str, Any]) -> bool:
    return str(field["type"]).endswith("_type")


def _explains(other: dict[str, Any], mismatch: dict[str, Any]) -> bool:
    """Whether `other` says what is wrong with the same value better than a type mismatch does."""
    loc, deeper = mismatch["loc"], other["loc"]
    if deeper[: len(loc)] != loc:
        return False
    return len(deeper) > len(loc) or not _is_type_mismatch(other)


def _message(msg: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


def _dotted(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc[1:] if p != "body"] if loc and loc[0] == "body" else [str(p) for p in loc]
    return ".".join(parts)


def problem_from_validation(exc: RequestValidationError) -> Problem:
    errors = list(exc.errors())
    if errors and errors[0].get("type") == "json_invalid":
        reason = (errors[0].get("ctx") or {}).get("error", "invalid JSON")
        position = errors[0]["loc"][1] if len(errors[0].get("loc", ())) > 1 else "?"
        return Problem("invalid_json", f"the request body is not valid JSON: {reason} (at character {position})")
    fields = _field_errors(errors, exc.body)
    refused = [f for f in fields if f["type"] == NOT_SUPPORTED]
    if refused:  # a valid request for something this server does not do: 400, not 422
        where = _dotted([part for part in refused[0]["loc"] if part != UNSUPPORTED])
        return Problem(NOT_SUPPORTED, f"{where}: {refused[0]['msg']}", param=where or None)
    first = fields[0] if fields else {"loc": [], "msg": "invalid request"}
    where = _dotted(first["loc"])
    more = f" (and {len(fields) - 1} more)" if len(fields) > 1 else ""
    detail = f"{where}: {first['msg']}{more}" if where else f"{first['msg']}{more}"
    # One wrong field is said whole by `detail` and `param`; the list is for requests with several.
    extra: dict[str, Any] = {"errors": fields} if len(fields) > 1 else {}
    return Problem("validation_error", detail, param=where or None, **extra)


V1_ENDPOINTS = "chat/completions, completions, embeddings, models, messages and responses"


def nearest_route(request: Request) -> str:
    """For a path under /v1 that has no route: the supported endpoint it most likely meant, or
    what /v1 serves when none is close. The endpoints are those of the OpenAPI document."""
    path = request.url.path
    if not path.startswith("/v1/"):
        return ""
    wanted = path[len("/v1/") :].strip("/")
    endpoints = [
        (method.upper(), known)
        for known, operations in request.app.openapi().get("paths", {}).items()
        if known.startswith("/v1/")
        for method in operations
    ]

    def likeness(endpoint: tuple[str, str]) -> float:
        method, known = endpoint[0], endpoint[1][len("/v1/") :]
        prefix = bool(wanted) and (known.startswith(wanted) or wanted.startswith(known.split("/{")[0]))
        return difflib.SequenceMatcher(None, wanted, known).ratio() + 0.5 * prefix + 0.05 * (method == request.method)

    best = max(endpoints, key=likeness, default=None)
    if best is None or likeness(best) < 0.6:
        return f"; /v1 serves {V1_ENDPOINTS}"
    return f"; did you mean {best[0]} {best[1]}?"


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def on_problem(request: Request, exc: Problem):
        return problem_response(request, exc)

    @app.exception_handler(ClientGone)
    async def on_client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it: the client left

    @app.exception_handler(EngineError)
    async def on_engine_error(request: Request, exc: EngineError):
        return problem_response(request, problem_from_engine(exc))

    @app.exception_handler(RoutingError)
    async def on_routing_error(request: Request, exc: RoutingError):
        return problem_response(request, problem_from_routing(exc))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        return problem_response(request, problem_from_validation(exc))

    @app.exception_handler(HTTPException)
    async def on_http_exception(request: Request, exc: HTTPException):
        # Starlette's own 404/405, the body limit's 413, FastAPI's 400 for unreadable bodies.
        kind = kind_for_status(exc.status_code)
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail else None
        if exc.status_code == 404 and detail in (None, "Not Found"):
            detail = f"no route {request.method} {request.url.path}" + nearest_route(request)
        elif exc.status_code == 405 and detail in (None, "Method Not Allowed"):
            allowed = (exc.headers or {}).get("allow") or (exc.headers or {}).get("Allow")
            detail = f"{request.method} is not allowed on {request.url.path}" + (f"; use {allowed}" if allowed else "")
        detail = detail or "the request could not be handled"
        problem = Problem(kind, detail, status=exc.status_code, headers=dict(exc.headers) if exc.headers else None)
        return problem_response(request, problem)
