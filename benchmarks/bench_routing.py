"""Benchmark: what routing costs, how a group spreads its load, and what a member's death loses.

    HF_HUB_OFFLINE=1 python -m benchmarks.bench_routing [--requests 32] [--group-requests 64] [--pin]

Three real daemons (`mlx-manager serve`, each its own process) serve the generated `fast` test
model: d1 and d2 as upstreams (one sequence at a time each, so requests queue at them), and a
router in front whose config routes `one` to d1 and `team` to the group of d1 and d2.

1. Overhead: streamed chat requests, alternately straight to d1 and through the router to d1, one
   at a time. Compared: the p50 time to first token, and tokens/s while streaming (the tokens after
   the first over the time from the first to the last: the time before the first token is the other
   target's). Targets: TTFT p50 overhead <= 5 ms, tokens/s >= 0.97x. Also shown: tokens/s over the
   whole request (with 64-token answers, 5 ms more TTFT alone is 3-4 % of it), the time from the
   finish reason to the stream's end (the audit commits it waits for) and the router's CPU per
   request. `--router-env MLX_MANAGER_...=...` sets a setting on the router only (to see what a
   part costs: telemetry, audit durability). `--pin` measures the deployment the targets mean, a
   router on a core of its own: the upstreams on core 0, the router and this client on core 1 (the
   direct baseline so runs the same upstream; Linux). Without it the router's CPU is taken from the
   upstream's generation on a shared machine, and tokens/s show it.
2. Spread: `--group-requests` streamed requests to `team`, 8 at a time; each response's
   `x-mlx-manager-backend` header says who served it. Target: each member within +-20 % of even.
3. A member killed mid-run: the same again, 16 at a time and longer answers; d1 is SIGKILLed once a
   quarter of them are done. Counted: requests answered whole, streams cut after their first byte
   (the SSE error event: no taking back what was sent), and requests lost before their first byte.
   Target: none lost.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from benchmarks.servers import free_port
from tests.models import build_model

MLX_MANAGER = str(Path(sys.executable).with_name("mlx-manager"))
HELLO = [{"role": "user", "content": "hello there"}]


@dataclass
class Result:
    """What one client saw of one streamed chat request."""

    status: int = 0
    backend: str | None = None
    ttft: float | None = None  # seconds to the first chunk with text
    last: float | None = None  # seconds to the last chunk with text
    finish: float | None = None  # seconds to the chunk with the finish reason
    seconds: float = 0.0
    tokens: int = 0
    chunks: int = 0  # data chunks received before the end
    done: bool = False  # [DONE] arrived
    error: str | None = None  # the SSE error event's code


def stream(url: str, model: str, max_tokens: int) -> Result:
    body = {
        "model": model,
        "messages": HELLO,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = Result()
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=300) as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
        result.status, result.backend = r.status_code, r.headers.get("x-mlx-manager-backend")
        lines = r.iter_lines()
        for line in lines:
            if line == "data: [DONE]":
                result.done = True
            elif line == "event: error":
                result.error = json.loads(next(lines).removeprefix("data: "))["error"]["code"]
            elif line.startswith("data: "):
                result.chunks += 1
                chunk = json.loads(line.removeprefix("data: "))
                if chunk.get("usage"):
                    result.tokens = chunk["usage"]["completion_tokens"]
                if any(c["delta"].get("content") for c in chunk.get("choices", [])):
                    result.last = time.perf_counter() - started
                    result.ttft = result.ttft or result.last
                if any(c.get("finish_reason") for c in chunk.get("choices", [])):
                    result.finish = time.perf_counter() - started
    result.seconds = time.perf_counter() - started
    return result


def streaming_rate(result: Result) -> float:
    """Tokens/s from the first token to the last (the time to the first token is its own target)."""
    assert result.ttft is not None and result.last is not None
    return (result.tokens - 1) / (result.last - result.ttft)


class Daemon:
    def __init__(
        self, work: Path, name: str, args: list[str], env: dict[str, str], cores: set[int] | None = None
    ) -> None:
        self.home = work / name
        self.home.mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{(port := free_port())}"
        base = {k: v for k, v in os.environ.items() if not k.startswith("MLX_MANAGER_")}
        pinned = f" (on core {','.join(map(str, sorted(cores)))})" if cores else ""
        print(f"{name}: {' '.join([MLX_MANAGER, 'serve', *args, '--port', str(port)])}{pinned}", flush=True)
        self.process = subprocess.Popen(
            [MLX_MANAGER, "serve", *args, "--port", str(port)],
            env={**base, "MLX_MANAGER_HOME": str(self.home), "HF_HUB_OFFLINE": "1", **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its threads (MLX's, the inference thread) inherit the affinity.
            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
        )

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.home.name} exited early (code {self.process.returncode})")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"{self.home.name} not ready within {timeout:g} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def router_config(d1: Daemon, d2: Daemon, model: str) -> str:
    backends = "".join(
        f'[[routing.backends]]\nname = "{name}"\ntype = "openai"\nbase_url = "{d.url}/v1"\n\n'
        for name, d in (("d1", d1), ("d2", d2))
    )
    return (
        backends + '[[routing.groups]]\nname = "pair"\nmembers = ["d1", "d2"]\n\n'
        f'[[routing.routes]]\nmodel = "one"\nto = "d1:{model}"\n\n'
        f'[[routing.routes]]\nmodel = "team"\nto = "pair:{model}"\n'
    )


def overhead(router: Daemon, d1: Daemon, model: str, requests: int, max_tokens: int) -> bool:
    for _ in range(3):  # warm-up: connections, the prompt cache
        stream(d1.url, model, max_tokens), stream(router.url, "one", max_tokens)
    direct: list[Result] = []
    routed: list[Result] = []
    router_process = psutil.Process(router.process.pid)
    cpu_before = sum(router_process.cpu_times()[:2])
    for _ in range(requests):
        direct.append(stream(d1.url, model, max_tokens))
        routed.append(stream(router.url, "one", max_tokens))
    router_cpu_ms = (sum(router_process.cpu_times()[:2]) - cpu_before) / requests * 1000
    if not all(r.done and r.tokens == max_tokens for r in direct + routed):
        raise SystemExit("a request of the overhead run did not complete")
    if {r.backend for r in routed} != {"d1"}:
        raise SystemExit(f"routed requests were served by {sorted({str(r.backend) for r in routed})}, not d1")

    def p50_ttft(results: list[Result]) -> float:
        return statistics.median(r.ttft or 0.0 for r in results) * 1000

    def rate(results: list[Result]) -> float:  # while streaming: from the first token to the last
        return statistics.median(streaming_rate(r) for r in results)

    def whole_rate(results: list[Result]) -> float:  # over the whole request, its TTFT included
        return statistics.median(r.tokens / r.seconds for r in results)

    extra_ms = p50_ttft(routed) - p50_ttft(direct)
    ratio = rate(routed) / rate(direct)
    ok_ttft, ok_rate = extra_ms <= 5.0, ratio >= 0.97
    print(
        f"{'ok  ' if ok_ttft else 'FAIL'} TTFT p50: direct {p50_ttft(direct):.1f} ms, through the router "
        f"{p50_ttft(routed):.1f} ms: +{extra_ms:.1f} ms (target <= 5 ms)"
    )
    print(
        f"{'ok  ' if ok_rate else 'FAIL'} tokens/s while streaming (median): direct {rate(direct):.0f}, through the "
        f"router {rate(routed):.0f}: {ratio:.3f}x (target >= 0.97x)"
    )
    # Each routed request ran right after its direct one: their difference shrugs off the load drifting.
    paired = statistics.median((r.ttft or 0.0) - (d.ttft or 0.0) for d, r in zip(direct, routed, strict=True))
    print(f"     TTFT paired difference (median of routed - direct, request by request): {paired * 1000:+.1f} ms")
    paired_rate = statistics.median(streaming_rate(r) / streaming_rate(d) for d, r in zip(direct, routed, strict=True))
    print(f"     tokens/s while streaming, paired ratio (median of routed / direct): {paired_rate:.3f}x")
    # The TTFT counted twice: with short answers, a few ms before the first token weigh on this one.
    print(
        f"     tokens/s over the whole request, TTFT included (median): direct {whole_rate(direct):.0f}, "
        f"through the router {whole_rate(routed):.0f}: {whole_rate(routed) / whole_rate(direct):.3f}x"
    )
    # From the finish reason to the end of the stream: the usage chunk and [DONE] wait for the audit
    # row's commit (audit.durability), the upstream's and then, routed, the router's own.
    tails = [statistics.median((r.seconds - (r.finish or r.seconds)) * 1000 for r in rs) for rs in (direct, routed)]
    print(f"     finish reason -> end of stream (median): direct {tails[0]:.1f} ms, routed {tails[1]:.1f} ms")
    print(f"     router CPU (user + system) per routed request: {router_cpu_ms:.1f} ms")
    return ok_ttft and ok_rate


def spread(router: Daemon, requests: int, max_tokens: int) -> bool:
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: stream(router.url, "team", max_tokens), range(requests)))
    if not all(r.status == 200 and r.done for r in results):
        raise SystemExit("a request of the spread run failed")
    counts = {name: sum(r.backend == name for r in results) for name in ("d1", "d2")}
    even = requests / 2
    ok = all(abs(count - even) <= 0.2 * even for count in counts.values())
    print(
        f"{'ok  ' if ok else 'FAIL'} spread of {requests} requests over the pair: d1 {counts['d1']}, "
        f"d2 {counts['d2']} (target each {even * 0.8:.0f}..{even * 1.2:.0f})"
    )
    return ok


def killed(router: Daemon, d1: Daemon, requests: int, max_tokens: int) -> bool:
    finished = 0
    lock = threading.Lock()

    def one(_: int) -> Result:
        nonlocal finished
        result = stream(router.url, "team", max_tokens)
        with lock:
            finished += 1
        return result

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, i) for i in range(requests)]
        while finished < requests // 4:
            time.sleep(0.01)
        d1.process.send_signal(signal.SIGKILL)
        d1.process.wait()
        results = [future.result() for future in futures]
    whole = [r for r in results if r.status == 200 and r.done and r.error is None]
    cut = [r for r in results if r.error is not None and r.chunks > 0 and r.backend == "d1"]
    lost = [r for r in results if r not in whole and r not in cut]
    moved = sum(
        float(line.rsplit(" ", 1)[1])
        for line in httpx.get(router.url + "/metrics").text.splitlines()
        if line.startswith('mlx_manager_backend_failures_total{backend="d1"')
    )
    served = {name: sum(r.backend == name for r in whole) for name in ("d1", "d2")}
    ok = not lost
    print(
        f"{'ok  ' if ok else 'FAIL'} d1 killed after {requests // 4} of {requests} requests: {len(whole)} answered "
        f"whole (d1 {served['d1']}, d2 {served['d2']}), {len(cut)} cut after their first byte (SSE error event), "
        f"{int(moved)} attempts moved off d1 before their first byte, {len(lost)} lost (target 0)"
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32, help="requests each way for the overhead")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--group-requests", type=int, default=64)
    parser.add_argument("--overhead-only", action="store_true", help="only part 1 (for A/B runs of the overhead)")
    parser.add_argument(
        "--router-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the router only, to see what a part costs (MLX_MANAGER_AUDIT__DURABILITY=batched)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the deployment the targets mean: the upstreams on core 0, the router and this client on core 1"
        " (the direct baseline so has the same upstream; Linux only)",
    )
    args = parser.parse_args()
    upstream_cores, router_cores = ({0}, {1}) if args.pin else (None, None)
    if router_cores:
        os.sched_setaffinity(0, router_cores)  # this client, and its threads

    work = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    model = str(build_model(work / "fast", "fast"))
    daemons: list[Daemon] = []
    try:
        for name in ("d1", "d2"):
            env = {"MLX_MANAGER_SERVER__MAX_BATCH_SIZE": "1"}
            daemons.append(Daemon(work, name, ["--model", model], env, upstream_cores))
        d1, d2 = daemons
        (work / "router").mkdir()
        (work / "router" / "config.toml").write_text(router_config(d1, d2, model))
        router_env = dict(item.split("=", 1) for item in args.router_env)
        daemons.append(router := Daemon(work, "router", [], router_env, router_cores))
        for daemon in daemons:
            daemon.wait_ready()
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        ok = overhead(router, d1, model, args.requests, args.max_tokens)
        print(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        if not args.overhead_only:
            ok &= spread(router, args.group_requests, args.max_tokens)
            ok &= killed(router, d1, args.group_requests, args.max_tokens * 4)
    finally:
        for daemon in daemons:
            daemon.stop()
    print(
        f"reproduce: HF_HUB_OFFLINE=1 python -m benchmarks.bench_routing --requests {args.requests} "
        f"--max-tokens {args.max_tokens} --group-requests {args.group_requests}"
        + (" --overhead-only" if args.overhead_only else "")
        + (" --pin" if args.pin else "")
        + "".join(f" --router-env {item}" for item in args.router_env)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
