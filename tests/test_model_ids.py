"""What a client may put in `model` and in text (issue 24): bounded, printable model ids kept out
of the records and the metrics (item 3); client input that made 500s (item 9); and no probing of
the file system through `model` (item 10)."""

from __future__ import annotations

import shutil
import sqlite3

import httpx
import openai
import pytest

from mlx_manager.daemon.app import create_app
from mlx_manager.settings import Settings
from tests.daemon_server import LiveServer, assert_problem, serving, settings_with, wait_until

HELLO = [{"role": "user", "content": "hello"}]


def audit_rows(live: LiveServer) -> list[dict]:
    with sqlite3.connect(live.daemon.audit.path) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM audit_logs")]


# -- item 3: model ids ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["m" * 1025, "x" * 1_000_000, "bad\nname", "ansi\x1b[31m", "bidi\u202e", ""])
def test_a_long_or_unprintable_model_id_is_422_and_recorded_nowhere(model, tmp_path):
    with LiveServer(create_app(Settings())) as live, live.http() as http:
        for path, body in (
            ("/v1/chat/completions", {"model": model, "messages": HELLO}),
            ("/v1/completions", {"model": model, "prompt": "hi"}),
            ("/v1/embeddings", {"model": model, "input": "hi"}),
            ("/v1/messages", {"model": model, "max_tokens": 5, "messages": HELLO}),
            ("/v1/responses", {"model": model, "input": "hi"}),
        ):
            answer = http.post(path, json=body, headers={"X-Request-ID": "long-" + path.replace("/", "-")})
            if path == "/v1/messages":
                assert answer.status_code == 422 and answer.json()["error"]["code"] == "validation_error"
            else:
                assert assert_problem(answer, 422, "validation_error")["error"]["param"] == "model"
        metrics = http.get("/metrics").text
        assert wait_until(lambda: len(audit_rows(live)) == 5, timeout=10)
    assert all(row["model"] is None for row in audit_rows(live))  # refused before anything recorded it
    if model:
        assert model not in metrics
    assert len(metrics) < 50_000


def test_metrics_name_only_known_models(fast_model):
    with serving(fast_model) as live, live.http() as http:
        live.openai().completions.create(model=fast_model, prompt="hi", max_tokens=2)
        for i in range(5):
            http.post("/v1/completions", json={"model": f"org/unknown-{i}", "prompt": "hi"})
        assert wait_until(lambda: 'model="other"' in http.get("/metrics").text)
        metrics = http.get("/metrics").text
    assert f'model="{fast_model}"' in metrics and "unknown-" not in metrics
    assert 'mlx_manager_requests_total{endpoint="/v1/completions",model="other",status="error"} 5.0' in metrics


# -- item 9: client input that made 500s ------------------------------------------------------------------


LONE = '"a\\ud800b"'  # as JSON text: the escape of half a surrogate pair


@pytest.fixture(scope="module")
def server(tmp_path_factory, fast_model):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLX_MANAGER_HOME", str(tmp_path_factory.mktemp("home")))
        with serving(fast_model) as live:
            yield live


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/chat/completions",
            '{"model": "MODEL", "max_tokens": 2, "messages": [{"role": "user", "content": LONE}]}',
        ),
        ("/v1/completions", '{"model": "MODEL", "max_tokens": 2, "prompt": LONE}'),
        ("/v1/completions", '{"model": "MODEL", "max_tokens": 2, "prompt": "ok", "stop": [LONE]}'),
        ("/v1/embeddings", '{"model": "MODEL", "input": [LONE]}'),
        ("/v1/messages", '{"model": "MODEL", "max_tokens": 2, "messages": [{"role": "user", "content": LONE}]}'),
        ("/v1/responses", '{"model": "MODEL", "input": LONE}'),
        ("/v1/completions", '{"model": "MODEL", "max_tokens": 2, "prompt": "\\udc00 low first"}'),
    ],
)
def test_an_unpaired_surrogate_is_a_422_not_a_500(server, fast_model, path, body):
    with server.http() as http:
        text = body.replace("MODEL", fast_model).replace("LONE", LONE)
        answer = http.post(path, content=text.encode(), headers={"Content-Type": "application/json"})
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["code"] == "invalid_json"
        assert "surrogate" in answer.json()["detail"]
        # A whole pair (an emoji) is text like any other; so is a backslash before "ud800".
        fine = text.replace("\\ud800", "\\ud83d\\ude00").replace("\\udc00", "\\\\udc00")
        answer = http.post(path, content=fine.encode(), headers={"Content-Type": "application/json"})
        # Past the JSON: served (the fast model makes no embeddings, and says so)
        assert answer.status_code == (400 if path == "/v1/embeddings" else 200), answer.text


def test_a_body_that_is_not_utf8_is_a_422(server):
    with server.http() as http:
        raw = b'{"model": "m", "prompt": "\xed\xa0\x80"}'  # a surrogate encoded as UTF-8: not UTF-8
        answer = http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
        assert_problem(answer, 422, "invalid_json")


# -- item 10: the file system is not for probing -------------------------------------------------------------------


def detail_of(answer: httpx.Response, model: str) -> str:
    """The problem's detail with the model id taken out: what is left must not vary."""
    assert_problem(answer, 404, "model_not_found")
    return answer.json()["detail"].replace(repr(model), "MODEL")


def test_every_unknown_model_reads_the_same(tmp_path, fast_model):
    """A folder with a model, one without config.json, a missing one, /proc, a name too long for
    the OS, a repo not in the cache: one message. Outside the HF cache and models.folders, a model
    folder does not load by default."""
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(fast_model, elsewhere)
    probes = [
        str(elsewhere),
        str(tmp_path),
        str(tmp_path / "none"),
        "/etc",
        "/proc/1/cwd",
        "/" + "a" * 300,
        "~root",
        "../../../../etc",
        "org/not-cached",
        str(elsewhere / "config.json"),
    ]
    with LiveServer(create_app(Settings())) as live, live.http() as http:
        details = {detail_of(http.post("/v1/completions", json={"model": p, "prompt": "hi"}), p) for p in probes}
        load = http.post(
            "/admin/models/load",
            json={"model": str(elsewhere)},
            headers={"Authorization": f"Bearer {live.daemon.admin_token}"},
        )
        details.add(detail_of(load, str(elsewhere)))
    assert len(details) == 1, details
    assert "models.folders" in details.pop()


def test_models_load_from_models_folders_and_with_allow_any_path(tmp_path, fast_model):
    shelf = tmp_path / "shelf"
    shutil.copytree(fast_model, shelf / "tiny")
    (shelf / "linked").symlink_to(fast_model)  # `models list` shows it by its target's path
    with LiveServer(create_app(settings_with(models={"folders": [str(shelf)]}))) as live:
        client = live.openai()
        for model in (str(shelf / "tiny"), str(shelf / "linked"), fast_model, str(shelf / "tiny" / ".." / "tiny")):
            usage = client.completions.create(model=model, prompt="hi", max_tokens=2).usage
            assert usage is not None and usage.completion_tokens >= 1
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=str(shelf / ".." / ".." / "elsewhere"), prompt="hi", max_tokens=2)
    with LiveServer(create_app(settings_with(models={"allow_any_path": True}))) as live:
        answer = live.openai().completions.create(model=fast_model, prompt="hi", max_tokens=2)
        assert answer.usage is not None and answer.usage.completion_tokens >= 1
        with pytest.raises(openai.NotFoundError):  # a folder, just not a model: the same one message
            live.openai().completions.create(model="/proc/1/cwd", prompt="hi", max_tokens=2)


def test_a_preloaded_folder_may_be_loaded_by_its_path(tmp_path, fast_model, monkeypatch):
    """`serve --model PATH` and models.preload name folders the operator chose."""
    with LiveServer(create_app(Settings(), extra_preload=[fast_model])) as live:
        assert wait_until(lambda: live.engine.status().loaded == [fast_model], timeout=60)
        assert live.openai().completions.create(model=fast_model, prompt="hi", max_tokens=2).usage
