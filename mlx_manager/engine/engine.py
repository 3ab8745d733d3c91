"""The engine's public face: submit jobs from asyncio, get events back, cancel, inspect.

Everything here runs on the caller's (event loop) thread and talks to the one inference
thread (`worker.py`) through a thread-safe command queue; events come back through
`loop.call_soon_threadsafe`, so the event loop never blocks on MLX.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from mlx_manager.engine.errors import EngineError, EngineStopped, Overloaded
from mlx_manager.engine.types import (
    EmbeddingRequest,
    EmbeddingResult,
    Event,
    Finished,
    GenerationRequest,
    Started,
    TextDelta,
)

if TYPE_CHECKING:
    from mlx_manager.settings import Settings


@dataclass(frozen=True)
class EngineConfig:
    allowed: list[str] = field(default_factory=list)
    max_loaded: int = 2
    keep_alive: float = 1800.0
    preload: list[str] = field(default_factory=list)
    queue_limit: int = 64
    max_batch_size: int = 32
    blas: str = "auto"  # see engine/blas.py

    @classmethod
    def from_settings(cls, settings: Settings) -> EngineConfig:
        return cls(
            allowed=list(settings.models.allowed),
            max_loaded=settings.models.max_loaded,
            keep_alive=settings.models.keep_alive,
            preload=list(settings.models.preload),
            queue_limit=settings.server.queue_limit,
            max_batch_size=settings.server.max_batch_size,
            blas=settings.server.blas,
        )


@dataclass(frozen=True)
class EngineStatus:
    loaded: list[str]
    queue_depth: int
    active_jobs: int
    loading: str | None
    running: bool
    blas: str | None = None  # the optimised BLAS library MLX uses; None: MLX's own



class Job:
    """One submitted generation. Iterate it for events; cancel it when the caller gives up."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, engine: Engine) -> None:
        self.request = request
        self.completion_tokens = 0  # written by the inference thread
        self.prompt_tokens = 0
        self.done = False
        self.cancelled = False
        self._started = False
        self.stopped_at: float | None = None  # perf_counter() when the engine let go of it
        self.submitted_at = time.perf_counter()
        self._loop = loop
        # The inference thread appends; the loop drains. One wake-up per batch of events,
        # not per token, keeps the event loop from fighting the inference thread for the GIL.
        self._events: deque[Event | BaseException] = deque()
        self._ready = asyncio.Event()
        self._wake_pending = False
        self._engine = engine

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            while not self._events:
                self._ready.clear()
                self._wake_pending = False
                if self._events:
                    break
                await self._ready.wait()
            item = self._events.popleft()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, Finished):
                return

    def take_ready_text(self) -> str:
        """The text of the deltas already waiting, taken at once (up to the next other event).

        A consumer that fell behind the model sends what piled up as one piece instead of one
        message per token."""
        parts = []
        while self._events and isinstance(self._events[0], TextDelta):
            parts.append(self._events.popleft().text)
        return "".join(parts)

    def _release(self) -> None:
        """The engine let go of this job (finished, failed or cancelled)."""
        if self.done:
            return
        if self._started:
            self._engine._count_active(-1)
        self.done = True
        self.stopped_at = time.perf_counter()

    def cancel(self) -> None:
        """Stop generating for this job; the inference thread drops it within one decode step."""
        if self.done or self.cancelled:
            return
        self.cancelled = True
        self._engine._send(("cancel", self))

    # Called from the inference thread only.
    def _emit(self, item: Event | BaseException) -> None:
        if isinstance(item, Started):
            self._started = True
            self._engine._count_active(+1)
        elif isinstance(item, (Finished, BaseException)):
            self._release()
        self._events.append(item)
        if self._wake_pending:
            return
        self._wake_pending = True
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            pass


class EmbeddingJob:
    """One submitted embedding request. Await `result()`; cancel it when the caller gives up.

    It counts as waiting until its first batch runs, then as active until it ends."""

    def __init__(self, request: EmbeddingRequest, loop: asyncio.AbstractEventLoop, engine: Engine) -> None:
        self.request = request
        self.cancelled = False
        self.done = False
        self.started = False
        # Filled on the inference thread by EmbeddingQueue.add / step.
        self.entry: Any = None
        self.tokens: list[list[int]] = []
        self.order: list[int] = []  # input indexes, shortest first: batches pad less
        self.cursor = 0
        self.vectors: list[Any] = []
        self.prompt_tokens = 0
        self._future: asyncio.Future = loop.create_future()
        self._loop = loop
        self._engine = engine

    async def result(self) -> EmbeddingResult:
        """The vectors; raises the EngineError that stopped the job. Cancelling the caller cancels the job."""
        try:
            return await self._future
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Stop computing this job: the inference thread drops it before its next batch."""
        if not self.done:
            self.cancelled = True

    # Called from the inference thread only.
    def prepare(self, entry: Any, tokens: list[list[int]]) -> None:
        self.entry, self.tokens = entry, tokens
        self.order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))
        self.vectors = [None] * len(tokens)
        self.prompt_tokens = sum(len(ids) for ids in tokens)

    def start(self) -> None:
        if not self.started:
            self.started = True
            self._engine._taken()
            self._engine._count_active(+1)

    def settle(self, result: EmbeddingResult | None = None, error: BaseException | None = None) -> None:
        """Hand the caller its result or error; releases the job's place in the counts."""
        if self.done:
            return
        self.done = True
        if self.started:
            self._engine._count_active(-1)
        else:
            self._engine._taken()

        def deliver() -> None:
            if self._future.done():
                return
            if error is not None:
                self._future.set_exception(error)
            elif result is not None:
                self._future.set_result(result)
            else:  # dropped after a cancel
                self._future.cancel()

        try:
            self._loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            pass


class Engine:
    """Owns the inference thread. Thread-safe to call from one asyncio loop."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Called on the inference thread with (model id, seconds) after each model load.
        self.model_load_listeners: list[Callable[[str, float], None]] = []
        self._waiting = 0  # submitted, not yet taken into a batch
        self._active = 0  # started, not yet finished
        self._lock = threading.Lock()
        self._blas: str | None = None
        from mlx_manager.engine.worker import Worker

        self._worker = Worker(self)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        from mlx_manager.engine import blas

        self._blas = blas.use(self.config.blas)  # before MLX's first matrix product
        self._thread = threading.Thread(target=self._worker.run, name="mlx-inference", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every job, unload the models and join the inference thread."""
        self._stopping = True
        if self._thread is None:
            return
        self._send(("stop", None))
        self._thread.join(timeout)
        self._thread = None

    def reconfigure(self, config: EngineConfig) -> None:
        """Apply new limits and allow-list; loaded models over the new limits are unloaded when idle."""
        self.config = config
        self._send(("reconfigure", config))

    # -- work ------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> Job:
        self._reserve_place()
        job = Job(request, asyncio.get_running_loop(), self)
        self._send(("submit", job))
        return job

    def submit_embedding(self, request: EmbeddingRequest) -> EmbeddingJob:
        """Queue an embedding request; await `job.result()`. May raise Overloaded or EngineStopped."""
        self._reserve_place()
        job = EmbeddingJob(request, asyncio.get_running_loop(), self)
        self._send(("embed", job))
        return job

    async def load(self, model_id: str) -> None:
        """Load a model (or touch it if loaded). Raises ModelNotFound, ModelNotAllowed, ModelLoadFailed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._send(("load", (model_id, loop, future)))
        await future

    def status(self) -> EngineStatus:
        worker = self._worker
        return EngineStatus(
            loaded=worker.pool.loaded_ids(),
            queue_depth=self._waiting,
            active_jobs=self._active,
            loading=worker.pool.loading,
            running=self._thread is not None and not self._stopping,
            blas=self._blas,
        )

    def known_models(self) -> list[str]:
        """Loaded models first, then the allow-list: what /v1/models shows."""
        seen = dict.fromkeys(self._worker.pool.loaded_ids())
        seen.update(dict.fromkeys(self.config.allowed))
        return list(seen)

    # -- used by the worker ----------------------------------------------------------------
    def _send(self, command: tuple) -> None:
        self._commands.put(command)

    def _reserve_place(self) -> None:
        """Count one more waiting request, or refuse it if the engine is stopping or the queue full."""
        if self._stopping or self._thread is None:
            raise EngineStopped("the engine is shutting down")
        with self._lock:
            if self._waiting >= self.config.queue_limit:
                raise Overloaded(
                    f"{self._waiting} requests are already waiting (server.queue_limit = {self.config.queue_limit})",
                    retry_after=1.0,
                )
            self._waiting += 1

    def _count_active(self, delta: int) -> None:
        with self._lock:
            self._active += delta

    def _taken(self) -> None:
        with self._lock:
            self._waiting -= 1


__all__ = ["EmbeddingJob", "Engine", "EngineConfig", "EngineStatus", "Job", "EngineError"]
