"""Shared fixtures: an isolated home for every test, the processes a test starts, the tiny real MLX models."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.processes import Children

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def session_home(tmp_path_factory):
    """A home for what session- and module-scoped fixtures make before a test's own home exists:
    no test ever writes to the real one."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLX_MANAGER_HOME", str(tmp_path_factory.mktemp("session-home")))
        yield


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


# Scripted models (tests/scripted_model.py): real mlx-lm models whose greedy output is a fixed
# script; each fixture's exact outputs are the constant named in its docstring (`.text(...)`).
# With tools offered they call; after a tool result they answer; without tools they say `plain`.


@pytest.fixture(scope="session")
def hermes_tool_model(tmp_path_factory) -> str:
    """Qwen/Hermes style: thinks, calls get_weather(Paris); after the result, thinks and answers (HERMES_TOOL)."""
    from tests.scripted_model import HERMES_TOOL

    return str(HERMES_TOOL.build(tmp_path_factory.mktemp("models") / "hermes-tool"))


@pytest.fixture(scope="session")
def hermes_parallel_model(tmp_path_factory) -> str:
    """Qwen/Hermes style: thinks, then two calls in one answer, Paris and London (HERMES_PARALLEL)."""
    from tests.scripted_model import HERMES_PARALLEL

    return str(HERMES_PARALLEL.build(tmp_path_factory.mktemp("models") / "hermes-parallel"))


@pytest.fixture(scope="session")
def hermes_split_tags_model(tmp_path_factory) -> str:
    """Qwen/Hermes style, no thinking: one call whose tags come as `<tool` + `_call>` (HERMES_SPLIT_TAGS)."""
    from tests.scripted_model import HERMES_SPLIT_TAGS

    return str(HERMES_SPLIT_TAGS.build(tmp_path_factory.mktemp("models") / "hermes-split-tags"))


@pytest.fixture(scope="session")
def mistral_tool_model(tmp_path_factory) -> str:
    """Mistral style: `[TOOL_CALLS]get_weather[ARGS]{...}`; after the result, answers (MISTRAL_TOOL)."""
    from tests.scripted_model import MISTRAL_TOOL

    return str(MISTRAL_TOOL.build(tmp_path_factory.mktemp("models") / "mistral-tool"))


@pytest.fixture(scope="session")
def mistral_parallel_model(tmp_path_factory) -> str:
    """Mistral style: two calls in one answer, Paris and London, no end tag (MISTRAL_PARALLEL)."""
    from tests.scripted_model import MISTRAL_PARALLEL

    return str(MISTRAL_PARALLEL.build(tmp_path_factory.mktemp("models") / "mistral-parallel"))
