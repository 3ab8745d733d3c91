"""Embedding models without the `embeddings` extra (`pip install 'mlx-manager[embeddings]'`).

The suite runs with the extra installed (the `test` extra brings it), so an install without it is
stood in for by a `sitecustomize` on PYTHONPATH that makes `mlx_embeddings` unimportable in the
processes started here: to them the package is simply not there, as in a base install.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.daemon_server import assert_problem
from tests.test_daemon_serve import Daemon

INSTALL = "pip install 'mlx-manager[embeddings]'"

BLOCK_MLX_EMBEDDINGS = '''
import sys


class NoMlxEmbeddings:
    """Stands in for an install without the `embeddings` extra."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "mlx_embeddings":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoMlxEmbeddings())
'''


@pytest.fixture
def without_the_extra(tmp_path) -> dict[str, str]:
    """The environment of a process that cannot import mlx_embeddings."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK_MLX_EMBEDDINGS)
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)}


def test_an_embedding_request_is_a_problem_naming_the_extra_and_chat_still_works(
    without_the_extra, minilm_model, fast_model
):
    allowed = {"MLX_MANAGER_MODELS__ALLOWED": f"{fast_model},{minilm_model}"}
    daemon = Daemon("--model", fast_model, env={**without_the_extra, **allowed})
    try:
        daemon.wait_ready(fast_model)
        response = httpx.post(daemon.url + "/v1/embeddings", json={"model": minilm_model, "input": "a cat"}, timeout=60)
        body = assert_problem(response, 501, "extra_not_installed")
        assert body["extra"] == "embeddings" and body["install"] == INSTALL
        assert INSTALL in body["detail"] and minilm_model in body["detail"] and body["error"]["param"] == "model"
        assert response.headers["x-should-retry"] == "false"  # the SDKs would only fail the same way again
        # The official client raises it with the same words, and the text model is served as usual.
        with pytest.raises(openai.APIStatusError) as caught:
            daemon.openai().embeddings.create(model=minilm_model, input="a cat")
        assert caught.value.status_code == 501 and INSTALL in caught.value.message
        answer = daemon.openai().completions.create(model=fast_model, prompt="hello", max_tokens=2)
        assert answer.usage.completion_tokens > 0
        code, stderr = daemon.stop()
        assert code == 0 and "Traceback" not in stderr, stderr
    finally:
        daemon.kill()


def test_the_load_check_of_models_pull_names_the_extra(without_the_extra, minilm_model):
    done = subprocess.run(
        [sys.executable, "-m", "mlx_manager.engine.check", minilm_model],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **without_the_extra},
    )
    assert done.returncode == 1, done.stderr
    assert INSTALL in json.loads(done.stdout.strip().splitlines()[-1])["error"]


def test_the_test_extra_brings_the_embeddings_extra():
    import tomllib

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("mlx-embeddings") for d in project["dependencies"])  # the base install is lean
    assert project["optional-dependencies"]["embeddings"] == ["mlx-embeddings>=0.1.0,<0.2"]
    assert "mlx-manager[embeddings]" in project["optional-dependencies"]["test"]
