"""What can go wrong on the way to a backend, as the daemon needs it to answer: a problem kind, a
detail we wrote (never an upstream's text: it may quote the prompt), and the upstream's own status
and error type, kept for the problem's extension fields."""

from __future__ import annotations

import re

# An upstream's error type is kept only if it is a plain identifier (it cannot carry request text).
_ERROR_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,63}")


class RoutingError(Exception):
    """A backend could not serve a request (or cannot be asked to). `retryable`: another backend
    may succeed, so a route's next candidate is tried if nothing reached the client yet."""

    def __init__(
        self,
        kind: str,
        detail: str,
        *,
        backend: str | None = None,
        retryable: bool = False,
        status: int | None = None,
        upstream_status: int | None = None,
        upstream_type: str | None = None,
        retry_after: float | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.kind = kind  # a problem kind: daemon/problems.py KINDS
        self.detail = detail
        self.backend = backend
        self.retryable = retryable
        self.status = status  # the HTTP status to answer with, when not the kind's own
        self.upstream_status = upstream_status
        self.upstream_type = upstream_type if upstream_type and _ERROR_TYPE.fullmatch(upstream_type) else None
        self.retry_after = retry_after
        self.param = param


def not_translatable(backend: str, param: str, detail: str) -> RoutingError:
    """A request field the backend's dialect has no way to say: a 400 that names it."""
    return RoutingError(
        "not_supported", f"{param}: {detail} (the model is routed to backend {backend!r})", backend=backend, param=param
    )
