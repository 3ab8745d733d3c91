"""The sockets under a backend's httpx client: an httpcore network backend on asyncio's own
transports, instead of httpcore's default (anyio streams).

A relayed stream is read a chunk per token, and each of anyio's reads costs more than the chunk's
own work: a cancel scope for its timeout, and the socket taken out of the event loop's selector and
put back (pause and resume reading). Here the transport keeps reading into a buffer, a read that
finds data returns it at once, and only a read that must wait arms a timer. httpx, its pool,
keep-alive, timeouts and errors (httpcore's, which httpx maps) and Logfire's httpx instrumentation
are as with the default backend.

Writes made one after the other in one step of the event loop go out as one: httpcore writes a
request's head and then its body, which would otherwise be two packets, and wake the upstream
twice. Nothing waits for more: what was written is sent when the writer yields (at its next read
at the latest), or at once beyond WRITE_JOIN_LIMIT bytes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import deque
from collections.abc import Iterable
from typing import Any, cast

import httpcore
import httpx

log = logging.getLogger("mlx_manager.routing")

# A connection's unread bytes beyond this pause reading from its socket until they are read.
READ_BUFFER_LIMIT = 1 << 20
# Writes joined (see the module doc) up to this many bytes; a larger one is sent at once.
WRITE_JOIN_LIMIT = 64 * 1024


class _Protocol(asyncio.Protocol):
    """A connection's bytes as they arrive, for `SocketStream` to read."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.eof = False
        self.error: BaseException | None = None  # the connection broke
        self.reader: asyncio.Future[None] | None = None  # a read waiting for bytes
        self.writer: asyncio.Future[None] | None = None  # a write waiting for room
        self.paused = False  # reading paused: the buffer is full
        self.writing_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's are not asyncio's classes)

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > READ_BUFFER_LIMIT and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake_reader()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._wake_reader()
        self.resume_writing()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.writer is not None and not self.writer.done():
            self.writer.set_result(None)

    def unread(self, data: bytes) -> None:
        """Put bytes taken back in front of the buffer, to be read again."""
        self.chunks.appendleft(data)
        self.buffered += len(data)

    def take(self, max_bytes: int) -> bytes:
        """Up to max_bytes of what is buffered (the buffer is not empty)."""
        chunks = self.chunks
        data = chunks.popleft()
        while chunks and len(data) + len(chunks[0]) <= max_bytes:
            data += chunks.popleft()
        if len(data) > max_bytes:
            chunks.appendleft(data[max_bytes:])
            data = data[:max_bytes]
        self.buffered -= len(data)
        if self.paused and self.buffered <= READ_BUFFER_LIMIT // 2 and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def _wake_reader(self) -> None:
        if self.reader is not None and not self.reader.done():
            self.reader.set_result(None)


async def _wait(future: asyncio.Future[None], timeout: float | None, error: type[Exception]) -> None:
    """Wait for the future, within timeout seconds (None: no limit), else raise `error`."""
    if timeout is None:
        await future
        return
    loop = asyncio.get_running_loop()
    timer = loop.call_later(timeout, _expire, future)
    try:
        await future
    except _Expired:
        raise error("timed out") from None
    finally:
        timer.cancel()


class _Expired(Exception):
    pass


class _ReadTimer:
    """The timeout of a connection's reads, one at a time, on a timer kept between them: a read
    that ends in time leaves it armed, and when it fires early (for a read long done) it is armed
    again for the read waiting then. A relayed stream waits once a chunk: one timer per timeout
    instead of one made and cancelled per chunk (~6 us each, measured on uvloop)."""

    def __init__(self) -> None:
        self.handle: asyncio.TimerHandle | None = None
        self.armed_for = 0.0  # loop time the handle fires at
        self.future: asyncio.Future[None] | None = None  # the read waiting
        self.expires = 0.0  # loop time it times out at

    async def wait(self, future: asyncio.Future[None], timeout: float | None) -> None:
        """Wait for the future, within timeout seconds (None: no limit), else raise ReadTimeout."""
        if timeout is None:
            await future
            return
        loop = asyncio.get_running_loop()
        self.future, self.expires = future, loop.time() + timeout
        if self.handle is None or self.armed_for > self.expires:
            self._arm(loop)
        try:
            await future
        except _Expired:
            raise httpcore.ReadTimeout("timed out") from None
        finally:
            self.future = None

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        self.cancel()
        self.armed_for = self.expires
        self.handle = loop.call_at(self.expires, self._fire, loop)

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self.handle = None
        future = self.future
        if future is None or future.done():
            return  # no read waiting: the next one arms it again
        if loop.time() >= self.expires:
            future.set_exception(_Expired())
        else:
            self._arm(loop)


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(_Expired())


class SocketStream(httpcore.AsyncNetworkStream):
    """One connection (plain or TLS) as httpcore reads and writes it."""

    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self.transport = transport
        self.protocol = protocol
        self._unsent: list[bytes] = []  # written in this step of the loop, not yet sent
        self._unsent_bytes = 0
        self._read_timer = _ReadTimer()
        self._head: bytes | None = None  # a response's head being read (since the request was written), so far
        # The last response head read ended at a read's end, and nothing was read since: its body
        # is all in the buffer, unread (for `chunked.ChunkedBody` to read instead of h11).
        self.at_body = False

    def _send(self) -> None:
        if self._unsent:
            data = self._unsent[0] if len(self._unsent) == 1 else b"".join(self._unsent)
            self._unsent.clear()
            self._unsent_bytes = 0
            if not self.transport.is_closing():
                self.transport.write(data)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._send()
        protocol = self.protocol
        while not protocol.chunks:
            if protocol.error is not None:
                raise httpcore.ReadError(str(protocol.error) or type(protocol.error).__name__)
            if protocol.eof:
                return b""
            protocol.reader = asyncio.get_running_loop().create_future()
            try:
                await self._read_timer.wait(protocol.reader, timeout)
            finally:
                protocol.reader = None
        if self._head is not None:
            return self._head_piece(max_bytes)
        self.at_body = False
        return protocol.take(max_bytes)

    def _head_piece(self, max_bytes: int) -> bytes:
        """A read of a response's head: up to its blank line, the rest left in the buffer. So, once
        the head is read, its body is all still here (`at_body`), however the bytes arrived."""
        assert self._head is not None
        data = self.protocol.take(max_bytes)
        seen = self._head + data
        end = seen.find(b"\r\n\r\n", max(0, len(self._head) - 3))
        if end < 0:
            self._head = seen
            return data
        end += 4
        if end < len(seen):
            self.protocol.unread(seen[end:])
            data = data[: len(data) - (len(seen) - end)]
        if seen[9:10] == b"1":  # `HTTP/1.1 1xx`: an interim head (100 Continue); the response's own follows
            self._head = b""
        else:
            self._head = None
            self.at_body = True
        return data

    def unread(self, data: bytes) -> None:
        """Put bytes read back, to be read again (by httpcore: the end of a body `ChunkedBody` read)."""
        if data:
            self.protocol.unread(data)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        protocol = self.protocol
        if protocol.error is not None or self.transport.is_closing():
            raise httpcore.WriteError("the connection is closed")
        self._head, self.at_body = b"", False  # a request: its response's head is read next
        if not self._unsent:
            asyncio.get_running_loop().call_soon(self._send)
        self._unsent.append(buffer)
        self._unsent_bytes += len(buffer)
        if self._unsent_bytes < WRITE_JOIN_LIMIT:
            return
        self._send()
        while protocol.writing_paused and not self.transport.is_closing():
            protocol.writer = asyncio.get_running_loop().create_future()
            try:
                await _wait(protocol.writer, timeout, httpcore.WriteTimeout)
            finally:
                protocol.writer = None

    async def aclose(self) -> None:
        self._send()
        self._read_timer.cancel()
        self.transport.close()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        self._send()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport = await loop.start_tls(
                    self.transport, self.protocol, ssl_context, server_hostname=server_hostname
                )
        except TimeoutError:
            self.transport.close()
            raise httpcore.ConnectTimeout("the TLS handshake timed out") from None
        except (OSError, ssl.SSLError) as exc:
            self.transport.close()
            raise httpcore.ConnectError(str(exc)) from exc
        if transport is None:
            raise httpcore.ConnectError("the connection closed during the TLS handshake")
        self.protocol.transport = transport
        self._read_timer.cancel()
        return SocketStream(transport, self.protocol)

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self.transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return self.transport.get_extra_info("sockname")
        if info == "server_addr":
            return self.transport.get_extra_info("peername")
        if info == "socket":
            return self.transport.get_extra_info("socket")
        if info == "is_readable":  # an idle connection with something to read was closed by the server
            protocol = self.protocol
            return bool(protocol.chunks) or protocol.eof or self.transport.is_closing()
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """Connections for httpcore's pool, on asyncio transports (see the module doc)."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        local = (local_address, 0) if local_address else None
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_connection(_Protocol, host, port, local_addr=local)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        return _stream(transport, protocol, socket_options)  # asyncio sets TCP_NODELAY itself

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_unix_connection(_Protocol, path)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"connecting to {path} timed out") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        return _stream(transport, protocol, socket_options)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def _stream(
    transport: asyncio.BaseTransport, protocol: _Protocol, options: Iterable[httpcore.SOCKET_OPTION] | None
) -> SocketStream:
    sock: socket.socket | None = transport.get_extra_info("socket")
    for option in options or ():
        if sock is not None:
            sock.setsockopt(*option)
    return SocketStream(cast(asyncio.Transport, transport), protocol)


def transport(limits: httpx.Limits, verify: ssl.SSLContext | bool = True) -> httpx.AsyncHTTPTransport:
    """httpx's own transport (pool, keep-alive, HTTP/1.1, TLS verification) on `AsyncioBackend`.
    httpx takes no network backend, so it is set on the pool it made."""
    made = httpx.AsyncHTTPTransport(limits=limits, verify=verify, trust_env=False)
    pool = getattr(made, "_pool", None)
    if isinstance(pool, httpcore.AsyncConnectionPool) and hasattr(pool, "_network_backend"):
        pool._network_backend = AsyncioBackend()
    else:  # another httpx/httpcore than the pinned ones: their own sockets, as they come
        log.warning("routing: httpcore's connection pool has changed; backends use its default sockets")
    return made
