"""A real uvicorn server on a free port, in a background thread, for the daemon's tests.

with LiveServer(create_app(settings)) as server:
    client = server.openai()          # the official client, no retries
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import httpx
import openai
import uvicorn

from mlx_manager.daemon.server import server_config
from mlx_manager.engine.config import EngineConfig
from mlx_manager.engine.engine import Engine
from mlx_manager.engine.jobs import EmbeddingJob, Job
from mlx_manager.engine.types import EmbeddingRequest, GenerationRequest
from mlx_manager.settings import Settings

T = TypeVar("T")


class RecordingEngine(Engine):
    """The real engine, keeping every job it was given so a test can see what the model did."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.jobs: list[Job] = []
        self.embedding_jobs: list[EmbeddingJob] = []

    def submit(self, request: GenerationRequest) -> Job:
        job = super().submit(request)
        self.jobs.append(job)
        return job

    def submit_embedding(self, request: EmbeddingRequest) -> EmbeddingJob:
        job = super().submit_embedding(request)
        self.embedding_jobs.append(job)
        return job

    def job(self, request_id: str) -> Job:
        return next(job for job in self.jobs if job.request.request_id == request_id)


def settings_with(**sections: dict[str, Any]) -> Settings:
    """Settings(server={"queue_limit": 1}, ...) with everything else at its default."""
    return Settings.model_validate(sections)


class LiveServer:
    def __init__(self, app, *, startup_timeout: float = 60.0) -> None:
        self.app = app
        self.startup_timeout = startup_timeout
        # Bound before uvicorn starts: the port is ours, no race with other tests for a "free" one.
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # The daemon's own uvicorn settings (connection limits, proxy headers), as `serve` runs it.
        self.server = uvicorn.Server(server_config(app, app.state.daemon.settings))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def daemon(self):
        """The app's DaemonState: settings, engine, draining flag."""
        return self.app.state.daemon

    @property
    def engine(self):
        return self.daemon.engine

    def openai(self, **options: Any) -> openai.OpenAI:
        """The official client; `api_key=` sends a real key to a daemon that has keys."""
        return openai.OpenAI(**{"base_url": self.url + "/v1", "api_key": "unused", "max_retries": 0, **options})

    def async_openai(self, **options: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(**{"base_url": self.url + "/v1", "api_key": "unused", "max_retries": 0, **options})

    def http(self, **options: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, **{"timeout": 60, **options})

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        if not self.daemon.owns_engine:
            self.engine.stop()

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def serving(*models: str, settings: Settings | None = None, **engine_config: Any) -> Iterator[LiveServer]:
    """A live daemon (the real app, a RecordingEngine) with `models` loaded before its first request.
    Requests may load any model folder by its path (the tests' models live in temporary folders),
    unless `allow_any_path=False` is given."""
    from mlx_manager.daemon.app import create_app

    engine = RecordingEngine(EngineConfig(preload=list(models), **{"allow_any_path": True, **engine_config}))
    with LiveServer(create_app(settings or Settings(), engine=engine)) as live:
        assert wait_until(lambda: set(models) <= set(engine.status().loaded), timeout=120)
        yield live


def wait_until(predicate: Callable[[], T], timeout: float = 60.0, interval: float = 0.02) -> T:
    """The predicate's first truthy value within `timeout` seconds (its last value otherwise).

    The timeout is a ceiling for a state that should come, not a deadline the product must meet:
    generous, so a busy machine only makes the test slower, never wrong."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def assert_problem(response: httpx.Response, status: int, kind: str) -> dict:
    """The response is an RFC 9457 problem of this kind, with an OpenAI error and the request id."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["type"] == f"urn:mlx-manager:problem:{kind}"
    assert body["status"] == status
    assert body["title"] and body["detail"] and body["instance"].startswith("/")
    assert body["request_id"] == response.headers["x-request-id"]
    assert body["error"]["message"] == body["detail"]
    assert body["error"]["code"] == kind
    return body
