"""The daemon's Prometheus metrics (GET /metrics), and a summary of a scrape for `mlx-manager status`.

Each app gets its own `Metrics` with its own registry, so tests and several apps in one process
do not share counters. Gauges of live state read the daemon's callables at scrape time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "mlx_manager"

# Generations run from a fraction of a second to minutes.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LOAD_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# Model names and paths come from clients: only models the daemon knows (`known_model`) are
# labels of their own, and a cap on distinct values keeps the registry bounded all the same.
MAX_MODELS = 64
MAX_ENDPOINTS = 32
OTHER = "other"

GaugeSource = Callable[[], float]
GAUGES = ("active_requests", "queue_depth", "loaded_models", "audit_backlog", "prompt_cache_bytes")


class _BoundedLabel:
    """Passes the first `limit` distinct values through; every later one becomes "other"."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        value = value or ""
        if value in self.seen:
            return value
        if len(self.seen) >= self.limit:
            return OTHER
        self.seen.add(value)
        return value


class Metrics:
    """One app's metrics. The daemon calls `observe_request` once per finished request,
    `observe_model_load` after each load, and serves `render()` at GET /metrics.

        metrics = Metrics(queue_depth=lambda: engine.status().queue_depth,
                          loaded_models=lambda: len(engine.status().loaded))
    """

    def __init__(
        self,
        *,
        active_requests: GaugeSource | None = None,
        queue_depth: GaugeSource | None = None,
        loaded_models: GaugeSource | None = None,
        audit_backlog: GaugeSource | None = None,
        prompt_cache_bytes: GaugeSource | None = None,
        known_model: Callable[[str], bool] | None = None,
    ) -> None:
        """`known_model`: whether a request's model id may be a label value (a model the daemon
        loaded or allows); others are counted as "other". None: the first MAX_MODELS ids seen."""
        self.known_model = known_model
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests", "Finished API requests.", ["endpoint", "model", "status"], registry=r
        )
        self.request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from request to last byte.",
            ["endpoint"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from request to first generated token.",
            buckets=FIRST_TOKEN_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.completion_tokens = Counter(
            f"{PREFIX}_completion_tokens", "Completion tokens generated.", ["model"], registry=r
        )
        self.timeouts = Counter(f"{PREFIX}_timeouts", "Requests that hit their deadline.", ["endpoint"], registry=r)
        self.model_load = Histogram(
            f"{PREFIX}_model_load_seconds", "Time to load a model.", buckets=LOAD_BUCKETS, registry=r
        )
        self.cache_hits = Counter(
            f"{PREFIX}_prompt_cache_hits", "Generations whose prompt reused a cached prefix.", ["model"], registry=r
        )
        self.cache_misses = Counter(
            f"{PREFIX}_prompt_cache_misses",
            "Generations whose prompt was computed from scratch.",
            ["model"],
            registry=r,
        )
        self.cached_tokens = Counter(
            f"{PREFIX}_prompt_cache_cached_tokens",
            "Prompt tokens restored from the prompt cache.",
            ["model"],
            registry=r,
        )
        # Routing: per backend (local, or an upstream's name from the settings: a bounded set).
        self.backend_requests = Counter(
            f"{PREFIX}_backend_requests",
            "Generations by the backend that served them.",
            ["backend", "backend_type", "status"],
            registry=r,
        )
        self.backend_failures = Counter(
            f"{PREFIX}_backend_failures",
            "Attempts that failed on a backend before the first byte (the next was tried).",
            ["backend", "error"],
            registry=r,
        )
        self.backend_tokens = Counter(
            f"{PREFIX}_backend_tokens",
            "Tokens of the generations a backend served (prompt or completion).",
            ["backend", "kind"],
            registry=r,
        )
        self._gauges = {
            "active_requests": Gauge(f"{PREFIX}_active_requests", "Requests in flight.", registry=r),
            "queue_depth": Gauge(f"{PREFIX}_queue_depth", "Generations waiting for the engine.", registry=r),
            "loaded_models": Gauge(f"{PREFIX}_loaded_models", "Models loaded in memory.", registry=r),
            "audit_backlog": Gauge(f"{PREFIX}_audit_backlog", "Audit records not yet written.", registry=r),
            "prompt_cache_bytes": Gauge(f"{PREFIX}_prompt_cache_bytes", "Memory held by prompt caches.", registry=r),
        }
        self._models = _BoundedLabel(MAX_MODELS)
        self._endpoints = _BoundedLabel(MAX_ENDPOINTS)
        self.watch(
            active_requests=active_requests,
            queue_depth=queue_depth,
            loaded_models=loaded_models,
            audit_backlog=audit_backlog,
            prompt_cache_bytes=prompt_cache_bytes,
        )

    def watch(self, **sources: GaugeSource | None) -> None:
        """Point live gauges at callables read at each scrape, e.g. once the audit writer exists:
        `metrics.watch(audit_backlog=lambda: writer.backlog)`. None leaves a gauge as it is."""
        for name, source in sources.items():
            if name not in self._gauges:
                raise ValueError(f"no gauge named {name!r}; the gauges are {', '.join(GAUGES)}")
            if source is not None:
                self._gauges[name].set_function(_never_raises(source))

    def observe_request(
        self,
        endpoint: str,
        model: str | None,
        status: str,
        duration_s: float | None,
        ttft_s: float | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        cached_tokens: int | None = None,
    ) -> None:
        """Count one finished request. `status` is success / error / timeout / cancelled
        (a timeout is also counted in timeouts_total); unknown figures are None. `cached_tokens`
        is given for a generation whose prompt went through the prompt cache (0: a miss)."""
        endpoint = self._endpoints(endpoint)
        if model is not None and self.known_model is not None and not self.known_model(model):
            model = OTHER
        model = self._models(model)
        self.requests.labels(endpoint, model, status).inc()
        if duration_s is not None:
            self.request_duration.labels(endpoint).observe(duration_s)
        if ttft_s is not None:
            self.time_to_first_token.observe(ttft_s)
        if prompt_tokens:
            self.prompt_tokens.labels(model).inc(prompt_tokens)
        if completion_tokens:
            self.completion_tokens.labels(model).inc(completion_tokens)
        if status == "timeout":
            self.timeouts.labels(endpoint).inc()
        if cached_tokens is not None:
            (self.cache_hits if cached_tokens else self.cache_misses).labels(model).inc()
            self.cached_tokens.labels(model).inc(cached_tokens)

    def observe_backend(
        self, backend: str, backend_type: str, status: str, prompt_tokens: int | None, completion_tokens: int | None
    ) -> None:
        """Count one generation against the backend that served it (or failed it last)."""
        self.backend_requests.labels(backend, backend_type, status).inc()
        if prompt_tokens:
            self.backend_tokens.labels(backend, "prompt").inc(prompt_tokens)
        if completion_tokens:
            self.backend_tokens.labels(backend, "completion").inc(completion_tokens)

    def observe_backend_failure(self, backend: str, error: str) -> None:
        self.backend_failures.labels(backend, error).inc()

    def watch_backends(self, source: Callable[[], list[dict[str, Any]]]) -> None:
        """Live gauges per backend, read at each scrape: up (1) or cooling down (0), and outstanding requests."""
        self.registry.register(_BackendGauges(source))

    def observe_model_load(self, seconds: float) -> None:
        self.model_load.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The body and content type of a GET /metrics response."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _BackendGauges:
    """A collector: each backend's state as the router reports it at scrape time."""

    def __init__(self, source: Callable[[], list[dict[str, Any]]]) -> None:
        self.source = source

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily(
            f"{PREFIX}_backend_up",
            "1 while a backend takes requests, 0 while it cools down.",
            labels=["backend", "backend_type"],
        )
        outstanding = GaugeMetricFamily(
            f"{PREFIX}_backend_outstanding", "Requests a backend is serving now.", labels=["backend"]
        )
        try:
            backends = self.source()
        except Exception:
            backends = []
        for backend in backends:
            up.add_metric([backend["name"], backend["type"]], 1.0 if backend["up"] else 0.0)
            outstanding.add_metric([backend["name"]], float(backend["outstanding"]))
        yield up
        yield outstanding


def _never_raises(source: GaugeSource) -> GaugeSource:
    """A failing source (engine stopping) makes its gauge NaN rather than the whole scrape fail."""

    def read() -> float:
        try:
            return float(source())
        except Exception:
            return math.nan

    return read


def scrape_summary(text: str) -> dict[str, Any]:
    """The main figures of a GET /metrics body, for `mlx-manager status`: counters (requests,
    requests_by_status, timeouts, prompt_tokens, completion_tokens; 0 if absent), the live gauges
    (active_requests, queue_depth, loaded_models, audit_backlog; None if absent or unreadable) and
    the mean request duration, time to first token and model load time in seconds (None before
    the first observation).
    """
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))

    def total(name: str) -> float:
        return sum(value for _, value in samples.get(f"{PREFIX}_{name}", []) if not math.isnan(value))

    def mean(histogram: str) -> float | None:
        count = total(f"{histogram}_count")
        return total(f"{histogram}_sum") / count if count else None

    by_status: dict[str, int] = {}
    for labels, value in samples.get(f"{PREFIX}_requests_total", []):
        status = labels.get("status", "")
        by_status[status] = by_status.get(status, 0) + int(value)

    summary: dict[str, Any] = {
        "requests": int(total("requests_total")),
        "requests_by_status": by_status,
        "timeouts": int(total("timeouts_total")),
        "prompt_tokens": int(total("prompt_tokens_total")),
        "completion_tokens": int(total("completion_tokens_total")),
        "prompt_cache_hits": int(total("prompt_cache_hits_total")),
        "prompt_cache_misses": int(total("prompt_cache_misses_total")),
        "prompt_cache_cached_tokens": int(total("prompt_cache_cached_tokens_total")),
    }
    for gauge in GAUGES:
        values = [value for _, value in samples.get(f"{PREFIX}_{gauge}", []) if not math.isnan(value)]
        summary[gauge] = int(values[0]) if values else None
    summary["request_duration_seconds_mean"] = mean("request_duration_seconds")
    summary["time_to_first_token_seconds_mean"] = mean("time_to_first_token_seconds")
    summary["model_load_seconds_mean"] = mean("model_load_seconds")
    return summary
