"""Benchmark of the audit log at a million rows. Run it by hand, from the project root:

    python -m benchmarks.bench_audit                 # 1,000,000 rows, about two minutes
    python -m benchmarks.bench_audit --rows 200000   # quicker, smaller

It fills a fresh database (in a temporary MLX_MANAGER_HOME) with requests spread over 30 days
(10 models, 3 endpoints, a mix of outcomes), then times what a user runs, through the real CLI:
each command in-process (the command's own cost: open, query, render) and as a fresh
`mlx-manager` process (what a person waits for, Python start-up and imports included):

    audit query --model mlx-community/model-3 --since 7d --limit 50    floor 200 ms (in-process)
    audit stats                                                       floor 2 s (in-process)
    audit prune --older-than 15d --yes                                (about half the rows)

and the writer: how many rows per second it commits when records arrive faster than it can
write (floor 20,000), and a paced run at 20,000 rows/s reporting the largest backlog and the
slowest time from record() to commit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mlx_manager.audit.record import AuditRecord
from tests.audit_rows import fill

ROOT = Path(__file__).resolve().parent.parent

MODELS = [f"mlx-community/model-{i}" for i in range(10)]
ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
FLOORS = {"query": 0.200, "stats": 2.0, "writer": 20_000}


def generate(rows: int, *, days: float = 30, seed: int = 1, start: datetime | None = None):
    """Requests spread evenly over `days` up to now (or from `start` on, as a live daemon writes them)."""
    rng = random.Random(seed)
    start = start or datetime.now(UTC) - timedelta(days=days)
    step = timedelta(days=days) / rows
    for i in range(rows):
        status = rng.choices(["success", "error", "timeout", "cancelled"], [92, 5, 2, 1])[0]
        duration = rng.lognormvariate(6, 1)
        completion = rng.randint(1, 500) if status == "success" else 0
        yield AuditRecord(
            request_id=f"bench-{i:08d}",
            timestamp=start + step * i,
            model=rng.choice(MODELS),
            endpoint=rng.choices(ENDPOINTS, [7, 2, 1])[0],
            status=status,
            http_status={"success": 200, "error": 500, "timeout": 504, "cancelled": None}[status],
            duration_ms=duration,
            time_to_first_token_ms=duration / 10 if rng.random() < 0.5 else None,
            prompt_tokens=rng.randint(5, 2000),
            completion_tokens=completion,
            error_type=None if status == "success" else status,
        )


def in_process(args: list[str], repeat: int) -> list[float]:
    from typer.testing import CliRunner

    from mlx_manager.cli import app

    runner = CliRunner()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = runner.invoke(app, args)
        times.append(time.perf_counter() - started)
        if result.exit_code != 0:
            raise SystemExit(f"`mlx-manager {' '.join(args)}` failed: {result.output}")
    return times


def as_process(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "from mlx_manager.cli import main; main()", *args],
        check=True,
        stdout=subprocess.DEVNULL,
        cwd=ROOT,
    )
    return time.perf_counter() - started


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms"


async def writer_throughput(path: Path, rows: int) -> float:
    """Records offered as fast as the event loop can (yielding every 500), until all are committed."""
    from mlx_manager.audit.writer import AuditWriter

    records = list(generate(rows, days=1 / 24, seed=2, start=datetime.now(UTC)))
    writer = AuditWriter(path)
    await writer.start()
    started = time.perf_counter()
    for i, item in enumerate(records):
        writer.record(item)
        if i % 500 == 0:
            await asyncio.sleep(0)
    await writer.flush()
    elapsed = time.perf_counter() - started
    await writer.stop()
    return rows / elapsed


async def writer_paced(path: Path, rate: int, seconds: float) -> tuple[int, float, int]:
    """Records at a steady rate; returns (largest backlog, slowest record-to-commit, rows)."""
    from mlx_manager.audit.writer import AuditWriter

    # Made up front, so the benchmark's own work does not compete with the writer for the CPU.
    records = iter(list(generate(int(rate * seconds) + rate, days=1 / 24, seed=3, start=datetime.now(UTC))))
    writer = AuditWriter(path)
    await writer.start()
    sent_at: dict[str, float] = {}
    worst_lag = 0.0

    async def watch_commits() -> None:
        nonlocal worst_lag
        async with writer.subscribe(maxsize=10_000_000) as feed:
            async for row in feed:
                worst_lag = max(worst_lag, time.perf_counter() - sent_at.pop(row["request_id"]))

    watcher = asyncio.create_task(watch_commits())
    await asyncio.sleep(0)
    largest_backlog = 0
    started = time.perf_counter()
    sent = 0
    while (now := time.perf_counter()) - started < seconds:
        due = int((now - started) * rate)
        while sent < due:
            item = next(records)
            sent_at[item.request_id] = time.perf_counter()
            writer.record(item)
            sent += 1
        largest_backlog = max(largest_backlog, writer.backlog)
        await asyncio.sleep(0.01)
    await writer.stop()  # ends the feed
    await watcher
    return largest_backlog, worst_lag, sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows to fill (default 1,000,000)")
    parser.add_argument("--repeat", type=int, default=5, help="in-process runs of each read command")
    options = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="mlx-manager-bench-"))
    os.environ["MLX_MANAGER_HOME"] = str(home)
    os.environ.setdefault("COLUMNS", "200")
    db = home / "audit.db"
    print(f"reproduce: python -m benchmarks.bench_audit --rows {options.rows}   (database: {db})")

    started = time.perf_counter()
    filled = fill(db, generate(options.rows))
    print(f"fill: {filled:,} rows in {time.perf_counter() - started:.1f} s ({db.stat().st_size / 1e6:,.0f} MB)")

    results: dict[str, float] = {}
    commands = {
        "query": ["audit", "query", "--model", "mlx-community/model-3", "--since", "7d", "--limit", "50"],
        "stats": ["audit", "stats"],
        "stats --by model": ["audit", "stats", "--by", "model"],
        "tail": ["audit", "tail"],
    }
    for name, args in commands.items():
        times = in_process(args, options.repeat)
        results[name] = statistics.median(times)
        print(
            f"mlx-manager {' '.join(args)}\n    in-process: median {ms(results[name])}, first {ms(times[0])}, "
            f"best {ms(min(times))}; as a new process: {ms(as_process(args))}"
        )

    from mlx_manager.audit.filters import AuditFilter, parse_time
    from mlx_manager.audit.query import count_rows, query_rows
    from mlx_manager.audit.store import AuditStore

    with AuditStore.open(db, create=False) as store, store.read() as conn:
        filters = AuditFilter(model="mlx-community/model-3", since=parse_time("7d"))
        times = []
        for _ in range(options.repeat):
            started = time.perf_counter()
            query_rows(conn, filters, limit=50)
            times.append(time.perf_counter() - started)
    print(
        f"audit query's SQL alone (query_rows, same filter): median {statistics.median(times) * 1000:.1f} ms; "
        "the rest of the command's time is settings, opening the file and the rich table"
    )

    prune_args = ["audit", "prune", "--older-than", "15d", "--yes"]
    [prune_time] = in_process(prune_args, 1)

    with AuditStore.open(db, create=False) as store, store.read() as conn:
        left = count_rows(conn)
    print(
        f"mlx-manager {' '.join(prune_args)}\n    deleted {filled - left:,} rows in {prune_time:.2f} s "
        f"({(filled - left) / prune_time:,.0f} rows/s), {left:,} left"
    )

    rate = asyncio.run(writer_throughput(db, 200_000))
    results["writer"] = rate
    print(f"writer, records offered faster than it writes: {rate:,.0f} rows/s committed (200,000 rows)")
    backlog, lag, sent = asyncio.run(writer_paced(db, 20_000, 5.0))
    print(
        f"writer, paced at 20,000 rows/s for 5 s ({sent:,} rows): largest backlog {backlog:,} rows, "
        f"slowest record-to-commit {ms(lag)}"
    )

    print("\nfloors:")
    verdicts = [
        (
            "query --model X --since 7d --limit 50",
            results["query"] < FLOORS["query"],
            f"{ms(results['query'])} < 200 ms",
        ),
        ("stats", results["stats"] < FLOORS["stats"], f"{results['stats']:.2f} s < 2 s"),
        ("writer", results["writer"] >= FLOORS["writer"], f"{results['writer']:,.0f} rows/s >= 20,000"),
    ]
    for name, ok, detail in verdicts:
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}")
    for path in home.iterdir():
        path.unlink()
    home.rmdir()
    if not all(ok for _, ok, _ in verdicts):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
