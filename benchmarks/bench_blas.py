"""Prompt tokens/s (prefill) with each BLAS MLX can use on Linux, A/B interleaved in fresh processes.

    HF_HUB_OFFLINE=1 python -m benchmarks.bench_blas [--size slow] [--prompt-tokens 1024] [--rounds 4]
                                                     [--blas auto,bundled,/path/to/libopenblas.so]

Each `--blas` choice is `server.blas` (mlx_manager/engine/blas.py): the choice holds for a whole
process, so every measurement runs in a process of its own, and the choices take turns within
each round (A, B, A, B...) so the machine's load hits them alike. Each figure is the best of 3
forward passes over one `--prompt-tokens` prompt on the generated test model (tests/models.py);
the machine's load average is printed with each round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, sys, time
from mlx_manager.engine import blas
path = blas.use(sys.argv[1])
import mlx.core as mx
from mlx_lm import load
model = load(sys.argv[2])[0]
ids = mx.array([[(7 * i) % 1000 + 2 for i in range(int(sys.argv[3]))]])
times = []
for _ in range(3):
    start = time.perf_counter()
    mx.eval(model(ids))
    times.append(time.perf_counter() - start)
print(json.dumps({"blas": path or "bundled", "tokens_per_s": int(sys.argv[3]) / min(times)}))
"""


def measure(choice: str, folder: Path, tokens: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, choice, str(folder), str(tokens)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="slow", help="test model size (tests/models.py): fast, bench, slow")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--blas", default="auto,bundled", help="comma-separated server.blas choices")
    args = parser.parse_args()
    choices = args.blas.split(",")

    folder = Path(tempfile.mkdtemp(prefix="mlx-bench-blas-")) / "model"
    build = f"from tests.models import build_model; build_model({str(folder)!r}, {args.size!r}, context=8192)"
    subprocess.run([sys.executable, "-c", build], check=True, cwd=Path(__file__).resolve().parent.parent)

    figures: dict[str, list[float]] = {choice: [] for choice in choices}
    for round_no in range(args.rounds):
        order = choices if round_no % 2 == 0 else choices[::-1]
        row = []
        for choice in order:
            result = measure(choice, folder, args.prompt_tokens)
            figures[choice].append(result["tokens_per_s"])
            row.append(f"{Path(choice).name} ({Path(result['blas']).name}): {result['tokens_per_s']:.0f} tok/s")
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"round {round_no + 1} [{time.strftime('%H:%M:%S')}, load {load}]: " + "; ".join(row), flush=True)
    print("median prompt tokens/s:")
    for choice, values in figures.items():
        print(f"  {Path(choice).name}: {statistics.median(values):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
