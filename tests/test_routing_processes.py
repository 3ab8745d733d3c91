"""Routing across real processes: `mlx-manager serve` daemons and mlx_lm.server on loopback.

A group of two daemons shares the load and outlives one of them being SIGKILLed; mlx_lm.server, a
foreign OpenAI-compatible implementation, is an `openai` backend for chat and for Anthropic's
Messages; a router in its own process authenticates to an upstream with a key it only knows by
reference, and that key appears in no file, log line or exported span.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.daemon_server import wait_until
from tests.test_routing import GREEDY, HELLO, chat_stream, openai_backend, router

pytestmark = pytest.mark.slow

MLX_MANAGER = str(Path(sys.executable).with_name("mlx-manager"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Process:
    """A server in its own process, its output in a file (a pipe nobody reads would fill and stall it)."""

    def __init__(self, args: list[str], home: Path, env: dict[str, str] | None = None) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output = home / "output.log"
        with self.output.open("wb") as output:
            environment = {**os.environ, "MLX_MANAGER_HOME": str(home), **(env or {})}
            self.process = subprocess.Popen(
                [*args, "--port", str(self.port)], stdout=output, stderr=output, env=environment
            )

    def wait_ready(self, path: str, timeout: float = 120) -> None:
        def ready() -> bool:
            assert self.process.poll() is None, self.output.read_text()
            try:
                return httpx.get(self.url + path, timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(ready, timeout=timeout, interval=0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


@contextlib.contextmanager
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    try:
        yield started
    finally:
        for process in started:
            process.stop()


def daemon(tmp_path: Path, name: str, model: str, *settings: str, env: dict[str, str] | None = None) -> Process:
    """`mlx-manager serve --model MODEL` in its own home, with `section.key=value` settings as variables."""
    variables = {
        f"MLX_MANAGER_{key.split('=')[0].replace('.', '__').upper()}": key.split("=", 1)[1] for key in settings
    }
    return Process([MLX_MANAGER, "serve", "--model", model], tmp_path / name, {**variables, **(env or {})})


# -- a group of two daemons --------------------------------------------------------------------


class Outcome:
    """What one client saw of one streamed request through the router."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.backend: str | None = None
        self.first_byte = threading.Event()
        self.done = False  # [DONE] arrived
        self.error: dict[str, Any] | None = None  # the SSE error event, if the stream ended in one


def stream_through(url: str, model: str, outcome: Outcome, max_tokens: int) -> None:
    body = {"model": model, "messages": HELLO, "max_tokens": max_tokens, "stream": True}
    with httpx.Client(base_url=url, timeout=120) as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
        outcome.status, outcome.backend = r.status_code, r.headers.get("x-mlx-manager-backend")
        lines = r.iter_lines()
        for line in lines:
            outcome.first_byte.set()
            if line == "data: [DONE]":
                outcome.done = True
            elif line == "event: error":
                outcome.error = json.loads(next(lines).removeprefix("data: "))
    outcome.first_byte.set()


def test_a_group_of_two_daemons_shares_load_and_survives_one_being_killed(tmp_path, fast_model):
    with processes() as started:
        # One sequence at a time each, so requests queue at a daemon: those are in flight, and no
        # byte of theirs has reached the client when their daemon dies.
        for name in ("d1", "d2"):
            started.append(daemon(tmp_path, name, fast_model, "server.max_batch_size=1"))
        d1, d2 = started
        for member in started:
            member.wait_ready("/ready")
        backends = [openai_backend(d1, "d1"), openai_backend(d2, "d2")]
        groups = [{"name": "macs", "members": ["d1", "d2"]}]
        routes = [{"model": "team", "to": f"macs:{fast_model}"}]
        with router(tmp_path, backends, routes, groups) as front:
            # Load is shared: concurrent requests spread over both members.
            shared = [Outcome() for _ in range(12)]
            threads = [threading.Thread(target=stream_through, args=(front.url, "team", o, 16)) for o in shared]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert all(o.status == 200 and o.done for o in shared)
            served = [o.backend for o in shared]
            assert 4 <= served.count("d1") <= 8 and served.count("d1") + served.count("d2") == 12

            # d1 dies in the middle of a burst: some of its requests stream, others wait in its queue.
            burst = [Outcome() for _ in range(12)]
            threads = [threading.Thread(target=stream_through, args=(front.url, "team", o, 300)) for o in burst]
            for thread in threads:
                thread.start()
            group_d1 = front.daemon.router.backends["d1"]
            assert wait_until(lambda: group_d1.outstanding >= 3 and any(o.backend == "d1" for o in burst), timeout=60)
            d1.kill()
            for thread in threads:
                thread.join(120)

            assert all(o.status == 200 for o in burst)  # nobody got a refusal
            streaming_on_d1 = [o for o in burst if o.backend == "d1"]
            # A request whose stream had begun on d1 ends with the error event (after the first byte
            # there is no taking it back); every other one was answered whole, most by d2.
            assert streaming_on_d1 and all(o.done or o.error is not None for o in streaming_on_d1)
            assert all(o.error["error"]["code"] == "upstream_error" for o in streaming_on_d1 if o.error)
            assert all(o.done and o.error is None for o in burst if o.backend != "d1")
            metrics = front.http().get("/metrics").text
            failed_over = [
                line
                for line in metrics.splitlines()
                if line.startswith('mlx_manager_backend_failures_total{backend="d1"')
            ]
            assert failed_over, metrics  # in-flight requests that had sent nothing moved to d2

            # Later requests go to the survivor (d1 cools down; its health checks fail).
            later = [Outcome() for _ in range(4)]
            for outcome in later:
                stream_through(front.url, "team", outcome, 4)
            assert [(o.backend, o.done) for o in later] == [("d2", True)] * 4
            assert 'mlx_manager_backend_up{backend="d1",backend_type="openai"} 0.0' in front.http().get("/metrics").text


# -- mlx_lm.server, a foreign implementation ------------------------------------------------------


def test_mlx_lm_server_is_an_openai_backend_for_chat_and_messages(tmp_path, fast_model):
    with processes() as started:
        started.append(Process([sys.executable, "-m", "mlx_lm.server", "--model", fast_model], tmp_path / "mlx-lm"))
        foreign = started[0]
        foreign.wait_ready("/v1/models")
        direct_client = openai.OpenAI(base_url=foreign.url + "/v1", api_key="unused", max_retries=0)
        routes = [{"model": "lm", "to": f"mlxlm:{fast_model}"}]
        with router(tmp_path, [openai_backend(foreign, "mlxlm")], routes) as front:
            text, _, _, usage = chat_stream(front.openai(), model="lm", messages=HELLO, max_tokens=24, **GREEDY)
            expected, _, _, direct_usage = chat_stream(
                direct_client, model=fast_model, messages=HELLO, max_tokens=24, **GREEDY
            )
            assert text == expected and text
            assert (usage.prompt_tokens, usage.completion_tokens) == (
                direct_usage.prompt_tokens,
                direct_usage.completion_tokens,
            )

            client = anthropic.Anthropic(base_url=front.url, api_key="unused", max_retries=0)
            with client.messages.stream(model="lm", max_tokens=24, messages=HELLO, extra_body=GREEDY) as stream:
                streamed = "".join(stream.text_stream)
                message = stream.get_final_message()
            assert streamed == expected
            assert message.usage.output_tokens == direct_usage.completion_tokens
            assert message.usage.input_tokens + message.usage.cache_read_input_tokens == direct_usage.prompt_tokens
            assert message.stop_reason == "max_tokens"

            whole = client.messages.create(model="lm", max_tokens=24, messages=HELLO, extra_body=GREEDY)
            assert whole.content[0].text == expected


# -- keys by reference ---------------------------------------------------------------------------


@pytest.fixture
def otlp_collector() -> Iterator[tuple[list[bytes], str]]:
    """An OTLP/HTTP endpoint that keeps what it is sent."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received: list[bytes] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            received.append(self.rfile.read(int(self.headers["content-length"])))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield received, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def exported_spans(received: list[bytes]) -> list[Any]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    spans = []
    for body in received:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        spans += [span for resource in request.resource_spans for scope in resource.scope_spans for span in scope.spans]
    return spans


def test_a_backend_key_given_by_reference_is_used_and_never_written_logged_or_traced(
    tmp_path, fast_model, otlp_collector
):
    key = "sk-upstream-" + hashlib.sha256(b"never written").hexdigest()[:32]
    received, collector_url = otlp_collector
    with processes() as started:
        # The upstream takes this key only (our own key mechanism: MLX_MANAGER_API_KEY).
        started.append(daemon(tmp_path, "upstream", fast_model, env={"MLX_MANAGER_API_KEY": key}))
        upstream = started[0]
        upstream.wait_ready("/health")  # /ready takes a key on a daemon that has keys
        config = tmp_path / "router" / "config.toml"
        config.parent.mkdir()
        config.write_text(
            '[log]\nlevel = "debug"\n\n[telemetry]\notlp_endpoint = "' + collector_url + '"\n\n'
            '[[routing.backends]]\nname = "up"\ntype = "openai"\nbase_url = "' + upstream.url + '/v1"\n'
            'api_key = "env:UPSTREAM_KEY"\n\n'
            '[[routing.routes]]\nmodel = "remote"\nto = "up:' + fast_model + '"\n'
        )
        front = Process([MLX_MANAGER, "serve"], tmp_path / "router", {"UPSTREAM_KEY": key})
        started.append(front)
        front.wait_ready("/ready")
        client = openai.OpenAI(base_url=front.url + "/v1", api_key="unused", max_retries=0)
        # Greedy: it runs to max_tokens (sampled, the tiny model may end early at its end token).
        answer = client.chat.completions.with_raw_response.create(
            model="remote", messages=HELLO, max_tokens=4, **GREEDY
        )
        assert answer.headers["x-mlx-manager-backend"] == "up"  # the upstream took our key
        assert answer.parse().usage.completion_tokens == 4
        list(client.chat.completions.create(model="remote", messages=HELLO, max_tokens=4, stream=True))
        listed = subprocess.run(
            [MLX_MANAGER, "config", "get", "routing.backends", "--json"],
            capture_output=True,
            text=True,
            env={**os.environ, "MLX_MANAGER_HOME": str(tmp_path / "router"), "UPSTREAM_KEY": key},
            check=True,
        )
        assert json.loads(listed.stdout)["value"][0]["api_key"] == "env:UPSTREAM_KEY"
        front.stop()  # flushes its spans and its audit rows

    spans = exported_spans(received)
    inbound = [s for s in spans if s.name == "POST /v1/chat/completions" and s.kind == 2]  # SERVER: FastAPI's
    outbound = [s for s in spans if s.name.startswith("POST") and s.kind == 3]  # CLIENT: httpx's
    assert len(inbound) == 2 and len(outbound) == 2
    # Each request to the upstream is traced inside the request that made it.
    assert {s.trace_id for s in outbound} == {s.trace_id for s in inbound}
    by_id = {s.span_id: s for s in spans}
    for span in outbound:
        parent = by_id[span.parent_span_id]
        while parent.parent_span_id:
            parent = by_id[parent.parent_span_id]
        assert parent in inbound
    generation = [{a.key: a.value.string_value for a in s.attributes} for s in spans if s.name == "generation"]
    assert [(g["mlx_manager.backend"], g["mlx_manager.backend_type"]) for g in generation] == [("up", "openai")] * 2

    secret = key.encode()
    assert not any(secret in body for body in received), "the key reached an exported span"
    written = [path for path in (tmp_path / "router").rglob("*") if path.is_file()]
    assert any(path.name == "audit.db" for path in written) and any(path.suffix == ".log" for path in written)
    for path in written:
        assert secret not in path.read_bytes(), f"the key is in {path}"
