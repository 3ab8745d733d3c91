"""Shared fixtures: an isolated home for every test, the processes a test starts, the tiny real MLX models."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.processes import Children

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Every test gets its own MLX_MANAGER_HOME, no inherited MLX_MANAGER_* settings and a fixed terminal."""
    for name in list(os.environ):
        if name.startswith("MLX_MANAGER_"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("MLX_MANAGER_HOME", str(home))
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("TERM", "dumb")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture
def children() -> Iterator[Children]:
    """Start a test's processes through this (`children.start(command, ctrl_c=True, ...)`): what
    still runs when the test ends, passed or failed, is killed and reaped."""
    started = Children()
    yield started
    started.reap()


@pytest.fixture(scope="session")
def fast_model(tmp_path_factory) -> str:
    """A tiny real Llama model: a few ms per token."""
    from tests.models import build_model

    return str(build_model(tmp_path_factory.mktemp("models") / "fast", "fast"))


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory) -> str:
    """A larger real model: hundreds of ms per request, for timeouts and cancellation."""
    from tests.models import build_model

    return str(build_model(tmp_path_factory.mktemp("models") / "slow", "slow"))


@pytest.fixture(scope="session")
def no_template_model(tmp_path_factory) -> str:
    """The fast model without a chat template."""
    from tests.models import build_model

    return str(build_model(tmp_path_factory.mktemp("models") / "no-template", "fast", chat_template=False))


@pytest.fixture(scope="session")
def minilm_model(request) -> str:
    """all-MiniLM-L6-v2, a real sentence-transformers embedding model (384 dimensions)."""
    from tests.embedding_model import minilm_folder

    return str(minilm_folder(request.config.cache.mkdir("all-minilm-l6-v2")))
