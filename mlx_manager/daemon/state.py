"""The daemon's mutable state, shared by middleware and routes, and the dependency aliases for it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request

from mlx_manager.auth import KeyRing
from mlx_manager.daemon.aliases import aliases_for
from mlx_manager.daemon.dialects.responses.store import ResponseStore
from mlx_manager.daemon.model_names import ModelName, ModelNames
from mlx_manager.daemon.outcome import RequestOutcome
from mlx_manager.daemon.problems import Problem
from mlx_manager.daemon.ratelimit import RateLimiter
from mlx_manager.engine.config import EngineConfig
from mlx_manager.engine.engine import Engine, StopReport
from mlx_manager.engine.pool import ModelAccess
from mlx_manager.routing.router import Router
from mlx_manager.settings import Settings

if TYPE_CHECKING:
    from mlx_manager.audit import AuditWriter

log = logging.getLogger("mlx_manager.daemon")

OutcomeSink = Callable[[RequestOutcome], None]


@dataclass
class DaemonState:
    settings: Settings  # swapped whole on reload; a request reads it once, at its start
    engine: Engine
    admin_token: str
    owns_engine: bool = True
    # Which backend serves each generation: the engine here, or an upstream (routing.* settings).
    router: Router = None  # type: ignore[assignment]  # made with the engine, in create_app
    # The API keys /v1 requests must present (none: open); rebuilt from the settings on reload.
    keyring: KeyRing = field(default_factory=KeyRing)
    # Listening on a network address: with no key left (all revoked), /v1 is closed, not open.
    require_key: bool = False
    rate_limiter: RateLimiter = field(default_factory=RateLimiter)
    # Flag values (dotted key -> value) that a reload must keep over file and environment.
    flag_overrides: dict[str, Any] = field(default_factory=dict)
    # `serve --model`: preloaded in addition to models.preload, and kept across reloads.
    extra_preload: list[str] = field(default_factory=list)
    started_at: int = field(default_factory=lambda: int(time.time()))  # epoch seconds, as OpenAI's `created`
    draining: bool = False
    preloading: list[str] = field(default_factory=list)  # preload models not loaded yet
    in_flight: int = 0
    # Set when the daemon cannot do what it was started for (a preload model failed to load, or
    # the engine's loop failed); `serve` then stops and exits non-zero with this message and the
    # hint. `on_fatal` asks the server to stop.
    fatal_error: str | None = None
    fatal_hint: str = "Check the model (--model or models.preload)."  # what `serve` says after it
    engine_stop: StopReport | None = None  # how the engine's stop went (stop_engine), for `serve`'s last words
    audit: AuditWriter | None = None  # set by the lifespan once the audit log is open
    on_fatal: Callable[[], None] | None = None
    # Called with every finished request's outcome. The audit writer plugs in here
    # (see create_app); a sink must not block: it runs on the event loop.
    outcome_sinks: list[OutcomeSink] = field(default_factory=list)
    # What an answer's last byte waits for once its outcome is emitted: the audit row's commit
    # under audit.durability = "acknowledged" (set by the audit log; None: nothing).
    durable: Callable[[RequestOutcome], Awaitable[None]] | None = None
    # Responses kept for GET /v1/responses/{id} and previous_response_id: in memory only.
    responses: ResponseStore = field(default_factory=ResponseStore)
    _idle: asyncio.Event | None = None
    _names: tuple[Settings, ModelNames] | None = None  # made once per settings object

    def model_names(self) -> ModelNames:
        """The names of models under the current settings: aliases and identities (model_names.py)."""
        if self._names is None or self._names[0] is not self.settings:
            settings = self.settings
            aliases = aliases_for(settings, self.extra_preload)
            access = ModelAccess.of(self.engine.config)  # where the engine may load from
            self._names = (settings, ModelNames(aliases, dict(settings.models.aliases), access))
        return self._names[1]

    def model(self, requested: str | None, kind: str = "generate") -> ModelName:
        """The model a request names; with none named, `models.default`, else the one loaded model
        of this kind ("generate" or "embed"), as mlx_lm.server does. A 400 problem when there is
        no such one."""
        names = self.model_names()
        if requested is not None:
            return names.of(requested)
        if self.settings.models.default:
            return names.of(self.settings.models.default)
        loaded = [m.model_id for m in self.engine.status().models if m.kind == kind]
        if len(loaded) == 1:
            return names.of(loaded[0])
        which = "no model is loaded" if not loaded else f"{len(loaded)} models are loaded"
        raise Problem(
            "invalid_request",
            f"model is required: the request names none, models.default is not set and {which}; name a"
            " model, or set a default with `mlx-manager config set models.default MODEL`",
            param="model",
        )

    def engine_config(self) -> EngineConfig:
        """The engine's limits from the current settings, with `serve --model` preloaded too."""
        return engine_config(self.settings, self.extra_preload)

    def timeout_for(self, endpoint: str) -> float:
        """The deadline, in seconds, of a request to `endpoint` ("chat", "messages", "embeddings"...)."""
        return float(getattr(self.settings.timeouts, endpoint))

    # -- in-flight bookkeeping (for draining) ---------------------------------------------------
    def request_started(self) -> None:
        self.in_flight += 1

    def request_ended(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if `timeout` seconds pass first."""
        if self.in_flight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False
        finally:
            self._idle = None

    async def acknowledge(self, outcome: RequestOutcome, http_status: int | None) -> None:
        """Just before an answer's last byte: finish and emit the outcome, and wait until what
        must be durable (the audit row) is, so a crash after the client has its answer loses nothing."""
        if not outcome.emitted:
            outcome.finish(http_status)
            self.emit(outcome)
        if self.durable is not None:
            await self.durable(outcome)

    def emit(self, outcome: RequestOutcome) -> None:
        """Hand the outcome to every sink, once (later calls do nothing)."""
        if outcome.emitted:
            return
        outcome.emitted = True
        for sink in self.outcome_sinks:
            try:
                sink(outcome)
            except Exception:  # an observer's bug must not break the response path
                log.exception("outcome sink %r failed for request %s", sink, outcome.request_id)


def engine_config(settings: Settings, extra_preload: list[str] | None = None) -> EngineConfig:
    """The engine's limits from the settings; `extra_preload` models are loaded first."""
    return EngineConfig(
        allowed=list(settings.models.allowed),
        folders=list(settings.models.folders),
        allow_any_path=settings.models.allow_any_path,
        max_loaded=settings.models.max_loaded,
        keep_alive=settings.models.keep_alive,
        preload=list(dict.fromkeys([*(extra_preload or []), *settings.models.preload])),
        queue_limit=settings.server.queue_limit,
        max_batch_size=settings.server.max_batch_size,
        blas=settings.server.blas,
        prefill_chunk=settings.server.prefill_chunk,
        cache_max_bytes=settings.cache.max_bytes,
        cache_max_entries=settings.cache.max_entries,
        cache_disk_folder=str(settings.prompt_cache_folder()) if settings.cache.disk else None,
        cache_disk_max_bytes=settings.cache.disk_max_bytes,
    )


# Dependencies are coroutines: FastAPI runs a plain function in its thread pool (a thread
# hand-off each, per request), though these only read an attribute.
async def get_daemon(request: Request) -> DaemonState:
    return request.app.state.daemon


async def get_outcome(request: Request) -> RequestOutcome:
    return request.scope["mlx_manager.outcome"]


Daemon = Annotated[DaemonState, Depends(get_daemon)]
Outcome = Annotated[RequestOutcome, Depends(get_outcome)]
