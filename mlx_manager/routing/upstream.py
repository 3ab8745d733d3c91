"""`UpstreamJob`: one generation on an upstream backend, seen as an engine job.

A task sends the request (always streamed) on the backend's shared client and decodes the answer
into the engine's events as they arrive; the daemon iterates the job as it iterates the engine's,
so deadlines, disconnects, cancellation and outcomes are the same for both. Cancelling the job
closes the upstream connection, which is how the upstream learns to stop generating.
With `hold`, the events wait until the answer is whole (a non-streamed request): until then the
job may fail and another backend start over, and nothing was lost. With a `Relay` (a streamed
request to a backend of its own dialect: chat to `openai`, Messages to `anthropic`), the answer
after `Started` is the upstream's own bytes, rewritten where they must be (relay.py,
message_relay.py), read with `relayed()`. A chunked body (chunked.py) is then read on in the
caller's task, by `relayed()` itself: the task's reading ends once the answer is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass

import httpx

from mlx_manager.engine.types import Event, Finished, GenerationRequest, ReasoningDelta, Started, TextDelta
from mlx_manager.routing import anthropic_wire, openai_wire
from mlx_manager.routing.backend import Backend
from mlx_manager.routing.chunked import ChunkedBody
from mlx_manager.routing.errors import RoutingError
from mlx_manager.routing.message_relay import MessageRelay
from mlx_manager.routing.relay import ChunkRelay, EventRelay, Relay, RelayEnd
from mlx_manager.routing.sse import server_events
from mlx_manager.routing.wire import StreamDecoder, status_error

log = logging.getLogger("mlx_manager.routing")

ERROR_BODY_LIMIT = 64 * 1024  # bytes of an error answer read for its type; the rest is dropped
DRAIN_SECONDS = 1.0  # how long the end of a response is waited for after the answer's end


@dataclass(frozen=True)
class _Handover:
    """A relayed body whose reading the reader left to `relayed()`, and how it tells it the end."""

    body: ChunkedBody
    relay: EventRelay
    done: asyncio.Future[None]


class UpstreamJob:
    """Iterate it for events (the first is Started, the last Finished); cancel it when the caller gives up."""

    def __init__(
        self, backend: Backend, request: GenerationRequest, model: str, *, hold: bool, relay: Relay | None = None
    ) -> None:
        wire = anthropic_wire if backend.type == "anthropic" else openai_wire
        # A request the backend's dialect cannot say is refused here, before anything is sent.
        self.path, self.body = wire.request_body(request, model, backend.name)
        self.relay: EventRelay | None = None
        # Relayed as it is: a stream (not held) to a backend that speaks the client's dialect.
        same = relay if relay is not None and not hold and relay.dialect == backend.type else None
        if backend.type == "anthropic":
            events = anthropic_wire.EventDecoder(backend.name)
            self.decoder: StreamDecoder = events
            if same is not None:
                self.relay = MessageRelay(same, events)
        else:
            chunks = openai_wire.ChunkDecoder(backend.name)
            self.decoder = chunks
            if same is not None and self.path == "/chat/completions":
                self.relay = ChunkRelay(same, chunks)
        self.backend = backend
        self.request = request
        self.model = model
        self.hold = hold
        self.cancelled = False
        self.finished = False  # the answer is whole (what may follow is the end of the HTTP response)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._events: deque[Event | bytes | RelayEnd | BaseException] = deque()
        self._ready = asyncio.Event()
        self._handover: _Handover | None = None  # the relayed body, read on by `relayed()`
        backend.outstanding += 1
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._task.add_done_callback(lambda _: backend.ended())

    @property
    def upstream_usage(self) -> tuple[int, int] | None:
        """(prompt, completion) tokens as the upstream reported them; None if it did not (yet)."""
        return self.decoder.upstream_usage

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _next(self) -> Event | bytes | RelayEnd:
        """The next item the reader queued (raised, if it is an error)."""
        while not self._events:
            self._ready.clear()
            await self._ready.wait()
        item = self._events.popleft()
        if isinstance(item, BaseException):
            raise item
        return item

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            item = await self._next()
            assert not isinstance(item, (bytes, RelayEnd)), "a relayed answer is read with relayed()"
            yield item
            if isinstance(item, Finished):
                return

    async def relayed(self) -> AsyncIterator[bytes | RelayEnd]:
        """After `Started`, a relayed answer: the bytes waiting (joined), then its end. Once the
        reader handed the body over (`_hand_over`), it is read here, in the caller's task."""
        try:
            while True:
                while not self._events and self._handover is not None:
                    await self._read_on(self._handover)
                item = await self._next()
                if isinstance(item, RelayEnd):
                    yield item
                    return
                assert isinstance(item, bytes)
                while self._events and isinstance(self._events[0], bytes):
                    item += self._events.popleft()  # type: ignore[operator]  # checked: bytes
                yield item
        finally:
            if self._handover is not None:  # left before the end: the connection is closed
                self._handover = None
                self.cancel()

    async def _read_on(self, handover: _Handover) -> None:
        """Read the handed-over body's next bytes and queue what they make relayable. Its end (or
        an error) goes back to the reader: it finishes the response, or fails the job."""
        try:
            data = await handover.body.read()
            ended = self._relay_step(*(handover.relay.feed(data) if data else handover.relay.end()), [])
        except Exception as exc:
            self._handover = None
            if handover.done.done():  # the reader is gone already (cancelled): nobody else says it
                raise
            handover.done.set_exception(exc)  # the reader fails the job as if it had read it
            return
        if ended or not data:
            self.finished = self.finished or ended
            self._handover = None
            if not handover.done.done():
                handover.done.set_result(None)

    def take_ready_text(self, kind: type[TextDelta | ReasoningDelta] = TextDelta) -> str:
        """The text of the deltas of `kind` already waiting, taken at once (as `Job.take_ready_text`)."""
        parts = []
        while self._events and type(self._events[0]) is kind:
            item = self._events.popleft()
            assert isinstance(item, (TextDelta, ReasoningDelta))
            parts.append(item.text)
        return "".join(parts)

    def cancel(self) -> None:
        """Stop: the upstream connection is closed, so the upstream stops generating too. Once the
        answer is whole there is nothing to stop: the end of the response is read, so that the
        connection goes back to the pool."""
        if not self._task.done() and not self.finished and not self.cancelled:  # once: a second
            # cancel could cut the closing of the connection short, and the upstream would go on
            self.cancelled = True
            self._task.cancel()

    def _push(self, items: Sequence[Event | bytes | RelayEnd | BaseException]) -> None:
        self._events.extend(items)
        self._ready.set()

    async def _run(self) -> None:
        backend = self.backend
        assert backend.client is not None
        held: list[Event | BaseException] = []
        try:
            headers = {"x-request-id": self.request.request_id} if self.request.request_id else None
            async with backend.client.stream("POST", self.path, json=self.body, headers=headers) as response:
                if response.status_code >= 400:
                    body = await _bounded(response)
                    raise status_error(
                        backend.name, response.status_code, body, response.headers.get("retry-after"), self.model
                    )
                if self.relay is not None:
                    await self._relay(response, self.relay)
                else:
                    events = server_events(response.aiter_lines())
                    async for event in events:
                        if self._deliver(self.decoder.decode(event), held):
                            self.finished = True
                            break
                    if self.finished:
                        await _drain(anext(events, None))
                    else:
                        self._deliver(self.decoder.end(), held)
            backend.succeeded()
        except RoutingError as exc:
            self._fail(exc, held)
        except httpx.TimeoutException as exc:
            connecting = isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout)
            setting = "routing.connect_timeout" if connecting else "routing.read_timeout"
            what = "accept the connection" if connecting else "answer"
            detail = f"backend {backend.name!r} did not {what} in time ({setting})"
            self._fail(RoutingError("upstream_timeout", detail, backend=backend.name, retryable=True), held)
        except httpx.ConnectError:
            detail = f"backend {backend.name!r} cannot be reached"
            self._fail(RoutingError("upstream_unreachable", detail, backend=backend.name, retryable=True), held)
        except httpx.HTTPError:
            detail = f"the connection to backend {backend.name!r} broke"
            self._fail(RoutingError("upstream_error", detail, backend=backend.name, retryable=True), held)
        except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, or not its dialect's shape
            detail = f"backend {backend.name!r} sent a stream that cannot be read"
            self._fail(RoutingError("upstream_error", detail, backend=backend.name, retryable=True), held)
        except Exception:  # a bug of ours: the caller must not wait forever
            log.exception("request to backend %s failed (request_id=%s)", backend.name, self.request.request_id)
            self._push(
                [
                    RoutingError(
                        "upstream_error", f"the request to backend {backend.name!r} failed", backend=backend.name
                    )
                ]
            )

    async def _relay(self, response: httpx.Response, relay: EventRelay) -> None:
        """Relay the answer's bytes as they arrive; until its first piece they are held, so that
        another backend may still take over."""
        pending: list[bytes] = []
        body = ChunkedBody.of(response)
        if body is None:  # not a body chunked.py reads: through httpx
            blocks = response.aiter_bytes()
            async for data in blocks:
                if self._relay_step(*relay.feed(data), pending):
                    self.finished = True
                    await _drain(anext(blocks, None))
                    return
            self.finished = self._relay_step(*relay.end(), pending)
            return
        while data := await body.read():
            if self._relay_step(*relay.feed(data), pending):
                self.finished = True
                break
            if self.decoder.started:  # the answer is the client's now: its reader reads on
                await self._hand_over(body, relay)
                break
        else:
            self.finished = self._relay_step(*relay.end(), pending)
        await _drain(body.finish())

    async def _hand_over(self, body: ChunkedBody, relay: EventRelay) -> None:
        """Leave the body's reading to `relayed()`, in the task that sends what it reads: one
        task woken per chunk instead of two. Returns once it read the body to its end; raises
        what its reading raised; the job is cancelled if it stopped reading before the end."""
        self._handover = _Handover(body, relay, asyncio.get_running_loop().create_future())
        self._ready.set()
        await self._handover.done

    def _relay_step(self, out: list[bytes], events: list[Event], pending: list[bytes]) -> bool:
        """Hand on what one read made relayable; True once the answer ended."""
        pending += out
        if not self.decoder.started:
            return False
        items: list[Event | bytes | RelayEnd | BaseException] = [e for e in events if isinstance(e, Started)]
        if pending:
            items.append(b"".join(pending))
            pending.clear()
        finished = next((e for e in events if isinstance(e, Finished)), None)
        if finished is not None:
            self.prompt_tokens, self.completion_tokens = finished.prompt_tokens, finished.completion_tokens
            assert self.relay is not None
            items.append(RelayEnd(finished, self.decoder.calls, self.relay.ending()))
        if items:
            self._push(items)
        return finished is not None

    def _deliver(self, events: list[Event], held: list[Event | BaseException]) -> bool:
        """Hand events on (or hold them until the answer is whole); True once Finished came."""
        done = any(isinstance(e, Finished) for e in events)
        for event in events:
            if isinstance(event, Finished):
                self.prompt_tokens, self.completion_tokens = event.prompt_tokens, event.completion_tokens
        if self.hold:
            held.extend(events)
            if done:
                self._push(held)
        elif events:
            self._push(list(events))
        return done

    def _fail(self, error: RoutingError, held: list[Event | BaseException]) -> None:
        if error.retryable and error.kind != "upstream_rejected":
            self.backend.failed(error.kind, error.retry_after)
        self._push([error])  # held events are dropped: the caller may start over elsewhere


async def _drain(end: Awaitable[object]) -> None:
    """Read what follows the answer's end (`end`: the next event, or a chunked body's `finish()`):
    normally only the end of the chunked body, and then the connection is kept for the next
    request (one left unread is closed, and the next request would wait for a new one). An
    upstream that sends more, or is slow to end, loses it."""
    with contextlib.suppress(httpx.HTTPError, TimeoutError):
        async with asyncio.timeout(DRAIN_SECONDS):
            await end


async def _bounded(response: httpx.Response) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= ERROR_BODY_LIMIT:
            break
    return bytes(body[:ERROR_BODY_LIMIT])
