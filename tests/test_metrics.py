"""Prometheus metrics: exact moves after observe_request, gauges read at scrape, valid text."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlx_manager.metrics import MAX_MODELS, OTHER, Metrics, scrape_summary


def scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a render, parsed by prometheus_client's own parser: {(name, labels): value}."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_observe_request_moves_every_figure_by_the_exact_amount():
    metrics = Metrics()
    metrics.observe_request("/v1/chat/completions", "tiny", "success", 0.3, 0.02, prompt_tokens=11, completion_tokens=7)
    metrics.observe_request("/v1/chat/completions", "tiny", "success", 2.0, 0.2, prompt_tokens=5, completion_tokens=3)
    metrics.observe_request("/v1/completions", "tiny", "timeout", 30.0, None, prompt_tokens=4, completion_tokens=None)
    metrics.observe_request("/v1/chat/completions", None, "error", 0.001)

    s = scrape(metrics)
    chat, completions = "/v1/chat/completions", "/v1/completions"
    assert value(s, "mlx_manager_requests_total", endpoint=chat, model="tiny", status="success") == 2
    assert value(s, "mlx_manager_requests_total", endpoint=completions, model="tiny", status="timeout") == 1
    assert value(s, "mlx_manager_requests_total", endpoint=chat, model="", status="error") == 1
    assert value(s, "mlx_manager_timeouts_total", endpoint=completions) == 1
    assert value(s, "mlx_manager_timeouts_total", endpoint=chat) == 0
    assert value(s, "mlx_manager_prompt_tokens_total", model="tiny") == 20
    assert value(s, "mlx_manager_completion_tokens_total", model="tiny") == 10

    assert value(s, "mlx_manager_request_duration_seconds_count", endpoint=chat) == 3
    assert value(s, "mlx_manager_request_duration_seconds_sum", endpoint=chat) == pytest.approx(2.301)
    assert value(s, "mlx_manager_request_duration_seconds_bucket", endpoint=chat, le="0.5") == 2  # 0.001 and 0.3
    assert value(s, "mlx_manager_request_duration_seconds_bucket", endpoint=chat, le="+Inf") == 3
    assert value(s, "mlx_manager_request_duration_seconds_count", endpoint=completions) == 1

    assert value(s, "mlx_manager_time_to_first_token_seconds_count") == 2  # the timeout had no first token
    assert value(s, "mlx_manager_time_to_first_token_seconds_sum") == pytest.approx(0.22)
    assert value(s, "mlx_manager_time_to_first_token_seconds_bucket", le="0.025") == 1


def test_model_load_histogram():
    metrics = Metrics()
    metrics.observe_model_load(1.5)
    metrics.observe_model_load(0.2)
    s = scrape(metrics)
    assert value(s, "mlx_manager_model_load_seconds_count") == 2
    assert value(s, "mlx_manager_model_load_seconds_sum") == pytest.approx(1.7)
    assert value(s, "mlx_manager_model_load_seconds_bucket", le="0.5") == 1


def test_gauges_read_their_callables_at_every_scrape():
    live = {"queue": 0, "loaded": 1, "active": 2}
    metrics = Metrics(
        queue_depth=lambda: live["queue"],
        loaded_models=lambda: live["loaded"],
        active_requests=lambda: live["active"],
    )
    s = scrape(metrics)
    assert (value(s, "mlx_manager_queue_depth"), value(s, "mlx_manager_loaded_models")) == (0, 1)
    assert value(s, "mlx_manager_active_requests") == 2
    assert value(s, "mlx_manager_audit_backlog") == 0  # no source yet

    live.update(queue=5, loaded=2, active=0)
    metrics.watch(audit_backlog=lambda: 17)  # e.g. once the audit writer has started
    s = scrape(metrics)
    assert value(s, "mlx_manager_queue_depth") == 5
    assert value(s, "mlx_manager_loaded_models") == 2
    assert value(s, "mlx_manager_active_requests") == 0
    assert value(s, "mlx_manager_audit_backlog") == 17


def test_a_failing_gauge_source_does_not_break_the_scrape():
    def engine_gone() -> int:
        raise RuntimeError("engine stopped")

    metrics = Metrics(queue_depth=engine_gone, loaded_models=lambda: 1)
    s = scrape(metrics)
    assert math.isnan(value(s, "mlx_manager_queue_depth"))
    assert value(s, "mlx_manager_loaded_models") == 1


def test_watch_rejects_an_unknown_gauge():
    with pytest.raises(ValueError, match="queue_depth"):
        Metrics().watch(queue_lenght=lambda: 1)


def test_each_instance_has_its_own_registry():
    first, second = Metrics(), Metrics()  # no "Duplicated timeseries" error either
    first.observe_request("/v1/completions", "m", "success", 0.1)
    labels = {"endpoint": "/v1/completions", "model": "m", "status": "success"}
    assert value(scrape(first), "mlx_manager_requests_total", **labels) == 1
    assert value(scrape(second), "mlx_manager_requests_total", **labels) == 0


def test_model_labels_are_capped_against_clients_inventing_names():
    metrics = Metrics()
    for i in range(MAX_MODELS + 10):
        metrics.observe_request("/v1/completions", f"model-{i}", "error", 0.01)
    metrics.observe_request("/v1/completions", "model-0", "success", 0.01)  # a known one still counts as itself

    s = scrape(metrics)
    models = {dict(labels)["model"] for (name, labels) in s if name == "mlx_manager_requests_total"}
    assert len(models) == MAX_MODELS + 1
    assert value(s, "mlx_manager_requests_total", endpoint="/v1/completions", model=OTHER, status="error") == 10
    assert value(s, "mlx_manager_requests_total", endpoint="/v1/completions", model="model-0", status="success") == 1


def test_render_is_valid_prometheus_text_with_every_metric():
    metrics = Metrics(queue_depth=lambda: 0)
    metrics.observe_request("/v1/chat/completions", 'odd "name"\\with\nnewline', "success", 0.1, 0.01, 1, 1)
    body, content_type = metrics.render()
    assert content_type == "text/plain; version=1.0.0; charset=utf-8"
    families = {family.name: family.type for family in text_string_to_metric_families(body.decode())}
    expected = {
        "mlx_manager_requests": "counter",
        "mlx_manager_request_duration_seconds": "histogram",
        "mlx_manager_time_to_first_token_seconds": "histogram",
        "mlx_manager_prompt_tokens": "counter",
        "mlx_manager_completion_tokens": "counter",
        "mlx_manager_timeouts": "counter",
        "mlx_manager_model_load_seconds": "histogram",
        "mlx_manager_active_requests": "gauge",
        "mlx_manager_queue_depth": "gauge",
        "mlx_manager_loaded_models": "gauge",
        "mlx_manager_audit_backlog": "gauge",
    }
    assert expected.items() <= families.items()
    s = scrape(metrics)
    assert value(s, "mlx_manager_prompt_tokens_total", model='odd "name"\\with\nnewline') == 1


def test_scrape_summary_gives_the_main_figures():
    live = {"queue": 3}
    metrics = Metrics(queue_depth=lambda: live["queue"], loaded_models=lambda: 1, active_requests=lambda: 2)
    metrics.observe_request("/v1/chat/completions", "a", "success", 1.0, 0.1, 10, 20, cached_tokens=8)
    metrics.observe_request("/v1/chat/completions", "b", "success", 3.0, 0.3, 5, 5, cached_tokens=0)
    metrics.observe_request("/v1/completions", "a", "timeout", 60.0, None, 7, None)
    metrics.observe_model_load(2.0)

    summary = scrape_summary(metrics.render()[0].decode())
    assert summary == {
        "requests": 3,
        "requests_by_status": {"success": 2, "timeout": 1},
        "timeouts": 1,
        "prompt_tokens": 22,
        "completion_tokens": 25,
        "active_requests": 2,
        "queue_depth": 3,
        "loaded_models": 1,
        "audit_backlog": 0,
        "prompt_cache_hits": 1,
        "prompt_cache_misses": 1,
        "prompt_cache_cached_tokens": 8,
        "prompt_cache_bytes": 0,
        "request_duration_seconds_mean": pytest.approx(64.0 / 3),
        "time_to_first_token_seconds_mean": pytest.approx(0.2),
        "model_load_seconds_mean": pytest.approx(2.0),
    }


def test_scrape_summary_of_a_fresh_daemon_and_of_nothing():
    fresh = scrape_summary(Metrics().render()[0].decode())
    assert fresh["requests"] == 0 and fresh["requests_by_status"] == {}
    assert fresh["queue_depth"] == 0
    assert fresh["request_duration_seconds_mean"] is None

    empty = scrape_summary("")
    assert empty["requests"] == 0
    assert empty["queue_depth"] is None
