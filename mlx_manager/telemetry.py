"""Tracing for the daemon: Logfire (OpenTelemetry) setup, FastAPI / httpx / SQLAlchemy
instrumentation, and the daemon's own spans (model load, generation).

Never prompt or completion text: request bodies and endpoint arguments are not recorded, other
libraries' exception messages are withheld, and scrubbing redacts any attribute whose name or
value looks like it carries text. With `telemetry.enabled = false` every function here is a
no-op that does not even import logfire.

Spans are made only when they can go somewhere: a Logfire token, an OTLP endpoint (the setting
or the OTEL_EXPORTER_OTLP_* variables), the console, or a caller's span processor. With none of
these (the default), Logfire is configured but nothing is instrumented and our spans are no-ops:
a request's spans cost a routed stream ~5 ms of CPU (measured in a router,
benchmarks/bench_routing.py), for nobody to read.
"""

from __future__ import annotations

import os
import re
import time
import traceback
import weakref
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI
    from logfire import ScrubMatch
    from logfire.types import ExceptionCallbackHelper
    from opentelemetry.sdk.trace import SpanProcessor

    from mlx_manager.settings import Settings

SERVICE_NAME = "mlx-manager"

# Probes and scrapes come every few seconds; a span each would drown the real requests.
EXCLUDED_PATHS = ("/health", "/ready", "/metrics")

# Our spans' attributes: OpenTelemetry's GenAI names where one exists, ours otherwise.
MODEL = "gen_ai.request.model"
PROMPT_TOKENS = "gen_ai.usage.input_tokens"
COMPLETION_TOKENS = "gen_ai.usage.output_tokens"
ENDPOINT = "mlx_manager.endpoint"
REQUEST_ID = "mlx_manager.request_id"
TIME_TO_FIRST_TOKEN_MS = "mlx_manager.time_to_first_token_ms"
TOKENS_PER_SECOND = "mlx_manager.tokens_per_second"
GRAMMAR_COMPILE_MS = "mlx_manager.grammar_compile_ms"
FINISH_REASON = "mlx_manager.finish_reason"
MODEL_ID = "mlx_manager.model_id"
LOAD_SECONDS = "mlx_manager.load_seconds"
MEMORY_BYTES = "mlx_manager.memory_bytes"
BACKEND = "mlx_manager.backend"  # which backend served a generation (routing): local, or an upstream's name
BACKEND_TYPE = "mlx_manager.backend_type"
FALLBACKS = "mlx_manager.fallbacks"  # attempts given up for the next backend before the first byte
OWN_ATTRIBUTES = frozenset(
    {
        BACKEND,
        BACKEND_TYPE,
        FALLBACKS,
        MODEL,
        PROMPT_TOKENS,
        COMPLETION_TOKENS,
        FINISH_REASON,
        ENDPOINT,
        REQUEST_ID,
        TIME_TO_FIRST_TOKEN_MS,
        TOKENS_PER_SECOND,
        GRAMMAR_COMPILE_MS,
        MODEL_ID,
        LOAD_SECONDS,
        MEMORY_BYTES,
    }
)

# Added to Logfire's default patterns (password, secret, auth...). Matched against attribute
# names and string values: anything that may hold a prompt, a completion or a tool call is
# redacted. `*_tokens` counts are numbers, not text, so `prompt` / `completion` spare them.
TEXT_PATTERNS = (
    r"prompt(?!_tokens)",
    r"completion(?!_tokens)",
    r"(?:\b|_)(?:messages?|content|text|input|body|choices?|delta|instructions|stop)(?:\b|_)",
    r"(?:\b|_)(?:tools?|tool_calls?|function_call)(?:\b|_)",
)

_FINISH_REASON = re.compile(r"[a-z_]{1,32}")

_logfire: ModuleType | None = None  # the logfire module, once configure_telemetry turned tracing on
_exporting = False  # whether the spans made go anywhere (see the module doc)
_httpx_instrumented = False
_instrumented_apps: weakref.WeakSet[Any] = weakref.WeakSet()


def enabled() -> bool:
    """Whether configure_telemetry turned tracing on in this process."""
    return _logfire is not None


def _tracing() -> ModuleType | None:
    """The logfire module if tracing is on and its spans go somewhere: else no span is made."""
    return _logfire if _exporting else None


def otlp_traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL for a setting: a base URL gets /v1/traces appended, as the
    OTEL_EXPORTER_OTLP_ENDPOINT variable does; a full .../v1/traces URL is kept."""
    url = endpoint.strip().rstrip("/")
    return url if url.endswith("/v1/traces") else url + "/v1/traces"


def configure_telemetry(settings: Settings, *, span_processors: Sequence[SpanProcessor] = ()) -> None:
    """Set up Logfire once, before the app is built. Sends to Logfire only if a token is present
    (LOGFIRE_TOKEN or a credentials file), to `telemetry.otlp_endpoint` if set, and to the console
    if `telemetry.console`. `span_processors` are added after scrubbing (tests capture spans so)."""
    global _logfire, _exporting
    options = settings.telemetry
    if not options.enabled:
        _logfire, _exporting = None, False
        return

    import logfire

    from mlx_manager import __version__

    processors = list(span_processors)
    if options.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        processors.append(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_traces_url(options.otlp_endpoint))))

    configured = logfire.configure(
        send_to_logfire="if-token-present",
        service_name=SERVICE_NAME,
        service_version=__version__,
        environment=options.environment,
        console=logfire.ConsoleOptions() if options.console else False,
        additional_span_processors=processors,
        # The daemon's metrics are Prometheus (mlx_manager.metrics); OTel metrics would double the work.
        metrics=False,
        scrubbing=logfire.ScrubbingOptions(extra_patterns=list(TEXT_PATTERNS), callback=_keep_own_attributes),
        # No f-string magic: it inspects call sites and could put local variables into attributes.
        inspect_arguments=False,
        # A client's trace context and baggage are not ours to trust (or to copy into attributes).
        distributed_tracing=False,
        add_baggage_to_attributes=False,
        advanced=logfire.AdvancedOptions(exception_callback=_withhold_exception_text),
    )
    # FastAPI's own telemetry starts tracing every app as soon as a tracer provider exists, and
    # logs validation failures with their messages; instrument_app's spans replace it.
    logfire.suppress_scopes("fastapi")
    _logfire = logfire
    # Logfire's token comes from LOGFIRE_TOKEN or its credentials file, read by configure.
    _exporting = bool(processors) or options.console or bool(configured.config.token) or _otlp_environment()


def _otlp_environment() -> bool:
    """Whether the OTEL_* variables make Logfire export spans over OTLP (as its configure reads them)."""
    endpoint = os.getenv("OTEL_EXPORTER_OTLP_ENDPOINT") or os.getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    return bool(endpoint) and os.getenv("OTEL_TRACES_EXPORTER", "").lower() in ("otlp", "")


def instrument_app(app: FastAPI, settings: Settings) -> bool:
    """A span per HTTP request, without bodies, headers or endpoint arguments; none for probes
    and scrapes. Call in the app factory, after configure_telemetry; a second call is a no-op.
    True if the app is instrumented."""
    tracing = _tracing()
    if tracing is None or not settings.telemetry.enabled:
        return False
    if app in _instrumented_apps:
        return True
    _instrumented_apps.add(app)
    tracing.instrument_fastapi(
        app,
        capture_headers=False,
        record_send_receive=False,
        # Not even made and dropped: the wrapper around each ASGI message costs a streamed answer
        # ~0.15 ms a chunk of CPU (measured in a router, benchmarks/bench_routing.py).
        exclude_spans=["send", "receive"],
        request_attributes_mapper=_validation_error_locations,
        excluded_urls=[re.escape(path) + "$" for path in EXCLUDED_PATHS],
    )
    return True


def instrument_httpx() -> bool:
    """A span per outgoing httpx request (all clients), without headers or bodies: the requests to
    upstream backends, as children of the request that made them. Call before any client is made."""
    global _httpx_instrumented
    tracing = _tracing()
    if tracing is None:
        return False
    if not _httpx_instrumented:
        # Explicit False: LOGFIRE_HTTPX_CAPTURE_ALL in the environment must not turn bodies on.
        tracing.instrument_httpx(
            capture_all=False, capture_headers=False, capture_request_body=False, capture_response_body=False
        )
        _httpx_instrumented = True
    return True


def instrument_sqlalchemy(engine: Any) -> bool:
    """A span per SQL statement on this engine (sync or async): the statement, never its parameters."""
    tracing = _tracing()
    if tracing is None:
        return False
    # OpenTelemetry's instrumentation declares SQLAlchemy < 2.1 but works with 2.1
    # (tests/test_telemetry.py checks the spans), so its version check is skipped.
    tracing.instrument_sqlalchemy(engine=engine, skip_dep_check=True)
    return True


class ModelLoadSpan:
    """`with model_load_span(model_id) as load:` ... `load.memory_bytes = ...`. `load.seconds`
    is set on exit, also with telemetry off, so the caller can feed it to the metrics."""

    __slots__ = ("_span", "_started", "memory_bytes", "model_id", "seconds")

    def __init__(self, model_id: str, span: Any) -> None:
        self.model_id = model_id
        self.memory_bytes: int | None = None
        self.seconds: float | None = None
        self._span = span
        self._started = 0.0

    def __enter__(self) -> ModelLoadSpan:
        if self._span is not None:
            self._span.__enter__()
        self._started = time.perf_counter()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.seconds = time.perf_counter() - self._started
        if self._span is None:
            return
        self._span.set_attribute(LOAD_SECONDS, round(self.seconds, 6))
        if self.memory_bytes is not None:
            self._span.set_attribute(MEMORY_BYTES, int(self.memory_bytes))
        self._span.__exit__(exc_type, exc, tb)


class EngineSpan:
    """A span around one request's work in the engine (a generation or an embedding):
    `with generation_span(model, endpoint, request_id) as gen:` then set the figures on `gen`,
    or `start()` it and `end()` it later. Only these numbers and a short finish reason reach
    the span: there is no place for text."""

    __slots__ = (
        "_span",
        "_started",
        "backend",
        "backend_type",
        "completion_tokens",
        "fallbacks",
        "finish_reason",
        "first_token_at",
        "grammar_compile_ms",
        "prompt_tokens",
        "time_to_first_token_ms",
        "tokens_per_second",
    )

    def __init__(self, span: Any) -> None:
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.time_to_first_token_ms: float | None = None
        # Decode speed; left unset, it is worked out on exit from the tokens after the first one.
        self.tokens_per_second: float | None = None
        self.finish_reason: str | None = None  # "stop", "length", "cancelled", "timeout", "error"...
        self.grammar_compile_ms: float | None = None  # structured output: compiling its grammar
        self.backend: str | None = None  # routing: the backend that served it, and its type
        self.backend_type: str | None = None
        self.fallbacks: int = 0
        # perf_counter() at the first token, when known: the decode speed is measured from it (the
        # time to first token counts from the request's start, which is before this span's).
        self.first_token_at: float | None = None
        self._span = span
        self._started = 0.0

    def __enter__(self) -> EngineSpan:
        if self._span is not None:
            self._span.__enter__()
            self._started = time.perf_counter()
        return self

    def start(self) -> EngineSpan:
        """Open the span without making it the current one: for a generation that ends in
        another task (a stream's body), where leaving a context entered elsewhere would fail.
        Its parent is still the request's span, current when this is called. End it with end()."""
        if self._span is not None:
            self._span._start()  # logfire's own non-attaching start (pinned: logfire 5.x)
            self._started = time.perf_counter()
        return self

    def end(self) -> None:
        """End a span opened with start(); a second call does nothing."""
        self.__exit__(None, None, None)
        self._span = None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self._span is None:
            return
        elapsed = time.perf_counter() - self._started
        if exc_type is not None and not issubclass(exc_type, Exception):
            # A cancelled task (client gone, timeout) is an outcome, not an error of ours.
            self.finish_reason = self.finish_reason or "cancelled"
            exc_type = exc = tb = None
        self._span.set_attributes(self._figures(elapsed))
        self._span.__exit__(exc_type, exc, tb)

    def _figures(self, elapsed: float) -> dict[str, Any]:
        figures: dict[str, Any] = {}
        if self.prompt_tokens is not None:
            figures[PROMPT_TOKENS] = int(self.prompt_tokens)
        if self.completion_tokens is not None:
            figures[COMPLETION_TOKENS] = int(self.completion_tokens)
        if self.time_to_first_token_ms is not None:
            figures[TIME_TO_FIRST_TOKEN_MS] = round(float(self.time_to_first_token_ms), 3)
        rate = self.tokens_per_second
        if rate is None and self.completion_tokens and self.time_to_first_token_ms is not None:
            if self.first_token_at is not None:
                decoding = time.perf_counter() - self.first_token_at
            else:
                decoding = elapsed - float(self.time_to_first_token_ms) / 1000
            if self.completion_tokens > 1 and decoding > 0:
                rate = (int(self.completion_tokens) - 1) / decoding
        if rate is not None:
            figures[TOKENS_PER_SECOND] = round(float(rate), 3)
        if self.grammar_compile_ms is not None:
            figures[GRAMMAR_COMPILE_MS] = round(float(self.grammar_compile_ms), 3)
        if self.backend is not None:
            figures[BACKEND] = self.backend
            figures[BACKEND_TYPE] = self.backend_type or ""
        if self.fallbacks:
            figures[FALLBACKS] = self.fallbacks
        if self.finish_reason is not None:
            reason = str(self.finish_reason)
            figures[FINISH_REASON] = reason if _FINISH_REASON.fullmatch(reason) else "other"
        return figures


def model_load_span(model_id: str) -> ModelLoadSpan:
    """A span around loading one model: its id, the seconds it took, the memory (bytes) after."""
    span = None
    if (tracing := _tracing()) is not None:
        span = tracing.span("load model {mlx_manager.model_id}", _span_name="model load", **{MODEL_ID: model_id})
    return ModelLoadSpan(model_id, span)


def embedding_span(model: str, request_id: str) -> EngineSpan:
    """A span around one embeddings request: its model, prompt tokens and outcome (no inputs)."""
    span = None
    if (tracing := _tracing()) is not None:
        span = tracing.span(
            "embed {gen_ai.request.model}",
            _span_name="embedding",
            **{MODEL: model, ENDPOINT: "embeddings", REQUEST_ID: request_id},
        )
    return EngineSpan(span)


def token_count_span(model: str, endpoint: str, request_id: str) -> EngineSpan:
    """A span around counting a prompt's tokens without generating (Anthropic's count_tokens)."""
    span = None
    if (tracing := _tracing()) is not None:
        span = tracing.span(
            "count tokens {gen_ai.request.model}",
            _span_name="token count",
            **{MODEL: model, ENDPOINT: endpoint, REQUEST_ID: request_id},
        )
    return EngineSpan(span)


def generation_span(model: str, endpoint: str, request_id: str) -> EngineSpan:
    """A span around one generation, for the caller to fill with token counts and speeds."""
    span = None
    if (tracing := _tracing()) is not None:
        span = tracing.span(
            "generate {gen_ai.request.model}",
            _span_name="generation",
            **{MODEL: model, ENDPOINT: endpoint, REQUEST_ID: request_id},
        )
    return EngineSpan(span)


# -- privacy hooks, called by logfire ---------------------------------------------------------


def _keep_own_attributes(match: ScrubMatch) -> Any:
    """Our own attributes hold ids, routes and numbers: a model named "text-gen" or the endpoint
    /v1/chat/completions must not be redacted for looking like text. None redacts the rest."""
    path = match.path
    if len(path) == 2 and path[0] in ("attributes", "message") and path[1] in OWN_ATTRIBUTES:
        return match.value
    return None


def _withhold_exception_text(helper: ExceptionCallbackHelper) -> None:
    """Keep the message of our own errors (we write those, never with request text); withhold any
    other library's, which may quote the input (pydantic's ValidationError does). The exception's
    type and the frames of its traceback are kept."""
    exc = helper.exception
    if type(exc).__module__.partition(".")[0] == "mlx_manager":
        return
    helper.no_record_exception()
    helper.span.add_event(
        "exception",
        {
            "exception.type": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "exception.message": "(withheld: may contain request text)",
            "exception.stacktrace": "".join(traceback.format_tb(exc.__traceback__)),
        },
    )
    _withhold_status_text(helper.span, type(exc).__qualname__)


def _withhold_status_text(span: Any, type_name: str) -> None:
    """Logfire and OpenTelemetry set an error status right after this, described as "Type:
    message"; scrubbing never sees status descriptions, so this one span's setter drops the message."""
    from opentelemetry.trace import Status, StatusCode

    set_status = span.set_status

    def set_status_without_text(status: Any, description: str | None = None) -> None:
        code = status.status_code if isinstance(status, Status) else status
        if code is StatusCode.ERROR:
            set_status(Status(StatusCode.ERROR, type_name))
        else:
            set_status(status, description)

    span.set_status = set_status_without_text


def _validation_error_locations(request: Any, attributes: dict[str, Any]) -> dict[str, Any] | None:
    """What FastAPI's instrumentation may add to a request span: for an invalid request, where
    and why it was invalid; never the endpoint's argument values (the request body)."""
    errors = attributes.get("errors") or []
    if not errors:
        return None
    return {
        "errors": [
            {"type": str(error.get("type", "")), "loc": [str(part) for part in error.get("loc", ())]}
            for error in errors
            if isinstance(error, dict)
        ]
    }
