"""Benchmark: the daemon against mlx_lm.server, same generated model, same client, one run.

    python -m benchmarks.bench_server [--requests 16] [--max-tokens 128] [--prompt-tokens 64] [--size bench]
                                 [--blas auto|bundled]

Starts both servers the same way (a subprocess each, the model folder given on the command
line), then runs `mlx-manager bench --vs`, which interleaves the two level by level (1 and 8
concurrent streaming clients, distinct prompts) and prints the A/B ratio of every figure.
On Linux mlx-manager loads an optimised BLAS for MLX (`server.blas = "auto"`, see
mlx_manager/engine/blas.py) while mlx_lm.server keeps the reference BLAS of the mlx-cpu wheel:
`--blas bundled` gives mlx-manager that same BLAS, to compare the serving code alone.
Targets (issue 3): A/B tokens/s >= 1.5 at 1 client and >= 1.2 at 8; A's p50 TTFT <= B's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.servers import free_port, wait_for
from tests.models import build_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--size", default="bench")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt length in words")
    parser.add_argument("--blas", default="auto", help="mlx-manager's server.blas (auto or bundled)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mlx-bench-server-"))
    model = str(build_model(work / "model", args.size))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "MLX_MANAGER_HOME": str(work / "home"),
        "HF_HUB_CACHE": str(work / "hf"),
    }
    (work / "hf").mkdir()  # mlx_lm.server's /v1/models scans the cache folder and fails if it is missing
    ours, theirs = free_port(), free_port()
    bin_dir = Path(sys.executable).parent
    commands = {
        "mlx-manager": [str(bin_dir / "mlx-manager"), "serve", "--model", model, "--port", str(ours)],
        "mlx_lm.server": [sys.executable, "-m", "mlx_lm.server", "--model", model, "--port", str(theirs)],
    }
    envs = [{**env, "MLX_MANAGER_SERVER__BLAS": args.blas}, env]
    processes = [
        subprocess.Popen(cmd, env=cmd_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for cmd, cmd_env in zip(commands.values(), envs, strict=True)
    ]
    try:
        wait_for(f"http://127.0.0.1:{ours}/ready", processes[0])
        wait_for(f"http://127.0.0.1:{theirs}/health", processes[1])
        bench = [
            str(bin_dir / "mlx-manager"),
            "bench",
            "--url",
            f"http://127.0.0.1:{ours}",
            "--vs",
            f"http://127.0.0.1:{theirs}",
            "--model",
            model,
            "--concurrency",
            "1,8",
            "--requests",
            str(args.requests),
            "--max-tokens",
            str(args.max_tokens),
            "--prompt-tokens",
            str(args.prompt_tokens),
        ]
        print("A:", " ".join(commands["mlx-manager"]))
        print("B:", " ".join(commands["mlx_lm.server"]))
        print("bench:", " ".join(bench), flush=True)
        result = subprocess.run(bench, env={**env, "COLUMNS": "160"})
        print(
            f"reproduce: HF_HUB_OFFLINE=1 python -m benchmarks.bench_server --requests {args.requests} "
            f"--max-tokens {args.max_tokens} --prompt-tokens {args.prompt_tokens} --size {args.size} "
            f"--blas {args.blas}"
        )
        return result.returncode
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    sys.exit(main())
