"""Fallback when the chosen backend fails before the first byte: an upstream 500 or 502, an upstream
that takes the request and then says nothing, our own engine's full queue; and the Retry-After of a
route whose every backend is cooling down. And after the first byte: a relayed Messages stream
whose upstream goes quiet gets our keepalive pings.

The fallback upstream is a real daemon (as an `anthropic` backend, its /v1/messages stands in for
Anthropic's cloud API, which cannot be reached from here). The failing upstream is `FailingUpstream`:
a tiny real HTTP server on loopback that stands in for an upstream in trouble (a real one cannot be
made to answer 500 or to hang on cue). It answers every request with one status, or reads the
request and stalls before sending a byte, until the test lets it go.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

import httpx
import pytest

from mlx_manager.daemon.dialects.anthropic.serving import MessageStream
from mlx_manager.engine.config import EngineConfig
from tests.daemon_server import LiveServer, serving, wait_until
from tests.test_daemon_audit import row_for
from tests.test_daemon_timeouts import sse_events
from tests.test_routing import HELLO, anthropic_backend, anthropic_client, openai_backend, router


class StandIn:
    """A loopback HTTP server on a thread, serving `Handler`, with a `released` event its handler
    may wait on until `release()` (or the end of the `with`)."""

    def __init__(self) -> None:
        self.released = threading.Event()

    def serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def release(self) -> None:
        self.released.set()

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


class FailingUpstream(StandIn):
    """A stand-in for a failing upstream: every POST is answered with `status` (with `headers`), or,
    with `status=None`, read and then left without a byte until `release()`. `requests` counts the
    POSTs it got, so a test can tell it was really asked."""

    def __init__(self, status: int | None, headers: dict[str, str] | None = None) -> None:
        super().__init__()
        self.requests = 0
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                self.rfile.read(int(self.headers.get("content-length") or 0))
                upstream.requests += 1
                if status is None:
                    upstream.released.wait(60)  # accepted, read, and then nothing
                    self.close_connection = True
                    return
                # The text an upstream error could carry (the prompt, quoted) is never passed on.
                body = b'{"error": {"type": "server_error", "message": "failed on: hello there"}}'
                self.send_response(status)
                for name, value in {**(headers or {}), "Content-Type": "application/json"}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - health checks: it stays down
                self.send_error(503)

            def log_message(self, *args: Any) -> None:
                pass

        self.serve(Handler)


def start_event_stream(handler: BaseHTTPRequestHandler, header: str, value: str) -> None:
    """Read the request and answer the head of an event stream whose body is framed by `header`."""
    handler.rfile.read(int(handler.headers.get("content-length") or 0))
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header(header, value)
    handler.end_headers()


class PausingAnthropicUpstream(StandIn):
    """A stand-in for an `anthropic` upstream that goes quiet mid-answer (a real one cannot be made
    to on cue): it streams the start of a message, then nothing until `release()`, then its end."""

    def __init__(self) -> None:
        super().__init__()
        upstream = self

        def event(name: str, data: dict[str, Any]) -> bytes:
            return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()

        def delta(text: str) -> bytes:
            return event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": text}})

        message = {"id": "msg_theirs", "type": "message", "role": "assistant", "model": "theirs", "content": []}
        usage = {"input_tokens": 3, "output_tokens": 1}
        self.before = [
            event("message_start", {"message": {**message, "stop_reason": None, "usage": usage}}),
            event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
            delta("Hello"),
        ]
        self.after = [
            delta(" world"),
            event("content_block_stop", {"index": 0}),
            event("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}}),
            event("message_stop", {}),
        ]

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                start_event_stream(self, "Connection", "close")  # the body ends when the connection does
                self.wfile.write(b"".join(upstream.before))
                self.wfile.flush()
                upstream.released.wait(60)
                self.wfile.write(b"".join(upstream.after))
                self.close_connection = True

            def log_message(self, *args: Any) -> None:
                pass

        self.serve(Handler)


class BreakingChatUpstream(StandIn):
    """A stand-in for an `openai` upstream whose chunked chat stream breaks after its first token
    (a real one cannot be made to on cue): `how` is "stalls" (nothing more until `release()`) or
    "closes" (the connection closes in the middle of a chunk)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        upstream = self

        def chunk(data: bytes) -> bytes:
            return b"%x\r\n%b\r\n" % (len(data), data)

        def event(delta: dict[str, Any]) -> bytes:
            payload = {
                "id": "theirs",
                "model": "theirs",
                "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
            }
            return f"data: {json.dumps(payload)}\n\n".encode()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                start_event_stream(self, "Transfer-Encoding", "chunked")
                self.wfile.write(
                    chunk(event({"role": "assistant", "content": ""})) + chunk(event({"content": "Hello"}))
                )
                self.wfile.flush()
                if how == "stalls":
                    upstream.released.wait(60)
                else:
                    self.wfile.write(chunk(event({"content": " world"}))[:20])
                self.close_connection = True

            def log_message(self, *args: Any) -> None:
                pass

        self.serve(Handler)


def failing_backend(stand_in: FailingUpstream, name: str) -> dict:
    return {"name": name, "type": "openai", "base_url": stand_in.url + "/v1"}


@pytest.fixture(scope="module")
def upstream(fast_model: str) -> Iterator[LiveServer]:
    """The daemon requests fall back to."""
    with serving(fast_model) as live:
        yield live


def chat(http: httpx.Client, model: str, **body: Any) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": model, "messages": HELLO, "max_tokens": 3, **body})


def failures(front: LiveServer, backend: str) -> list[str]:
    prefix = f'mlx_manager_backend_failures_total{{backend="{backend}"'
    return [line for line in front.http().get("/metrics").text.splitlines() if line.startswith(prefix)]


@pytest.mark.parametrize("status", [500, 502])
def test_an_upstream_5xx_falls_back_and_without_a_fallback_is_a_502_in_our_words(
    tmp_path, upstream, fast_model, status
):
    with FailingUpstream(status) as failing, FailingUpstream(status) as alone:
        backends = [failing_backend(failing, "failing"), failing_backend(alone, "alone"), openai_backend(upstream)]
        routes = [
            {"model": "m", "to": f"failing:{fast_model}", "fallback": [f"up:{fast_model}"]},
            {"model": "only", "to": "alone"},
        ]
        with router(tmp_path, backends, routes) as front, front.http() as http:
            for stream in (False, True):
                response = chat(http, "m", stream=stream)
                assert response.status_code == 200, response.text
                assert response.headers["x-mlx-manager-backend"] == "up"
                row = row_for(front, response.headers["x-request-id"])
                assert (row["backend"], row["status"], row["completion_tokens"]) == ("up", "success", 3)
            # The first request found it failing; the second did not ask it again (it cools down).
            assert failing.requests == 1
            assert failures(front, "failing") == [
                'mlx_manager_backend_failures_total{backend="failing",error="upstream_error"} 1.0'
            ]

            refused = chat(http, "only")
            body = refused.json()
            assert refused.status_code == 502 and body["error"]["code"] == "upstream_error"
            assert (body["backend"], body["upstream_status"], body["upstream_type"]) == (
                "alone",
                status,
                "server_error",
            )
            assert "hello there" not in refused.text  # the upstream's text, which quoted the prompt, stays out


def test_an_upstream_that_stalls_before_its_first_token_falls_back_after_the_read_timeout(
    tmp_path, upstream, fast_model
):
    with FailingUpstream(None) as stalling:
        backends = [failing_backend(stalling, "stalling"), openai_backend(upstream)]
        routes = [{"model": "m", "to": f"stalling:{fast_model}", "fallback": [f"up:{fast_model}"]}]
        with router(tmp_path, backends, routes, routing={"read_timeout": 1}) as front, front.http() as http:
            with http.stream(
                "POST", "/v1/chat/completions", json={"model": "m", "messages": HELLO, "max_tokens": 3, "stream": True}
            ) as response:
                assert response.status_code == 200
                assert response.headers["x-mlx-manager-backend"] == "up"
                lines = list(response.iter_lines())
            assert "data: [DONE]" in lines
            assert stalling.requests == 1  # it was asked, and said nothing within routing.read_timeout
            assert failures(front, "stalling") == [
                'mlx_manager_backend_failures_total{backend="stalling",error="upstream_timeout"} 1.0'
            ]
            row = row_for(front, response.headers["x-request-id"])
            assert (row["backend"], row["status"]) == ("up", "success")


def test_a_relayed_messages_stream_falls_back_from_an_anthropic_backend_that_fails_or_stalls(
    tmp_path, upstream, fast_model
):
    """The same for Anthropic's dialect, streamed (relayed as the fallback sends it): an upstream
    500, and an upstream that says nothing within routing.read_timeout."""
    with FailingUpstream(500) as failing, FailingUpstream(None) as stalling:
        backends = [
            {"name": "failing", "type": "anthropic", "base_url": failing.url},
            {"name": "stalling", "type": "anthropic", "base_url": stalling.url},
            anthropic_backend(upstream),
        ]
        routes = [
            {"model": "m", "to": f"failing:{fast_model}", "fallback": [f"claude:{fast_model}"]},
            {"model": "s", "to": f"stalling:{fast_model}", "fallback": [f"claude:{fast_model}"]},
        ]
        with router(tmp_path, backends, routes, routing={"read_timeout": 1}) as front:
            cases = (("m", failing, "failing", "upstream_error"), ("s", stalling, "stalling", "upstream_timeout"))
            for model, stand_in, name, kind in cases:
                with anthropic_client(front).messages.stream(model=model, max_tokens=3, messages=HELLO) as stream:
                    message = stream.get_final_message()
                    response = stream.response
                assert response.headers["x-mlx-manager-backend"] == "claude"
                request_id = response.headers["x-request-id"]
                assert (message.id, message.model, message.usage.output_tokens) == (f"msg_{request_id}", model, 3)
                assert stand_in.requests == 1
                assert failures(front, name) == [
                    f'mlx_manager_backend_failures_total{{backend="{name}",error="{kind}"}} 1.0'
                ]
                row = row_for(front, request_id)
                assert (row["backend"], row["status"], row["upstream_completion_tokens"]) == ("claude", "success", 3)


def test_a_relayed_messages_stream_whose_upstream_goes_quiet_gets_our_pings(tmp_path, monkeypatch):
    """As a translated stream does (a ping after PING_EVERY seconds of silence, here 0.2 s), so
    that proxies keep the connection open; the answer then goes on as the upstream sent it."""
    monkeypatch.setattr(MessageStream, "keepalive_every", 0.2)
    with PausingAnthropicUpstream() as pausing:
        backends = [{"name": "pausing", "type": "anthropic", "base_url": pausing.url}]
        with router(tmp_path, backends, [{"model": "m", "to": "pausing"}]) as front, front.http() as http:
            body = {"model": "m", "max_tokens": 5, "messages": HELLO, "stream": True}
            events: list[tuple[str, str]] = []  # (name, data)
            with http.stream("POST", "/v1/messages", json=body) as response:
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        events.append((line.removeprefix("event: "), ""))
                    elif line.startswith("data: "):
                        events[-1] = (events[-1][0], line.removeprefix("data: "))
                    if [name for name, _ in events].count("ping") == 2:  # quiet for a while: pinged twice
                        pausing.release()
            names = [name for name, _ in events]
            quiet = names[3 : names.index("content_block_delta", 3)]  # a third ping may come before the rest
            assert len(quiet) >= 2 and set(quiet) == {"ping"}
            assert names[:3] == ["message_start", "content_block_start", "content_block_delta"]
            after = ["content_block_delta", "content_block_stop", "message_delta", "message_stop"]
            assert names[3 + len(quiet) :] == after
            assert json.loads(events[0][1])["message"]["id"] == f"msg_{response.headers['x-request-id']}"
            assert json.loads(events[-2][1])["usage"] == {"output_tokens": 2}
            row = row_for(front, response.headers["x-request-id"])
            assert (row["status"], row["backend"], row["completion_tokens"]) == ("success", "pausing", 2)


@pytest.mark.parametrize(("how", "kind"), [("stalls", "upstream_timeout"), ("closes", "upstream_error")])
def test_a_relayed_chat_stream_whose_upstream_breaks_after_its_first_token_ends_with_the_error_event(
    tmp_path, how, kind
):
    """After the first byte there is no falling back: what came is relayed, then the SSE error event
    (a silence of routing.read_timeout, or a connection closed in the middle of the body)."""
    with BreakingChatUpstream(how) as breaking:
        backends = [{"name": "breaking", "type": "openai", "base_url": breaking.url + "/v1"}]
        routing = {"read_timeout": 1}
        with router(tmp_path, backends, [{"model": "m", "to": "breaking"}], routing=routing) as front:
            body = {"model": "m", "messages": HELLO, "stream": True}
            with front.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
                events = sse_events(response)
            assert response.status_code == 200
            texts = [json.loads(data)["choices"][0]["delta"].get("content") for name, data in events[:-1]]
            assert texts == ["", "Hello"]
            assert events[-1][0] == "error" and json.loads(events[-1][1])["error"]["code"] == kind
            row = row_for(front, response.headers["x-request-id"])
            assert (row["status"], row["error_type"], row["backend"]) == ("error", kind, "breaking")


def test_a_full_local_queue_falls_back_upstream(tmp_path, upstream, fast_model, slow_model):
    """Our own engine refuses a request when server.queue_limit requests already wait: one sequence
    at a time here, one running and one waiting fill it."""
    routes = [
        {"model": "m", "to": f"local:{slow_model}", "fallback": [f"up:{fast_model}"]},
        {"model": "here", "to": f"local:{slow_model}"},
    ]
    engine = EngineConfig(max_loaded=2, allow_any_path=True, queue_limit=1, max_batch_size=1)
    with router(tmp_path, [openai_backend(upstream)], routes, engine=engine) as front, front.http() as http:
        stop = threading.Event()

        def occupy() -> None:
            body = {"model": slow_model, "messages": HELLO, "max_tokens": 5000, "stream": True}
            with (
                contextlib.suppress(httpx.HTTPError),
                httpx.Client(base_url=front.url, timeout=120) as own,
                own.stream("POST", "/v1/chat/completions", json=body) as response,
            ):
                for _ in response.iter_lines():
                    if stop.is_set():
                        return

        occupants = [threading.Thread(target=occupy) for _ in range(2)]
        try:
            status = front.engine.status
            # One after the other: both waiting while the model loads would overflow the queue.
            occupants[0].start()
            assert wait_until(lambda: status().active_jobs == 1, timeout=120)
            occupants[1].start()
            assert wait_until(lambda: status().active_jobs == 1 and status().queue_depth == 1, timeout=120)

            moved = chat(http, "m")
            assert moved.status_code == 200, moved.text
            assert moved.headers["x-mlx-manager-backend"] == "up"
            assert failures(front, "local") == [
                'mlx_manager_backend_failures_total{backend="local",error="overloaded"} 1.0'
            ]
            full = chat(http, "here")  # no fallback: the engine's own answer
            assert full.status_code == 503 and full.json()["error"]["code"] == "overloaded"
            assert int(full.headers["retry-after"]) >= 1
        finally:
            stop.set()
            for thread in occupants:
                if thread.ident is not None:  # started
                    thread.join(120)
        assert wait_until(lambda: front.engine.status().active_jobs == 0, timeout=60)


def test_retry_after_of_a_route_whose_backends_all_cool_down_is_that_routes_shortest_wait(tmp_path, fast_model):
    """`brief` asks for 5 s (its Retry-After); `gone` and `gone2` cool down routing.cooldown (600 s).
    A request for the route of gone and gone2 is told 600 s, not brief's 5 s."""
    with FailingUpstream(429, {"Retry-After": "5"}) as brief:
        backends = [
            failing_backend(brief, "brief"),
            {"name": "gone", "type": "openai", "base_url": "http://127.0.0.1:9/v1"},
            {"name": "gone2", "type": "openai", "base_url": "http://127.0.0.1:9/v1"},
        ]
        groups = [{"name": "pair", "members": ["gone2"]}]
        routes = [{"model": "far", "to": "gone", "fallback": ["pair"]}, {"model": "near", "to": "brief"}]
        with router(tmp_path, backends, routes, groups, routing={"cooldown": 600}) as front, front.http() as http:
            assert chat(http, "far").status_code == 502  # both unreachable: now cooling down
            limited = chat(http, "near")
            assert limited.status_code == 429 and brief.requests == 1
            assert 1 <= int(limited.headers["retry-after"]) <= 5

            far = chat(http, "far")
            assert far.status_code == 503 and far.json()["error"]["code"] == "upstream_unavailable"
            assert int(far.headers["retry-after"]) > 500  # its own backends' wait, not brief's
            near = chat(http, "near")
            assert near.status_code == 503 and 1 <= int(near.headers["retry-after"]) <= 5
