"""`create_app(settings)`: the daemon's FastAPI app. Tests build their own with their own settings."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from mlx_manager import __version__, telemetry
from mlx_manager.auth import load_keyring
from mlx_manager.daemon import handlers
from mlx_manager.daemon.middleware import DaemonMiddleware
from mlx_manager.daemon.openapi import describe_errors
from mlx_manager.daemon.outcome import RequestOutcome, end_span
from mlx_manager.daemon.routes import (
    admin,
    admin_cache,
    admin_models,
    audit_feed,
    chat,
    completions,
    dashboard,
    dashboard_api,
    embeddings,
    health,
    messages,
    metrics,
    models,
    responses,
)
from mlx_manager.daemon.state import DaemonState
from mlx_manager.engine.engine import Engine
from mlx_manager.engine.errors import EngineError
from mlx_manager.metrics import Metrics
from mlx_manager.routing.router import Router
from mlx_manager.runtime import admin_token
from mlx_manager.settings import Settings

log = logging.getLogger("mlx_manager.daemon")

ENGINE_STOP_TIMEOUT = 10.0


def create_app(
    settings: Settings,
    engine: Engine | None = None,
    *,
    extra_preload: list[str] | None = None,
    flag_overrides: dict | None = None,
    require_key: bool = False,
) -> FastAPI:
    """The app, with its engine: one made from `settings` (started and stopped with the app), or
    the caller's (started with the app if it is not yet; stopped by the caller).

    API keys come from `settings` (and auth.keys_file, MLX_MANAGER_API_KEY): SettingsError if a
    configured source cannot be read. `require_key` (a network address) closes /v1 when no key is left."""
    daemon = DaemonState(
        settings=settings,
        engine=None,  # type: ignore[arg-type]  # set just below, once the preload list is known
        admin_token=admin_token(create=True) or "",
        keyring=load_keyring(settings),
        require_key=require_key,
        owns_engine=engine is None,
        flag_overrides=dict(flag_overrides or {}),
        extra_preload=list(extra_preload or []),
    )
    daemon.engine = engine if engine is not None else Engine(daemon.engine_config())
    daemon.router = make_router(daemon)  # SettingsError if a backend's key cannot be read
    daemon.outcome_sinks.append(end_span)
    figures = daemon_metrics(daemon)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from mlx_manager.daemon.auditing import Auditing

        auditing = Auditing(daemon)
        await auditing.start()  # before the first request: every request leaves its row
        figures.watch(audit_backlog=lambda: auditing.writer.backlog)
        telemetry.instrument_sqlalchemy(auditing.writer.sql_engine)
        loop = asyncio.get_running_loop()

        def failed(exc: Exception) -> None:  # on the inference thread
            loop.call_soon_threadsafe(engine_failed, daemon, exc)

        daemon.engine.failure_listeners.append(failed)
        daemon.engine.start()  # no-op if already running
        preload = asyncio.create_task(watch_preload(daemon))
        try:
            yield
        finally:
            daemon.engine.failure_listeners.remove(failed)
            preload.cancel()
            if daemon.owns_engine:
                await stop_engine(daemon)
            await auditing.stop()  # after the engine: the last requests' rows are queued by now
            await daemon.router.aclose()

    app = FastAPI(
        title="mlx-manager",
        version=__version__,
        summary="OpenAI-compatible API for local MLX models",
        lifespan=lifespan,
        # Swagger UI comes from a CDN into the browser that opens it: only when asked for (server.docs).
        docs_url="/docs" if settings.server.docs else None,
        redoc_url=None,
        # FastAPI's own telemetry is not ours: it would trace the request next to instrument_app's
        # span and log validation failures with their messages (request text). Off, it is not even
        # a layer every request and every streamed chunk passes (telemetry.py: logfire's spans).
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.daemon = daemon
    app.state.metrics = figures
    telemetry.instrument_app(app, settings)
    handlers.install(app)
    routers = (chat, completions, messages, responses, embeddings, models, health, metrics)
    for module in (*routers, admin, admin_models, admin_cache, audit_feed, dashboard, dashboard_api):
        app.include_router(module.router)
    describe_errors(app)
    app.add_middleware(DaemonMiddleware, daemon=daemon)
    if settings.server.cors_origins:  # outermost: a browser's preflight is answered before any key check
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.server.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    return app


def make_router(daemon: DaemonState) -> Router:
    """The router over the engine here and the upstream backends of the settings."""
    engine = daemon.engine

    def local_load() -> int:
        status = engine.status()
        return status.queue_depth + status.active_jobs

    return Router(daemon.settings, engine.submit, local_load)


def daemon_metrics(daemon: DaemonState) -> Metrics:
    """Prometheus figures: live gauges read at scrape time, counters fed by each request's outcome."""
    engine = daemon.engine
    loaded_ids: set[str] = set()  # the id of every model loaded: a model a client named is a label only then

    def known_model(label: str) -> bool:  # a request's label: a model's id or its alias (model_names.py)
        models = daemon.settings.models
        return label in loaded_ids or label in models.allowed or label in models.aliases

    figures = Metrics(
        queue_depth=lambda: engine.status().queue_depth,
        loaded_models=lambda: len(engine.status().loaded),
        active_requests=lambda: daemon.in_flight,
        prompt_cache_bytes=lambda: sum(m.cache.bytes for m in engine.status().models),
        known_model=known_model,
    )

    def observe(outcome: RequestOutcome) -> None:
        if not outcome.endpoint.startswith("/v1/"):
            return
        ttft = outcome.time_to_first_token_ms
        figures.observe_request(
            outcome.route or outcome.endpoint,  # one label per route, not per response id
            outcome.model,
            outcome.status or "error",
            (outcome.duration_ms or 0) / 1000,
            None if ttft is None else ttft / 1000,
            outcome.prompt_tokens,
            outcome.completion_tokens,
            outcome.cached_tokens,
        )

    def observe_backend(outcome: RequestOutcome) -> None:
        if outcome.backend is not None and outcome.status is not None:
            figures.observe_backend(
                outcome.backend, outcome.backend_type, outcome.status, outcome.prompt_tokens, outcome.completion_tokens
            )

    daemon.outcome_sinks.append(observe)
    daemon.outcome_sinks.append(observe_backend)
    daemon.router.failure_listeners.append(figures.observe_backend_failure)
    figures.watch_backends(daemon.router.status)

    def loaded(model_id: str, seconds: float) -> None:  # on the inference thread
        loaded_ids.add(model_id)
        figures.observe_model_load(seconds)

    engine.model_load_listeners.append(loaded)
    return figures


async def watch_preload(daemon: DaemonState) -> None:
    """Load the preload models on the engine's thread, keeping /ready at 503 "loading" meanwhile.

    A model that cannot be loaded is fatal: a daemon started to serve it would only fail every
    request for it, so it stops with the reason (and a supervisor sees a crash, not a success)."""
    daemon.preloading = list(daemon.engine.config.preload)
    for model_id in list(daemon.preloading):
        try:
            await daemon.engine.load(model_id)
        except EngineError as exc:
            daemon.fatal_error = f"could not preload model {model_id!r}: {exc}"
            log.error("%s", daemon.fatal_error)
            if daemon.on_fatal is not None:
                daemon.on_fatal()
            return
        finally:
            daemon.preloading.remove(model_id)


def engine_failed(daemon: DaemonState, exc: Exception) -> None:
    """The engine's loop failed (a bug; its traceback is in the log): it has stopped, so does the
    daemon, exiting non-zero, and a supervisor (`mlx-manager start`) starts a new one."""
    daemon.fatal_error = f"the inference engine failed ({type(exc).__name__}; the log has its traceback)"
    daemon.fatal_hint = "This is a bug in mlx-manager: please report it with that traceback."
    log.error("%s: stopping", daemon.fatal_error)
    if daemon.on_fatal is not None:
        daemon.on_fatal()


async def stop_engine(daemon: DaemonState) -> None:
    """Stop the engine off the event loop (`Engine.stop` waits for the inference thread), and
    keep what the stop saw: a load abandoned, or a thread that did not come back in time."""
    report = await asyncio.to_thread(daemon.engine.stop, ENGINE_STOP_TIMEOUT)
    if report != daemon.engine_stop:  # the drain's stop, then the lifespan's: said once
        for note in report.notes():
            log.warning("stopping: %s", note)
    daemon.engine_stop = report
