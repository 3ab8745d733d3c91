"""RFC 9457 problem documents: every HTTP error the daemon sends, from any layer, is one of these.

A problem document also carries an `error` object in the dialect of its route, so the official
SDKs raise the right exception class with a readable message: OpenAI's (message, type, param,
code) everywhere, Anthropic's on /v1/messages (`"type": "error"`, and Anthropic's type names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse

MEDIA_TYPE = "application/problem+json"

# Not meant to be dereferenced: the URI only has to be stable and unique per kind (RFC 9457 3.1.1).
TYPE_BASE = "urn:mlx-manager:problem:"


@dataclass(frozen=True)
class Kind:
    status: int
    title: str
    openai_type: str  # the `error.type` the OpenAI API uses for this class of failure


KINDS: dict[str, Kind] = {
    "bad_request": Kind(400, "Bad request", "invalid_request_error"),
    "invalid_request": Kind(400, "The request cannot be run", "invalid_request_error"),
    "context_length_exceeded": Kind(400, "Over the model's context", "invalid_request_error"),
    "chat_template_missing": Kind(400, "The model has no chat template", "invalid_request_error"),
    "wrong_model_kind": Kind(400, "The model does not serve this endpoint", "invalid_request_error"),
    "tools_not_supported": Kind(400, "The model cannot call tools", "invalid_request_error"),
    "not_supported": Kind(400, "Not supported by this server", "invalid_request_error"),
    "unauthorized": Kind(401, "Missing or wrong credential", "authentication_error"),
    "forbidden": Kind(403, "Not allowed from this client", "permission_error"),
    "not_found": Kind(404, "No such route", "not_found_error"),
    "model_not_found": Kind(404, "Unknown model", "invalid_request_error"),
    "model_not_allowed": Kind(404, "Model not allowed", "invalid_request_error"),
    "model_not_loaded": Kind(404, "Model not loaded", "invalid_request_error"),
    "response_not_found": Kind(404, "Unknown response", "invalid_request_error"),
    "method_not_allowed": Kind(405, "Method not allowed", "invalid_request_error"),
    "misdirected_request": Kind(421, "Host not served here", "invalid_request_error"),
    "model_busy": Kind(409, "The model has jobs", "invalid_request_error"),
    "body_too_large": Kind(413, "Request body too large", "invalid_request_error"),
    "unsupported_media_type": Kind(415, "Unsupported media type", "invalid_request_error"),
    "invalid_json": Kind(422, "Malformed JSON", "invalid_request_error"),
    "validation_error": Kind(422, "Invalid request", "invalid_request_error"),
    "invalid_settings": Kind(422, "Invalid settings file", "invalid_request_error"),
    "limit_exceeded": Kind(422, "Request over a limit", "invalid_request_error"),
    "rate_limited": Kind(429, "Too many requests", "rate_limit_error"),
    "internal_error": Kind(500, "Internal server error", "server_error"),
    "pull_failed": Kind(502, "The pull from the Hugging Face hub failed", "server_error"),
    "model_load_failed": Kind(500, "The model could not be loaded", "server_error"),
    "generation_failed": Kind(500, "Generation failed", "server_error"),
    # An optional part of mlx-manager (an extra) the request needs is not installed: the problem
    # names it (`extra`) and the command that adds it (`install`).
    "extra_not_installed": Kind(501, "An optional part of mlx-manager is not installed", "server_error"),
    "overloaded": Kind(503, "Server overloaded", "server_error"),
    "draining": Kind(503, "Server shutting down", "server_error"),
    "not_ready": Kind(503, "Not ready", "server_error"),
    "model_unloaded": Kind(503, "The model was unloaded", "server_error"),
    "timeout": Kind(504, "Request timed out", "timeout_error"),
    # A request routed to an upstream backend (routing/): the upstream's status and error type
    # ride along as extension members (backend, upstream_status, upstream_type), never its text.
    "upstream_rejected": Kind(400, "The backend refused the request", "invalid_request_error"),
    "upstream_rate_limited": Kind(429, "The backend is rate limiting", "rate_limit_error"),
    "upstream_error": Kind(502, "The backend failed", "server_error"),
    "upstream_unreachable": Kind(502, "The backend cannot be reached", "server_error"),
    "upstream_unavailable": Kind(503, "No backend available", "server_error"),
    "upstream_timeout": Kind(504, "The backend timed out", "timeout_error"),
}

# Starlette's own HTTPExceptions carry only a status: name them by it.
_KIND_BY_STATUS = {
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


def kind_for_status(status: int) -> str:
    if status in _KIND_BY_STATUS:
        return _KIND_BY_STATUS[status]
    return "internal_error" if status >= 500 else "bad_request"


class Problem(Exception):
    """Raise anywhere in request handling; the daemon turns it into a problem response."""

    def __init__(
        self,
        kind: str,
        detail: str,
        *,
        status: int | None = None,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        param: str | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        spec = KINDS[kind]
        self.kind = kind
        self.detail = detail
        self.status = status or spec.status
        self.title = title or spec.title
        self.headers = dict(headers or {})
        self.param = param
        self.extra = extra  # extension members, e.g. timeout_seconds or errors

    def document(self, *, instance: str, request_id: str) -> dict[str, Any]:
        """The problem as sent for the route `instance` (the request's path): its `error` member,
        and on Anthropic's routes its `type`, are those that route's clients read."""
        anthropic = speaks_anthropic(instance)
        # `error` comes first: clients that print the whole body (the openai SDK 1.x, LiteLLM) then
        # show the one-sentence message first, as they do for OpenAI's own errors.
        return {
            "error": {
                "message": self.detail,
                "type": anthropic_type(self.status) if anthropic else KINDS[self.kind].openai_type,
                "param": self.param,
                "code": self.kind,
            },
            "type": "error" if anthropic else TYPE_BASE + self.kind,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "instance": instance,
            "request_id": request_id,
            **self.extra,
        }

    def response(self, *, instance: str, request_id: str) -> JSONResponse:
        headers = {**self.headers, "X-Request-ID": request_id}
        return JSONResponse(
            self.document(instance=instance, request_id=request_id),
            status_code=self.status,
            headers=headers,
            media_type=MEDIA_TYPE,
        )


# -- Anthropic's dialect ------------------------------------------------------------------------
# Its SDKs read `{"type": "error", "error": {"type", "message"}}`. RFC 9457's `type` is a URI
# reference, and "error" is one (relative): the two specs meet there, and the problem's kind
# stays in `error.code`, as on every other route.

ANTHROPIC_PATH = "/v1/messages"
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def speaks_anthropic(path: str) -> bool:
    """Whether `path` is one of Anthropic's routes (/v1/messages and below)."""
    return path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/")


def anthropic_type(status: int) -> str:
    """Anthropic's `error.type` for an HTTP status."""
    return _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def retry_after(seconds: float) -> dict[str, str]:
    """A Retry-After header: whole seconds, at least one."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}
