"""A relayed answer's body read straight from its connection (`network.SocketStream`), not through
httpcore's h11 connection and httpx's response iteration.

A relayed stream is read a chunk per token, and those layers cost more per chunk than the relay's
own work: h11's event machinery and chunked reader, httpcore's and httpx's generators one inside
the other. `ChunkedBody` decodes the chunked transfer coding itself, and one read returns every
whole chunk already buffered, so chunks that arrived together are relayed together.

httpx still sends the request and reads the head, and the connection stays its pool's: the body's
last chunk (`0`, its trailers, the blank line) is put back for h11 to read (`finish`), which ends
the response as if h11 had read it all, and a connection read whole is kept alive. One not read to
its end is closed when the response is (the upstream learns that the client left). Timeouts and
broken connections raise httpx's errors, as reading through httpx would.

Only a body this can read whole is taken: chunked, not compressed, on our own stream, its head
read by h11 without any of its body (`SocketStream.at_body`). Any other (a Content-Length body, a
compressed one) is read through httpx.
"""

from __future__ import annotations

import re

import httpcore
import httpx

from mlx_manager.routing.network import SocketStream

READ_BYTES = 64 * 1024  # as httpcore reads
MAX_LINE = 4096  # a chunk's size line longer than this is not HTTP
_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


class ChunkedBody:
    """A response's chunked body, decoded as it arrives (see the module doc)."""

    def __init__(self, response: httpx.Response, stream: SocketStream) -> None:
        self.response = response
        self.stream = stream
        self.timeout: float | None = response.request.extensions.get("timeout", {}).get("read")
        self.ended = False  # the last chunk came (and was put back for h11)
        self._buffer = b""  # bytes read, not decoded yet (part of a size line or of a chunk's CRLF)
        self._left = 0  # bytes of the current chunk's data still to come
        self._crlf = False  # the CRLF after a chunk's data is still to come

    @classmethod
    def of(cls, response: httpx.Response) -> ChunkedBody | None:
        """The body to read this way, or None: read it through httpx."""
        stream = response.extensions.get("network_stream")
        if not isinstance(stream, SocketStream) or not stream.at_body or response.http_version != "HTTP/1.1":
            return None
        headers = response.headers
        if headers.get("transfer-encoding", "").lower() != "chunked":
            return None
        if headers.get("content-encoding", "identity").lower() != "identity":
            return None
        return cls(response, stream)

    async def read(self) -> bytes:
        """The body's next bytes (every whole chunk buffered, and what came of one not whole);
        b"" at its end. Raises httpx's errors: a read timeout, a broken connection, a body cut
        short or not chunked as it says."""
        while not self.ended:
            data = self._decode()
            if data:
                return data
            if self.ended:
                break
            self._buffer += await self._receive()
        return b""

    async def finish(self) -> bool:
        """Read to the end of the response: True if the body ended with nothing more, and the
        connection went back to its pool."""
        while not self.ended:
            if await self.read():
                return False  # more than the answer: the connection is closed with the response
        async for _ in self.response.aiter_raw():  # h11 reads the last chunk put back
            return False
        return True

    async def _receive(self) -> bytes:
        try:
            data = await self.stream.read(READ_BYTES, self.timeout)
        except httpcore.TimeoutException as exc:
            raise httpx.ReadTimeout(str(exc) or "timed out", request=self.response.request) from exc
        except httpcore.NetworkError as exc:
            raise httpx.ReadError(str(exc) or "the connection broke", request=self.response.request) from exc
        if not data:
            raise httpx.RemoteProtocolError(
                "the connection closed before the end of the body", request=self.response.request
            )
        return data

    def _decode(self) -> bytes:
        """The data of the chunks in the buffer; at the last one, it is put back and `ended` set."""
        buffer, pos, end = self._buffer, 0, len(self._buffer)
        out: list[bytes] = []
        while pos < end:
            if self._left:
                stop = min(end, pos + self._left)
                out.append(buffer[pos:stop])
                self._left -= stop - pos
                pos = stop
            elif self._crlf:
                if end - pos < 2:
                    break
                if buffer[pos : pos + 2] != b"\r\n":
                    raise self._malformed("a chunk does not end with CRLF")
                pos += 2
                self._crlf = False
            else:
                line_end = buffer.find(b"\r\n", pos)
                if line_end < 0:
                    if end - pos > MAX_LINE:
                        raise self._malformed("a chunk's size line is too long")
                    break
                size = _SIZE.match(buffer, pos, line_end)
                if size is None or buffer[size.end() : line_end].lstrip(b" \t")[:1] not in (b"", b";"):
                    raise self._malformed("a chunk's size is not hexadecimal")
                self._left = int(size.group(), 16)
                if not self._left:  # the last chunk: h11 reads it (and its trailers)
                    self.stream.unread(buffer[pos:])
                    self.ended = True
                    pos = end
                    break
                self._crlf = True
                pos = line_end + 2
        self._buffer = buffer[pos:] if pos < end else b""
        return out[0] if len(out) == 1 else b"".join(out)

    def _malformed(self, what: str) -> httpx.RemoteProtocolError:
        return httpx.RemoteProtocolError(f"the body is not chunked as it says: {what}", request=self.response.request)
