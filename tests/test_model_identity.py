"""One identity per model (issue 25 item 4): every spelling of a model (absolute, relative, with a
trailing slash or `..`, a symlink, an alias, a Hugging Face id or its snapshot folder) is loaded
once and is one model in `models ps`, /v1/models, the metrics and `audit stats --by model`.
And `models.default` (item 8): a request that names no model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from typer.testing import CliRunner

from mlx_manager.cli import app
from mlx_manager.settings import load_settings
from tests.daemon_server import LiveServer, assert_problem, serving, settings_with, wait_until

HELLO = [{"role": "user", "content": "hi"}]


def stats_by_model() -> dict[str, int]:
    """`audit stats --by model --json`: requests per model (not those that name none: /v1/models)."""
    done = CliRunner().invoke(app, ["audit", "stats", "--by", "model", "--json"])
    groups = json.loads(done.stdout or "[]") if done.exit_code == 0 else []
    return {group["model"]: group["requests"] for group in groups if group["model"] is not None}


def loads_counted(live: LiveServer) -> float:
    for line in live.http().get("/metrics").text.splitlines():
        if line.startswith("mlx_manager_model_load_seconds_count"):
            return float(line.split()[-1])
    return 0.0


def models_ps(live: LiveServer) -> list[str]:
    headers = {"Authorization": f"Bearer {live.daemon.admin_token}"}
    return [m["id"] for m in live.http().get("/admin/models", headers=headers).json()["models"]]


def ask_with_each(live: LiveServer, spellings: list[str]) -> None:
    client = live.openai()
    for model in spellings:
        answer = client.completions.create(model=model, prompt="hi", max_tokens=2)
        assert answer.model == model  # the answer names the model as the request did
        chat = client.chat.completions.create(model=model, messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
        assert chat.model == model


def test_every_spelling_of_a_folder_is_one_model(fast_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(fast_model)
    spellings = [
        fast_model,
        fast_model + "/",
        os.path.relpath(fast_model),
        f"{fast_model}/../{Path(fast_model).name}",
        "./link",
        "tiny",
    ]
    settings = settings_with(models={"aliases": {"tiny": str(link)}})  # an alias, by way of the symlink
    with serving(settings=settings) as live:  # nothing preloaded: the first request loads it
        ask_with_each(live, spellings)
        assert live.engine.status().loaded == [fast_model] == models_ps(live)
        assert loads_counted(live) == 1.0  # loaded once, not once per spelling
        listed = live.openai().models.list().data
        assert [(m.id, m.root) for m in listed] == [("tiny", fast_model)]
        metrics = live.http().get("/metrics").text
        requests = [line for line in metrics.splitlines() if line.startswith("mlx_manager_requests_total{")]
        requests = [line for line in requests if "/completions" in line]  # not /v1/models (no model)
        assert len(requests) == 2 and all('model="tiny"' in line for line in requests), requests  # 2 endpoints
        # The audit log names it by its alias: one group of every request.
        assert wait_until(lambda: stats_by_model() == {"tiny": 2 * len(spellings)}), stats_by_model()


def test_a_hugging_face_id_and_its_snapshot_folder_are_one_model(fast_model, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    shutil.copytree(fast_model, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    with serving() as live:
        ask_with_each(live, ["org/tiny", str(snapshot), str(snapshot) + "/"])
        assert live.engine.status().loaded == ["org/tiny"] == models_ps(live)
        assert loads_counted(live) == 1.0
        assert [m.id for m in live.openai().models.list().data] == ["org/tiny"]
        # No alias: the audit log names it by its repo id, as `models list` shows it.
        assert wait_until(lambda: stats_by_model() == {"org/tiny": 6}), stats_by_model()


# -- models.default ------------------------------------------------------------------------------------


BODIES = {
    "/v1/chat/completions": {"messages": HELLO, "max_tokens": 2},
    "/v1/completions": {"prompt": "hi", "max_tokens": 2},
    "/v1/messages": {"messages": HELLO, "max_tokens": 2},
    "/v1/responses": {"input": "hi", "max_output_tokens": 2},
}


def cli(*args: str) -> str:
    done = CliRunner().invoke(app, list(args))
    assert done.exit_code == 0, done.output
    return done.stdout


def test_a_request_without_a_model_gets_the_default_or_the_one_loaded(fast_model, slow_model, minilm_model):
    cli("config", "set", "models.allow_any_path", "true")  # the tests' models live in temporary folders
    with serving(fast_model, settings=load_settings()) as live, live.http(timeout=120) as http:
        admin = {"Authorization": f"Bearer {live.daemon.admin_token}"}
        # One model loaded: it serves what names none (as mlx_lm.server does), in every dialect.
        for path, body in BODIES.items():
            answer = http.post(path, json=body)
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"] == fast_model
        # ... but it is no embedding model: the problem says what to do.
        problem = assert_problem(http.post("/v1/embeddings", json={"input": "hi"}), 400, "invalid_request")
        assert problem["error"]["param"] == "model"
        assert "model is required" in problem["detail"] and "no model is loaded" in problem["detail"]
        assert "mlx-manager config set models.default MODEL" in problem["detail"]

        assert http.post("/admin/models/load", json={"model": slow_model}, headers=admin).status_code == 200
        answer = http.post("/v1/chat/completions", json=BODIES["/v1/chat/completions"])
        assert "2 models are loaded" in assert_problem(answer, 400, "invalid_request")["detail"]

        # models.default applies live (no restart).
        cli("config", "set", "models.default", slow_model)
        assert http.post("/admin/reload", headers=admin).json()["applied"] == ["models.default"]
        for path, body in BODIES.items():
            answer = http.post(path, json=body, headers={"X-Request-ID": f"default-{path.rsplit('/', 1)[-1]}"})
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"] == slow_model
        # A model named in the request wins over the default.
        answer = http.post("/v1/completions", json={"model": fast_model, **BODIES["/v1/completions"]})
        assert answer.json()["model"] == fast_model
        # models.default may be an alias; an embedding request gets it too.
        cli("config", "set", "models.aliases.embed", minilm_model)
        cli("config", "set", "models.default", "embed")
        assert http.post("/admin/reload", headers=admin).json()["applied"] == ["models.aliases", "models.default"]
        answer = http.post("/v1/embeddings", json={"input": "hi"})
        assert answer.status_code == 200 and answer.json()["model"] == "embed", answer.text

    assert "models.default" in cli("config", "list")

    def rows() -> list[dict]:
        found = json.loads(cli("audit", "query", "--model", slow_model, "--json"))
        return [r for r in found if r["request_id"].startswith("default-")]

    assert len(wait_until(lambda: len(rows()) == 4 and rows(), timeout=60)) == 4
