"""`audit stats` over the per-day rollup: the same numbers as from the requests, kept right as rows come and go."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from array import array
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mlx_manager.audit import AuditFilter, AuditStore, AuditWriter, compute_stats
from mlx_manager.audit.query import insert_rows
from mlx_manager.audit.rollup import apply_step, plan_step, refresh_step, rolled_up_days
from mlx_manager.audit.stats import kth_smallest
from tests.audit_rows import fill, record
from tests.daemon_server import wait_until

NOW = datetime.now(UTC)
TODAY = NOW.date().isoformat()
MIDNIGHT = datetime.combine(NOW.date(), datetime.min.time(), tzinfo=UTC)
EXACT = (
    "requests",
    "errors",
    "timeouts",
    "cancelled",
    "p50_duration_ms",
    "p95_duration_ms",
    "prompt_tokens",
    "completion_tokens",
)


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "audit.db"


def requests_over_days(count: int, days: float, *, seed: int = 7) -> list:
    """Requests spread over the last `days`, with every kind of group, outcome and missing value."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        status = rng.choice(["success", "success", "success", "error", "timeout", "cancelled"])
        rows.append(
            record(
                request_id=f"roll-{i}",
                timestamp=NOW - timedelta(seconds=rng.uniform(0, days * 86400)),
                model=rng.choice(["m1", "m2", "org/a-long-model-name", None]),
                endpoint=rng.choice(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]),
                status=status,
                backend_type=rng.choice(["local", "local", "openai"]),
                api_key=rng.choice(["alice", "bob", None]),
                duration_ms=rng.lognormvariate(5, 1.2),
                time_to_first_token_ms=rng.uniform(1, 50) if rng.random() < 0.5 else None,
                prompt_tokens=rng.randint(0, 500),
                completion_tokens=rng.randint(0, 300) if status == "success" else 0,
            )
        )
    return rows


def roll_up(path: Path) -> list[str]:
    """What the daemon's writer does between batches, until every closed day is rolled up."""
    checked: set[str] = set()
    with AuditStore.open(path) as store:
        while True:
            with store.write() as conn:
                if not refresh_step(conn, TODAY, checked):
                    break
        with store.read() as conn:
            return rolled_up_days(conn, None, None)


def stats(path: Path, filters: AuditFilter | None = None, by: str | None = None) -> list[dict]:
    with AuditStore.open(path, create=False) as store, store.read() as conn:
        return compute_stats(conn, filters, by=by)  # type: ignore[arg-type]


def closed_days(rows) -> list[str]:
    return sorted({row.timestamp.date().isoformat() for row in rows} - {TODAY})


def stats_from_the_requests(path: Path, by: str | None = None) -> list[dict]:
    """What compute_stats says with no rollup at all (dropped in a transaction that is rolled back)."""
    with AuditStore.open(path, create=False) as store, store.write() as conn:
        conn.execute("SAVEPOINT no_rollup")
        conn.execute("DELETE FROM audit_rollup")
        result = compute_stats(conn, by=by)  # type: ignore[arg-type]
        conn.execute("ROLLBACK TO no_rollup")
        return result


def same(got: list[dict], expected: list[dict]) -> bool:
    try:
        assert_same(got, expected)
    except AssertionError:
        return False
    return True


def assert_same(got: list[dict], expected: list[dict]) -> None:
    assert [len(g) for g in got] == [len(e) for e in expected]
    for g, e in zip(got, expected, strict=True):
        assert g.keys() == e.keys()
        for key, value in e.items():
            if key in EXACT or isinstance(value, str) or value is None:
                assert g[key] == value, key
            else:
                assert g[key] == pytest.approx(value, rel=1e-12), key


WINDOWS = {
    "everything": AuditFilter(),
    "since 1d": AuditFilter(since=NOW - timedelta(days=1)),
    # Two whole days and two part days, whatever the time of day the test runs at (a window
    # anchored on NOW held only one whole day when it ran between 03:07 and 05:00 UTC).
    "mid-day to mid-day": AuditFilter(
        since=MIDNIGHT - timedelta(days=4) + timedelta(hours=20, minutes=53),
        until=MIDNIGHT - timedelta(days=1) + timedelta(hours=7),
    ),
    "whole days": AuditFilter(since=MIDNIGHT - timedelta(days=4), until=MIDNIGHT - timedelta(days=1)),
    "one model": AuditFilter(model="m1", since=NOW - timedelta(days=5)),
    "one key and endpoint": AuditFilter(api_key="alice", endpoint="/v1/chat/completions"),
    "no model": AuditFilter(backend_type="openai", until=MIDNIGHT - timedelta(days=2)),
    "a request id": AuditFilter(request_id="roll-42"),
}


def test_stats_from_the_rollup_are_the_stats_from_the_requests(db):
    rows = requests_over_days(3000, 6.5)
    fill(db, rows)
    expected = {
        (name, by): stats(db, filters, by)
        for name, filters in WINDOWS.items()
        for by in (None, "model", "endpoint", "status", "backend", "key")
    }
    days = roll_up(db)
    assert days == closed_days(rows) and len(days) >= 6  # closed days only: today keeps changing
    for (name, by), before in expected.items():
        assert_same(stats(db, WINDOWS[name], by), before)
    with AuditStore.open(db, create=False) as store, store.read() as conn:
        assert len(rolled_up_days(conn, WINDOWS["mid-day to mid-day"].since, WINDOWS["mid-day to mid-day"].until)) == 2
        assert rolled_up_days(conn, WINDOWS["whole days"].since, WINDOWS["whole days"].until) == days[-4:-1]


def test_writing_or_pruning_requests_drops_the_rollup_of_their_days(db):
    rows = requests_over_days(1500, 5.5)
    fill(db, rows)
    days = roll_up(db)
    assert days == closed_days(rows)
    late = record(request_id="late", timestamp=MIDNIGHT - timedelta(days=2, hours=-1), duration_ms=99999.0)
    fill(db, [late])  # a request that ended after its day had been rolled up
    with AuditStore.open(db, create=False) as store, store.read() as conn:
        left = rolled_up_days(conn, None, None)
    assert left == [day for day in days if day != late.timestamp.date().isoformat()]
    [overall] = stats(db)
    assert overall["requests"] == 1501

    from mlx_manager.audit import prune_older

    cutoff = MIDNIGHT - timedelta(days=3, hours=12)
    with AuditStore.open(db, create=False) as store:
        prune_older(store, cutoff)
        with store.read() as conn:  # the days before the cutoff, and its own (cut in two), lost requests
            assert rolled_up_days(conn, None, None) == [d for d in left if d > cutoff.date().isoformat()]
    expected = stats(db)
    roll_up(db)
    assert_same(stats(db), expected)


def test_the_writer_rolls_up_closed_days_and_repairs_changes_made_behind_its_back(db):
    rows = requests_over_days(1200, 3.9, seed=11)
    fill(db, rows)

    def rolled() -> list[str]:
        with AuditStore.open(db, create=False) as store, store.read() as conn:
            return rolled_up_days(conn, None, None)

    async def run_writer_until(condition) -> bool:
        writer = AuditWriter(db)
        await writer.start()
        try:
            return await asyncio.to_thread(wait_until, condition, 30)
        finally:
            await writer.stop()

    expected = stats(db, by="model")
    assert asyncio.run(run_writer_until(lambda: rolled() == closed_days(rows)))
    assert_same(stats(db, by="model"), expected)

    # A program that does not know the rollup (an older version) deletes and adds requests.
    days = rolled()
    with sqlite3.connect(db) as raw:
        raw.execute(
            "DELETE FROM audit_logs WHERE id IN (SELECT id FROM audit_logs WHERE timestamp LIKE ? LIMIT 10)",
            (days[1] + "%",),
        )
        raw.execute(
            "INSERT INTO audit_logs (request_id, timestamp, endpoint, status, duration_ms) "
            "VALUES ('foreign', ?, '/v1/completions', 'success', 1.0)",
            (days[2] + "T12:00:00.000000Z",),
        )
    from_requests = stats_from_the_requests(db, by="model")
    assert not same(stats(db, by="model"), from_requests)  # the rollup no longer tells the truth
    # The next writer checks every rolled-up day once, and rebuilds the two that changed.
    assert asyncio.run(run_writer_until(lambda: same(stats(db, by="model"), from_requests)))
    assert rolled() == days


def test_a_day_whose_requests_change_between_the_reads_and_the_writes_is_not_rolled_up_stale(db):
    """The writer reads a day (`plan_step`) outside the write lock: a request of that day written
    meanwhile (a long request that ended after midnight) must not be left out of its rollup."""
    rows = requests_over_days(300, 1.9, seed=5)
    fill(db, rows)
    day = closed_days(rows)[0]
    checked: set[str] = set()
    with AuditStore.open(db) as store:
        with store.read() as conn:
            step = plan_step(conn, TODAY, checked)
        assert step is not None and step.day == day
        late = record(request_id="late", timestamp=datetime.fromisoformat(day + "T23:59:59+00:00"))
        with store.write() as conn:
            insert_rows(conn, [late.values()])
        with store.write() as conn:
            assert apply_step(conn, step, checked)  # not written: look again
        with store.read() as conn:
            assert rolled_up_days(conn, None, None) == []
    expected = stats_from_the_requests(db, by="model")
    assert roll_up(db) == closed_days([*rows, late])
    assert_same(stats(db, by="model"), expected)


def test_kth_smallest_of_sorted_runs():
    rng = random.Random(3)
    for runs_count, size, spread in ((1, 500, 10**6), (40, 300, 10**6), (300, 20, 50), (7, 1000, 3)):
        runs = [
            array("q", sorted(rng.randrange(spread) for _ in range(rng.randint(0, size)))) for _ in range(runs_count)
        ]
        everything = sorted(v for run in runs for v in run)
        ks = sorted(
            k
            for k in {
                1,
                2,
                len(everything) // 2,
                (95 * len(everything) + 99) // 100,
                len(everything) - 1,
                len(everything),
            }
            if k >= 1
        )
        assert kth_smallest(runs, *ks) == [everything[k - 1] for k in ks], (runs_count, size, spread)
    # Lopsided: many runs of one or two values, a few long ones, a far tail, heavy ties.
    for _ in range(12):
        runs = [
            array("q", sorted(int(rng.lognormvariate(8, 3)) for _ in range(rng.choice([1, 1, 2, 33, 400]))))
            for _ in range(rng.choice([2, 50, 400]))
        ]
        runs.append(array("q", [7] * rng.randint(0, 500)))
        everything = sorted(v for run in runs for v in run)
        ks = [1, rng.randint(1, len(everything)), (95 * len(everything) + 99) // 100, len(everything)]
        assert kth_smallest(runs, *ks) == [everything[k - 1] for k in ks]
