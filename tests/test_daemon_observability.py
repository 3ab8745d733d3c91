"""The daemon's own figures and traces, from real requests to a real server and model."""

from __future__ import annotations

import logfire
import openai
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from prometheus_client.parser import text_string_to_metric_families

from mlx_manager import telemetry
from mlx_manager.settings import Settings
from tests.daemon_server import serving, wait_until

CHAT = "/v1/chat/completions"
MARKER = "TANGERINE-WALRUS-SECRET-4410"


def scrape(server) -> dict[tuple[str, tuple], float]:
    with server.http() as http:
        response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(figures, name: str, **labels) -> float:
    return figures.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def server(tmp_path, monkeypatch, fast_model):
    monkeypatch.setenv("MLX_MANAGER_HOME", str(tmp_path / "obs-home"))
    with serving(fast_model) as live:
        yield live


def test_metrics_move_by_the_right_amounts(server, fast_model):
    before = scrape(server)
    client = server.openai()
    # Greedy: sampled at the default temperature, the tiny model picks its end token now and then
    # (about 1 answer in 1,000), and that answer is shorter than max_tokens; greedy, each runs to it.
    usages = [
        client.chat.completions.create(
            model=fast_model, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=5, temperature=0
        ).usage
        for i in range(3)
    ]
    chunks = list(
        client.chat.completions.create(
            model=fast_model,
            messages=[{"role": "user", "content": "s"}],
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usages.append([c.usage for c in chunks if c.usage][-1])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope/none", messages=[{"role": "user", "content": "x"}])
    # The outcome of a request is counted once its response has gone out; a model the daemon does
    # not know is labelled "other" (a client picks model ids: they must not grow the label set).
    assert wait_until(
        lambda: value(scrape(server), "mlx_manager_requests_total", endpoint=CHAT, model="other", status="error") == 1
    )
    after = scrape(server)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("mlx_manager_requests_total", endpoint=CHAT, model=fast_model, status="success") == 4
    assert [u.completion_tokens for u in usages] == [5, 5, 5, 4]  # the answers the client got, each
    completion_tokens = sum(u.completion_tokens for u in usages)
    assert delta("mlx_manager_completion_tokens_total", model=fast_model) == completion_tokens == 19
    assert delta("mlx_manager_prompt_tokens_total", model=fast_model) == sum(u.prompt_tokens for u in usages)
    assert delta("mlx_manager_request_duration_seconds_count", endpoint=CHAT) == 5
    assert delta("mlx_manager_time_to_first_token_seconds_count") == 4
    assert value(after, "mlx_manager_loaded_models") == 1
    assert value(after, "mlx_manager_queue_depth") == 0
    assert value(after, "mlx_manager_model_load_seconds_count") >= 1
    assert ("mlx_manager_audit_backlog", ()) in after


@pytest.fixture
def traced(capfire, tmp_path, monkeypatch):
    """Telemetry on (no Logfire token: nothing is sent), every span kept by capfire; off again after."""
    monkeypatch.delenv("LOGFIRE_TOKEN", raising=False)
    monkeypatch.setenv("MLX_MANAGER_HOME", str(tmp_path / "trace-home"))
    telemetry.configure_telemetry(Settings(), span_processors=[SimpleSpanProcessor(capfire.exporter)])
    try:
        yield
    finally:
        telemetry._logfire = None
        logfire.configure(send_to_logfire=False, console=False, metrics=False, distributed_tracing=False)


def _recorded(capfire) -> str:
    """Every span's name, attributes and event attributes, as one text to search."""
    return repr(
        [
            (s.name, dict(s.attributes or {}), [dict(e.attributes or {}) for e in s.events])
            for s in capfire.exporter.exported_spans
        ]
    )


@pytest.mark.usefixtures("traced")
def test_generation_and_load_spans_from_real_requests(capfire, fast_model):
    with serving(fast_model) as server:
        engine = server.engine
        client = server.openai()
        whole = client.chat.completions.create(
            model=fast_model, messages=[{"role": "user", "content": MARKER}], max_tokens=6, temperature=0
        )  # greedy: both run to max_tokens (sampled, one may end early at the end token)
        for _ in client.completions.create(model=fast_model, prompt=MARKER, max_tokens=3, temperature=0, stream=True):
            pass
        assert wait_until(lambda: len(_ended(capfire, "generation")) == 2)
    generations = _ended(capfire, "generation")
    by_endpoint = {s.attributes["mlx_manager.endpoint"]: s.attributes for s in generations}
    chat = by_endpoint["chat"]
    assert chat["gen_ai.request.model"] == fast_model
    assert chat["gen_ai.usage.output_tokens"] == whole.usage.completion_tokens == 6
    assert chat["gen_ai.usage.input_tokens"] == whole.usage.prompt_tokens
    assert chat["mlx_manager.finish_reason"] == "length"
    assert chat["mlx_manager.time_to_first_token_ms"] > 0 and chat["mlx_manager.tokens_per_second"] > 0
    assert chat["mlx_manager.request_id"] == engine.jobs[0].request.request_id
    assert by_endpoint["completions"]["gen_ai.usage.output_tokens"] == 3
    [load] = _ended(capfire, "model load")
    assert load.attributes["mlx_manager.model_id"] == fast_model
    assert load.attributes["mlx_manager.load_seconds"] > 0 and load.attributes["mlx_manager.memory_bytes"] > 0
    assert MARKER not in _recorded(capfire)


def _ended(capfire, name: str):
    return [
        s
        for s in capfire.exporter.exported_spans
        if s.name == name and (s.attributes or {}).get("logfire.span_type") != "pending_span"
    ]


@pytest.mark.usefixtures("traced")
def test_embedding_span_has_figures_and_no_input_text(capfire, minilm_model):
    with serving(minilm_model) as server:
        result = server.openai().embeddings.create(model=minilm_model, input=[MARKER, "a second input"])
        assert wait_until(lambda: _ended(capfire, "embedding"))
    [span] = _ended(capfire, "embedding")
    attributes = span.attributes
    assert attributes["gen_ai.request.model"] == minilm_model and attributes["mlx_manager.endpoint"] == "embeddings"
    assert attributes["gen_ai.usage.input_tokens"] == result.usage.prompt_tokens
    assert attributes["gen_ai.usage.output_tokens"] == 0 and attributes["mlx_manager.finish_reason"] == "stop"
    recorded = _recorded(capfire)
    assert MARKER not in recorded and MARKER.lower() not in recorded  # BERT's tokenizer lower-cases


@pytest.mark.usefixtures("traced")
def test_spans_hold_no_tool_definitions_calls_results_or_reasoning(capfire, hermes_tool_model):
    from tests.scripted_model import HERMES_TOOL, WEATHER_TOOL

    tool = {**WEATHER_TOOL, "function": {**WEATHER_TOOL["function"], "description": MARKER}}
    history = HERMES_TOOL.messages(after_tool=True)
    history[-1]["content"] = MARKER
    with serving(hermes_tool_model) as server:
        client = server.openai()
        called = client.chat.completions.create(model=hermes_tool_model, messages=HERMES_TOOL.messages(), tools=[tool])
        assert called.choices[0].message.tool_calls  # the model really called
        for _ in client.chat.completions.create(model=hermes_tool_model, messages=history, tools=[tool], stream=True):
            pass
        assert wait_until(lambda: len(_ended(capfire, "generation")) == 2)
    recorded = _recorded(capfire)
    private = (MARKER, "get_weather", '"city"', HERMES_TOOL.answer, HERMES_TOOL.thinking, HERMES_TOOL.answer_thinking)
    for secret in private:
        assert secret not in recorded
