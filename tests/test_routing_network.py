"""The sockets under a backend's client (routing/network.py): httpx on asyncio's transports keeps
what httpx on its default backend does — keep-alive, a server closing an idle connection, timeouts,
refused connections, large bodies (reading pauses while they wait), TLS with verification. Each
on both event loops: uvloop's transports (the daemon's loop, daemon/server.py) and asyncio's own.

The server is a real HTTP server on loopback (http.server in a thread), plain or behind TLS with
a certificate made for the test by the openssl command.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Coroutine, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvloop

from mlx_manager.routing import network
from mlx_manager.routing.backend import make_client
from mlx_manager.settings.schema import BackendEntry, RoutingSettings

BIG = 3 * network.READ_BUFFER_LIMIT + 12345  # more than the read buffer holds before reading pauses
T = TypeVar("T")
TRICKLE, PIECE_GAP, TRICKLE_READ_TIMEOUT = 9, 0.15, 1.0  # the pieces outlast one read timeout; a gap has 6x room


class Server:
    """Answers GET /small, GET /big (BIG bytes), GET /stall (nothing until the test ends), GET
    /close (answers, then closes the connection it kept alive), and POST (the SHA-256 of the body
    it read); counts the connections."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.connections = 0
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                server.connections += 1
                super().setup()

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                if self.path == "/trickle":  # TRICKLE pieces PIECE_GAP s apart, then nothing
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    for _ in range(TRICKLE):
                        self.wfile.write(b"piece")
                        self.wfile.flush()
                        server.release.wait(PIECE_GAP)
                    server.release.wait(30)
                    self.close_connection = True
                    return
                if self.path == "/stall":
                    server.release.wait(30)
                    self.close_connection = True
                    return
                body = b"x" * BIG if self.path == "/big" else b"small"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                if self.path == "/close":
                    self.wfile.flush()
                    self.close_connection = True

            def do_POST(self) -> None:  # noqa: N802 - answers with the SHA-256 of the body it read
                body = self.rfile.read(int(self.headers["content-length"]))
                digest = hashlib.sha256(body).hexdigest().encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(digest)))
                self.end_headers()
                self.wfile.write(digest)

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        if tls is not None:
            self.http.socket = tls.wrap_socket(self.http.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.http.server_address[1]}"
        self.thread = threading.Thread(target=self.http.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    live = Server()
    yield live
    live.close()


@pytest.fixture(params=["uvloop", "asyncio"])
def on_loop(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, T]], T]:
    """Runs a coroutine to its end on a new event loop of the kind the test is run for."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def run(coroutine: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coroutine)

    return run


def client(url: str, verify: ssl.SSLContext | bool = True, read_timeout: float = 0.5) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=4, max_keepalive_connections=4, keepalive_expiry=30)
    transport = network.transport(limits, verify)
    timeout = httpx.Timeout(5, read=read_timeout)
    return httpx.AsyncClient(base_url=url, transport=transport, timeout=timeout, trust_env=False)


def test_a_backends_client_runs_on_asyncio_transports_and_keeps_its_connection(server, on_loop):
    entry = BackendEntry(name="b", type="openai", base_url=server.url + "/v1")

    async def run() -> list[object]:
        async with make_client(entry, "", RoutingSettings()) as http:
            streams = []
            for _ in range(3):
                response = await http.get(server.url + "/small")
                assert (response.status_code, response.content) == (200, b"small")
                streams.append(response.extensions["network_stream"])
            return streams

    streams = on_loop(run())
    assert all(isinstance(stream, network.SocketStream) for stream in streams)
    assert server.connections == 1  # kept alive: three requests, one connection


def test_a_connection_the_server_closed_while_idle_is_replaced(server, on_loop):
    async def run() -> None:
        async with client(server.url) as http:
            response = await http.get("/close")
            assert response.content == b"small"
            stream = response.extensions["network_stream"]
            async with asyncio.timeout(10):  # the server's close reaches the connection idle in the pool
                while not stream.protocol.eof:
                    await asyncio.sleep(0.01)
            assert (await http.get("/small")).content == b"small"

    on_loop(run())
    assert server.connections == 2


def test_a_body_larger_than_the_read_buffer_arrives_whole(server, on_loop):
    async def run() -> int:
        async with client(server.url) as http, http.stream("GET", "/big") as response:
            size = 0
            async for block in response.aiter_raw():
                size += len(block)
                await asyncio.sleep(0.001)  # a slow reader: the buffer fills and reading pauses
            return size

    assert on_loop(run()) == BIG


def test_request_bodies_small_and_larger_than_a_joined_write_arrive_whole(server, on_loop):
    """A request's head and a small body go out as one write; a large body at once, with flow control."""
    bodies = [b'{"model": "m"}', bytes(range(256)) * (BIG // 256)]

    async def run() -> list[str]:
        async with client(server.url) as http:
            return [(await http.post("/", content=body)).text for body in bodies * 2]

    assert on_loop(run()) == [hashlib.sha256(body).hexdigest() for body in bodies * 2]
    assert server.connections == 1


def test_a_silent_server_is_a_read_timeout_and_a_closed_port_a_connect_error(server, on_loop):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"  # bound, not listening: refused

    async def run() -> None:
        async with client(server.url) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.get("/stall")
            assert (await http.get("/small")).content == b"small"  # the pool is fine after it
        async with client(closed) as http:
            with pytest.raises(httpx.ConnectError):
                await http.get("/small")

    on_loop(run())


def test_each_read_has_the_read_timeout_so_a_steady_trickle_is_read_and_the_stall_after_it_times_out(server, on_loop):
    """The read timeout's timer is kept between reads (network._ReadTimer): once it fires for a
    read long done, it must wait again for the read of that moment, not end it."""

    async def run() -> bytes:
        received = b""
        async with client(server.url, read_timeout=TRICKLE_READ_TIMEOUT) as http:
            async with http.stream("GET", "/trickle") as response:
                with pytest.raises(httpx.ReadTimeout):
                    async for block in response.aiter_raw():
                        received += block
        return received

    assert on_loop(run()) == b"piece" * TRICKLE


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    assert openssl is not None, "the TLS test needs the openssl command"
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_tls_is_verified_against_the_certificates_trusted(certificate, on_loop):
    cert, key = certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    live = Server(tls=context)
    try:

        async def run() -> None:
            async with client(live.url, verify=ssl.create_default_context(cafile=str(cert))) as http:
                response = await http.get("/small")
                assert response.content == b"small"
                assert response.extensions["network_stream"].get_extra_info("ssl_object") is not None
            async with client(live.url) as http:  # the system's trust store knows nothing of it
                with pytest.raises(httpx.ConnectError):
                    await http.get("/small")

        on_loop(run())
    finally:
        live.close()
