"""Client connections, bounded: idle sockets and slow senders cannot starve the daemon.

Each open connection holds a file descriptor. Without bounds, a few thousand idle sockets (or
slowloris clients trickling their headers) use up the open-file limit, accept() fails, /health
goes unanswered and the supervisor's watchdog kills a daemon that was working fine. So:

- a connection that sends nothing for server.idle_timeout seconds is closed, and so is one that
  takes longer than server.read_timeout to send a whole request, headers and body (counted from
  when it opened or got its last answer);
- at most server.max_connections are kept open: a new one first makes room by closing the one
  idle the longest (not one that is sending a request or waiting for its answer); when none is
  idle, the new one is answered 503 `overloaded` (with Retry-After) and closed, except GET
  /health and /ready, which are served.

`ConnectionGuard.protocol()` is the HTTP/1.1 protocol (uvicorn's h11 one, bounded) to give uvicorn.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections import OrderedDict
from typing import Any

import h11
from h11 import _writers as h11_writers
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from mlx_manager.daemon.problems import Problem, retry_after

log = logging.getLogger("mlx_manager.daemon")

PROBES = ("/health", "/ready")
WARN_EVERY_SECONDS = 60.0


class ConnectionGuard:
    """The open connections of one server: the idle ones oldest first, and the limits."""

    def __init__(self, max_connections: int, idle_timeout: float, read_timeout: float) -> None:
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.read_timeout = max(read_timeout, idle_timeout)
        self.open: set[BoundedH11Protocol] = set()
        self.idle: OrderedDict[BoundedH11Protocol, None] = OrderedDict()
        self.evicted = 0
        self.refused = 0
        self._warned_at = -WARN_EVERY_SECONDS

    def protocol(self) -> Any:
        """What uvicorn.Config takes as `http`: a factory of bounded protocols sharing this guard."""
        return functools.partial(BoundedH11Protocol, guard=self)

    def admit(self, connection: BoundedH11Protocol) -> bool:
        """Count a new connection in; False when it is over the limit and nothing idle can go."""
        while len(self.open) >= self.max_connections and self.idle:
            oldest, _ = self.idle.popitem(last=False)
            self.open.discard(oldest)  # its connection_lost comes later
            self.evicted += 1
            oldest.close()
        self.open.add(connection)
        if len(self.open) <= self.max_connections:
            return True
        self.refused += 1
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_SECONDS:
            self._warned_at = now
            log.warning(
                "%d connections open, all busy (server.max_connections=%d): new ones get 503 "
                "(/health and /ready still answer)",
                len(self.open) - 1,
                self.max_connections,
            )
        return False

    def forget(self, connection: BoundedH11Protocol) -> None:
        self.open.discard(connection)
        self.idle.pop(connection, None)


class H11Connection(h11.Connection):
    """h11's connection, with a piece of a chunked response body framed here. A stream sends a
    body message a token, and h11 runs its state machine for each although a piece of the body
    changes no state (~3.5 us a piece against ~0.2); anything else (a body of known length, the
    end of the body, another h11 than this one) is h11's own."""

    def send(self, event: h11.Event) -> bytes | None:  # type: ignore[override]  # h11's overloads, as one
        chunked = type(getattr(self, "_writer", None)) is _CHUNKED
        if chunked and type(event) is h11.Data and self.our_state is h11.SEND_BODY:
            data = event.data
            return b"%x\r\n%b\r\n" % (len(data), data) if data else b""  # as h11's ChunkedWriter writes it
        return super().send(event)


_CHUNKED = getattr(h11_writers, "ChunkedWriter", H11Connection)  # (never a writer's type: no fast path)


class BoundedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with the guard's timeouts and connection limit (and
    `H11Connection`'s framing of a streamed body)."""

    def __init__(self, *args: Any, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limit = self.config.h11_max_incomplete_event_size
        self.conn = H11Connection(h11.SERVER, DEFAULT_MAX_INCOMPLETE_EVENT_SIZE if limit is None else limit)
        self.guard = guard
        self._timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0
        self._heard = False  # any bytes since it became idle
        self._upgraded = False  # handed to a WebSocket protocol: no longer ours to time or count

    # -- the connection's life ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.guard.admit(self):
            self.app = _probes_only(self.app, self.guard.max_connections)
        self._became_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        self.guard.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._heard = True
        super().data_received(data)
        self._check_state()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._check_state()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        # The socket goes to a WebSocket protocol with its own pings: nothing of it stays here
        # (data_received's check, right after this, must not count it idle again).
        self._upgraded = True
        self._stop_timer()
        self.guard.forget(self)
        super().handle_websocket_upgrade(event)

    def close(self) -> None:
        """Close the connection: it is idle, or too slow to send its request."""
        self._stop_timer()
        if not self.transport.is_closing():
            try:
                self.conn.send(h11.ConnectionClosed())
            except h11.LocalProtocolError:
                pass
            self.transport.close()

    # -- idle, reading a request, or busy with one ---------------------------------------------
    def _busy(self) -> bool:
        """A request is in (its headers at least) and its answer is not complete."""
        return self.cycle is not None and not self.cycle.response_complete

    def _check_state(self) -> None:
        if self._upgraded or self.transport.is_closing():
            return
        if self._busy():
            self.guard.idle.pop(self, None)  # never closed to make room
            if not self.cycle.more_body:  # the whole request is in: the rest is the app's time
                self._stop_timer()
        elif self not in self.guard.idle:  # idle already: its clock runs from when it became idle
            self._became_idle()

    def _became_idle(self) -> None:
        if self.transport.is_closing():
            return
        self._idle_since = self.loop.time()
        self._heard = False
        self.guard.idle[self] = None
        self._arm(self.guard.idle_timeout)

    def _arm(self, delay: float) -> None:
        self._stop_timer()
        self._timer = self.loop.call_later(delay, self._on_timer)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self.transport.is_closing() or (self._busy() and not self.cycle.more_body):
            return
        waited = self.loop.time() - self._idle_since
        if self._heard and waited < self.guard.read_timeout:
            self._arm(self.guard.read_timeout - waited)  # a request on its way: it gets the longer time
            return
        self.guard.idle.pop(self, None)
        self.close()  # a request cut off mid-body sees the client gone


def _probes_only(app: ASGIApp, limit: int) -> ASGIApp:
    """The app for a connection over the limit: probes are served, anything else gets 503."""

    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in PROBES:

            async def send_and_close(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
                await send(message)

            await app(scope, receive, send_and_close)
            return
        detail = f"every one of the daemon's {limit} connections is busy (server.max_connections); retry shortly"
        problem = Problem("overloaded", detail, headers={**retry_after(1), "Connection": "close"})
        await problem.response(instance=scope.get("path", "/"), request_id=uuid.uuid4().hex)(scope, receive, send)

    return answer
