"""Fuzzing the API: schemathesis makes requests from the daemon's own OpenAPI document (valid ones,
and ones that break it on purpose) and sends them to a real server with the fast model.

Every answer must be: no 5xx, every error an RFC 9457 problem document, every response as the
document describes it. Bounded (a fixed number of examples, derandomized) so it runs the same in
well under a minute; the count of cases run is printed.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from mlx_manager.auth import key_digest, new_key
from mlx_manager.daemon.app import create_app
from mlx_manager.engine.config import EngineConfig
from tests.daemon_server import LiveServer, RecordingEngine, settings_with, wait_until

pytestmark = pytest.mark.slow

EXAMPLES = 600
KEY = new_key()
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
PROBLEM_FIELDS = {"type", "title", "status", "detail", "instance", "request_id", "error"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, fast_model):
    """The fast model loaded; limits low enough that no generated request can run for long."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLX_MANAGER_HOME", str(tmp_path_factory.mktemp("home")))
        options = settings_with(
            models={"max_tokens": 16, "default_max_tokens": 16},
            server={"max_messages": 8, "max_body_bytes": 64 * 1024},
            timeouts={"chat": 20, "completions": 20, "messages": 20, "responses": 20},
            auth={"keys": [{"name": "fuzz", "sha256": key_digest(KEY), "created": datetime.now(UTC)}]},
        )
        engine = RecordingEngine(EngineConfig(preload=[fast_model], max_loaded=1))
        with LiveServer(create_app(options, engine=engine)) as live:
            assert wait_until(lambda: fast_model in engine.status().loaded, timeout=60)
            yield live


def assert_problem_document(response) -> None:
    content_type = (response.headers.get("content-type") or [""])[0]  # schemathesis keeps lists of values
    assert content_type.startswith("application/problem+json"), (
        f"{response.status_code} with content-type {content_type!r}: {response.text[:300]}"
    )
    body = response.json()
    assert PROBLEM_FIELDS <= set(body) and body["status"] == response.status_code, body


def test_the_api_survives_fuzzing(server, fast_model, capsys):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"})
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))
    seen: Counter[str] = Counter()
    statuses: Counter[int] = Counter()

    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    # Random model names only reach "unknown model": three cases in four name the real one, so that
    # generation runs; one in ten goes without the key. (Hypothesis favours 0: it means the usual.)
    @given(case=cases, odd_model=st.integers(0, 3), without_key=st.integers(0, 9))
    def fuzz(case, odd_model, without_key):
        if odd_model != 3 and isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            case.body["model"] = fast_model
        headers = {} if without_key == 9 else {"Authorization": f"Bearer {KEY}"}
        response = case.call(headers=headers, timeout=60)
        seen[f"{case.method} {case.path}"] += 1
        statuses[response.status_code] += 1
        case.validate_response(response, checks=CHECKS, headers=headers)
        if response.status_code >= 400:
            assert_problem_document(response)

    fuzz()
    total = sum(seen.values())
    with capsys.disabled():
        print(f"\nschemathesis: {total} cases over {len(seen)} operations; statuses {dict(sorted(statuses.items()))}")
    assert total >= EXAMPLES and len(seen) >= 4
    assert statuses[200] > 0 and any(code >= 400 for code in statuses)
