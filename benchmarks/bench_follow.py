"""Benchmark: how soon `mlx-manager audit tail --follow` shows a request after the daemon records it.

    python -m benchmarks.bench_follow [--rows 20]

A real `audit tail --follow --json` process follows a fresh audit log (a temporary
MLX_MANAGER_HOME) while the daemon's own writer (AuditWriter, in this process) records one row at
a time, at random moments so the figures do not ride on the follower's polling rhythm. Each
figure runs from `record()` (when the daemon is done with a request) to the row's line on the
follower's output: the writer's batching interval plus the follower's polling.
Promise (issue 5): new rows show within half a second of being written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.audit_rows import record

PROMISE_S = 0.5


async def measure(db: Path, rows: int) -> list[float]:
    from mlx_manager.audit.writer import AuditWriter

    writer = AuditWriter(db)
    await writer.start()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    follower = subprocess.Popen(
        [sys.executable, "-m", "mlx_manager.cli", "audit", "tail", "--follow", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    shown: dict[str, float] = {}

    def read() -> None:
        for line in follower.stdout or []:
            shown[json.loads(line)["request_id"]] = time.perf_counter()

    threading.Thread(target=read, daemon=True).start()
    rng = random.Random(5)
    figures = []
    try:
        for i in range(-1, rows):  # row -1 warms up: the follower is running once it shows
            request_id = f"follow-{i}"
            await asyncio.sleep(rng.uniform(0.05, 0.4))
            written = time.perf_counter()
            writer.record(record(request_id=request_id))
            while request_id not in shown:
                if time.perf_counter() - written > 120:
                    raise SystemExit(f"{request_id} did not show within 120 s")
                await asyncio.sleep(0.001)
            if i >= 0:
                figures.append(shown[request_id] - written)
    finally:
        follower.terminate()
        follower.wait(30)
        await writer.stop()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-follow-") as home:
        os.environ["MLX_MANAGER_HOME"] = home
        figures = asyncio.run(measure(Path(home) / "audit.db", args.rows))
    slowest = max(figures)
    print(
        f"record() -> shown by `audit tail --follow`: median {statistics.median(figures) * 1000:.0f} ms, "
        f"slowest {slowest * 1000:.0f} ms ({len(figures)} rows)"
    )
    verdict = "ok  " if slowest < PROMISE_S else "FAIL"
    print(f"{verdict} every row shown within {PROMISE_S * 1000:.0f} ms")
    print(f"reproduce: python -m benchmarks.bench_follow --rows {args.rows}")
    return 0 if slowest < PROMISE_S else 1


if __name__ == "__main__":
    sys.exit(main())
