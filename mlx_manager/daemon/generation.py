"""One engine job seen from HTTP: its deadline, its outcome, and its cancellation on every exit.

Chat and completions differ only in how they shape JSON (a `Format`); everything about running
a job — submit, wait within the deadline, collect or stream, cancel when the client leaves —
is here, once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from starlette.responses import Response

from mlx_manager.daemon.handlers import problem_from_engine
from mlx_manager.daemon.outcome import RequestOutcome
from mlx_manager.daemon.problems import Problem
from mlx_manager.daemon.sse import EventStream, sse_data, sse_error, sse_done
from mlx_manager.daemon.state import DaemonState
from mlx_manager.engine import EngineError, Finished, GenerationRequest, Job, SamplingParams, Started, TextDelta
from mlx_manager.telemetry import generation_span

log = logging.getLogger("mlx_manager.daemon")

T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499  # nginx's code: the client went away before the answer; never seen by it


class Format:
    """How one endpoint shapes its JSON; subclasses in routes/chat.py and routes/completions.py."""

    def __init__(self, request_id: str, model: str, include_usage: bool, created: int) -> None:
        self.request_id, self.model, self.include_usage, self.created = request_id, model, include_usage, created

    def first_chunk(self) -> dict[str, Any] | None:
        return None

    def delta_chunk(self, text: str) -> dict[str, Any]:
        raise NotImplementedError

    def final_chunk(self, finish_reason: str) -> dict[str, Any]:
        raise NotImplementedError

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        raise NotImplementedError

    def complete(self, text: str, finish_reason: str, usage: dict[str, int]) -> Any:
        raise NotImplementedError


def usage_of(finished: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
    }


def sampling_of(body: Any) -> SamplingParams:
    defaults = SamplingParams()
    return SamplingParams(
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        top_p=defaults.top_p if body.top_p is None else body.top_p,
        top_k=defaults.top_k if body.top_k is None else body.top_k,
        min_p=defaults.min_p if body.min_p is None else body.min_p,
        seed=body.seed,
    )


def timeout_problem(endpoint: str, timeout: float) -> Problem:
    """The 504 for a request that outlived `timeouts.<endpoint>`."""
    return Problem(
        "timeout",
        f"the request took longer than timeouts.{endpoint} = {timeout:g} seconds",
        headers={"x-should-retry": "false"},  # a retry would only wait as long again
        timeout_seconds=timeout,
    )


class Generation:
    def __init__(self, daemon: DaemonState, outcome: RequestOutcome, endpoint: str, request: GenerationRequest) -> None:
        # The deadline is fixed at the request's start from the settings of that moment: a
        # reload changes the deadline of later requests, not of this one.
        self.endpoint = endpoint
        self.timeout = daemon.timeout_for(endpoint)
        self.deadline = asyncio.get_running_loop().time() + self.timeout
        self.outcome = outcome
        self.job: Job = daemon.engine.submit(request)  # Overloaded / EngineStopped: at once
        self._events = aiter(self.job)
        self.finish_reason: str | None = None  # "stop"/"length", or why it ended early
        # Ends in close(), which for a stream runs in the stream's own task.
        self.span = generation_span(request.model, endpoint, request.request_id).start()

    async def next_event(self):
        """The job's next event, or Problem("timeout") once the deadline has passed."""
        try:
            async with asyncio.timeout_at(self.deadline):
                return await anext(self._events)
        except TimeoutError:
            self.finish_reason = "timeout"
            self.job.cancel()  # the model must stop computing it, not only the client waiting
            raise timeout_problem(self.endpoint, self.timeout) from None

    async def started(self) -> Started:
        """Wait for the job to be in a batch: queue wait, model load and prompt checks are over."""
        event = await self.next_event()
        if isinstance(event, Started):
            self.outcome.prompt_tokens = event.prompt_tokens
        return event

    async def collect(self) -> tuple[str, Finished]:
        parts: list[str] = []
        while True:
            event = await self.next_event()
            if isinstance(event, TextDelta):
                self.outcome.first_token()
                parts.append(event.text)
            elif isinstance(event, Finished):
                self._finished(event)
                return "".join(parts), event

    def _finished(self, event: Finished) -> None:
        self.finish_reason = event.finish_reason
        self.outcome.prompt_tokens = event.prompt_tokens
        self.outcome.completion_tokens = event.completion_tokens

    def close(self) -> None:
        """Free the job's batch slot if it still holds one (no-op once it finished)."""
        self.job.cancel()
        if self.outcome.completion_tokens is None:
            self.outcome.completion_tokens = self.job.completion_tokens
        if self.outcome.prompt_tokens is None and self.job.prompt_tokens:
            self.outcome.prompt_tokens = self.job.prompt_tokens
        span = self.span
        span.prompt_tokens = self.outcome.prompt_tokens
        span.completion_tokens = self.outcome.completion_tokens
        span.time_to_first_token_ms = self.outcome.time_to_first_token_ms
        span.first_token_at = self.outcome.first_token_at
        span.finish_reason = self.finish_reason or ("cancelled" if self.job.cancelled else "error")
        span.end()


class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; if the client disconnects first, cancel it and raise ClientGone.

    Starlette only notices a disconnect while it streams, so the non-streaming wait watches
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


async def respond(request: Request, generation: Generation, fmt: Format, stream: bool) -> Any:
    outcome = generation.outcome
    try:
        await unless_disconnected(request, generation.started())
        if stream:
            response = EventStream(_events(generation, fmt), on_close=generation.close)
            generation = None  # the stream owns it now and closes it when it ends
            return response
        text, finished = await unless_disconnected(request, generation.collect())
        return fmt.complete(text, finished.finish_reason, usage_of(finished))
    except ClientGone:
        outcome.cancel(nothing_sent=True)
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        if generation is not None:
            generation.close()


async def _events(generation: Generation, fmt: Format) -> AsyncIterator[str]:
    """The SSE body. Errors after the first byte become an `error` event, then the stream ends."""
    outcome = generation.outcome
    ended = False
    try:
        first = fmt.first_chunk()
        if first is not None:
            yield sse_data(first)
        while True:
            event = await generation.next_event()
            if isinstance(event, TextDelta):
                outcome.first_token()
                # Deltas that arrived while the last chunk was written go out together.
                yield sse_data(fmt.delta_chunk(event.text + generation.job.take_ready_text()))
            elif isinstance(event, Finished):
                generation._finished(event)
                yield sse_data(fmt.final_chunk(event.finish_reason))
                if fmt.include_usage:
                    yield sse_data(fmt.usage_chunk(usage_of(event)))
                yield sse_done()
                ended = True
                return
    except Problem as problem:
        ended = True
        yield _error_event(outcome, problem)
    except EngineError as exc:
        ended = True
        yield _error_event(outcome, problem_from_engine(exc))
    except Exception:
        ended = True
        log.exception("stream failed (request_id=%s)", outcome.request_id)
        problem = Problem("internal_error", f"the stream failed; see request_id {outcome.request_id} in the daemon's log")
        yield _error_event(outcome, problem)
    finally:
        generation.close()
        if not ended:  # closed from outside: the client went away
            outcome.cancel()


def _error_event(outcome: RequestOutcome, problem: Problem) -> str:
    outcome.fail(problem.kind)
    return sse_error(problem.document(instance=outcome.endpoint, request_id=outcome.request_id))
