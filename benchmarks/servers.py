"""Servers for side-by-side benchmarks: mlx-manager and mlx_lm.server as real processes on free
ports, serving one model folder, the same optimised BLAS for both on Linux.

    with start_servers([Server("mlx-manager", "ours", {}), Server("mlx_lm.server", "theirs", {})], model, work):
        ...  # each server's .url is set
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class Server:
    kind: str  # "mlx-manager" or "mlx_lm.server"
    label: str
    env: dict[str, str] = field(default_factory=dict)
    url: str = ""
    pid: int = 0  # the server's process, once started


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def optimised_blas() -> str | None:
    """The BLAS library mlx-manager's `server.blas = auto` would load here (None: MLX's own)."""
    from mlx_manager.engine import blas

    return next((path for path in blas.candidates() if blas.works(path)), None)


def wait_for(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited early: {' '.join(map(str, process.args))}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server not ready: {url}")


@contextlib.contextmanager
def start_servers(servers: list[Server], model: str, work: Path) -> Iterator[list[Server]]:
    """Start every server (in order), wait until each is ready, stop them all at the end."""
    library = optimised_blas()
    base = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(work / "hf")}
    (work / "hf").mkdir(exist_ok=True)  # mlx_lm.server's /v1/models scans the cache folder and fails without it
    bin_dir = Path(sys.executable).parent
    processes: list[subprocess.Popen] = []
    try:
        for i, server in enumerate(servers):
            port = free_port()
            server.url = f"http://127.0.0.1:{port}"
            env = {**base, **server.env}
            if server.kind == "mlx-manager":
                env["MLX_MANAGER_HOME"] = str(work / f"home-{i}")
                command = [str(bin_dir / "mlx-manager"), "serve", "--model", model, "--port", str(port)]
                ready = f"{server.url}/ready"
            else:
                if library and sys.platform.startswith("linux"):
                    env["LD_PRELOAD"] = library  # the same BLAS mlx-manager loads for itself
                command = [sys.executable, "-m", "mlx_lm.server", "--model", model, "--port", str(port)]
                ready = f"{server.url}/health"
            print(f"{server.label}: {' '.join(command)}", flush=True)
            processes.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            server.pid = processes[-1].pid
            wait_for(ready, processes[-1])
        print(f"BLAS on both sides: {library or 'MLX bundled reference BLAS'}", flush=True)
        yield servers
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
