"""A generation seen from HTTP: run its engine jobs, answer whole or as server-sent events.

Running the jobs — submit, wait within the deadline, collect or stream, cancel when the client
leaves — is `GenerationCall` on the shared call path (call.py): one job, or for chat and
completions one per choice (n per prompt, several prompts), which `choices.respond()` answers
with. The other dialects (daemon/dialects/) answer one job with `answer()` and their own
`Translation` of the stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from mlx_manager.daemon.call import EngineCall
from mlx_manager.daemon.handlers import problem_for
from mlx_manager.daemon.outcome import RequestOutcome
from mlx_manager.daemon.problems import Problem
from mlx_manager.daemon.sse import EventStream, sse_error
from mlx_manager.daemon.state import DaemonState
from mlx_manager.engine.constraints import ConstraintError, GrammarSpec, grammar_for_response_format
from mlx_manager.engine.errors import EngineError
from mlx_manager.engine.jobs import Job
from mlx_manager.engine.types import (
    Event,
    Finished,
    GenerationRequest,
    Logprobs,
    Penalties,
    ReasoningDelta,
    SamplingParams,
    Started,
    TextDelta,
    TokenLogprob,
    ToolCall,
)
from mlx_manager.routing.errors import RoutingError, not_translatable
from mlx_manager.routing.relay import Relay, RelayEnd
from mlx_manager.routing.router import RoutedJob
from mlx_manager.telemetry import generation_span

log = logging.getLogger("mlx_manager.daemon")


Piece = TextDelta | ReasoningDelta | ToolCall


@dataclass
class Answer:
    """A whole generation: its answer text, its thinking, the tool calls it made, how it ended,
    and the log probabilities of its tokens (when asked for)."""

    finished: Finished
    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class AnswerParts:
    """An answer as its events arrive."""

    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def answer(self, finished: Finished) -> Answer:
        return Answer(finished, "".join(self.text), "".join(self.reasoning), self.tool_calls, self.logprobs)


def constraint_of(body: Any) -> GrammarSpec | None:
    """The grammar a request's `response_format` asks for (None for plain text), or a 400 problem
    that says what cannot be enforced."""
    try:
        return grammar_for_response_format(body.response_format)
    except ConstraintError as exc:
        raise Problem("invalid_request", str(exc), param="response_format") from None


def penalties_of(body: Any) -> Penalties:
    """OpenAI's penalties and logit_bias, and mlx-lm's repetition_penalty, of a chat or completions request."""
    return Penalties(
        frequency=body.frequency_penalty or 0.0,
        presence=body.presence_penalty or 0.0,
        repetition=body.repetition_penalty,
        logit_bias=dict(body.logit_bias or {}),
    )


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
    """The jobs of one request: one (routed: to the local engine, or to an upstream backend), or
    `n` choices for each of several prompts on the local engine (choice `i * n + j` is prompt i's
    j-th, as OpenAI indexes them); `job` is the first."""

    def __init__(
        self,
        daemon: DaemonState,
        request: Request,
        endpoint: str,
        job_request: GenerationRequest | Sequence[GenerationRequest],
        n: int = 1,
        relay: Relay | None = None,
    ) -> None:
        requests = [job_request] if isinstance(job_request, GenerationRequest) else list(job_request)
        first = requests[0]
        self.jobs: list[RoutedJob | Job] = []
        if len(requests) == 1 and n == 1:
            # The one place a generation is routed. A whole (not streamed) answer from an upstream
            # is held until complete, so that another backend can still take over if it fails.
            whole = not request.scope["mlx_manager.outcome"].stream
            self.jobs.append(daemon.router.submit(first, hold=whole, relay=None if whole else relay))
        else:
            if not daemon.router.is_local(first.model):  # one request upstream per request, not several
                backend = daemon.router.first_choice(first.model).name
                raise not_translatable(
                    backend, "n" if n > 1 else "prompt", "several choices or prompts are made by the local engine only"
                )
            try:
                for each in requests:  # Overloaded / EngineStopped: at once
                    self.jobs += daemon.engine.submit_choices(each, n)
            except BaseException:
                for job in self.jobs:
                    job.cancel()
                raise
        self.job = self.jobs[0]
        self.n = n
        span = generation_span(first.model, endpoint, first.request_id)
        super().__init__(daemon, request, endpoint, span)
        self.outcome.tools_offered = first.tools is not None
        self.outcome.tool_calls = 0
        forced_call = first.tools is not None and first.tool_choice not in (None, "auto", "none")
        self.outcome.constrained = first.constraint is not None or forced_call
        self._events = aiter(self.job)
        self._streams = [self._events, *(aiter(job) for job in self.jobs[1:])]
        self._waiting: dict[int, asyncio.Future[Event]] = {}  # choice -> its next event, being awaited
        self._over: set[int] = set()  # choices that finished
        self.ended = False  # the answer reached its end: Finished, or an error event in a stream

    async def next_event(self, *, watch_client: bool = True) -> Event:
        return await self.wait(anext(self._events), watch_client=watch_client)

    async def next_choice_event(self, *, watch_client: bool = True) -> tuple[int, Event]:
        """The next event of any choice still running, and its choice index (the lowest of those ready)."""
        if len(self._streams) == 1:
            return 0, await self.next_event(watch_client=watch_client)
        for index, stream in enumerate(self._streams):
            if index not in self._waiting and index not in self._over:
                self._waiting[index] = asyncio.ensure_future(anext(stream))
        waits = set(self._waiting.values())
        await self.wait(asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED), watch_client=watch_client)
        index = min(i for i, future in self._waiting.items() if future.done())
        event = self._waiting.pop(index).result()  # the job's error, if it failed
        if isinstance(event, Finished):
            self._over.add(index)
        return index, event

    @property
    def relaying(self) -> bool:
        """Whether the answer is an upstream's stream relayed as it is (routing/relay.py): once started."""
        return isinstance(self.job, RoutedJob) and self.job.relaying

    async def started(self) -> None:
        """Wait for every job to be in a batch: queue wait, model load and prompt checks are over."""
        prompt_tokens = 0
        for index, stream in enumerate(self._streams):
            event = await self.wait(anext(stream))
            if isinstance(event, Started):
                if index % self.n == 0:  # the choices of one prompt count it once
                    prompt_tokens += event.prompt_tokens
                self.outcome.prompt_tokens = prompt_tokens
                self.outcome.grammar_compile_ms = event.grammar_compile_ms
        self.served_by()

    async def collect(self) -> Answer:
        """The whole answer, once the job finished."""
        parts = AnswerParts()
        while True:
            event = await self.next_event()
            if isinstance(event, Finished):
                self.finished(event)
                return parts.answer(event)
            self.take(parts, event)

    def take(self, parts: AnswerParts, event: Event) -> None:
        """Add one event (not Finished) to an answer being collected."""
        if isinstance(event, Started):
            return
        self.outcome.first_token()
        if isinstance(event, TextDelta):
            parts.text.append(event.text)
        elif isinstance(event, ReasoningDelta):
            parts.reasoning.append(event.text)
        elif isinstance(event, ToolCall):
            parts.tool_calls.append(event)
            self.outcome.tool_calls = (self.outcome.tool_calls or 0) + 1
        elif isinstance(event, Logprobs):
            parts.logprobs.extend(event.tokens)

    def finished(self, event: Finished) -> None:
        self.ended = True
        self.served_by()
        outcome = self.outcome
        outcome.finish_reason = event.finish_reason
        outcome.prompt_tokens = event.prompt_tokens
        outcome.completion_tokens = event.completion_tokens
        outcome.cached_tokens = event.cached_tokens
        outcome.reasoning_tokens = event.reasoning_tokens

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    def served_by(self) -> None:
        """Name the backend that took the request (for the response header, the audit row, the
        metrics and the span), with the tokens an upstream reported."""
        outcome, job = self.outcome, self.job
        if not isinstance(job, RoutedJob):  # several choices: the local engine's own jobs
            outcome.backend, outcome.backend_type = "local", "local"
            return
        outcome.backend, outcome.backend_type = job.backend.name, job.backend.type  # type: ignore[assignment]
        outcome.fallbacks = len(job.failures)
        if job.upstream_usage is not None:
            outcome.upstream_prompt_tokens, outcome.upstream_completion_tokens = job.upstream_usage

    def close(self) -> None:
        """Free the jobs' batch slots if they still hold some; record their figures if they did not finish."""
        super().close()
        self.cancel()
        self.served_by()
        for future in self._waiting.values():
            future.cancel()
        self._waiting.clear()
        outcome = self.outcome
        if not self.ended:
            outcome.completion_tokens = sum(job.completion_tokens for job in self.jobs)
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
            return EventStream(_body(call, translation), on_close=call.close_stream)
        return complete(await call.collect())
    finally:
        if not streaming:
            call.close()


def _body(call: GenerationCall, translation: Translation) -> AsyncIterator[str] | AsyncIterator[bytes]:
    """The SSE body: the translation's events, or the upstream's own relayed (with the
    translation's keepalive when the upstream is silent, as a translated stream has it)."""
    if not call.relaying:
        return _events(call, translation)
    if translation.keepalive_every is None:
        return relayed(call)
    return with_keepalive(relayed(call), translation.keepalive_every, translation.keepalive().encode())


async def with_keepalive(body: AsyncIterator[bytes], every: float, keepalive: bytes) -> AsyncIterator[bytes]:
    """`body`, and `keepalive` whenever it has said nothing for `every` seconds (between its
    items, which are whole events)."""
    pending: asyncio.Future[bytes] | None = None
    try:
        while True:
            pending = pending or asyncio.ensure_future(anext(body))
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                yield keepalive
                continue
            future, pending = pending, None
            try:
                item = future.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:  # the client left: stop the body where it waits, then close it
            pending.cancel()
            await asyncio.wait({pending})
        await body.aclose()  # type: ignore[attr-defined]  # an async generator


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
            if isinstance(event, (Started, Logprobs)):  # a dialect without log probabilities never asks
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
    except (EngineError, RoutingError) as exc:
        for text in await _failure(call, translation, problem_for(exc)):
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
    problem = ended_by(call, problem)
    await call.acknowledge()  # the stream's outcome is final: its audit row before its last byte
    return translation.failure(problem, call.outcome)


async def relayed(call: GenerationCall) -> AsyncIterator[bytes]:
    """The SSE body of an upstream's stream relayed as it is (routing/relay.py): its bytes as they
    come, then, once the outcome is final, its last events (chat: the usage chunk and [DONE];
    Messages: message_delta and message_stop). An error after the first byte is the SSE error
    event, as on the other paths."""
    outcome = call.outcome
    assert isinstance(call.job, RoutedJob)
    blocks = call.job.relayed()
    try:
        outcome.first_token()  # the first block holds the answer's first piece
        while True:
            item = await call.wait(anext(blocks), watch_client=False)
            if not isinstance(item, RelayEnd):
                yield item
                continue
            call.finished(item.finished)
            outcome.tool_calls = item.tool_calls
            await call.acknowledge()  # the audit row before the last byte
            yield item.tail
            return
    except Exception as exc:
        problem = ended_by(call, stream_problem(call, exc))
        await call.acknowledge()
        yield sse_error(problem.document(instance=outcome.endpoint, request_id=outcome.request_id)).encode()


def ended_by(call: GenerationCall, problem: Problem) -> Problem:
    """A stream that fails after its first byte: the outcome records the problem, which the caller sends."""
    call.ended = True
    call.outcome.fail(problem.kind)
    return problem


def stream_problem(call: GenerationCall, exc: Exception) -> Problem:
    """The problem to send for an error in the middle of a stream."""
    if isinstance(exc, Problem):
        return exc
    if isinstance(exc, (EngineError, RoutingError)):
        return problem_for(exc)
    log.error("stream failed (request_id=%s)", call.outcome.request_id, exc_info=exc)
    return Problem("internal_error", f"the stream failed; see request_id {call.outcome.request_id} in the daemon's log")
