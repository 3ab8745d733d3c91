"""What the two dialects' translations share: the fields a translation must not drop, the error an
upstream's status means, and the decoding of a stream into engine events."""

from __future__ import annotations

import json
from dataclasses import MISSING, fields
from typing import Any

from mlx_manager.engine.constraints import GrammarSpec
from mlx_manager.engine.types import Event, GenerationRequest, Started
from mlx_manager.routing.errors import RoutingError, not_translatable
from mlx_manager.routing.sse import ServerEvent


def refuse_unhandled(request: GenerationRequest, handled: frozenset[str], backend: str) -> None:
    """A request field this translation does not carry, set to anything but its default, is a 400:
    a field added to GenerationRequest later is refused for upstreams until a translation says it."""
    for spec in fields(GenerationRequest):
        if spec.name in handled:
            continue
        default = spec.default_factory() if spec.default_factory is not MISSING else spec.default
        if getattr(request, spec.name) != default:
            raise not_translatable(backend, spec.name, "an upstream backend cannot be asked for it")


def json_schema_of(spec: GrammarSpec, backend: str, param: str) -> dict[str, Any]:
    """The JSON schema a json_schema constraint was made from (llguidance keeps it in its grammar)."""
    try:
        grammar = json.loads(spec.grammar)["grammars"][0]
        schema = dict(grammar["json_schema"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise not_translatable(backend, param, "this kind of constraint cannot be sent upstream") from None
    schema.pop("x-guidance", None)  # llguidance's own formatting options
    return schema


def status_error(backend: str, status: int, body: bytes, retry_after: str | None, model: str) -> RoutingError:
    """The error an upstream's HTTP status means. Its body is read for an error type only: its
    message may quote the request, so it is never passed on."""
    error_type = _error_type(body)
    seconds = _seconds(retry_after)
    said = f"backend {backend!r} answered {status}"
    extra: dict[str, Any] = {"backend": backend, "upstream_status": status, "upstream_type": error_type}
    if status == 429:
        return RoutingError(
            "upstream_rate_limited", f"{said} (rate limited)", retryable=True, retry_after=seconds, **extra
        )
    if status in (503, 529):
        return RoutingError(
            "upstream_unavailable", f"{said} (unavailable)", retryable=True, retry_after=seconds, **extra
        )
    if status in (408, 504):
        return RoutingError("upstream_timeout", f"{said} (timed out)", retryable=True, **extra)
    if status >= 500:
        return RoutingError("upstream_error", f"{said} (server error)", retryable=True, **extra)
    if status in (401, 403):
        return RoutingError(
            "upstream_error", f"{said}: it refused our credentials (check its api_key)", retryable=True, **extra
        )
    if status == 404:
        return RoutingError(
            "upstream_rejected",
            f"{said}: it has no model {model!r} (or its base_url is wrong)",
            status=404,
            retryable=True,
            **extra,
        )
    return RoutingError(
        "upstream_rejected",
        f"{said}: it refused the request as translated for it",
        status=status if status in (400, 413, 422) else 400,
        **extra,
    )


def stream_error(backend: str, document: Any) -> RoutingError:
    """An `error` event in the middle of an upstream's stream (OpenAI's, Anthropic's or a problem document)."""
    error_type = _error_type(json.dumps(document).encode()) if isinstance(document, dict) else None
    status = document.get("status") if isinstance(document, dict) and isinstance(document.get("status"), int) else None
    overloaded = error_type in ("overloaded_error", "overloaded", "rate_limit_error", "rate_limited")
    return RoutingError(
        "upstream_unavailable" if overloaded else "upstream_error",
        f"backend {backend!r} sent an error event ({error_type or 'no type'})",
        backend=backend,
        retryable=True,
        upstream_status=status,
        upstream_type=error_type,
    )


def _error_type(body: bytes) -> str | None:
    try:
        document = json.loads(body)
    except ValueError:
        return None
    error = document.get("error") if isinstance(document, dict) else None
    if not isinstance(error, dict):
        return None
    code, kind = error.get("code"), error.get("type")
    return code if isinstance(code, str) else kind if isinstance(kind, str) else None


def _seconds(retry_after: str | None) -> float | None:
    try:
        return max(0.0, float(retry_after)) if retry_after else None
    except ValueError:
        return None  # an HTTP date: rare from APIs, and the cooldown covers it


class StreamDecoder:
    """An upstream's stream into engine events. `Started` goes out just before the first piece of the
    answer, so that an upstream that fails or stalls before its first token can still be left for
    the next backend (nothing reached the client yet)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.started = False
        self.prompt_tokens = 0  # as far as the upstream said so far
        self.upstream_usage: tuple[int, int] | None = None  # (prompt, completion) as the upstream reported them
        self.calls = 0  # tool calls handed on

    def _piece(self, out: list[Event], event: Event) -> None:
        if not self.started:
            self.started = True
            out.append(Started(self.prompt_tokens))
        out.append(event)

    def decode(self, event: ServerEvent) -> list[Event]:
        """The engine events one server-sent event of the upstream's stream carries."""
        raise NotImplementedError

    def end(self) -> list[Event]:
        """What the stream's end means: the last events, or an error if it ended too soon."""
        raise NotImplementedError

    def early_end(self) -> RoutingError:
        return RoutingError(
            "upstream_error",
            f"backend {self.backend!r} ended its stream before the answer's end",
            backend=self.backend,
            retryable=True,
        )
