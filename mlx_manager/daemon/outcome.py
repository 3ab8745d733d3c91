"""What happened to one request: filled in as it runs, emitted once when its response has ended.

The middleware creates one per request and emits it once: just before the last byte of the
answer (for a stream, before its closing events), so that with `audit.durability =
"acknowledged"` that byte can wait for the row's commit, or when the response ended without
one (a client that left). This is the one place that knows the outcome of every /v1 request.
The audit log subscribes through `DaemonState.outcome_sinks`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from mlx_manager.audit.record import AuditRecord, Status
from mlx_manager.telemetry import EngineSpan


@dataclass(kw_only=True)
class RequestOutcome(AuditRecord):
    """The one record of a request. The audit columns are `AuditRecord`'s fields (the stored row
    is taken from this object as it is); these add what only the daemon needs. A request always
    has its id and path from the start, so those two are not optional here."""

    request_id: str
    endpoint: str

    method: str = "GET"
    route: str | None = None  # the path's route template, e.g. /v1/responses/{response_id}; None: no route
    stream: bool = False
    grammar_compile_ms: float | None = None
    first_token_at: float | None = None  # perf_counter() at the first token
    nothing_sent: bool = False  # the client left before its answer: whatever status was "sent" never arrived
    # How the engine's work ended: "stop"/"length", or "timeout", "cancelled", "error".
    finish_reason: str | None = None
    span: EngineSpan | None = None  # the engine work's span, ended by `end_span` once the response is over
    fallbacks: int = 0  # backends given up for the next one before the first byte (routing)
    emitted: bool = False  # handed to the sinks (once: before the last byte, or when the response ended)
    audit_ticket: int | None = None  # the audit writer's ticket for its row (for `committed()`)
    _t0: float = field(default_factory=time.perf_counter, repr=False)

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self._t0) * 1000

    def first_token(self) -> None:
        if self.time_to_first_token_ms is None:
            self.first_token_at = time.perf_counter()
            self.time_to_first_token_ms = (self.first_token_at - self._t0) * 1000

    def fail(self, kind: str, status: Status | None = None) -> None:
        """Record an error; the first recorded failure wins (a timeout is not re-labelled later)."""
        if self.error_type is None:
            self.error_type = kind
            self.status = status or ("timeout" if kind == "timeout" else "error")

    def cancel(self, *, nothing_sent: bool = False) -> None:
        if self.status is None:
            self.status = "cancelled"
        self.nothing_sent = self.nothing_sent or nothing_sent

    def finish(self, http_status: int | None) -> None:
        self.duration_ms = self.elapsed_ms()
        if self.nothing_sent:
            http_status = None
        if self.http_status is None:
            self.http_status = http_status
        if self.status is None:
            if http_status is None:
                self.status = "cancelled"  # nothing was sent: the client went away first
            elif http_status >= 400:
                self.status = "timeout" if http_status == 504 else "error"
            else:
                self.status = "success"


def end_span(outcome: RequestOutcome) -> None:
    """The span sink: the engine work's span gets the outcome's figures and ends."""
    span = outcome.span
    if span is None:
        return
    span.prompt_tokens = outcome.prompt_tokens
    span.completion_tokens = outcome.completion_tokens
    span.time_to_first_token_ms = outcome.time_to_first_token_ms
    span.first_token_at = outcome.first_token_at
    span.finish_reason = outcome.finish_reason
    span.grammar_compile_ms = outcome.grammar_compile_ms
    span.backend, span.backend_type = outcome.backend, outcome.backend_type
    span.fallbacks = outcome.fallbacks
    span.end()
