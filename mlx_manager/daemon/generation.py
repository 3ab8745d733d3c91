"""A generation seen from HTTP: run one engine job, answer whole or as server-sent events.

Chat and completions differ only in how they shape JSON (a `Format`); running the job — submit,
wait within the deadline, collect or stream, cancel when the client leaves — is `GenerationCall`
on the shared call path (call.py), and `respond()` answers with it. The other dialects
(daemon/dialects/) answer with `answer()` and their own `Translation` of the stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from mlx_manager.daemon.call import EngineCall
from mlx_manager.daemon.handlers import problem_from_engine
from mlx_manager.daemon.outcome import RequestOutcome
from mlx_manager.daemon.problems import Problem
from mlx_manager.daemon.sse import EventStream, sse_data, sse_done, sse_error
from mlx_manager.daemon.state import DaemonState
from mlx_manager.engine.constraints import ConstraintError, GrammarSpec, grammar_for_response_format
from mlx_manager.engine.errors import EngineError
from mlx_manager.engine.jobs import Job
from mlx_manager.engine.types import (
    Event,
    Finished,
    GenerationRequest,
    ReasoningDelta,
    SamplingParams,
    Started,
    TextDelta,
    ToolCall,
)
from mlx_manager.telemetry import generation_span

log = logging.getLogger("mlx_manager.daemon")


Piece = TextDelta | ReasoningDelta | ToolCall


@dataclass
class Answer:
    """A whole generation: its answer text, its thinking, the tool calls it made, how it ended."""

    finished: Finished
    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


class Format:
    """How one endpoint shapes its JSON; subclasses in routes/chat.py and routes/completions.py."""

    def __init__(self, request_id: str, model: str, include_usage: bool, created: int) -> None:
        self.request_id, self.model, self.include_usage, self.created = request_id, model, include_usage, created

    def first_chunk(self) -> dict[str, Any] | None:
        return None

    def piece_chunks(self, piece: Piece) -> list[dict[str, Any]]:
        """The chunks that stream one piece of output (text, reasoning or a tool call)."""
        raise NotImplementedError

    def final_chunk(self, finished: Finished) -> dict[str, Any]:
        raise NotImplementedError

    def usage_chunk(self, finished: Finished) -> dict[str, Any]:
        raise NotImplementedError

    def complete(self, answer: Answer) -> Any:
        raise NotImplementedError


def constraint_of(body: Any) -> GrammarSpec | None:
    """The grammar a request's `response_format` asks for (None for plain text), or a 400 problem
    that says what cannot be enforced."""
    try:
        return grammar_for_response_format(body.response_format)
    except ConstraintError as exc:
        raise Problem("invalid_request", str(exc), param="response_format") from None


def sampling_of(body: Any) -> SamplingParams:
    defaults = SamplingParams()
    return SamplingParams(
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        top_p=defaults.top_p if body.top_p is None else body.top_p,
        top_k=defaults.top_k if body.top_k is None else body.top_k,
        min_p=defaults.min_p if body.min_p is None else body.min_p,
        seed=body.seed,
    )


class GenerationCall(EngineCall):
    def __init__(self, daemon: DaemonState, request: Request, endpoint: str, job_request: GenerationRequest) -> None:
        self.job: Job = daemon.engine.submit(job_request)  # Overloaded / EngineStopped: at once
        span = generation_span(job_request.model, endpoint, job_request.request_id)
        super().__init__(daemon, request, endpoint, span)
        self.outcome.tools_offered = job_request.tools is not None
        self.outcome.tool_calls = 0
        forced_call = job_request.tools is not None and job_request.tool_choice not in (None, "auto", "none")
        self.outcome.constrained = job_request.constraint is not None or forced_call
        self._events = aiter(self.job)
        self.ended = False  # the answer reached its end: Finished, or an error event in a stream

    async def next_event(self, *, watch_client: bool = True) -> Event:
        return await self.wait(anext(self._events), watch_client=watch_client)

    async def started(self) -> None:
        """Wait for the job to be in a batch: queue wait, model load and prompt checks are over."""
        event = await self.next_event()
        if isinstance(event, Started):
            self.outcome.prompt_tokens = event.prompt_tokens
            self.outcome.grammar_compile_ms = event.grammar_compile_ms

    async def collect(self) -> Answer:
        """The whole answer, once the job finished."""
        text: list[str] = []
        reasoning: list[str] = []
        calls: list[ToolCall] = []
        while True:
            event = await self.next_event()
            if isinstance(event, Started):
                continue
            if not isinstance(event, Finished):
                self.outcome.first_token()
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, ReasoningDelta):
                reasoning.append(event.text)
            elif isinstance(event, ToolCall):
                calls.append(event)
                self.outcome.tool_calls = (self.outcome.tool_calls or 0) + 1
            elif isinstance(event, Finished):
                self.finished(event)
                return Answer(event, "".join(text), "".join(reasoning), calls)

    def finished(self, event: Finished) -> None:
        self.ended = True
        outcome = self.outcome
        outcome.finish_reason = event.finish_reason
        outcome.prompt_tokens = event.prompt_tokens
        outcome.completion_tokens = event.completion_tokens
        outcome.cached_tokens = event.cached_tokens
        outcome.reasoning_tokens = event.reasoning_tokens

    def cancel(self) -> None:
        self.job.cancel()

    def close(self) -> None:
        """Free the job's batch slot if it still holds one; record its figures if it did not finish."""
        self.cancel()
        outcome = self.outcome
        if not self.ended:
            outcome.completion_tokens = self.job.completion_tokens
            outcome.prompt_tokens = outcome.prompt_tokens or self.job.prompt_tokens or None
            outcome.finish_reason = outcome.finish_reason or ("cancelled" if self.job.cancelled else "error")

    async def acknowledge(self) -> None:
        """Before a stream's closing (or failure) events: its outcome is final, and the client
        must not see the end of its answer before the audit row is durable (audit.durability)."""
        await self.daemon.acknowledge(self.outcome, 200)

    def close_stream(self) -> None:
        """The stream's end: a stream cut before its last event was cut by the client."""
        if not self.ended:
            self.outcome.cancel()
        self.close()


class Translation:
    """How one dialect streams a generation, as server-sent event text: its opening, each piece
    of output, its end, and a failure after the first byte. With `keepalive_every` set,
    `keepalive()` goes out whenever the model has been silent that many seconds."""

    keepalive_every: float | None = None

    def opening(self, prompt_tokens: int) -> list[str]:
        return []

    def piece(self, piece: Piece) -> list[str]:
        raise NotImplementedError

    def closing(self, finished: Finished) -> list[str]:
        raise NotImplementedError

    def failure(self, problem: Problem, outcome: RequestOutcome) -> list[str]:
        """The problem as an SSE `error` event (its body in the dialect of the route)."""
        return [sse_error(problem.document(instance=outcome.endpoint or "", request_id=outcome.request_id or ""))]

    def keepalive(self) -> str:
        raise NotImplementedError


class FormatStream(Translation):
    """Chat and completions: a Format's chunks as `data:` lines, then `[DONE]`."""

    def __init__(self, fmt: Format) -> None:
        self.fmt = fmt

    def opening(self, prompt_tokens: int) -> list[str]:
        first = self.fmt.first_chunk()
        return [] if first is None else [sse_data(first)]

    def piece(self, piece: Piece) -> list[str]:
        return [sse_data(chunk) for chunk in self.fmt.piece_chunks(piece)]

    def closing(self, finished: Finished) -> list[str]:
        events = [sse_data(self.fmt.final_chunk(finished))]
        if self.fmt.include_usage:
            events.append(sse_data(self.fmt.usage_chunk(finished)))
        return [*events, sse_done()]


async def respond(call: GenerationCall, fmt: Format, stream: bool) -> Any:
    """The answer to a chat or completions request, whole or streamed."""
    return await answer(call, stream, fmt.complete, FormatStream(fmt))


async def answer(
    call: GenerationCall, stream: bool, complete: Callable[[Answer], Any], translation: Translation
) -> Any:
    """The answer to a generation: `complete(answer)` once it is whole, or an SSE stream of
    `translation`'s events that owns the call."""
    streaming = False
    try:
        await call.started()
        if stream:
            streaming = True
            return EventStream(_events(call, translation), on_close=call.close_stream)
        return complete(await call.collect())
    finally:
        if not streaming:
            call.close()


async def _events(call: GenerationCall, translation: Translation) -> AsyncIterator[str]:
    """The SSE body. Errors after the first byte become the dialect's failure events, then the stream ends."""
    outcome = call.outcome
    pending: asyncio.Future[Event] | None = None
    try:
        for text in translation.opening(outcome.prompt_tokens or 0):
            yield text
        while True:
            if translation.keepalive_every is None:
                event = await call.next_event(watch_client=False)
            else:
                pending = pending or asyncio.ensure_future(call.next_event(watch_client=False))
                done, _ = await asyncio.wait({pending}, timeout=translation.keepalive_every)
                if not done:
                    yield translation.keepalive()
                    continue
                event, pending = pending.result(), None
            if isinstance(event, Started):
                continue
            if not isinstance(event, Finished):
                outcome.first_token()
            if isinstance(event, (TextDelta, ReasoningDelta)):
                # Deltas that arrived while the last chunk was written go out together.
                event = type(event)(event.text + call.job.take_ready_text(type(event)))
            if isinstance(event, ToolCall):
                outcome.tool_calls = (outcome.tool_calls or 0) + 1
            if isinstance(event, Finished):
                call.finished(event)
                await call.acknowledge()
                for text in translation.closing(event):
                    yield text
                return
            for text in translation.piece(event):
                yield text
    except Problem as problem:
        for text in await _failure(call, translation, problem):
            yield text
    except EngineError as exc:
        for text in await _failure(call, translation, problem_from_engine(exc)):
            yield text
    except Exception:
        log.exception("stream failed (request_id=%s)", outcome.request_id)
        detail = f"the stream failed; see request_id {outcome.request_id} in the daemon's log"
        for text in await _failure(call, translation, Problem("internal_error", detail)):
            yield text
    finally:
        if pending is not None:
            pending.cancel()


async def _failure(call: GenerationCall, translation: Translation, problem: Problem) -> list[str]:
    call.ended = True
    call.outcome.fail(problem.kind)
    await call.acknowledge()
    return translation.failure(problem, call.outcome)
