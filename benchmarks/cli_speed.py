"""How long the read commands take as fresh processes, against a bare Typer app (issue 26's targets).

    python benchmarks/cli_speed.py                   # fills a 1,000,000-row audit log first (~2 min)
    python benchmarks/cli_speed.py --home /tmp/cli-speed   # keep the filled log, reuse it next time

Each command runs as a new `python` process (what a person waits for: start-up, imports, the
work, the output), `--runs` times (median of 5 by default), interleaved with the others so
machine noise hits all alike. Figures are ratios to a bare two-command Typer app's `--help`
measured in the same run, so they mean the same on a fast and on a busy machine.

The audit log: requests spread over the 30 days before the fill (10 models, 3 endpoints, a mix
of outcomes), written straight into SQLite, then rolled up as the daemon's writer does between
batches (skipped when the code measured has no rollup, as before it existed). It measures the
`mlx_manager` that `python` imports: point PYTHONPATH at a checkout to measure that one.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

MODELS = [f"mlx-community/model-{i}" for i in range(10)]
ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
STORED = (
    "request_id",
    "timestamp",
    "model",
    "backend_type",
    "endpoint",
    "status",
    "http_status",
    "duration_ms",
    "time_to_first_token_ms",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "error_type",
)

BARE_TYPER = '''
import typer

app = typer.Typer()


@app.command()
def hello(name: str) -> None:
    """Say hello."""


@app.command()
def bye(name: str) -> None:
    """Say bye."""


app()
'''

# (label, arguments of mlx-manager, target: at most this many times the bare Typer app)
COMMANDS: list[tuple[str, list[str], float]] = [
    ("--help", ["--help"], 1.5),
    ("config get timeouts.chat", ["config", "get", "timeouts.chat"], 1.5),
    ("status (no daemon)", ["status"], 1.5),
    ("keys list", ["keys", "list"], 1.5),
    ("audit tail -n 20 (1M rows)", ["audit", "tail", "-n", "20"], 2.0),
    ("audit query --limit 50 (1M rows)", ["audit", "query", "--limit", "50"], 2.0),
    ("audit stats --since 1d (1M rows)", ["audit", "stats", "--since", "1d"], 2.0),
    ("audit stats, 30 days (1M rows)", ["audit", "stats"], 4.0),
]


def requests(count: int, *, days: float = 30, seed: int = 1):
    """Rows (as stored) spread evenly over the `days` before now, like tests/bench_audit.py's."""
    rng = random.Random(seed)
    start = datetime.now(UTC) - timedelta(days=days)
    step = timedelta(days=days) / count
    for i in range(count):
        status = rng.choices(["success", "error", "timeout", "cancelled"], [92, 5, 2, 1])[0]
        duration = rng.lognormvariate(6, 1)
        prompt = rng.randint(5, 2000)
        completion = rng.randint(1, 500) if status == "success" else 0
        yield (
            f"bench-{i:08d}",
            (start + step * i).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            rng.choice(MODELS),
            "local",
            rng.choices(ENDPOINTS, [7, 2, 1])[0],
            status,
            {"success": 200, "error": 500, "timeout": 504, "cancelled": None}[status],
            duration,
            duration / 10 if rng.random() < 0.5 else None,
            prompt,
            completion,
            prompt + completion,
            None if status == "success" else status,
        )


def fill(path: Path, count: int) -> None:
    """The log as a daemon would have left it: every row, and (if this code has one) the rollup."""
    from mlx_manager.audit.store import AuditStore

    AuditStore.open(path).close()  # creates and migrates, whatever the version measured
    insert = f"INSERT INTO audit_logs ({', '.join(STORED)}) VALUES ({', '.join('?' for _ in STORED)})"
    rows = requests(count)
    with sqlite3.connect(path) as conn:
        while chunk := list(itertools.islice(rows, 50_000)):
            conn.executemany(insert, chunk)
            conn.commit()
    try:
        from mlx_manager.audit.rollup import refresh_step
    except ImportError:
        return
    today = datetime.now(UTC).date().isoformat()
    checked: set[str] = set()
    with AuditStore.open(path) as store:
        while True:
            with store.write() as conn:
                if not refresh_step(conn, today, checked):
                    return


def run(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode not in (0, 3):  # `status` says "not running" with 3
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the audit log (default 1,000,000)")
    parser.add_argument("--runs", type=int, default=5, help="runs of each command; the median counts (default 5)")
    parser.add_argument("--home", type=Path, help="MLX_MANAGER_HOME to fill, or to reuse if already filled")
    options = parser.parse_args()

    home = options.home or Path(tempfile.mkdtemp(prefix="mlx-manager-cli-speed-"))
    home.mkdir(parents=True, exist_ok=True)
    db = home / "audit.db"
    if db.exists():
        with sqlite3.connect(db) as conn:
            rows, first, last = conn.execute(
                "SELECT count(*), min(timestamp), max(timestamp) FROM audit_logs"
            ).fetchone()
        print(f"reusing {db}: {rows:,} rows from {first} to {last}")
    else:
        started = time.perf_counter()
        fill(db, options.rows)
        print(f"filled {db} with {options.rows:,} rows over 30 days in {time.perf_counter() - started:.0f} s")

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_MANAGER_")}
    env.update(MLX_MANAGER_HOME=str(home), COLUMNS="120", NO_COLOR="1")
    bare = home / "bare_typer.py"
    bare.write_text(BARE_TYPER)
    program = [sys.executable, "-c", "from mlx_manager.cli import main; main()"]
    cases = [
        ("python -c pass", [sys.executable, "-c", "pass"], None),
        ("bare Typer app --help (1.00)", [sys.executable, str(bare), "--help"], None),
    ]
    cases += [(label, program + args, target) for label, args, target in COMMANDS]

    # From the home folder: `python -c` puts the current folder first on sys.path, and a checkout
    # there would be measured instead of the code PYTHONPATH (or the installation) points at.
    import mlx_manager

    print(f"measuring {Path(mlx_manager.__file__).parent}")
    for _, argv, _ in cases:  # warm the file cache; not counted
        run(argv, env, home)
    times: dict[str, list[float]] = {label: [] for label, _, _ in cases}
    for _ in range(options.runs):
        for label, argv, _ in cases:
            times[label].append(run(argv, env, home))

    base = statistics.median(times[cases[1][0]])
    print(f"\n{'command (fresh process)':<36} {'median':>8} {'ratio':>7} {'target':>7}")
    for label, _, target in cases:
        median = statistics.median(times[label])
        verdict = "" if target is None else f"<= {target:.1f}x {'ok' if median / base <= target else 'OVER'}"
        print(f"{label:<36} {median:>7.3f}s {median / base:>6.2f}x  {verdict}")
    where = os.environ.get("PYTHONPATH", "")
    print(
        f"\nreproduce: {'PYTHONPATH=' + where + ' ' if where else ''}python benchmarks/cli_speed.py "
        f"--rows {options.rows} --runs {options.runs}{' --home ' + str(home) if options.home else ''}"
    )
    if options.home is None:
        shutil.rmtree(home)


if __name__ == "__main__":
    main()
