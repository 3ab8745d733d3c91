"""The audit log as the daemon writes it: a real server, real requests, the real SQLite file."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import threading
import uuid

import httpx
import openai
import pytest

from mlx_manager.daemon.app import create_app
from mlx_manager.engine.config import EngineConfig
from tests.daemon_server import LiveServer, RecordingEngine, serving, settings_with, wait_until

HELLO = [{"role": "user", "content": "hello"}]


def rows(db_path, where: str = "1=1", params: tuple = ()) -> list[dict]:
    with sqlite3.connect(db_path) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute(f"SELECT * FROM audit_logs WHERE {where} ORDER BY id", params)]


def row_for(server, request_id: str, timeout: float = 60.0) -> dict:
    """The row of one request, once the batched writer has committed it."""
    path = server.daemon.audit.path
    found: list[dict] = []
    assert wait_until(lambda: bool(found.extend(rows(path, "request_id = ?", (request_id,))) or found), timeout)
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory, fast_model, slow_model):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLX_MANAGER_HOME", str(tmp_path_factory.mktemp("home")))
        engine = RecordingEngine(EngineConfig(preload=[fast_model, slow_model], max_loaded=2))
        with LiveServer(create_app(settings_with(), engine=engine)) as live:
            assert wait_until(lambda: len(engine.status().loaded) == 2, timeout=120)
            yield live


def test_success_row_has_the_request_metadata(server, fast_model):
    raw = server.openai().chat.completions.with_raw_response.create(model=fast_model, messages=HELLO, max_tokens=7)
    completion = raw.parse()
    row = row_for(server, raw.headers["x-request-id"])
    assert row["status"] == "success" and row["http_status"] == 200
    assert row["endpoint"] == "/v1/chat/completions" and row["model"] == fast_model and row["backend_type"] == "local"
    assert row["prompt_tokens"] == completion.usage.prompt_tokens
    # 7 unless the random model happened to end its answer sooner.
    assert row["completion_tokens"] == completion.usage.completion_tokens <= 7
    assert (completion.usage.completion_tokens == 7) == (completion.choices[0].finish_reason == "length")
    assert row["total_tokens"] == completion.usage.total_tokens
    assert row["duration_ms"] > 0 and row["error_type"] is None
    assert row["timestamp"]
    assert row["api_key"] is None  # this daemon has no API keys


def test_without_keys_no_row_names_a_key_whatever_the_client_sends(server, fast_model):
    server.openai(api_key="mlxm-" + "z" * 43).completions.create(
        model=fast_model, prompt="hi", max_tokens=2, extra_headers={"X-Request-ID": "keyless-1"}
    )
    with server.http() as http:
        assert http.get("/v1/models", headers={"X-Request-ID": "keyless-2"}).status_code == 200
    for request_id in ("keyless-1", "keyless-2"):
        row = row_for(server, request_id)
        assert row["status"] == "success" and row["api_key"] is None


def test_streamed_request_is_recorded_when_the_stream_ends(server, fast_model):
    stream = server.openai().completions.create(
        model=fast_model,
        prompt="once upon",
        max_tokens=9,
        temperature=0,  # greedy: it runs to max_tokens (sampled, it may end early at the end token)
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"X-Request-ID": "stream-row-1"},
    )
    usage = [chunk.usage for chunk in stream if chunk.usage][-1]
    row = row_for(server, "stream-row-1")
    assert row["status"] == "success" and row["endpoint"] == "/v1/completions"
    assert row["completion_tokens"] == usage.completion_tokens == 9
    assert row["time_to_first_token_ms"] is not None and 0 < row["time_to_first_token_ms"] <= row["duration_ms"]


def test_validation_error_and_unknown_model_rows(server, fast_model):
    with pytest.raises(openai.UnprocessableEntityError):
        server.openai().chat.completions.create(
            model=fast_model, messages=HELLO, max_tokens=-3, extra_headers={"X-Request-ID": "bad-values-1"}
        )
    with pytest.raises(openai.NotFoundError):
        server.openai().chat.completions.create(
            model="no/such-model", messages=HELLO, extra_headers={"X-Request-ID": "unknown-model-1"}
        )
    bad = row_for(server, "bad-values-1")
    assert (bad["status"], bad["http_status"], bad["error_type"]) == ("error", 422, "validation_error")
    unknown = row_for(server, "unknown-model-1")
    assert (unknown["status"], unknown["http_status"], unknown["error_type"]) == ("error", 404, "model_not_found")
    assert unknown["model"] == "no/such-model"


def test_timeout_row(slow_model):
    # Its own daemon: a 2 s deadline on the shared one would cut its other tests on a busy machine.
    with serving(slow_model, settings=settings_with(timeouts={"chat": 2})) as server:
        with pytest.raises(openai.APIStatusError) as refused:
            server.openai().chat.completions.create(
                model=slow_model, messages=HELLO, max_tokens=100000, extra_headers={"X-Request-ID": "timeout-row-1"}
            )
        assert refused.value.status_code == 504
        row = row_for(server, "timeout-row-1")
    assert (row["status"], row["http_status"], row["error_type"]) == ("timeout", 504, "timeout")
    assert 2000 <= row["duration_ms"] < 120_000  # in ms: the 2 s deadline, not the 100000 tokens


def test_client_that_disconnects_is_cancelled(server, slow_model):
    body = {"model": slow_model, "prompt": "go on", "max_tokens": 100000, "stream": True}
    with httpx.Client(base_url=server.url, timeout=120) as http:
        with http.stream("POST", "/v1/completions", json=body, headers={"X-Request-ID": "gone-row-1"}) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    break  # one chunk, then hang up
    row = row_for(server, "gone-row-1")
    assert row["status"] == "cancelled"
    job = server.engine.job("gone-row-1")
    assert wait_until(lambda: job.done)


def test_no_prompt_or_completion_text_reaches_the_disk(server, fast_model):
    marker = f"PRIVATE-{uuid.uuid4().hex}"
    client = server.openai()
    client.chat.completions.create(
        model=fast_model,
        messages=[{"role": "user", "content": marker}],
        max_tokens=5,
        extra_headers={"X-Request-ID": "private-1"},
    )
    for _ in client.completions.create(
        model=fast_model,
        prompt=f"{marker} again",
        max_tokens=5,
        stream=True,
        extra_headers={"X-Request-ID": "private-2"},
    ):
        pass
    with pytest.raises(openai.UnprocessableEntityError):  # refused requests leave rows too, without their body
        client.chat.completions.create(
            model=fast_model,
            messages=[{"role": "user", "content": marker}],
            max_tokens=-1,
            extra_headers={"X-Request-ID": "private-3"},
        )
    completion = client.completions.create(
        model=fast_model, prompt="echo", max_tokens=32, temperature=0, extra_headers={"X-Request-ID": "private-4"}
    )
    produced = completion.choices[0].text.strip()
    assert len(produced) >= 12  # long enough that finding it on disk could not be chance
    for request_id in ("private-1", "private-2", "private-3", "private-4"):
        row_for(server, request_id)
    files = [p for p in server.daemon.audit.path.parent.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"audit.db", "audit.db-wal"}
    for path in files:
        data = path.read_bytes()
        assert marker.encode() not in data, path
        assert produced.encode() not in data, path


def test_graceful_stop_loses_no_row_of_a_200_request_burst(tmp_path, monkeypatch, fast_model):
    monkeypatch.setenv("MLX_MANAGER_HOME", str(tmp_path / "burst-home"))
    engine = RecordingEngine(EngineConfig(preload=[fast_model], queue_limit=1000, max_batch_size=64))
    app = create_app(settings_with(server={"queue_limit": 1000, "max_batch_size": 64}), engine=engine)
    live = LiveServer(app).start()
    try:
        assert wait_until(lambda: fast_model in engine.status().loaded, timeout=60)

        async def burst():
            client = live.async_openai(timeout=120)
            ids = [f"burst-{i}" for i in range(200)]
            await asyncio.gather(
                *(
                    client.completions.create(
                        model=fast_model, prompt=f"n{i}", max_tokens=2, extra_headers={"X-Request-ID": rid}
                    )
                    for i, rid in enumerate(ids)
                )
            )
            await client.close()
            return ids

        ids = asyncio.run(burst())
        path = app.state.daemon.audit.path
    finally:
        live.stop()  # the lifespan's end flushes the writer
    stored = {r["request_id"] for r in rows(path) if r["request_id"].startswith("burst-")}
    assert stored == set(ids)


def test_live_feed_streams_new_rows_to_an_admin(server, fast_model):
    from websockets.sync.client import connect

    url = server.url.replace("http://", "ws://") + "/admin/audit/feed"
    received: list[dict] = []

    with connect(url, additional_headers={"Authorization": f"Bearer {server.daemon.admin_token}"}) as ws:

        def read():
            received.append(json.loads(ws.recv(timeout=60)))

        reader = threading.Thread(target=read)
        reader.start()
        server.openai().completions.create(
            model=fast_model, prompt="feed me", max_tokens=2, extra_headers={"X-Request-ID": "feed-row-1"}
        )
        reader.join(60)
    assert received and received[0]["request_id"] == "feed-row-1" and received[0]["status"] == "success"
    assert "api_key" in received[0] and received[0]["api_key"] is None  # every column, the key name too


def test_the_live_feed_outlives_the_idle_timeout_of_http_connections(tmp_path, monkeypatch):
    """server.idle_timeout closes HTTP connections that send nothing; a WebSocket is not one of
    them once upgraded (the dashboard's feed lost rows reconnecting every idle_timeout)."""
    from websockets.sync.client import connect

    monkeypatch.setenv("MLX_MANAGER_HOME", str(tmp_path / "home"))
    settings = settings_with(server={"idle_timeout": 0.5})
    with LiveServer(create_app(settings, engine=RecordingEngine(EngineConfig()))) as live:
        url = live.url.replace("http://", "ws://") + "/admin/audit/feed"
        with connect(url, additional_headers={"Authorization": f"Bearer {live.daemon.admin_token}"}) as ws:
            # A plain connection opened after the WebSocket, silent: wait until the daemon closes it
            # as idle. The WebSocket's own timer, had it one, ran out before.
            with socket.create_connection(("127.0.0.1", live.port), timeout=60) as idle:
                assert idle.recv(1) == b""
            httpx.post(
                f"{live.url}/v1/chat/completions",
                json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
                headers={"X-Request-ID": "after-quiet"},
            )
            row = json.loads(ws.recv(timeout=60))
    assert row["request_id"] == "after-quiet"


def test_live_feed_refuses_without_the_admin_token(server):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    url = server.url.replace("http://", "ws://") + "/admin/audit/feed"
    with connect(url, additional_headers={"Authorization": "Bearer wrong"}) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=60)
    assert closed.value.rcvd.code == 1008


def test_the_daemon_prunes_old_rows_at_start(tmp_path, monkeypatch):
    from tests.audit_rows import ago, fill, record

    home = tmp_path / "prune-home"
    monkeypatch.setenv("MLX_MANAGER_HOME", str(home))
    settings = settings_with(audit={"retention_days": 7})
    path = settings.audit_path()
    fill(
        path,
        [record(request_id=f"old-{i}", timestamp=ago(days=8 + i)) for i in range(30)]
        + [record(request_id=f"new-{i}", timestamp=ago(days=6)) for i in range(5)],
    )
    engine = RecordingEngine(EngineConfig())
    with LiveServer(create_app(settings, engine=engine)):
        assert wait_until(lambda: len(rows(path)) == 5)
    assert {r["request_id"] for r in rows(path)} == {f"new-{i}" for i in range(5)}
