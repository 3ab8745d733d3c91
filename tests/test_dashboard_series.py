"""The dashboard's figures over time, read from a real audit database with the daemon's reader
(aiosqlite): the same numbers as `audit stats` for the same window, exact percentiles, and
buckets read again when (and only when) their rows change; all of it the same again once the
writer has rolled the minutes up (audit/minutes.py), and rows written behind its back still counted;
and the same figures again from the daemon's reader process (audit/reader_process.py)."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from mlx_manager.audit import AuditFilter, AuditStore, AuditWriter, compute_stats, prune_older, reader_process
from mlx_manager.audit import reader as reader_module
from mlx_manager.audit.errors import AuditLogMissing
from mlx_manager.audit.minutes import refresh_step as roll_up_minutes
from mlx_manager.audit.reader import AuditReader
from mlx_manager.audit.reader_process import ReaderProcess
from mlx_manager.audit.record import format_timestamp
from mlx_manager.audit.series import WINDOWS
from mlx_manager.audit.stats import nearest_rank
from tests.audit_rows import ago, fill, record
from tests.daemon_server import wait_until

MODELS = ("model-a", "model-b")
KEYS = ("alice", "bob", None)


def requests(count: int, *, minutes: float = 55) -> list:
    """`count` API requests spread over the last `minutes`, with a mix of models, keys, outcomes."""
    rows = []
    for i in range(count):
        status = ("success", "success", "success", "error", "timeout", "cancelled")[i % 6]
        rows.append(
            record(
                timestamp=ago(seconds=minutes * 60 * (i + 0.5) / count),
                model=MODELS[i % 2],
                api_key=KEYS[i % 3],
                status=status,
                duration_ms=10.0 + (i * 37) % 500 + (i % 7) / 8,
                time_to_first_token_ms=None if i % 5 == 0 else 1.0 + (i * 13) % 90,
                prompt_tokens=5 + i % 11,
                completion_tokens=0 if status != "success" else 1 + i % 23,
                error_type={"error": "model_not_found" if i % 12 != 9 else None, "timeout": "timeout"}.get(status),
            )
        )
    return rows


def summary(path, window: str = "hour") -> dict:
    async def read() -> dict:
        reader = AuditReader(path)
        try:
            return await reader.series(WINDOWS[window])
        finally:
            await reader.close()

    return asyncio.run(read())


def exact(values: list[float], percent: int) -> float:
    ordered = sorted(int(v * 1000) for v in values)
    return ordered[nearest_rank(len(ordered), percent) - 1] / 1000


@pytest.fixture
def audit_path(isolated_home):
    return isolated_home / "audit.db"


def roll_up(path) -> int:
    """What the daemon's writer does between batches: roll up every closed minute; how many there are."""
    with AuditStore.open(path) as store, store.write() as conn:
        while roll_up_minutes(conn, datetime.now(UTC)):
            pass
        return conn.execute("SELECT count(*) FROM audit_minutes_done").fetchone()[0]


@pytest.mark.parametrize("rolled_up", [False, True], ids=["requests", "minutes"])
def test_the_window_says_what_audit_stats_says(audit_path, rolled_up):
    fill(audit_path, requests(600) + [record(endpoint="/admin/reload", model=None, timestamp=ago(minutes=3))])
    if rolled_up:
        assert roll_up(audit_path) >= 50  # the minutes of the last 55 but the newest
    figures = summary(audit_path)
    window = WINDOWS["hour"]
    assert len(figures["time"]) == window.count == 60
    assert all(b - a == 60 for a, b in zip(figures["time"], figures["time"][1:], strict=False))
    since = datetime.fromtimestamp(figures["time"][0], UTC)
    until = datetime.fromtimestamp(figures["time"][-1] + window.step, UTC)
    same = AuditFilter(since=since, until=until)
    with AuditStore.open(audit_path) as store, store.read() as conn:
        (total,) = compute_stats(conn, AuditFilter(since=since, until=until, endpoint="/v1/chat/completions"))
        per_model = compute_stats(conn, same, by="model")
        per_key = compute_stats(conn, same, by="key")
        ttfts = [
            row[0]
            for row in conn.execute(
                "SELECT time_to_first_token_ms FROM audit_logs WHERE timestamp >= ? AND timestamp < ?"
                " AND time_to_first_token_ms IS NOT NULL AND endpoint LIKE '/v1/%'",
                (format_timestamp(since), format_timestamp(until)),
            )
        ]
    assert ttfts

    fields = (
        "requests",
        "errors",
        "timeouts",
        "cancelled",
        "p50_duration_ms",
        "p95_duration_ms",
        "prompt_tokens",
        "completion_tokens",
    )
    for name in fields:
        assert figures["total"][name] == total[name], name
    assert figures["total"]["tokens_per_second"] == pytest.approx(total["tokens_per_second"])
    assert figures["total"]["p50_ttft_ms"] == exact(ttfts, 50) and figures["total"]["p95_ttft_ms"] == exact(ttfts, 95)
    # The admin call is in the log (audit stats counts it) but not among the API's figures.
    assert sum(item["requests"] for item in per_model) == total["requests"] + 1
    api_models = [item for item in per_model if item["model"] is not None]
    assert [item["model"] for item in figures["by_model"]] == [item["model"] for item in api_models]
    for mine, theirs in zip(figures["by_model"], api_models, strict=True):
        assert {n: mine[n] for n in fields} == {n: theirs[n] for n in fields}
    keys = {item["key"]: item for item in figures["by_key"]}
    assert set(keys) == {"alice", "bob", None}
    for theirs in per_key:
        if theirs["key"] is not None:
            assert keys[theirs["key"]]["requests"] == theirs["requests"]
            assert keys[theirs["key"]]["p95_duration_ms"] == theirs["p95_duration_ms"]

    assert sum(figures["requests_per_second"][:-1]) * 60 + figures["requests_per_second"][-1] > 0
    assert figures["failures"].keys() == {"model_not_found", "error", "timeout", "cancelled"}
    assert sum(map(sum, figures["failures"].values())) == total["errors"] + total["timeouts"] + total["cancelled"]


@pytest.mark.parametrize("rolled_up", [False, True], ids=["requests", "minutes"])
def test_a_bucket_is_read_again_only_when_its_rows_change(audit_path, monkeypatch, rolled_up):
    monkeypatch.setattr(reader_module, "FRESH_SECONDS", 0.0)
    fill(audit_path, requests(120))
    if rolled_up:
        assert roll_up(audit_path) >= 50

    async def scenario() -> None:
        reader = AuditReader(audit_path)
        try:
            first = await reader.series(WINDOWS["hour"])
            kept = dict(reader._buckets["hour"])
            old = datetime.fromtimestamp(first["time"][10] + 5, UTC)  # a bucket 50 minutes back
            fill(audit_path, [record(timestamp=old, duration_ms=99_999.0, model="late-model")])
            second = await reader.series(WINDOWS["hour"])
            changed = [start for start, bucket in reader._buckets["hour"].items() if kept.get(start) is not bucket]
            assert first["time"][10] in changed and len(changed) <= 2  # that bucket (and a new minute's)
            assert second["total"]["requests"] == first["total"]["requests"] + 1
            assert "late-model" in [item["model"] for item in second["by_model"]]
            assert second["duration_p95_ms"][10] == 99_999.0

            with AuditStore.open(audit_path) as store:
                prune_older(store, datetime.now(UTC) - timedelta(minutes=30))
            third = await reader.series(WINDOWS["hour"])
            assert third["total"]["requests"] < second["total"]["requests"]
            assert "late-model" not in [item["model"] for item in third["by_model"]]
            assert third["requests_per_second"][:25] == [0.0] * 25
        finally:
            await reader.close()

    asyncio.run(scenario())


def test_the_day_window_and_an_empty_log(audit_path):
    fill(audit_path, [record(timestamp=ago(hours=20)), record(timestamp=ago(days=3))])
    figures = summary(audit_path, "day")
    assert len(figures["time"]) == 96 and figures["time"][1] - figures["time"][0] == 900
    assert figures["total"]["requests"] == 1  # the one three days back is outside
    assert sum(1 for value in figures["duration_p50_ms"] if value is not None) == 1

    empty = summary(audit_path, "hour")
    assert empty["total"]["requests"] == 0 and empty["by_model"] == [] and empty["failures"] == {}
    assert empty["ttft_p50_ms"] == [None] * 60 and empty["requests_per_second"] == [0.0] * 60


def test_the_writer_rolls_up_minutes_and_rows_behind_its_back_still_count(audit_path):
    fill(audit_path, requests(300))
    from_requests = summary(audit_path)

    async def run_writer_until_rolled_up() -> bool:
        writer = AuditWriter(audit_path)
        await writer.start()
        try:
            return await asyncio.to_thread(wait_until, lambda: marked(audit_path) >= 50)
        finally:
            await writer.stop()

    assert asyncio.run(run_writer_until_rolled_up())
    rolled_up = summary(audit_path)
    for name in ("requests_per_second", "ttft_p50_ms", "ttft_p95_ms", "duration_p50_ms", "duration_p95_ms"):
        assert rolled_up[name][:-1] == from_requests[name][:-1], name  # the newest bucket's rate is over its seconds
    assert rolled_up["failures"] == from_requests["failures"]
    for name in ("requests", "errors", "p50_duration_ms", "p95_duration_ms", "p50_ttft_ms", "p95_ttft_ms"):
        assert rolled_up["total"][name] == from_requests["total"][name], name

    # The figures come from the minutes: a change there shows (no program makes one, but this one).
    with sqlite3.connect(audit_path) as raw:
        raw.execute(
            "UPDATE audit_minutes SET requests = requests + 1000 WHERE rowid = (SELECT min(rowid) FROM audit_minutes)"
        )
    assert summary(audit_path)["total"]["requests"] == from_requests["total"]["requests"] + 1000
    # A program that does not know the minutes (an older version) adds a request to a rolled-up
    # minute: its bucket is read from the requests again, with the new one.
    with sqlite3.connect(audit_path) as raw:
        raw.execute(
            "UPDATE audit_minutes SET requests = requests - 1000 WHERE rowid = (SELECT min(rowid) FROM audit_minutes)"
        )
        (minute,) = raw.execute("SELECT max(minute) FROM audit_minutes_done").fetchone()
        raw.execute(
            "INSERT INTO audit_logs (request_id, timestamp, endpoint, status, duration_ms, model)"
            " VALUES ('foreign', ?, '/v1/completions', 'success', 77777.0, 'foreign-model')",
            (minute + ":30.000000Z",),
        )
    figures = summary(audit_path)
    assert figures["total"]["requests"] == from_requests["total"]["requests"] + 1
    assert "foreign-model" in [item["model"] for item in figures["by_model"]]
    assert 77777.0 in figures["duration_p95_ms"]


FIRST_MINUTE_ROW = "rowid = (SELECT min(rowid) FROM audit_minutes)"


def marked(path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT count(*) FROM audit_minutes_done").fetchone()[0]


def test_the_reader_process_answers_what_the_reader_answers(audit_path, monkeypatch):
    fill(audit_path, requests(300))

    def settled(figures: dict) -> dict:
        """All but the newest bucket's rates, which are over the seconds it has lasted so far."""
        rates = ("requests_per_second", "tokens_per_second")
        return {name: value[:-1] if name in rates else value for name, value in figures.items()}

    async def scenario() -> None:
        reader, figures = AuditReader(audit_path), ReaderProcess(audit_path)
        try:
            for name in ("hour", "day"):
                for _ in range(3):  # again if a bucket's boundary passed between the two reads
                    theirs = await reader.series(WINDOWS[name])
                    mine = await figures.series(WINDOWS[name])
                    if mine["time"] == theirs["time"]:
                        break
                assert settled(mine) == settled(theirs)
                assert mine["total"]["requests"] == 300

            # A caller that goes away does not leave its answer to the next one.
            gone = asyncio.ensure_future(figures.series(WINDOWS["hour"]))
            await asyncio.sleep(0)  # it has asked
            gone.cancel()
            day = await figures.series(WINDOWS["day"])
            assert gone.cancelled() and day["window"] == "day" and len(day["time"]) == 96

            # A reader process that dies is started again on the next read.
            first = figures._process
            assert first is not None
            first.kill()
            await first.wait()
            assert (await figures.series(WINDOWS["hour"]))["total"]["requests"] == 300
            assert figures._process is not None and figures._process is not first

            # One left idle stops by itself, and a read starts another.
            monkeypatch.setattr(reader_process, "IDLE_SECONDS", 0.0)
            await figures.series(WINDOWS["hour"])
            idle = figures._process
            assert idle is not None
            assert await asyncio.wait_for(idle.wait(), 60) == 0
            assert (await figures.series(WINDOWS["day"]))["total"]["requests"] == 300
        finally:
            await reader.close()
            await figures.close()
        assert figures._process is None

    asyncio.run(scenario())


def test_the_reader_process_says_what_is_wrong(tmp_path):
    async def scenario() -> None:
        figures = ReaderProcess(tmp_path / "absent.db")
        try:
            with pytest.raises(AuditLogMissing, match="no audit log yet"):
                await figures.series(WINDOWS["hour"])
        finally:
            await figures.close()

    asyncio.run(scenario())
