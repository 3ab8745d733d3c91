"""Submitted work as both threads see it: a generation `Job`, an `EmbeddingJob`, and the
`Admission` counters they report to.

The event loop creates a job and awaits it; the inference thread fills it (`emit`, `settle`)
and moves it through its phases. Each phase change is reported to the shared `Admission`, so
the queue limit and `status()` see the same numbers without either thread asking the other.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar, cast

from mlx_manager.engine.errors import EngineStopped, Overloaded
from mlx_manager.engine.types import (
    EmbeddingRequest,
    EmbeddingResult,
    Event,
    Finished,
    GenerationRequest,
    ReasoningDelta,
    Started,
    TextDelta,
)

T = TypeVar("T")


class Admission:
    """How many jobs wait for the inference thread and how many run on it; refuses new ones past
    `queue_limit` or once closed. Thread-safe: the loop reserves, the inference thread reports."""

    def __init__(self, queue_limit: int) -> None:
        self.queue_limit = queue_limit
        self.waiting = 0  # submitted, not yet taken into a batch
        self.active = 0  # started, not yet finished
        self.closed = False
        self._lock = threading.Lock()

    def reserve(self, count: int = 1) -> None:
        """Count `count` more waiting jobs (all or none), or raise EngineStopped / Overloaded."""
        if self.closed:
            raise EngineStopped("the engine is shutting down")
        with self._lock:
            if self.waiting + count > self.queue_limit:
                raise Overloaded(
                    f"{self.waiting} requests are already waiting (server.queue_limit = {self.queue_limit})",
                    retry_after=1.0,
                )
            self.waiting += count

    def _move(self, waiting: int, active: int) -> None:
        with self._lock:
            self.waiting += waiting
            self.active += active


class _Work:
    """The phases every job goes through: queued -> (taken ->) running -> done."""

    QUEUED, TAKEN, RUNNING, DONE = range(4)

    def __init__(self, admission: Admission, loop: asyncio.AbstractEventLoop) -> None:
        self._admission = admission
        self._loop = loop
        self._phase = self.QUEUED
        self.cancelled = False
        self.submitted_at = time.perf_counter()
        self.stopped_at: float | None = None  # perf_counter() when the engine let go of it

    @property
    def done(self) -> bool:
        return self._phase == self.DONE

    def take(self) -> None:
        """Out of the waiting line: into a batch (the inference thread), or cancelled while it
        waited (the caller's thread: a job nobody waits for leaves `queue_depth` at once)."""
        with self._admission._lock:  # both threads may take it; it leaves the line once
            if self._phase == self.QUEUED:
                self._phase = self.TAKEN
                self._admission.waiting -= 1

    # Called from the inference thread only.
    def begin(self) -> None:
        """Running: counts as active until it ends."""
        self.take()
        if self._phase == self.TAKEN:
            self._phase = self.RUNNING
            self._admission._move(0, +1)

    def end(self) -> None:
        """The engine let go of it (finished, failed or cancelled); later calls do nothing."""
        if self._phase == self.DONE:
            return
        self.take()
        if self._phase == self.RUNNING:
            self._admission._move(0, -1)
        self._phase = self.DONE
        self.stopped_at = time.perf_counter()

    def _call_soon(self, callback: Callable[[], Any]) -> None:
        try:
            self._loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            pass


class Job(_Work):
    """One submitted generation. Iterate it for events; cancel it when the caller gives up."""

    def __init__(
        self,
        request: GenerationRequest,
        loop: asyncio.AbstractEventLoop,
        admission: Admission,
        on_cancel: Callable[[Job], None],
    ) -> None:
        super().__init__(admission, loop)
        self.request = request
        self.completion_tokens = 0  # written by the inference thread
        self.prompt_tokens = 0
        # The choices of one request (n > 1), this one among them, in order: the worker admits
        # them together and reads their prompt once. None for a job of its own.
        self.group: tuple[Job, ...] | None = None
        self._on_cancel = on_cancel
        # The inference thread appends; the loop drains. One wake-up per batch of events,
        # not per token, keeps the event loop from fighting the inference thread for the GIL.
        self._events: deque[Event | BaseException] = deque()
        self._ready = asyncio.Event()
        self._wake_pending = False

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

    def take_ready_text(self, kind: type[TextDelta | ReasoningDelta] = TextDelta) -> str:
        """The text of the deltas of `kind` already waiting, taken at once (up to the next other event).

        A consumer that fell behind the model sends what piled up as one piece instead of one
        message per token."""
        parts = []
        while self._events and type(self._events[0]) is kind:
            item = self._events.popleft()
            assert isinstance(item, (TextDelta, ReasoningDelta))
            parts.append(item.text)
        return "".join(parts)

    def cancel(self) -> None:
        """Stop generating for this job: a waiting one leaves the line now, a running one is
        dropped by the inference thread within one step (a decode step or a prompt chunk)."""
        if self.done or self.cancelled:
            return
        self.cancelled = True
        self.take()
        self._on_cancel(self)

    # Called from the inference thread only.
    def emit(self, item: Event | BaseException) -> None:
        """Hand the caller an event; Started marks the job running, Finished or an error ends it."""
        if isinstance(item, Started):
            self.begin()
        elif isinstance(item, (Finished, BaseException)):
            self.end()
        self._events.append(item)
        if not self._wake_pending:
            self._wake_pending = True
            self._call_soon(self._ready.set)


class Reply(Generic[T]):
    """An answer the inference thread gives to a coroutine waiting on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.future: asyncio.Future[T] = loop.create_future()

    def settle(self, result: T | None = None, error: BaseException | None = None) -> None:
        """From the inference thread: the result, or the error to raise in the waiting coroutine."""

        def deliver(future: asyncio.Future[T]) -> None:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(cast(T, result))

        self._deliver(deliver)

    def drop(self) -> None:
        """From the inference thread: no answer will come (the work was dropped after a cancel)."""
        self._deliver(lambda future: future.cancel())

    def _deliver(self, action: Callable[[asyncio.Future[T]], Any]) -> None:
        def deliver() -> None:
            if not self.future.done():
                action(self.future)

        try:
            self._loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            pass


class EmbeddingJob(_Work):
    """One submitted embedding request. Await `result()`; cancel it when the caller gives up.

    It counts as waiting until its first batch runs, then as active until it ends. The
    inference thread keeps its working state (tokens, progress, vectors) in `work`."""

    def __init__(self, request: EmbeddingRequest, loop: asyncio.AbstractEventLoop, admission: Admission) -> None:
        super().__init__(admission, loop)
        self.request = request
        self.prompt_tokens = 0
        self.work: Any = None  # the embedding queue's per-job state, on the inference thread
        self._reply: Reply[EmbeddingResult] = Reply(loop)

    async def result(self) -> EmbeddingResult:
        """The vectors; raises the EngineError that stopped the job. Cancelling the caller cancels the job."""
        try:
            return await self._reply.future
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Stop computing this job: a waiting one leaves the line now; the inference thread
        drops it before its next batch."""
        if not self.done:
            self.cancelled = True
            self.take()

    # Called from the inference thread only.
    def settle(self, result: EmbeddingResult | None = None, error: BaseException | None = None) -> None:
        """Hand the caller its result or error (neither: it was dropped after a cancel); ends the job."""
        if self.done:
            return
        self.end()
        if result is None and error is None:
            self._reply.drop()
        else:
            self._reply.settle(result, error)
