"""The OpenAPI document says what the daemon really sends: errors as problem documents, API keys,
and streams as server-sent events. FastAPI alone would describe a 422 body the daemon never sends,
and clients (and the fuzz test) check responses against this document.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from mlx_manager.daemon.problems import MEDIA_TYPE, speaks_anthropic

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "An RFC 9457 problem document that also carries an OpenAI-style `error` object.",
    "type": "object",
    "required": ["type", "title", "status", "detail", "instance", "request_id", "error"],
    "properties": {
        "type": {"type": "string", "description": "urn:mlx-manager:problem:<kind>"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "request_id": {"type": "string"},
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "code": {"type": "string"},
            },
        },
    },
    "additionalProperties": True,  # extension members: errors, timeout_seconds, limit, reason...
}

# On Anthropic's routes the same document has `type: "error"` and Anthropic's error type names.
ANTHROPIC_PROBLEM_SCHEMA: dict[str, Any] = {
    **PROBLEM_SCHEMA,
    "title": "AnthropicProblem",
    "description": "An RFC 9457 problem document in the shape Anthropic's SDKs read: `type` is "
    '`"error"`, `error.type` an Anthropic error type, `error.code` the problem kind.',
    "properties": {**PROBLEM_SCHEMA["properties"], "type": {"type": "string", "enum": ["error"]}},
}

ERROR_RESPONSE = {
    "description": "Any error, as a problem document (401 without a valid API key, 413, 421 for a Host the daemon"
    " does not answer to, 422, 429, 5xx).",
    "content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
}
ANTHROPIC_ERROR_RESPONSE = {
    "description": ERROR_RESPONSE["description"],
    "content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/AnthropicProblem"}}},
}
STREAMING_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses")
# Before OpenAPI 3.2, the schema of an event stream describes one event (its fields as parsed).
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "description": "One server-sent event of a `stream: true` answer.",
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {
            "type": "string",
            "description": "The event's type on /v1/messages and /v1/responses; `error` for a failure "
            "mid-stream; otherwise `message`.",
        },
        "data": {
            "type": "string",
            "description": "A chunk or typed event as JSON, a problem document for an `error` event, "
            "or [DONE] at the end of a chat or completions stream.",
        },
    },
}


def describe_errors(app: FastAPI) -> None:
    """Replace `app.openapi` with one that rewrites FastAPI's document as described above."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        schemas["Problem"] = PROBLEM_SCHEMA
        schemas["AnthropicProblem"] = ANTHROPIC_PROBLEM_SCHEMA
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        components["securitySchemes"] = {
            "apiKey": {
                "type": "http",
                "scheme": "bearer",
                "description": "Needed once any API key is set (`mlx-manager keys add NAME`).",
            },
            "anthropicApiKey": {
                "type": "apiKey",
                "in": "header",
                "name": "x-api-key",
                "description": "The same keys, as Anthropic's clients send them.",
            },
        }
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                _describe(path, operation)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _describe(path: str, operation: dict[str, Any]) -> None:
    responses = operation.setdefault("responses", {})
    responses.pop("422", None)  # FastAPI's HTTPValidationError: never sent, the default covers 422
    responses["default"] = ANTHROPIC_ERROR_RESPONSE if speaks_anthropic(path) else ERROR_RESPONSE
    if path.startswith("/v1/"):
        # {}: no key needed while none is set
        operation["security"] = [{"apiKey": []}, {"anthropicApiKey": []}, {}]
    if path in STREAMING_PATHS and "200" in responses:
        content = responses["200"].setdefault("content", {})
        content["text/event-stream"] = {"schema": SSE_EVENT_SCHEMA}
