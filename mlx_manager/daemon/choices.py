"""The answer to a chat or completions request: every choice (n per prompt, several prompts on
/v1/completions), with its log probabilities, whole or streamed as OpenAI sends them.

Chat and completions differ only in how they shape JSON (a `Format`, in routes/chat.py and
routes/completions.py). A stream interleaves the choices' chunks as their tokens come, each
carrying its choice `index`; a token's log probability goes out with the next chunk of its
choice (its text may be held back by a stop string, or be markup that never shows), and any
left at the end with the choice's final chunk. Usage counts each prompt once and every choice's
completion tokens.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from mlx_manager.daemon.generation import (
    Answer,
    AnswerParts,
    GenerationCall,
    Piece,
    ended_by,
    relayed,
    stream_problem,
)
from mlx_manager.daemon.sse import EventStream, sse_data, sse_done, sse_error
from mlx_manager.engine.types import Finished, Logprobs, ReasoningDelta, Started, TextDelta, TokenLogprob, ToolCall


class Format:
    """How one endpoint shapes its JSON; subclasses in routes/chat.py and routes/completions.py.
    `logprobs`: the request asked for log probabilities."""

    def __init__(self, request_id: str, model: str, include_usage: bool, created: int, logprobs: bool = False) -> None:
        self.request_id, self.model, self.include_usage, self.created = request_id, model, include_usage, created
        self.logprobs = logprobs

    def first_chunk(self, index: int) -> dict[str, Any] | None:
        return None

    def piece_chunks(self, index: int, piece: Piece, logprobs: list[TokenLogprob]) -> list[dict[str, Any]]:
        """The chunks that stream one piece of output (text, reasoning or a tool call) of a choice,
        the first carrying `logprobs`."""
        raise NotImplementedError

    def final_chunk(self, index: int, finished: Finished, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        raise NotImplementedError

    def usage_chunk(self, total: Finished) -> dict[str, Any]:
        raise NotImplementedError

    def complete(self, answers: list[Answer], total: Finished) -> Any:
        raise NotImplementedError


def total_of(finished: list[Finished], n: int) -> Finished:
    """The request's figures: each prompt once (its first choice's), every choice's completion."""
    prompts = finished[::n]
    return Finished(
        finished[0].finish_reason,
        sum(f.prompt_tokens for f in prompts),
        sum(f.completion_tokens for f in finished),
        reasoning_tokens=sum(f.reasoning_tokens for f in finished),
        stop_sequence=finished[0].stop_sequence,
        cached_tokens=sum(f.cached_tokens for f in prompts),
    )


async def respond(call: GenerationCall, fmt: Format, stream: bool) -> Any:
    """The answer to a chat or completions request, whole or streamed."""
    streaming = False
    try:
        await call.started()
        if stream:
            streaming = True
            body = relayed(call) if call.relaying else _chunks(call, fmt)  # relayed: an upstream's own stream
            return EventStream(body, on_close=call.close_stream)
        return fmt.complete(*await _collect(call))
    finally:
        if not streaming:
            call.close()


async def _collect(call: GenerationCall) -> tuple[list[Answer], Finished]:
    parts = [AnswerParts() for _ in call.jobs]
    finished: dict[int, Finished] = {}
    while len(finished) < len(parts):
        index, event = await call.next_choice_event()
        if isinstance(event, Finished):
            finished[index] = event
        else:
            call.take(parts[index], event)
    answers = [part.answer(finished[i]) for i, part in enumerate(parts)]
    total = total_of([a.finished for a in answers], call.n)
    call.finished(total)
    return answers, total


async def _chunks(call: GenerationCall, fmt: Format) -> AsyncIterator[str]:
    """The SSE body: the choices' chunks as they come, usage, then [DONE]. An error after the
    first byte is an SSE `error` event with the problem document, and the stream ends."""
    outcome = call.outcome
    pending: list[list[TokenLogprob]] = [[] for _ in call.jobs]  # log probabilities not sent yet
    finished: dict[int, Finished] = {}
    try:
        for index in range(len(call.jobs)):
            first = fmt.first_chunk(index)
            if first is not None:
                yield sse_data(first)
        while len(finished) < len(call.jobs):
            index, event = await call.next_choice_event(watch_client=False)
            if isinstance(event, Started):
                continue
            if isinstance(event, Finished):
                finished[index] = event
                yield sse_data(fmt.final_chunk(index, event, _take(pending[index])))
                continue
            outcome.first_token()
            if isinstance(event, Logprobs):
                pending[index].extend(event.tokens)
                continue
            if isinstance(event, (TextDelta, ReasoningDelta)) and not fmt.logprobs:
                # Deltas that arrived while the last chunk was written go out together.
                event = type(event)(event.text + call.jobs[index].take_ready_text(type(event)))
            if isinstance(event, ToolCall):
                outcome.tool_calls = (outcome.tool_calls or 0) + 1
            for chunk in fmt.piece_chunks(index, event, _take(pending[index])):
                yield sse_data(chunk)
        total = total_of([finished[i] for i in range(len(call.jobs))], call.n)
        call.finished(total)
        await call.acknowledge()  # the outcome is final: its audit row before the last byte
        if fmt.include_usage:
            yield sse_data(fmt.usage_chunk(total))
        yield sse_done()
    except Exception as exc:
        problem = ended_by(call, stream_problem(call, exc))
        await call.acknowledge()
        yield sse_error(problem.document(instance=outcome.endpoint, request_id=outcome.request_id))


def _take(entries: list[TokenLogprob]) -> list[TokenLogprob]:
    taken = list(entries)
    entries.clear()
    return taken
