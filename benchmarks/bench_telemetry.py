"""Benchmark: the daemon's tokens/s with telemetry on (no Logfire token: nothing is sent) and off.

    python -m benchmarks.bench_telemetry [--sessions 4] [--rounds 12] [--tokens 128] [--size bench] [--control]

Target: the two figures within 3% of each other.

Two real daemons (uvicorn, each in its own process, both loading the same
`tests.models.build_model(folder, "bench")` model) serve streamed chat completions. Each round
sends one fresh prompt to both, in alternating order, so machine noise and drift hit both alike;
each session starts a fresh pair, and on Linux the servers share one pinned CPU, the client the rest.
A request's tokens/s is its completion tokens (from the stream's usage) over its wall time; the
figures are the medians over rounds, and the ratio is the median of the rounds' on/off ratios.
`--control` runs two telemetry-off daemons instead: the noise floor of this machine.

The servers are built by `serve()` below the way the daemon is: configure_telemetry(settings),
create_app(settings), instrument_app(app, settings). Once the daemon does that itself (app
factory / `mlx-manager serve`), the on/off difference measured here includes everything it adds.
"""

from __future__ import annotations

import argparse
import json
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

REPO = Path(__file__).resolve().parent.parent
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()


def serve(telemetry_on: bool, model: str, port: int, cpu: int | None) -> None:
    """One daemon, in this process, until killed."""
    import uvicorn

    from mlx_manager import telemetry
    from mlx_manager.daemon.app import create_app
    from mlx_manager.settings import Settings

    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    settings = Settings.model_validate(
        {"telemetry": {"enabled": telemetry_on}, "models": {"preload": [model]}, "server": {"port": port}}
    )
    telemetry.configure_telemetry(settings)
    app = create_app(settings)
    telemetry.instrument_app(app, settings)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def split_cpus() -> tuple[int | None, set[int] | None]:
    """Linux: the last CPU for the servers, the others for the client. Only one server works at
    a time, so each gets the same core; left to the scheduler, one server process can run several
    percent faster than its twin for its whole life, which swamps a 3% target."""
    if not hasattr(os, "sched_getaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return cpus[-1], set(cpus[:-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name: str, telemetry_on: bool, model: str, workdir: Path, cpu: int | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    home = workdir / f"home-{name}"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_MANAGER_", "LOGFIRE_", "OTEL_"))}
    env.update(MLX_MANAGER_HOME=str(home), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    serve_as = "on" if telemetry_on else "off"
    command = [sys.executable, "-m", "benchmarks.bench_telemetry", "--serve", serve_as, "--model", model]
    command += ["--port", str(port)]
    if cpu is not None:
        command += ["--cpu", str(cpu)]
    process = subprocess.Popen(command, env=env, cwd=workdir)  # cwd: no .logfire credentials there
    return process, f"http://127.0.0.1:{port}"


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server for {url} exited with code {process.returncode}")
        try:
            ready = httpx.get(url + "/ready", timeout=2)
            if ready.status_code == 200 and ready.json().get("loaded"):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} was not ready within {timeout:.0f}s")


def prompt(round_no: int) -> str:
    return " ".join(WORDS[(round_no * 5 + k * 3) % len(WORDS)] for k in range(24)) + f" round {round_no}"


def stream_once(client: httpx.Client, url: str, model: str, text: str, max_tokens: int) -> tuple[int, float]:
    """Completion tokens and seconds of one streamed chat completion."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tokens = 0
    started = time.perf_counter()
    with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    tokens = usage["completion_tokens"]
    return tokens, time.perf_counter() - started


def run_session(
    workdir: Path, model: str, args: argparse.Namespace, session: int, rates: dict, cpu: int | None
) -> None:
    """A fresh pair of daemons, `args.rounds` rounds of one request each. Fresh processes per
    session: whatever makes one process a little faster than its twin for its whole life
    (memory layout, placement) is drawn again, and the medians average it out."""
    workdir.mkdir()
    servers = {name: start(name, name == "on" and not args.control, model, workdir, cpu) for name in ("on", "off")}
    try:
        for process, url in servers.values():
            wait_ready(url, process)
        with httpx.Client(timeout=300) as client:
            for _, url in servers.values():  # warm-up: first-request costs are not the steady state
                stream_once(client, url, model, prompt(-1), args.tokens)
            for round_no in range(session * args.rounds, (session + 1) * args.rounds):
                order = ("on", "off") if round_no % 2 == 0 else ("off", "on")
                for name in order:
                    tokens, seconds = stream_once(client, servers[name][1], model, prompt(round_no), args.tokens)
                    rates[name].append(tokens / seconds)
    finally:
        for process, _ in servers.values():
            process.terminate()
        for process, _ in servers.values():
            process.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=4, help="fresh pairs of daemons")
    parser.add_argument("--rounds", type=int, default=12, help="requests to each daemon per session")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--size", default="bench")
    parser.add_argument("--control", action="store_true", help="both daemons with telemetry off")
    parser.add_argument("--serve", choices=["on", "off"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve == "on", args.model, args.port, args.cpu)
        return 0

    rates: dict[str, list[float]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = str(build_model(workdir / "model", args.size))
        server_cpu, client_cpus = split_cpus()
        if client_cpus:
            os.sched_setaffinity(0, client_cpus)
        for session in range(args.sessions):
            run_session(workdir / f"session-{session}", model, args, session, rates, server_cpu)

    on, off = (statistics.median(rates[name]) for name in ("on", "off"))
    ratio = statistics.median(a / b for a, b in zip(rates["on"], rates["off"]))
    label = "off (control)" if args.control else "on"
    command = (
        f"python -m benchmarks.bench_telemetry --sessions {args.sessions} --rounds {args.rounds}"
        f" --tokens {args.tokens} --size {args.size}"
    )
    command += " --control" if args.control else ""
    print(f"telemetry {label:<13}: {on:8.1f} tokens/s (median of {len(rates['on'])} streamed requests)")
    print(f"telemetry {'off':<13}: {off:8.1f} tokens/s")
    verdict = "within" if abs(ratio - 1) <= 0.03 else "OUTSIDE"
    print(f"ratio (median of rounds): {ratio:.3f} ({verdict} the 3% target)")
    print(f"reproduce: {command}")
    return 0 if verdict == "within" else 1


if __name__ == "__main__":
    sys.exit(main())
