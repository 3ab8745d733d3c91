"""`mlx-manager bench` against the real daemon: its report agrees with the daemon's audit log."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon_server import serving, wait_until

MLX_MANAGER = str(Path(sys.executable).with_name("mlx-manager"))


@pytest.fixture
def server(tmp_path, monkeypatch, fast_model):
    monkeypatch.setenv("MLX_MANAGER_HOME", str(tmp_path / "bench-home"))
    with serving(fast_model) as live:
        yield live


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([MLX_MANAGER, "bench", *args], capture_output=True, text=True, timeout=300)


def test_report_matches_the_audit_log(server, fast_model):
    done = bench(
        "--url",
        server.url,
        "--model",
        fast_model,
        "--concurrency",
        "1,3",
        "--requests",
        "4",
        "--max-tokens",
        "6",
        "--prompt-tokens",
        "8",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    [levels] = report["servers"]
    assert [level["concurrency"] for level in levels] == [1, 3]
    for level in levels:
        assert level["requests"] == 4 and level["errors"] == {}
        assert level["completion_tokens"] == 4 * 6
        assert level["tokens_per_second"] > 0 and level["ttft_p50"] <= level["latency_p50"]

    with sqlite3.connect(server.daemon.audit.path) as db:
        assert wait_until(lambda: db.execute("SELECT count(*) FROM audit_logs").fetchone()[0] == 10)
        rows = db.execute("SELECT status, completion_tokens, endpoint FROM audit_logs").fetchall()
    # The model probe (1 token) and the warm-up (8 tokens), then the 8 measured requests (6 each).
    assert sorted(r[1] for r in rows) == [1] + [6] * 8 + [8]
    assert {(r[0], r[2]) for r in rows} == {("success", "/v1/chat/completions")}
    assert sum(level["completion_tokens"] for level in levels) == sum(r[1] for r in rows if r[1] == 6)


def test_compare_prints_ratios(server, fast_model):
    done = bench(
        "--url",
        server.url,
        "--vs",
        server.url,
        "--model",
        fast_model,
        "--concurrency",
        "2",
        "--requests",
        "2",
        "--max-tokens",
        "3",
        "--prompt-tokens",
        "4",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert len(report["servers"]) == 2 and len(report["ratios"]) == 1
    assert report["ratios"][0]["tokens_per_second"] > 0
    human = bench(
        "--url",
        server.url,
        "--vs",
        server.url,
        "--model",
        fast_model,
        "--concurrency",
        "1",
        "--requests",
        "1",
        "--max-tokens",
        "2",
        "--prompt-tokens",
        "4",
    )
    assert human.returncode == 0 and "A/B" in human.stdout


def test_unreachable_and_foreign_servers_are_one_line_errors(server):
    refused = bench("--url", "http://127.0.0.1:9", "--requests", "1")
    assert refused.returncode == 1
    assert refused.stderr.strip() == "Error: cannot connect to http://127.0.0.1:9: is the server running?"
    foreign = bench("--url", server.url + "/health", "--requests", "1")  # answers, but not the OpenAI API
    assert foreign.returncode == 1 and len(foreign.stderr.strip().splitlines()) == 1
    assert "Traceback" not in foreign.stderr
    bad = bench("--url", "ftp://x", "--requests", "1")
    assert bad.returncode == 2 and "http://" in bad.stderr
    levels = bench("--concurrency", "0,x")
    assert levels.returncode == 2 and "1,4,8" in levels.stderr


def test_conversation_mode_reports_first_and_later_turns(server, fast_model):
    done = bench(
        "--url",
        server.url,
        "--model",
        fast_model,
        "--concurrency",
        "2",
        "--requests",
        "2",
        "--turns",
        "3",
        "--system-tokens",
        "120",
        "--max-tokens",
        "5",
        "--prompt-tokens",
        "6",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    [[level]] = json.loads(done.stdout)["servers"]
    assert level["requests"] == 2 * 3 and level["errors"] == {}
    assert level["ttft_first_turn_p50"] > 0 and level["ttft_later_turns_p50"] > 0
    with sqlite3.connect(server.daemon.audit.path) as db:
        # The probe, the warm-up, then two conversations of three requests each.
        assert wait_until(lambda: db.execute("SELECT count(*) FROM audit_logs").fetchone()[0] == 8)
    # Each later turn resent the conversation, and the daemon's prompt cache reused it.
    assert server.engine.status().models[0].cache.hits >= 4
    human = bench(
        "--url",
        server.url,
        "--model",
        fast_model,
        "--concurrency",
        "1",
        "--requests",
        "1",
        "--turns",
        "2",
        "--max-tokens",
        "2",
        "--prompt-tokens",
        "4",
    )
    assert human.returncode == 0 and "TTFT p50 later" in human.stdout
