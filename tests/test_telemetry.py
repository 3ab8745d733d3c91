"""Tracing: our spans and their attributes, no prompt text anywhere, off means off, no network
without a token, OTLP export. Spans are captured with logfire's own test exporter (`capfire`)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import logfire
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from pydantic import BaseModel

from mlx_manager import __version__, telemetry
from mlx_manager.settings import Settings

MARKER = "PURPLE-OCTOPUS-PROMPT-7731"  # stands for any user text: it must never reach a span


def settings_with(**telemetry_options) -> Settings:
    return Settings.model_validate({"telemetry": telemetry_options})


@pytest.fixture(autouse=True)
def telemetry_reset(monkeypatch):
    """No token, no OTLP variables, no inherited switches; logfire left inert after each test."""
    for name in ("LOGFIRE_TOKEN", "LOGFIRE_SEND_TO_LOGFIRE", "LOGFIRE_CONSOLE", "LOGFIRE_HTTPX_CAPTURE_ALL"):
        monkeypatch.delenv(name, raising=False)
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    yield
    telemetry._logfire = None
    logfire.configure(send_to_logfire=False, console=False, metrics=False, distributed_tracing=False)


@pytest.fixture
def spans(capfire):
    """Telemetry set up as the daemon does it; capfire's exporter receives the scrubbed spans."""
    telemetry.configure_telemetry(
        settings_with(environment="test"), span_processors=[SimpleSpanProcessor(capfire.exporter)]
    )
    return capfire.exporter


def finished(exporter) -> list[ReadableSpan]:
    """The ended spans (logfire also exports a 'pending' copy of each span when it starts)."""
    return [s for s in exporter.exported_spans if (s.attributes or {}).get("logfire.span_type") != "pending_span"]


def named(exporter, name: str) -> ReadableSpan:
    [span] = [s for s in finished(exporter) if s.name == name]
    return span


def everything_recorded(exported: list[ReadableSpan]) -> str:
    """Every name, attribute, event and status text of every span, as one string to search."""
    parts = []
    for span in exported:
        parts += [span.name, repr(dict(span.attributes or {})), repr(span.status.description)]
        parts += [repr(dict(span.resource.attributes))]
        for event in span.events:
            parts += [event.name, repr(dict(event.attributes or {}))]
        for link in span.links:
            parts.append(repr(dict(link.attributes or {})))
    return "\n".join(parts)


# -- our spans --------------------------------------------------------------------------------


def test_model_load_span_records_id_seconds_and_memory(spans):
    with telemetry.model_load_span("mlx-community/tiny-4bit") as load:
        load.memory_bytes = 123_456_789

    span = named(spans, "model load")
    assert span.attributes[telemetry.MODEL_ID] == "mlx-community/tiny-4bit"
    assert span.attributes[telemetry.MEMORY_BYTES] == 123_456_789
    assert span.attributes[telemetry.LOAD_SECONDS] == pytest.approx(load.seconds, abs=1e-6)
    assert 0 <= load.seconds < 1
    assert span.attributes["logfire.msg"] == "load model mlx-community/tiny-4bit"


def test_model_load_span_seconds_are_measured_with_telemetry_off():
    telemetry.configure_telemetry(settings_with(enabled=False))
    with telemetry.model_load_span("m") as load:
        load.memory_bytes = 1
    assert load.seconds is not None and load.seconds >= 0


def test_generation_span_records_the_figures(spans):
    with telemetry.generation_span("tiny", "/v1/chat/completions", "req-42") as gen:
        gen.prompt_tokens = 12
        gen.completion_tokens = 30
        gen.time_to_first_token_ms = 45.5
        gen.tokens_per_second = 88.25
        gen.finish_reason = "length"

    span = named(spans, "generation")
    assert {key: span.attributes[key] for key in telemetry.OWN_ATTRIBUTES if key in span.attributes} == {
        telemetry.MODEL: "tiny",
        telemetry.ENDPOINT: "/v1/chat/completions",
        telemetry.REQUEST_ID: "req-42",
        telemetry.PROMPT_TOKENS: 12,
        telemetry.COMPLETION_TOKENS: 30,
        telemetry.TIME_TO_FIRST_TOKEN_MS: 45.5,
        telemetry.TOKENS_PER_SECOND: 88.25,
        telemetry.FINISH_REASON: "length",
    }
    assert "logfire.scrubbed" not in span.attributes  # a route full of "completions" is not text


def test_model_names_that_look_like_text_are_not_redacted(spans):
    with telemetry.generation_span("org/text-completion-model", "/v1/completions", "r"):
        pass
    span = named(spans, "generation")
    assert span.attributes[telemetry.MODEL] == "org/text-completion-model"
    assert span.attributes["logfire.msg"] == "generate org/text-completion-model"
    assert "logfire.scrubbed" not in span.attributes


def test_generation_span_works_out_tokens_per_second(spans):
    with telemetry.generation_span("tiny", "/v1/completions", "r") as gen:
        gen.completion_tokens = 11
        gen.time_to_first_token_ms = 0.0
    rate = named(spans, "generation").attributes[telemetry.TOKENS_PER_SECOND]
    assert rate > 0


def test_generation_span_has_no_room_for_text(spans):
    with telemetry.generation_span("tiny", "/v1/completions", "r") as gen:
        with pytest.raises(AttributeError):
            gen.prompt = MARKER  # type: ignore[attr-defined]
        gen.finish_reason = MARKER  # not a finish reason: recorded as "other"
    span = named(spans, "generation")
    assert span.attributes[telemetry.FINISH_REASON] == "other"
    assert MARKER not in everything_recorded(spans.exported_spans)


def test_a_failed_generation_keeps_the_error_type_but_not_its_message(spans):
    with pytest.raises(ValueError):
        with telemetry.generation_span("tiny", "/v1/completions", "r"):
            raise ValueError(f"bad input {MARKER!r}")

    span = named(spans, "generation")
    assert span.attributes["logfire.level_num"] == 17  # error
    [event] = span.events
    assert event.attributes["exception.type"] == "builtins.ValueError"
    assert "test_telemetry.py" in event.attributes["exception.stacktrace"]
    assert span.status.description == "ValueError"
    assert MARKER not in everything_recorded(spans.exported_spans)


def test_our_own_errors_keep_their_message(spans):
    from mlx_manager.engine.errors import ModelLoadFailed

    with pytest.raises(ModelLoadFailed):
        with telemetry.model_load_span("broken"):
            raise ModelLoadFailed("could not load 'broken': no weights")
    [event] = named(spans, "model load").events
    assert event.attributes["exception.message"] == "could not load 'broken': no weights"


def test_a_cancelled_generation_is_not_an_error(spans):
    import asyncio

    with pytest.raises(asyncio.CancelledError):
        with telemetry.generation_span("tiny", "/v1/completions", "r") as gen:
            gen.completion_tokens = 3
            raise asyncio.CancelledError
    span = named(spans, "generation")
    assert span.attributes[telemetry.FINISH_REASON] == "cancelled"
    assert span.attributes.get("logfire.level_num", 9) < 17
    assert not span.events


def test_resource_names_the_service_version_and_environment(spans):
    with telemetry.generation_span("tiny", "/v1/completions", "r"):
        pass
    resource = named(spans, "generation").resource.attributes
    assert resource["service.name"] == "mlx-manager"
    assert resource["service.version"] == __version__
    assert resource["deployment.environment.name"] == "test"


def test_scrubbing_redacts_whatever_looks_like_text(spans):
    with logfire.span("anything", prompt=MARKER, messages=[{"role": "user", "content": MARKER}], n=3):
        logfire.info("note", completion=MARKER, system_prompt=MARKER, input=MARKER, prompt_tokens=5)

    assert MARKER not in everything_recorded(spans.exported_spans)
    note = named(spans, "note")
    assert note.attributes["prompt_tokens"] == 5  # counts are not text
    assert named(spans, "anything").attributes["n"] == 3


# -- FastAPI ----------------------------------------------------------------------------------


class ChatRequest(BaseModel):
    model: str
    messages: list[dict[str, str]]
    max_tokens: int = 16


def tiny_app() -> FastAPI:
    """An app shaped like the daemon's API: a JSON body that carries the user's text."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: ChatRequest) -> dict:
        return {"model": request.model, "choices": [{"message": {"role": "assistant", "content": "ok"}}]}

    @app.post("/v1/explode")
    async def explode(request: ChatRequest) -> dict:
        raise RuntimeError(f"failed on {request.messages[0]['content']}")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> str:
        return ""

    return app


def chat_body(text: str) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 4}


def test_request_spans_never_hold_the_request_body(spans):
    app = tiny_app()
    assert telemetry.instrument_app(app, settings_with())
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/v1/chat/completions", json=chat_body(MARKER)).status_code == 200
        invalid = {"model": "tiny", "messages": MARKER, "max_tokens": MARKER}
        assert client.post("/v1/chat/completions", json=invalid).status_code == 422
        assert client.post("/v1/explode", json=chat_body(MARKER)).status_code == 500

    requests = [s for s in finished(spans) if s.name.startswith("POST ")]
    assert [s.name for s in requests] == ["POST /v1/chat/completions"] * 2 + ["POST /v1/explode"]
    assert [s.attributes["http.status_code"] for s in requests] == [200, 422, 500]
    # The invalid request says where it was invalid, not what was sent.
    errors = json.loads(requests[1].attributes["fastapi.arguments.errors"])
    assert {tuple(e["loc"]) for e in errors} == {("body", "messages"), ("body", "max_tokens")}
    recorded = everything_recorded(spans.exported_spans)
    assert "fastapi.arguments.values" not in recorded  # kept out, not merely scrubbed
    assert MARKER not in recorded


def test_the_body_check_would_catch_a_leak(spans):
    """Control: logfire's default FastAPI instrumentation records endpoint arguments, so the
    marker check above can fail; instrument_app is what keeps the body out."""
    app = tiny_app()
    logfire.instrument_fastapi(app)
    with TestClient(app) as client:
        client.post("/v1/chat/completions", json=chat_body(MARKER))
    assert "fastapi.arguments.values" in everything_recorded(spans.exported_spans)


def test_probes_and_scrapes_get_no_span(spans):
    app = tiny_app()
    telemetry.instrument_app(app, settings_with())
    assert telemetry.instrument_app(app, settings_with())  # twice is harmless: one span per request
    with TestClient(app) as client:
        client.get("/health")
        client.get("/metrics")
        client.post("/v1/chat/completions", json=chat_body("hi"))
    assert [s.name for s in finished(spans) if s.name.startswith(("GET", "POST"))] == ["POST /v1/chat/completions"]


def test_fastapi_own_telemetry_stays_quiet(spans):
    """FastAPI traces (and logs validation failures of) any app once a tracer provider exists;
    with telemetry configured, only instrument_app's spans remain."""
    with TestClient(tiny_app()) as client:  # not instrumented
        client.post("/v1/chat/completions", json={"model": "tiny", "messages": MARKER})
    assert finished(spans) == []


# -- off means off ----------------------------------------------------------------------------


def test_disabled_telemetry_makes_no_spans(capfire):
    settings = settings_with(enabled=False)
    telemetry.configure_telemetry(settings)  # leaves capfire's configuration (and exporter) in place
    # capfire installed a tracer provider, which FastAPI's own telemetry would use; in the daemon
    # with telemetry off there is none. What is checked here is that our code makes no span.
    logfire.suppress_scopes("fastapi")
    assert not telemetry.enabled()

    app = tiny_app()
    assert telemetry.instrument_app(app, settings) is False
    assert telemetry.instrument_httpx() is False
    with TestClient(app) as client:
        client.post("/v1/chat/completions", json=chat_body(MARKER))
    with telemetry.model_load_span("m") as load:
        load.memory_bytes = 1
    with telemetry.generation_span("m", "/v1/completions", "r") as gen:
        gen.completion_tokens = 1

    assert capfire.exporter.exported_spans == []


def test_disabled_telemetry_does_not_even_import_logfire():
    code = (
        "import sys\n"
        "from mlx_manager import telemetry\n"
        "from mlx_manager.settings import Settings\n"
        "telemetry.configure_telemetry(Settings.model_validate({'telemetry': {'enabled': False}}))\n"
        "with telemetry.generation_span('m', '/v1/completions', 'r') as gen:\n"
        "    gen.completion_tokens = 1\n"
        "with telemetry.model_load_span('m'):\n"
        "    pass\n"
        "print('logfire' in sys.modules, 'opentelemetry' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


# -- where spans go ---------------------------------------------------------------------------


def test_no_network_is_attempted_without_a_token(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no .logfire credentials folder here
    attempts = []
    real_connect = socket.socket.connect

    def record_connect(self, address):
        attempts.append(address)
        return real_connect(self, address)

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", record_connect)
    monkeypatch.setattr(socket, "create_connection", refuse)

    telemetry.configure_telemetry(settings_with())
    assert telemetry.enabled()
    with telemetry.generation_span("tiny", "/v1/completions", "r") as gen:
        gen.completion_tokens = 3
    with telemetry.model_load_span("tiny"):
        pass
    logfire.force_flush()
    threading.Event().wait(0.2)  # a background exporter or token check would have started by now

    assert attempts == []


class Collector(BaseHTTPRequestHandler):
    """A stand-in OTLP/HTTP collector that keeps what it is sent."""

    received: list[tuple[str, bytes]] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def collector():
    Collector.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_spans_go_to_the_otlp_endpoint(collector):
    host, port = collector.server_address
    telemetry.configure_telemetry(settings_with(otlp_endpoint=f"http://{host}:{port}"))
    with telemetry.generation_span("tiny", "/v1/completions", "req-otlp") as gen:
        gen.completion_tokens = 3
        gen.finish_reason = "stop"
    with logfire.span("anything", prompt=MARKER):
        pass
    logfire.force_flush()

    assert Collector.received, "nothing reached the collector"
    assert {path for path, _ in Collector.received} == {"/v1/traces"}
    sent = b"".join(body for _, body in Collector.received)
    assert b"req-otlp" in sent and b"mlx-manager" in sent
    assert MARKER.encode() not in sent  # scrubbed before any exporter sees it


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("http://collector:4318", "http://collector:4318/v1/traces"),
        ("http://collector:4318/", "http://collector:4318/v1/traces"),
        ("https://otel.example.com/v1/traces", "https://otel.example.com/v1/traces"),
        ("https://otel.example.com/prefix", "https://otel.example.com/prefix/v1/traces"),
    ],
)
def test_otlp_traces_url(endpoint, url):
    assert telemetry.otlp_traces_url(endpoint) == url


# -- httpx and SQLAlchemy -----------------------------------------------------------------------


def test_httpx_requests_are_traced_without_bodies(spans, collector):
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    assert telemetry.instrument_httpx()
    try:
        host, port = collector.server_address
        with httpx.Client() as client:
            client.post(f"http://{host}:{port}/v1/anything", json=chat_body(MARKER))
    finally:
        HTTPXClientInstrumentor().uninstrument()
        telemetry._httpx_instrumented = False

    [span] = [s for s in finished(spans) if s.name.startswith("POST")]
    assert span.attributes["http.status_code"] == 200
    assert MARKER not in everything_recorded(spans.exported_spans)


def test_sqlalchemy_statements_are_traced_without_parameters(spans, tmp_path):
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'audit.db'}")
    assert telemetry.instrument_sqlalchemy(engine)
    with engine.begin() as connection:
        connection.execute(sa.text("create table t (note text)"))
        connection.execute(sa.text("insert into t (note) values (:note)"), {"note": MARKER})
    engine.dispose()

    statements = [s.attributes.get("db.statement") for s in finished(spans)]
    assert "insert into t (note) values (?)" in statements
    assert MARKER not in everything_recorded(spans.exported_spans)
