"""A relayed body read by our own chunked decoder (routing/chunked.py), straight from the socket
stream (routing/network.py): whatever way the bytes arrive it reads the body whole, gives the
connection back to the pool (kept alive) after the last chunk, and raises httpx's errors for a
body cut short, one not chunked as it says, or a silent server. Bodies it does not read (a
Content-Length one, a compressed one) are left to httpx.

The server is a real one on loopback (asyncio's, in the test's loop) that answers each request
with the bytes a test gives it, piece by piece: once the client has a response head, each further
piece is written when it waits for more, so a piece boundary is a read boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import termios
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
import uvloop

from mlx_manager.routing import network
from mlx_manager.routing.chunked import ChunkedBody

EVENTS = [b'data: {"id":"a","choices":[{"delta":{"content":"h\\u00e9"}}]}\n\n', b"data: [DONE]\n\n"]


def chunked(*pieces: bytes, last: bytes = b"0\r\n\r\n") -> bytes:
    """A chunked body of these pieces (sizes in upper and lower case hex, one with an extension)."""
    out = b""
    for index, piece in enumerate(pieces):
        size = f"{len(piece):X}" if index % 2 else f"{len(piece):x}"
        out += size.encode() + (b";ext=1" if index == 1 else b"") + b"\r\n" + piece + b"\r\n"
    return out + last


HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
BODY = chunked(*EVENTS)


class Upstream:
    """Answers each request with the pieces put on `answers` (a list per request; None closes the
    connection); counts its connections."""

    def __init__(self) -> None:
        self.answers: asyncio.Queue[list[bytes | None]] = asyncio.Queue()
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.url = ""
        self.waiting: Callable[[], bool] = lambda: True  # the client waits for bytes: the next piece goes
        self.followed = asyncio.Event()  # the test has the response (and set `waiting` for it)

    def follow(self, response: httpx.Response | network.SocketStream) -> None:
        """The next pieces of this response are written once its client waits for bytes."""
        stream = response if isinstance(response, network.SocketStream) else response.extensions["network_stream"]
        protocol, sock = stream.protocol, stream.get_extra_info("socket")

        def waiting() -> bool:  # what was sent is read (none left in the socket, nor in its buffer)
            unread = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
            return protocol.reader is not None and not protocol.chunks and unread == b"\0\0\0\0"

        self.waiting = waiting
        self.followed.set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    0,
                )
                await reader.readexactly(length)
                pieces = await self.answers.get()
                for index, piece in enumerate(pieces):
                    if index:
                        await self.followed.wait()
                        await until(self.waiting)
                    if piece is None:
                        self.followed.clear()
                        writer.close()
                        return
                    writer.write(piece)
                    await writer.drain()
                self.followed.clear()  # the next answer waits for its own `follow`
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()


async def until(predicate: Callable[[], bool]) -> None:
    """Wait for the state (a ceiling, not a deadline: a busy machine only makes it slower)."""
    async with asyncio.timeout(30):
        while not predicate():
            await asyncio.sleep(0.001)


def client(url: str, read_timeout: float = 5.0) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=2, max_keepalive_connections=2, keepalive_expiry=30)
    timeout = httpx.Timeout(5, read=read_timeout)
    return httpx.AsyncClient(base_url=url, transport=network.transport(limits), timeout=timeout, trust_env=False)


@contextlib.asynccontextmanager
async def posted(http: httpx.AsyncClient, path: str = "/") -> AsyncIterator[tuple[httpx.Response, ChunkedBody]]:
    """A POST's response and its body, to be read as a relayed one is."""
    async with http.stream("POST", path, json={}) as response:
        body = ChunkedBody.of(response)
        assert body is not None
        yield response, body


async def read_all(body: ChunkedBody) -> bytes:
    out = b""
    while data := await body.read():
        out += data
    return out


def run(test: Callable[[Upstream], Awaitable[None]], loop: str) -> None:
    async def main() -> None:
        upstream = Upstream()
        await upstream.start()
        try:
            await test(upstream)
        finally:
            await upstream.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop if loop == "uvloop" else None) as runner:
        runner.run(main())


def test_a_read_of_a_response_head_ends_with_it_so_its_body_is_left_whole_for_ours():
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    whole = interim + HEAD + BODY

    async def test(upstream: Upstream) -> None:
        for i in range(1, len(interim) + len(HEAD) + 2):
            stream = await network.AsyncioBackend().connect_tcp("127.0.0.1", int(upstream.url.rsplit(":", 1)[1]))
            upstream.follow(stream)
            upstream.answers.put_nowait([whole[:i], whole[i:]])
            await stream.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            heads = b""
            while not stream.at_body:
                heads += await stream.read(65536)
            assert heads == interim + HEAD, i  # h11 gets the heads, and nothing of the body
            body = b""
            while len(body) < len(BODY):
                body += await stream.read(65536)
            assert body == BODY
            await stream.aclose()

    run(test, "uvloop")


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_body_split_at_any_byte_is_read_whole_and_its_connection_kept_alive(loop):
    whole = HEAD + BODY

    async def test(upstream: Upstream) -> None:
        async with client(upstream.url) as http:
            # The head alone, then the body cut at each byte; and the head with the body's start.
            splits = [[HEAD, BODY[:i], BODY[i:]] for i in range(1, len(BODY))]
            splits += [[whole[:i], whole[i:]] for i in range(len(HEAD), len(whole), 3)]
            for pieces in splits:
                upstream.answers.put_nowait(pieces)
                async with posted(http, "/v1/chat/completions") as (response, body):
                    upstream.follow(response)
                    assert await read_all(body) == b"".join(EVENTS), pieces
                    assert await body.finish()
            assert upstream.connections == 1  # each body read to its end: one connection throughout

    run(test, loop)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_an_interim_head_and_trailers_are_h11s_and_the_body_between_ours(loop):
    async def test(upstream: Upstream) -> None:
        async with client(upstream.url) as http:
            interim = b"HTTP/1.1 100 Continue\r\n\r\n"
            trailers = chunked(*EVENTS, last=b"0\r\nx-trailer: 1\r\n\r\n")
            for _ in range(2):
                upstream.answers.put_nowait([interim + HEAD + trailers[:7], trailers[7:]])
                async with posted(http) as (response, body):
                    upstream.follow(response)
                    assert await read_all(body) == b"".join(EVENTS)
                    assert await body.finish()
            assert upstream.connections == 1

    run(test, loop)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_body_cut_mid_chunk_is_a_protocol_error_and_its_connection_is_not_reused(loop):
    async def test(upstream: Upstream) -> None:
        async with client(upstream.url) as http:
            upstream.answers.put_nowait([HEAD + BODY[:20], None])
            async with posted(http) as (response, body):
                upstream.follow(response)
                assert await body.read() == BODY[:20].split(b"\r\n", 1)[1]  # what came of the chunk is relayed
                with pytest.raises(httpx.RemoteProtocolError):
                    await body.read()
            # The next request is answered whole, on a new connection.
            upstream.answers.put_nowait([HEAD + BODY])
            async with posted(http) as (response, body):
                assert await read_all(body) == b"".join(EVENTS)
                assert await body.finish()
            assert upstream.connections == 2

    run(test, loop)


@pytest.mark.parametrize(
    "body", [b"zz\r\n" + EVENTS[0] + b"\r\n", b"5\r\nabcdeXY", b"1" * 5000], ids=["size", "crlf", "line"]
)
def test_a_body_not_chunked_as_it_says_is_a_protocol_error(body):
    async def test(upstream: Upstream) -> None:
        async with client(upstream.url) as http:
            upstream.answers.put_nowait([HEAD + body])
            async with posted(http) as (_, chunks):
                with pytest.raises(httpx.RemoteProtocolError):
                    await read_all(chunks)

    run(test, "uvloop")


def test_a_body_left_unread_closes_its_connection_and_a_silent_server_is_a_read_timeout():
    async def test(upstream: Upstream) -> None:
        async with client(upstream.url, read_timeout=0.3) as http:
            upstream.answers.put_nowait([HEAD + BODY[:30]])  # then nothing
            async with posted(http) as (response, body):
                assert await body.read()
                with pytest.raises(httpx.ReadTimeout):
                    await body.read()
            upstream.answers.put_nowait([HEAD + BODY])
            async with posted(http) as (response, body):
                assert await body.read()  # left before its end
            upstream.answers.put_nowait([HEAD + BODY])
            async with posted(http) as (response, body):
                assert await read_all(body) == b"".join(EVENTS)
                assert await body.finish()
            assert upstream.connections == 3  # the two bodies not read to their end took theirs along

    run(test, "uvloop")


def test_a_content_length_or_compressed_body_is_left_to_httpx():
    length = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(EVENTS[0])
    gzipped = HEAD.replace(b"\r\n\r\n", b"\r\ncontent-encoding: gzip\r\n\r\n")

    async def test(upstream: Upstream) -> None:
        async with client(upstream.url) as http:
            upstream.answers.put_nowait([length + EVENTS[0]])
            async with http.stream("POST", "/", json={}) as response:
                assert ChunkedBody.of(response) is None
                assert await response.aread() == EVENTS[0]
            upstream.answers.put_nowait([gzipped + b"0\r\n\r\n"])
            async with http.stream("POST", "/", json={}) as response:
                assert ChunkedBody.of(response) is None
                assert await response.aread() == b""
            upstream.answers.put_nowait([HEAD + BODY])  # and the connection is still good for ours
            async with posted(http) as (response, body):
                assert await read_all(body) == b"".join(EVENTS)
                assert await body.finish()
            assert upstream.connections == 1

    run(test, "uvloop")
