"""Benchmark: how close to its deadline a request that runs out of time is answered, and how soon
the daemon stops working on it.

    HF_HUB_OFFLINE=1 python -m benchmarks.bench_deadlines [--rounds 3]

A real daemon (`mlx-manager serve`, its own process) serves the generated `slow` test model with
`timeouts.chat = 1`. Each round sends a chat request for 2000 tokens (far more than a second's
worth), once whole and once streamed, and times from the moment it was sent: the 504 problem (or
the stream's `error` event), and the moment /ready shows no job running any more (the engine let
go of it). Figures are over the deadline: 0 would be exactly at it.
Targets (the bounds the tests used to hold): the answer within 2 s of the deadline, the job let
go within 2.5 s of it.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.models import build_model

DEADLINE_S = 1.0
TARGETS = {"chat, whole answer": 2.0, "chat, streamed": 2.0, "job let go": 2.5}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ready(url: str) -> dict | None:
    try:
        response = httpx.get(url + "/ready", timeout=5)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def until(predicate, what: str, timeout: float = 300) -> None:
    deadline = time.perf_counter() + timeout
    while not predicate():
        if time.perf_counter() > deadline:
            raise SystemExit(f"{what}: not within {timeout:g} s")
        time.sleep(0.005)


def one_request(url: str, model: str, stream: bool) -> tuple[float, float]:
    """Seconds from sending to the end of the answer, and to the engine having no job running."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "tell me everything"}],
        "max_tokens": 2000,
        "temperature": 0,
        "stream": stream,
    }
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=120) as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
        text = r.read().decode()
    answered = time.perf_counter() - started
    if not (r.status_code == 504 or "event: error" in text):
        raise SystemExit(f"expected a timeout, got {r.status_code}: {text[:200]}")
    until(lambda: (state := ready(url)) is not None and state["active_jobs"] == 0, "the job was not let go")
    return answered, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-deadlines-"))
    model = str(build_model(work / "slow", "slow"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_MANAGER_")}
    env.update(MLX_MANAGER_HOME=str(work / "home"), MLX_MANAGER_TIMEOUTS__CHAT=str(DEADLINE_S), HF_HUB_OFFLINE="1")
    daemon = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlx-manager")), "serve", "--model", model, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    over: dict[str, list[float]] = {name: [] for name in TARGETS}
    try:
        until(
            lambda: daemon.poll() is None and (state := ready(url)) is not None and model in state["loaded"],
            "the daemon was not ready",
        )
        one_request(url, model, stream=False)  # warm-up
        for _ in range(args.rounds):
            for name, stream in (("chat, whole answer", False), ("chat, streamed", True)):
                answered, let_go = one_request(url, model, stream)
                over[name].append(answered - DEADLINE_S)
                over["job let go"].append(let_go - DEADLINE_S)
    finally:
        daemon.terminate()
        daemon.wait(60)

    ok = True
    for name, figures in over.items():
        within = max(figures) <= TARGETS[name]
        ok &= within
        print(
            f"{'ok  ' if within else 'FAIL'} {name:<20} after the {DEADLINE_S:g} s deadline: median "
            f"{statistics.median(figures):.2f} s, slowest {max(figures):.2f} s (target <= {TARGETS[name]:g} s)"
        )
    print(f"reproduce: HF_HUB_OFFLINE=1 python -m benchmarks.bench_deadlines --rounds {args.rounds}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
