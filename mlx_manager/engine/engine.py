"""The engine's public face: submit jobs from asyncio, get events back, cancel, inspect.

Everything here runs on the caller's (event loop) thread and talks to the one inference
thread (`worker.py`) through a queue of commands; events come back through the jobs, so the
event loop never blocks on MLX.
"""

from __future__ import annotations

import asyncio
import atexit
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from mlx_manager.engine.commands import (
    Cancel,
    ClearCache,
    Command,
    CountTokens,
    Embed,
    Load,
    Reconfigure,
    Stop,
    Submit,
    Unload,
)
from mlx_manager.engine.config import EngineConfig
from mlx_manager.engine.errors import EngineStopped
from mlx_manager.engine.inference_thread import run_on_inference_thread
from mlx_manager.engine.jobs import Admission, EmbeddingJob, Job, Reply
from mlx_manager.engine.types import EmbeddingRequest, EngineStatus, GenerationRequest, ModelStatus
from mlx_manager.engine.worker import Worker


@dataclass(frozen=True)
class StopReport:
    """What `Engine.stop` saw: whether the inference thread came back within the timeout, the
    model whose load it abandoned to stop, and what it was still busy with if it did not."""

    finished: bool = True
    abandoned_load: str | None = None
    still_loading: str | None = None

    def notes(self) -> list[str]:
        """What an operator should hear about this stop, in words; nothing for a plain one."""
        notes = []
        if self.abandoned_load is not None:
            notes.append(f"the load of model {self.abandoned_load!r} was abandoned")
        if not self.finished:
            busy = f"loading model {self.still_loading!r}" if self.still_loading else "busy"
            notes.append(f"the inference thread was still {busy}, so the process exited without waiting for it")
        return notes


class Engine:
    """Owns the inference thread. Thread-safe to call from one asyncio loop."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._admission = Admission(self.config.queue_limit)
        self._done: threading.Event | None = None  # set when the worker's loop has returned
        self._blas: str | None = None
        # Called on the inference thread with (model id, seconds) after each model load.
        self.model_load_listeners: list[Callable[[str, float], None]] = []
        # Called on the inference thread with the exception if the loop itself fails (a bug, not
        # one job's step): the engine has stopped and answered every job and command it had.
        self.failure_listeners: list[Callable[[Exception], None]] = []
        self._worker = Worker(self.config, self._commands, self.model_load_listeners)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._done is not None:
            return
        from mlx_manager.engine import allocator, attention, blas

        self._blas = blas.use(self.config.blas)  # before MLX's first matrix product
        allocator.tune()
        attention.install()
        self._done = run_on_inference_thread(self._serve)
        _started.add(self)

    def stop(self, timeout: float = 10.0) -> StopReport:
        """Fail every job with EngineStopped, abandon a model load at its next step, unload the
        models, and wait up to `timeout` seconds for the inference thread to be done."""
        self._admission.closed = True
        done = self._done
        if done is None:
            return StopReport()
        if not self._worker.stopping.is_set():
            self._worker.stopping.set()
            self._commands.put(Stop())
        finished = done.wait(timeout)
        if finished:
            _started.discard(self)
        pool = self._worker.pool
        return StopReport(finished, pool.abandoned, None if finished else self._worker.snapshot.loading)

    def _serve(self) -> None:
        try:
            self._worker.run()
        except Exception as exc:
            self._over()
            for listener in self.failure_listeners:
                listener(exc)
            raise  # to the inference thread, which logs it
        self._over()

    def _over(self) -> None:
        """The loop is over (a Stop, or a failure): nothing more is admitted or left unanswered."""
        self._admission.closed = True
        self._worker.answer_commands()  # any that came in meanwhile

    def _running(self) -> bool:
        return self._done is not None and not self._admission.closed

    def reconfigure(self, config: EngineConfig) -> None:
        """Apply new limits and allow-list; loaded models over the new limits are unloaded when idle."""
        self.config = config
        self._admission.queue_limit = config.queue_limit
        self._commands.put(Reconfigure(config))

    # -- work ------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> Job:
        """Queue a generation; iterate the job for its events. May raise Overloaded or EngineStopped."""
        self._reserve_place()
        job = Job(request, asyncio.get_running_loop(), self._admission, on_cancel=self._cancel)
        self._commands.put(Submit(job))
        return job

    def submit_choices(self, request: GenerationRequest, n: int) -> list[Job]:
        """Queue `n` generations of one request (its choices): admitted together, their prompt
        read once. May raise Overloaded (for all of them) or EngineStopped."""
        if n == 1:
            return [self.submit(request)]
        self._reserve_place(n)
        loop = asyncio.get_running_loop()
        jobs = [Job(request, loop, self._admission, on_cancel=self._cancel) for _ in range(n)]
        group = tuple(jobs)
        for job in jobs:
            job.group = group
        self._commands.put(Submit(jobs[0]))  # the worker takes the whole group from its first job
        return jobs

    def submit_embedding(self, request: EmbeddingRequest) -> EmbeddingJob:
        """Queue an embedding request; await `job.result()`. May raise Overloaded or EngineStopped."""
        self._reserve_place()
        job = EmbeddingJob(request, asyncio.get_running_loop(), self._admission)
        self._commands.put(Embed(job))
        return job

    async def load(self, model_id: str) -> ModelStatus:
        """Load a model (or touch it if loaded) and return its status.
        Raises ModelNotFound, ModelNotAllowed, ModelLoadFailed, EngineStopped."""
        if self._admission.closed:  # stopped, or its loop failed: nobody would answer (before start: queued)
            raise EngineStopped("the engine is not running")
        reply: Reply[ModelStatus] = Reply(asyncio.get_running_loop())
        self._commands.put(Load(model_id, reply))
        return await reply.future

    async def unload(self, model_id: str, force: bool = False) -> None:
        """Unload a model now. Raises ModelNotLoaded, or ModelBusy while it has jobs unless `force`,
        which ends them with ModelUnloaded first."""
        if self._admission.closed:
            raise EngineStopped("the engine is not running")
        reply: Reply[None] = Reply(asyncio.get_running_loop())
        self._commands.put(Unload(model_id, force, reply))
        await reply.future

    async def count_tokens(self, request: GenerationRequest) -> int:
        """How many tokens `request`'s prompt is (its messages through the chat template, with
        its tools), without generating. Raises what submitting it would (ModelNotFound...)."""
        if not self._running():
            raise EngineStopped("the engine is not running")
        reply: Reply[int] = Reply(asyncio.get_running_loop())
        self._commands.put(CountTokens(request, reply))
        return await reply.future

    async def clear_cache(self) -> int:
        """Forget every loaded model's prompt cache (its disk tier too); how many entries went."""
        if not self._running():
            raise EngineStopped("the engine is not running")
        reply: Reply[int] = Reply(asyncio.get_running_loop())
        self._commands.put(ClearCache(reply))
        return await reply.future

    def _cancel(self, job: Job) -> None:
        self._commands.put(Cancel(job))

    def _reserve_place(self, count: int = 1) -> None:
        """Count `count` more waiting jobs, or raise EngineStopped / Overloaded."""
        if self._done is None:
            raise EngineStopped("the engine is not running")
        self._admission.reserve(count)

    # -- inspection ------------------------------------------------------------------------
    def status(self) -> EngineStatus:
        snapshot = self._worker.snapshot
        return EngineStatus(
            loaded=[m.model_id for m in snapshot.models],
            queue_depth=self._admission.waiting,
            active_jobs=self._admission.active,
            loading=snapshot.loading,
            running=self._running(),
            blas=self._blas,
            models=snapshot.models,
        )

    def known_models(self) -> list[str]:
        """Loaded models first, then the allow-list: what /v1/models shows."""
        seen = dict.fromkeys(m.model_id for m in self._worker.snapshot.models)
        seen.update(dict.fromkeys(self.config.allowed))
        return list(seen)


# Engines started and not yet stopped: those still running when Python exits are stopped first,
# while their threads may still take the GIL (see inference_thread.py for what happens otherwise).
_started: set[Engine] = set()


@atexit.register
def _stop_engines() -> None:
    for engine in list(_started):
        engine.stop()
