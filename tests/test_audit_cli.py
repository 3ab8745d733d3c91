"""`mlx-manager audit tail | query | stats | prune` against a real SQLite file, as a user sees them."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mlx_manager.cli import app
from tests.audit_rows import ago, fill, record
from tests.daemon_server import wait_until
from tests.processes import Children

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def cli(*args: str, input: str | None = None):
    return runner.invoke(app, ["audit", *args], input=input)


def json_lines(text: str) -> list[dict]:
    """--jsonl output: one JSON object per line."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def json_doc(text: str):
    """--json output: exactly one JSON document (what json.load accepts)."""
    return json.loads(text)


@pytest.fixture
def db(isolated_home) -> Path:
    return isolated_home / "audit.db"


@pytest.fixture
def sample(db) -> Path:
    base = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    fill(
        db,
        [
            record(request_id="r-a", timestamp=base, model="m1", status="success", duration_ms=100.0, api_key="alice"),
            record(
                request_id="r-b",
                timestamp=base + timedelta(minutes=1),
                model="m2",
                endpoint="/v1/completions",
                status="error",
                http_status=404,
                error_type="model_not_found",
                duration_ms=5.0,
                completion_tokens=0,
                api_key="bob",
            ),
            record(
                request_id="r-c",
                timestamp=base + timedelta(minutes=2),
                model="m1",
                endpoint="/v1/embeddings",
                status="timeout",
                http_status=504,
                error_type="timeout",
                duration_ms=900.0,
                completion_tokens=0,
                api_key="alice",
            ),
            record(
                request_id="r-d",
                timestamp=ago(minutes=10),
                model="m1",
                status="cancelled",
                http_status=None,
                duration_ms=300.0,
                time_to_first_token_ms=40.0,
                backend_type="openai",
            ),
            record(
                request_id="r-e",
                timestamp=ago(minutes=1),
                model="m2",
                status="success",
                duration_ms=200.0,
                time_to_first_token_ms=20.0,
            ),
        ],
    )
    return db


def request_ids(result) -> list[str]:
    return [row["request_id"] for row in json_doc(result.stdout)]


# -- missing, corrupt and bad input -------------------------------------------------------


@pytest.mark.parametrize("command", [["tail"], ["query", "--model", "m1"], ["stats"], ["prune", "--older-than", "7d"]])
def test_a_missing_database_says_so_and_succeeds(db, command):
    result = cli(*command)
    assert result.exit_code == 0
    assert f"no audit log yet at {db}" in result.stderr
    assert not db.exists()  # reading never creates the file


def test_a_missing_database_prints_no_rows_on_stdout_in_json_mode(db):
    result = cli("tail", "--json")
    assert result.exit_code == 0 and json_doc(result.stdout) == []


@pytest.mark.parametrize("command", [["tail"], ["query"], ["stats"], ["prune", "--older-than", "7d", "--yes"]])
def test_a_corrupt_database_is_a_clear_one_line_error(db, command):
    db.write_bytes(b"definitely not sqlite " * 500)
    result = cli(*command)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert f"{db} is not a readable audit database" in lines[0] and "Move the file aside" in lines[0]
    assert "Traceback" not in result.output


def test_a_corrupt_database_in_json_mode_reports_json(db):
    db.write_bytes(b"definitely not sqlite " * 500)
    result = cli("query", "--json")
    assert result.exit_code == 1
    error = json.loads(result.stderr)
    assert "not a readable audit database" in error["error"] and error["hint"]


@pytest.mark.parametrize(
    ("args", "accepted"),
    [
        (["query", "--since", "yesterday"], "30m, 2h, 7d"),
        (["query", "--until", "soon"], "2026-05-01"),
        (["query", "--status", "ok"], "'success', 'error', 'timeout', 'cancelled'"),
        (["query", "--backend", "gpt"], "'local', 'openai', 'anthropic'"),
        (["query", "--order", "sideways"], "'newest', 'oldest'"),
        (["query", "--limit", "-1"], "greater than or equal to 0"),
        (["stats", "--by", "colour"], "'model', 'endpoint', 'status', 'backend', 'key'"),
        (["stats", "--since", "last week"], "30m, 2h, 7d"),
        (["prune", "--older-than", "ancient"], "30m, 2h, 7d"),
        (["prune"], "--older-than"),
    ],
)
def test_bad_values_are_rejected_with_the_accepted_forms(sample, args, accepted):
    result = cli(*args)
    assert result.exit_code == 2
    assert accepted in " ".join(result.stderr.split()).replace("│ ", "").replace(" │", "")


def test_contradictory_options_are_usage_errors(sample):
    both = cli("query", "--json", "--csv")
    assert both.exit_code == 2 and "--json and --csv cannot be used together" in both.stderr
    window = cli("query", "--since", "1h", "--until", "2h")
    assert window.exit_code == 2 and "--since must be earlier than --until" in window.stderr


# -- tail ---------------------------------------------------------------------------------


def test_tail_shows_the_latest_rows_newest_last(db):
    fill(db, [record(request_id=f"t-{i:02d}", timestamp=ago(minutes=60 - i)) for i in range(30)])
    table = cli("tail")
    assert table.exit_code == 0
    shown = [line.split()[2] for line in table.stdout.splitlines() if " t-" in line]
    assert shown == [f"t-{i:02d}" for i in range(10, 30)]  # the last 20 by default
    assert "time (UTC)" in table.stdout and "tiny-model" in table.stdout and "success" in table.stdout
    as_json = cli("tail", "-n", "3", "--json")
    assert request_ids(as_json) == ["t-27", "t-28", "t-29"]


def test_tail_on_an_empty_log(db):
    fill(db, [])
    result = cli("tail")
    assert result.exit_code == 0 and "has no requests yet" in result.stderr


class Follower:
    """`audit tail --follow` in its own process, as started at a terminal (so Ctrl-C reaches it);
    its output lines arrive through reader threads. The `children` fixture reaps it."""

    def __init__(self, children: Children, *args: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = children.start(
            [sys.executable, "-c", "from mlx_manager.cli import main; main()", "audit", "tail", "--follow", *args],
            ctrl_c=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.errors: queue.Queue[str] = queue.Queue()
        self.readers = [
            threading.Thread(target=lambda s=stream, q=sink: [q.put(line) for line in s], daemon=True)
            for stream, sink in ((self.proc.stdout, self.lines), (self.proc.stderr, self.errors))
        ]
        for reader in self.readers:
            reader.start()

    def read_line(self, timeout: float = 60) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout}s") from None

    def wait_for_error_line(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        try:
            while text not in self.errors.get(timeout=max(0.01, deadline - time.monotonic())):
                pass
        except queue.Empty:
            raise AssertionError(f"{text!r} not on stderr within {timeout}s") from None

    def stop_with_ctrl_c(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=60)
        for reader in self.readers:  # they end at the end of the output
            reader.join(60)
        stderr = "".join(self.errors.get_nowait() for _ in range(self.errors.qsize()))
        return code, stderr


def test_tail_follow_shows_a_row_written_after_it_started_and_ctrl_c_exits_0(db, children):
    # How soon a new row shows is a figure of benchmarks/bench_follow.py, not a deadline here.
    fill(db, [record(request_id="before")])
    follower = Follower(children, "--jsonl", "-n", "5")
    try:
        assert json.loads(follower.read_line())["request_id"] == "before"
        fill(db, [record(request_id="after")])
        assert json.loads(follower.read_line())["request_id"] == "after"
    finally:
        code, stderr = follower.stop_with_ctrl_c()
    assert code == 0
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr


def test_tail_follow_waits_for_a_log_that_does_not_exist_yet(db, children):
    follower = Follower(children)
    try:
        follower.wait_for_error_line("waiting for the daemon")
        writer_script = textwrap.dedent(
            f"""
            import asyncio
            from pathlib import Path
            from tests.audit_rows import record
            from mlx_manager.audit import AuditWriter

            async def main():
                writer = AuditWriter(Path({str(db)!r}))
                await writer.start()
                writer.record(record(request_id="first-ever", model="fresh-model"))
                await writer.stop()

            asyncio.run(main())
            """
        )
        subprocess.run([sys.executable, "-c", writer_script], check=True, cwd=ROOT, timeout=120)
        lines = [follower.read_line() for _ in range(3)]  # the table: header, rule, row
        assert "time (UTC)" in lines[0]
        assert "first-ever" in lines[2] and "fresh-model" in lines[2], lines
    finally:
        code, stderr = follower.stop_with_ctrl_c()
    assert code == 0 and "Traceback" not in stderr


# -- query --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], ["r-e", "r-d", "r-c", "r-b", "r-a"]),
        (["--model", "m1"], ["r-d", "r-c", "r-a"]),
        (["--status", "error"], ["r-b"]),
        (["--endpoint", "/v1/embeddings"], ["r-c"]),
        (["--backend", "openai"], ["r-d"]),
        (["--request-id", "r-b"], ["r-b"]),
        (["--key", "alice"], ["r-c", "r-a"]),
        (["-k", "bob"], ["r-b"]),
        (["--key", "alice", "--status", "timeout"], ["r-c"]),
        (["--key", "carol"], []),
        (["--since", "2h"], ["r-e", "r-d"]),
        (["--since", "30m", "--model", "m1"], ["r-d"]),
        (["--since", "2026-05-01T12:01:00Z", "--until", "2026-05-01T12:02:00"], ["r-b"]),
        (["--until", "2026-05-02"], ["r-c", "r-b", "r-a"]),
        (["--order", "oldest", "--limit", "2"], ["r-a", "r-b"]),
        (["-n", "1"], ["r-e"]),
    ],
)
def test_query_filters(sample, args, expected):
    result = cli("query", *args, "--json")
    assert result.exit_code == 0, result.output
    assert request_ids(result) == expected


def test_query_json_rows_have_every_field(sample):
    [row] = json_doc(cli("query", "--request-id", "r-d", "--json").stdout)
    assert row["model"] == "m1" and row["status"] == "cancelled" and row["http_status"] is None
    assert row["time_to_first_token_ms"] == 40.0 and row["backend_type"] == "openai"
    assert row["timestamp"].endswith("Z") and isinstance(row["id"], int)
    assert row["api_key"] is None  # made without a key
    [alice] = json_doc(cli("query", "--request-id", "r-a", "--json").stdout)
    assert alice["api_key"] == "alice"


def test_query_by_key_shows_only_that_keys_rows(sample):
    as_json = cli("query", "--key", "alice", "--json")
    assert as_json.exit_code == 0, as_json.output
    rows = json_doc(as_json.stdout)
    assert [(r["request_id"], r["api_key"]) for r in rows] == [("r-c", "alice"), ("r-a", "alice")]
    table = cli("query", "--key", "alice")
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split()[:5] == ["time", "(UTC)", "request", "id", "key"]
    shown = [line.split()[2:4] for line in lines if " r-" in line]
    assert shown == [["r-c", "alice"], ["r-a", "alice"]]
    assert "bob" not in table.stdout and "r-b" not in table.stdout and "r-e" not in table.stdout
    as_csv = list(csv.DictReader(io.StringIO(cli("query", "--key", "bob", "--csv").stdout)))
    assert [(r["request_id"], r["api_key"]) for r in as_csv] == [("r-b", "bob")]
    everyone = cli("query")
    keys = {line.split()[2]: line.split()[3] for line in everyone.stdout.splitlines() if " r-" in line}
    assert keys == {"r-a": "alice", "r-b": "bob", "r-c": "alice", "r-d": "-", "r-e": "-"}


def test_query_table_and_csv(sample):
    table = cli("query", "--model", "m2")
    assert table.exit_code == 0
    assert "model_not_found" in table.stdout and "404" in table.stdout and "r-e" in table.stdout
    assert "2026-05-01 12:01:00" in table.stdout
    as_csv = cli("query", "--status", "timeout", "--csv")
    [row] = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert row["request_id"] == "r-c" and row["http_status"] == "504" and row["error_type"] == "timeout"


def test_query_with_no_match(sample):
    result = cli("query", "--model", "nobody")
    assert result.exit_code == 0 and result.stdout == "" and "No requests match." in result.stderr
    assert json_doc(cli("query", "--model", "nobody", "--json").stdout) == []


# -- stats --------------------------------------------------------------------------------


def test_stats_json_and_table(sample):
    result = cli("stats", "--json")
    assert result.exit_code == 0
    [overall] = json_doc(result.stdout)
    assert overall["requests"] == 5 and overall["errors"] == 1 and overall["timeouts"] == 1
    assert overall["cancelled"] == 1 and overall["error_rate"] == 0.2
    assert overall["p50_duration_ms"] == 200.0 and overall["p95_duration_ms"] == 900.0
    assert overall["mean_ttft_ms"] == 30.0
    table = cli("stats")
    assert "requests" in table.stdout and "p95 ms" in table.stdout and "1 (20.0%)" in table.stdout


def test_stats_by_model_and_since(sample):
    groups = json_doc(cli("stats", "--by", "model", "--json").stdout)
    assert [(g["model"], g["requests"]) for g in groups] == [("m1", 3), ("m2", 2)]
    recent = json_doc(cli("stats", "--since", "1h", "--by", "status", "--json").stdout)
    assert {g["status"]: g["requests"] for g in recent} == {"cancelled": 1, "success": 1}
    table = cli("stats", "--by", "endpoint")
    assert "/v1/embeddings" in table.stdout


def test_stats_by_key_and_for_one_key(sample):
    groups = json_doc(cli("stats", "--by", "key", "--json").stdout)
    assert [(g["key"], g["requests"], g["errors"], g["timeouts"]) for g in groups] == [
        ("alice", 2, 0, 1),
        (None, 2, 0, 0),
        ("bob", 1, 1, 0),  # among equals, no key last
    ]
    [alice] = json_doc(cli("stats", "--key", "alice", "--json").stdout)
    assert alice["requests"] == 2 and alice["timeouts"] == 1
    table = cli("stats", "--by", "key")
    assert table.exit_code == 0, table.output
    rows = {
        line.split()[0]: line.split()[1]
        for line in table.stdout.splitlines()
        if line.split() and line.split()[0] in ("alice", "bob", "-")
    }
    assert rows == {"alice": "2", "bob": "1", "-": "2"}


def test_query_and_stats_by_backend_name_or_type(db):
    fill(
        db,
        [
            record(
                request_id="r-1",
                backend="mac2",
                backend_type="openai",
                upstream_prompt_tokens=10,
                upstream_completion_tokens=20,
            ),
            record(request_id="r-2", backend="mac3", backend_type="openai"),
            record(
                request_id="r-3",
                backend="cloud",
                backend_type="anthropic",
                status="error",
                http_status=429,
                error_type="upstream_rate_limited",
            ),
            record(request_id="r-4"),
        ],
    )
    assert request_ids(cli("query", "--backend", "mac2", "--json")) == ["r-1"]
    assert request_ids(cli("query", "--backend", "openai", "--json")) == ["r-2", "r-1"]  # a type: all of them
    assert request_ids(cli("query", "--backend", "local", "--json")) == ["r-4"]
    [row] = json_doc(cli("query", "--request-id", "r-1", "--json").stdout)
    assert (row["backend"], row["backend_type"], row["upstream_prompt_tokens"], row["upstream_completion_tokens"]) == (
        "mac2",
        "openai",
        10,
        20,
    )
    groups = json_doc(cli("stats", "--by", "backend", "--json").stdout)
    assert sorted((g["backend"], g["requests"], g["errors"]) for g in groups) == [
        ("cloud", 1, 1),
        ("local", 1, 0),
        ("mac2", 1, 0),
        ("mac3", 1, 0),
    ]
    [cloud] = json_doc(cli("stats", "--backend", "cloud", "--json").stdout)
    assert cloud["requests"] == 1 and cloud["errors"] == 1
    typo = cli("query", "--backend", "mac9")
    assert typo.exit_code == 2
    assert "nor a backend in the audit log (cloud, local, mac2, mac3)" in " ".join(typo.stderr.split())


def test_key_names_complete_from_the_configured_keys(isolated_home, tmp_path):
    from tests.test_cli_help import complete

    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# a comment\nfile-key-0123456789\n")
    (isolated_home / "config.toml").write_text(
        f'[auth]\nkeys_file = "{keys_file}"\n\n'
        '[[auth.keys]]\nname = "alice"\nsha256 = "' + "a" * 64 + '"\ncreated = 2025-01-01T00:00:00Z\n\n'
        '[[auth.keys]]\nname = "albert"\nsha256 = "' + "b" * 64 + '"\ncreated = 2025-01-01T00:00:00Z\n'
    )
    env = {"MLX_MANAGER_HOME": str(isolated_home), "MLX_MANAGER_API_KEY": "env-key-0123456789"}
    assert complete("mlx-manager audit query --key al", env) == ["alice", "albert"]
    assert complete("mlx-manager audit stats --key ", env) == ["alice", "albert", "keys_file:2", "MLX_MANAGER_API_KEY"]
    assert complete("mlx-manager audit stats --by ") == ["model", "endpoint", "status", "backend", "key"]


def test_stats_on_an_empty_window(sample):
    result = cli("stats", "--since", "2030-01-01")
    assert result.exit_code == 0 and "No requests in this window." in result.stderr


# -- prune --------------------------------------------------------------------------------


@pytest.fixture
def aged(db) -> Path:
    fill(db, [record(request_id=f"old-{i}", timestamp=ago(days=10)) for i in range(12)])
    fill(db, [record(request_id=f"new-{i}", timestamp=ago(days=1)) for i in range(3)])
    return db


def count(path: Path) -> int:
    return len(json_doc(cli("query", "--limit", "0", "--json").stdout))


def test_prune_dry_run_changes_nothing(aged):
    result = cli("prune", "--older-than", "7d", "--dry-run")
    assert result.exit_code == 0
    assert "Would delete 12 requests from before" in result.stdout and "nothing changed" in result.stdout
    assert count(aged) == 15


def test_prune_asks_first(aged):
    declined = cli("prune", "--older-than", "7d", input="n\n")
    assert declined.exit_code == 0  # a user's "no" is not an error
    assert "Delete 12 requests from before" in declined.stderr and declined.stdout.strip().endswith("Nothing deleted.")
    assert "Error" not in declined.stderr
    assert count(aged) == 15
    no_answer = cli("prune", "--older-than", "7d", input="")
    assert no_answer.exit_code == 1 and "Nothing deleted." in no_answer.stderr and count(aged) == 15
    accepted = cli("prune", "--older-than", "7d", input="y\n")
    assert accepted.exit_code == 0 and "Deleted 12 requests" in accepted.stdout
    assert sorted(request_ids(cli("query", "--json"))) == ["new-0", "new-1", "new-2"]


def test_prune_yes_json_and_nothing_to_do(aged):
    result = cli("prune", "--older-than", "7d", "--yes", "--json")
    assert result.exit_code == 0
    assert json_doc(result.stdout)["deleted"] == 12
    again = cli("prune", "--older-than", "7d", "--yes")
    assert again.exit_code == 0 and "nothing to prune" in again.stdout
    by_date = cli(
        "prune", "--older-than", (datetime.now(UTC) + timedelta(days=1)).date().isoformat(), "--dry-run", "--json"
    )
    assert json_doc(by_date.stdout)["would_delete"] == 3


def test_prune_while_a_writer_writes(db, children):
    # Another process writes through the daemon's writer for the whole prune (it stops only when
    # told to, after the prune); neither side may fail with "database is locked", the prune is not
    # held up until the writer stops, and every row written must still be there afterwards.
    fill(db, [record(request_id=f"old-{i}", timestamp=ago(days=10)) for i in range(20_000)])
    writer_script = textwrap.dedent(
        f"""
        import asyncio, sys, threading
        from pathlib import Path
        from tests.audit_rows import record
        from mlx_manager.audit import AuditWriter

        async def main():
            writer = AuditWriter(Path({str(db)!r}))
            await writer.start()
            told_to_stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            threading.Thread(
                target=lambda: (sys.stdin.readline(), loop.call_soon_threadsafe(told_to_stop.set)), daemon=True
            ).start()
            print("started", flush=True)
            n = 0
            while not told_to_stop.is_set():
                for _ in range(20):
                    writer.record(record(request_id=f"live-{{n}}"))
                    n += 1
                await asyncio.sleep(0.005)
            await writer.stop()
            print(n, writer.written, writer.dropped, flush=True)

        asyncio.run(main())
        """
    )
    proc = children.start(
        [sys.executable, "-c", writer_script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout.readline().strip() == "started"
    assert wait_until(lambda: live_rows(db) > 0), "the writer committed nothing"  # it is writing now
    pruned = {}
    pruning = threading.Thread(target=lambda: pruned.update(result=cli("prune", "--older-than", "7d", "--yes")))
    pruning.start()
    pruning.join(120)
    assert not pruning.is_alive(), "the prune did not finish while the writer was writing: it was held up by it"
    assert proc.poll() is None  # the writer was still writing when the prune finished
    out, err = proc.communicate("stop\n", timeout=120)
    result = pruned["result"]
    assert result.exit_code == 0, result.output
    assert "Deleted 20,000 requests" in result.stdout
    recorded, written, dropped = map(int, out.split())
    assert recorded == written and dropped == 0, err
    assert "locked" not in err
    rows = json_doc(cli("query", "--limit", "0", "--json").stdout)
    assert len(rows) == recorded and all(r["request_id"].startswith("live-") for r in rows)


def live_rows(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute("SELECT count(*) FROM audit_logs WHERE request_id LIKE 'live-%'").fetchone()[0]


# -- tables that fit the terminal ---------------------------------------------------------

LONG_ID = "5f0c" + "9" * 28
LONG_MODEL = "mlx-community/Llama-3.2-3B-Instruct-4bit"


@pytest.fixture
def long_names(db) -> Path:
    fill(
        db,
        [
            record(
                request_id=LONG_ID,
                model=LONG_MODEL,
                api_key="laptop",
                time_to_first_token_ms=12.0,
                timestamp=ago(minutes=3),
            ),
            record(
                request_id="r-b",
                model="/Users/someone/models/mid",
                status="error",
                http_status=404,
                error_type="model_not_found",
                api_key="alice",
                timestamp=ago(minutes=2),
            ),
        ],
    )
    return db


def shown(result) -> tuple[str, list[str]]:
    """The table's header line and its rows, checked to fit in $COLUMNS."""
    width = int(os.environ["COLUMNS"])
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert all(len(line.rstrip()) <= width for line in lines), result.stdout
    return lines[0], lines[2:]


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize(
    ("args", "filtered"),
    [
        (["tail"], None),
        (["query"], None),
        (["query", "--key", "laptop"], "key"),
        (["query", "--endpoint", "/v1/chat/completions"], "endpoint"),
        (["query", "--model", LONG_MODEL], "model"),
        (["query", "--backend", "local"], "backend"),
    ],
)
def test_row_tables_fit_the_terminal_and_keep_what_identifies_a_row(long_names, monkeypatch, width, args, filtered):
    monkeypatch.setenv("COLUMNS", str(width))
    result = cli(*args)
    assert result.exit_code == 0, result.output
    header, rows = shown(result)
    for title in ("time (UTC)", "request id", "status", filtered or "status"):
        assert title in header
    assert any(row.split()[2] == LONG_ID[:9] + "…" for row in rows)  # a short request id
    assert all(row.split()[2] in (LONG_ID[:9] + "…", "r-b") for row in rows)  # a short one stays whole
    if "model" in header.split():
        assert "mlx-commu…truct-4bit" in result.stdout  # shortened in the middle
    hidden = [name for name in ("key", "endpoint", "ms", "ttft ms", "in", "out", "error") if name not in header.split()]
    if width == 80:
        assert "Hidden to fit the terminal:" in result.stderr and "--wide shows every column" in result.stderr
        assert all(name in result.stderr for name in hidden)
        assert "status" in header and "http" in header


def test_row_tables_at_full_width_hide_nothing_and_wide_shows_every_column(long_names, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    roomy = cli("query")
    assert "Hidden" not in roomy.stderr and LONG_MODEL in roomy.stdout and LONG_ID in roomy.stdout
    monkeypatch.setenv("COLUMNS", "80")
    wide = cli("query", "--wide")
    assert wide.exit_code == 0 and "Hidden" not in wide.stderr
    header = wide.stdout.splitlines()[0]
    for title in (
        "request id",
        "key",
        "model",
        "backend",
        "endpoint",
        "status",
        "http",
        "ms",
        "ttft ms",
        "in",
        "out",
        "total",
        "error",
    ):
        assert title in header
    assert LONG_ID in wide.stdout and LONG_MODEL in wide.stdout  # whole, on one line each
    assert len(wide.stdout.splitlines()) == 4  # header, rule, two rows: nothing folded


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("by", ["model", "key", "endpoint", "status"])
def test_stats_tables_fit_the_terminal_and_keep_the_group(long_names, monkeypatch, width, by):
    monkeypatch.setenv("COLUMNS", str(width))
    result = cli("stats", "--by", by)
    assert result.exit_code == 0, result.output
    header, _ = shown(result)
    assert header.split()[:2] == [by, "requests"] and "errors" in header and "p50 ms" in header
    groups = {line.split()[0] for line in result.stdout.splitlines()[2:4]}
    expected = {
        "model": {"mlx-commu…truct-4bit", "/Users/so…models/mid"},
        "key": {"laptop", "alice"},
        "endpoint": {"/v1/chat/completions"},
        "status": {"success", "error"},
    }[by]
    assert groups >= expected
    if width == 80 and by == "model":
        assert "Hidden to fit the terminal:" in result.stderr
    wide = cli("stats", "--by", by, "--wide")
    assert "mean TTFT ms" in wide.stdout and "cancelled" in wide.stdout and "Hidden" not in wide.stderr


# -- one JSON document per command; JSON lines where rows stream ---------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["tail"],
        ["tail", "-n", "1"],
        ["query"],
        ["query", "--model", "nobody"],
        ["stats"],
        ["stats", "--by", "key"],
        ["stats", "--since", "2030-01-01"],
        ["prune", "--older-than", "30d", "--dry-run"],
    ],
)
def test_json_is_one_document_on_every_command(sample, args):
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.output
    json.load(io.StringIO(result.stdout))  # what a script does: one document, or this raises


def test_jsonl_prints_one_row_per_line(sample):
    as_json = json_doc(cli("query", "--json").stdout)
    lines = cli("query", "--jsonl")
    assert lines.exit_code == 0 and json_lines(lines.stdout) == as_json and len(lines.stdout.splitlines()) == 5
    assert json_lines(cli("tail", "-n", "2", "--jsonl").stdout) == as_json[1::-1]
    assert cli("query", "--model", "nobody", "--jsonl").stdout == ""


def test_follow_streams_json_lines_not_one_document(sample):
    result = cli("tail", "--follow", "--json")
    assert result.exit_code == 2
    assert "--follow --jsonl" in json.loads(result.stderr)["hint"]
    both = cli("query", "--json", "--jsonl")
    assert both.exit_code == 2 and "--json and --jsonl cannot be used together" in both.stderr


# -- help ---------------------------------------------------------------------------------


def test_every_audit_command_has_help_examples_and_option_help():
    group = typer.main.get_command(app).commands["audit"]
    assert set(group.commands) == {"tail", "query", "stats", "prune"}
    for name, command in group.commands.items():
        assert command.help and "\n" not in command.help.strip(), name
        assert command.epilog and "Examples:" in command.epilog and f"mlx-manager audit {name}" in command.epilog
        for param in command.params:
            if param.name != "help":
                assert param.help, f"audit {name} {param.opts} has no help"
    for name in group.commands:
        result = runner.invoke(app, ["audit", name, "--help"])
        assert result.exit_code == 0 and "Examples" in result.stdout


def test_audit_help_does_not_import_sqlalchemy():
    code = (
        "import sys\n"
        "from mlx_manager.cli import app\n"
        "for argv in (['audit', '--help'], ['audit', 'query', '--help'], ['audit', 'tail', '--help']):\n"
        "    try:\n"
        "        app(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('sqlalchemy', 'sqlmodel', 'sqlite3') if m in sys.modules), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.stderr.strip().splitlines()[-1] == "[]"
