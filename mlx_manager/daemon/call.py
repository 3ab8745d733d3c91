"""One request's work in the engine, seen from HTTP: the path every endpoint shares.

An `EngineCall` fixes the request's deadline at its start (`timeouts.<endpoint>` of that
moment: a reload changes later requests, not this one), waits for the engine within it,
notices a client that went away, cancels the engine's work on every exit, and writes what
happened into the request's outcome (`RequestOutcome`), from which the span, the metrics and
the audit row are fed. Every generating endpoint uses `GenerationCall` (generation.py),
embeddings `EmbeddingCall`, Anthropic's count_tokens `TokenCountCall`.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import Request

from mlx_manager.daemon.outcome import RequestOutcome
from mlx_manager.daemon.problems import Problem
from mlx_manager.daemon.state import DaemonState
from mlx_manager.engine.jobs import EmbeddingJob
from mlx_manager.engine.types import EmbeddingRequest, EmbeddingResult, GenerationRequest
from mlx_manager.telemetry import EngineSpan, embedding_span, token_count_span

T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499  # nginx's code: the client went away before the answer; never seen by it


class ClientGone(Exception):
    """The client closed the connection before the answer was ready (answered with a bare 499)."""


def timeout_problem(endpoint: str, timeout: float) -> Problem:
    """The 504 for a request that outlived `timeouts.<endpoint>`."""
    return Problem(
        "timeout",
        f"the request took longer than timeouts.{endpoint} = {timeout:g} seconds",
        headers={"x-should-retry": "false"},  # a retry would only wait as long again
        timeout_seconds=timeout,
    )


class EngineCall:
    """The deadline, disconnect and cancellation of one request's engine work; see the module doc."""

    def __init__(self, daemon: DaemonState, request: Request, endpoint: str, span: EngineSpan) -> None:
        self.daemon = daemon
        self.request = request
        self.outcome: RequestOutcome = request.scope["mlx_manager.outcome"]
        self.endpoint = endpoint  # the timeouts.<endpoint> key: "chat", "messages", "embeddings"...
        self.timeout = daemon.timeout_for(endpoint)
        self.deadline = asyncio.get_running_loop().time() + self.timeout
        self.outcome.span = span.start()  # ended by the span sink once the response is over
        self._deadline: Deadline | None = None  # a stream's waits share one timer

    async def wait(self, work: Awaitable[T], *, watch_client: bool = True) -> T:
        """`work`'s result within the deadline. A timeout cancels the engine's work and raises the
        504 problem; with `watch_client`, a client that leaves first cancels it and raises
        ClientGone (a stream needs no watching: the server stops it when the client goes)."""
        try:
            if watch_client:
                async with asyncio.timeout_at(self.deadline):
                    return await unless_disconnected(self.request, work)
            if self._deadline is None:
                self._deadline = Deadline(self.deadline)
            return await self._deadline.within(work)
        except TimeoutError:
            self.outcome.finish_reason = "timeout"
            self.cancel()  # the model must stop computing it, not only the client waiting
            raise timeout_problem(self.endpoint, self.timeout) from None
        except ClientGone:  # answered with a bare 499 by the exception handler
            self.outcome.cancel(nothing_sent=True)
            self.outcome.finish_reason = "cancelled"
            self.cancel()
            raise

    def cancel(self) -> None:
        """Stop the engine's work for this request (a no-op once it finished)."""
        raise NotImplementedError

    def close(self) -> None:
        """The request is over: free what the engine still holds and record the final figures."""
        if self._deadline is not None:
            self._deadline.stop()


class Deadline:
    """What `asyncio.timeout_at(deadline)` does for each wait of a stream, on one timer for them
    all: the wait in progress when it fires is cancelled and raises TimeoutError. A stream waits
    once a chunk, and a timeout made and ended for each costs ~12 us (measured on uvloop); a
    wait that starts past the deadline is left to asyncio.timeout_at."""

    def __init__(self, when: float) -> None:
        self.when = when
        self._timer: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Task[Any] | None = None  # the task waiting now
        self._expired = False  # the timer fired (and cancelled the waiter, if there was one)

    async def within(self, work: Awaitable[T]) -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        if self._expired or task is None or loop.time() >= self.when:
            async with asyncio.timeout_at(self.when):
                return await work
        if self._timer is None:  # the timer holds no reference to the call: a call never closed goes
            self._timer = loop.call_at(self.when, _expire, weakref.ref(self))
        cancelling = task.cancelling()
        self._waiter = task
        try:
            result = await work
        except asyncio.CancelledError:
            if self._expired and task.uncancel() <= cancelling:
                raise TimeoutError from None
            raise
        finally:
            self._waiter = None
        if self._expired:  # it fired as the work ended: the cancellation is ours, as asyncio's Timeout
            task.uncancel()
        return result

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def fire(self) -> None:
        self._timer = None
        if self._waiter is not None and not self._expired:
            self._expired = True
            self._waiter.cancel()


def _expire(deadline: weakref.ref[Deadline]) -> None:
    target = deadline()
    if target is not None:
        target.fire()


class EmbeddingCall(EngineCall):
    def __init__(self, daemon: DaemonState, request: Request, job_request: EmbeddingRequest) -> None:
        self.job: EmbeddingJob = daemon.engine.submit_embedding(job_request)  # Overloaded / EngineStopped: at once
        super().__init__(daemon, request, "embeddings", embedding_span(job_request.model, job_request.request_id))

    async def result(self) -> EmbeddingResult:
        """The vectors, within the deadline; raises ClientGone, the timeout problem or an EngineError."""
        try:
            result = await self.wait(self.job.result())
            self.outcome.finish_reason = "stop"
            return result
        finally:
            self.close()

    def cancel(self) -> None:
        self.job.cancel()

    def close(self) -> None:
        super().close()
        self.cancel()
        self.outcome.prompt_tokens = self.job.prompt_tokens or None
        self.outcome.completion_tokens = 0
        self.outcome.finish_reason = self.outcome.finish_reason or "error"


class TokenCountCall(EngineCall):
    """How many tokens a generation's prompt is, without generating it."""

    def __init__(self, daemon: DaemonState, request: Request, endpoint: str, job_request: GenerationRequest) -> None:
        if not daemon.router.is_local(job_request.model):
            raise Problem(
                "not_supported",
                f"model {job_request.model!r} is routed to another backend, whose prompt"
                " tokens this server cannot count",
                param="model",
            )
        self.engine = daemon.engine
        self.job_request = job_request
        span = token_count_span(job_request.model, endpoint, job_request.request_id)
        super().__init__(daemon, request, endpoint, span)

    async def count(self) -> int:
        """The count, within the deadline; raises ClientGone, the timeout problem or an EngineError."""
        try:
            tokens = await self.wait(self.engine.count_tokens(self.job_request))
            self.outcome.prompt_tokens, self.outcome.completion_tokens = tokens, 0
            self.outcome.finish_reason = "stop"
            return tokens
        finally:
            self.close()

    def cancel(self) -> None:
        """Nothing to stop: the count is one template call on the inference thread, or waits for
        a model load that other requests may share; the awaiting coroutine is already cancelled."""

    def close(self) -> None:
        super().close()
        self.outcome.finish_reason = self.outcome.finish_reason or "error"


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; if the client disconnects first, cancel it and raise ClientGone.

    Starlette only notices a disconnect while it streams, so a non-streaming wait watches
    the connection itself."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        raise ClientGone
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
