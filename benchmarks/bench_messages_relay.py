"""Benchmark: a streamed Messages request routed to an `anthropic` backend, relayed as the upstream
sent it (routing/message_relay.py) vs decoded and translated again (the path before the relay).

    HF_HUB_OFFLINE=1 python -m benchmarks.bench_messages_relay [--blocks 6] [--per-block 8] [--max-tokens 256]

Two real daemons (`mlx-manager serve`, each its own process): d1 serves the generated `fast` test
model, and a router in front routes `claude` to d1 as an `anthropic` backend (d1's own /v1/messages
standing in for Anthropic's API). The two paths are picked per request: thinking `display:
omitted` is translated (the upstream is not asked to omit it), `summarized` relayed; the fast
model does not think, so both answers are the same. Blocks of requests alternate — translated,
relayed, direct to d1 — so the machine's load drifts over all three alike. Shown: the router's CPU
(user + system) per request of each path, the p50 time to first token, tokens/s, and each block's
figures with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from benchmarks.bench_routing import Daemon
from tests.models import build_model

HELLO = [{"role": "user", "content": "hello there"}]


@dataclass
class Result:
    ttft: float  # seconds to the first text delta
    seconds: float
    tokens: int


def stream(url: str, model: str, max_tokens: int, display: str) -> Result:
    body = {
        "model": model,
        "messages": HELLO,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "thinking": {"type": "adaptive", "display": display},
    }
    ttft, tokens, name = None, 0, ""
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=300) as http, http.stream("POST", "/v1/messages", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"{url}: {response.status_code} {response.read().decode()}")
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif not line.startswith("data: "):
                continue
            elif name == "content_block_delta" and ttft is None:
                ttft = time.perf_counter() - started
            elif name == "message_delta":
                tokens = json.loads(line.removeprefix("data: "))["usage"]["output_tokens"]
            elif name == "error":
                raise SystemExit(f"{url}: the stream failed: {line}")
    if ttft is None or tokens != max_tokens:
        raise SystemExit(f"{url}: {tokens} of {max_tokens} tokens")
    return Result(ttft, time.perf_counter() - started, tokens)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=6, help="blocks of each path, interleaved")
    parser.add_argument("--per-block", type=int, default=8, help="requests in a block")
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-messages-relay-"))
    model = str(build_model(work / "fast", "fast"))
    d1 = Daemon(work, "d1", ["--model", model], {"MLX_MANAGER_SERVER__MAX_BATCH_SIZE": "1"})
    (work / "router").mkdir()
    (work / "router" / "config.toml").write_text(
        f'[[routing.backends]]\nname = "d1"\ntype = "anthropic"\nbase_url = "{d1.url}"\n\n'
        f'[[routing.routes]]\nmodel = "claude"\nto = "d1:{model}"\n'
    )
    router = Daemon(work, "router", [], {})
    paths = {  # name: (url, model, thinking display)
        "translated": (router.url, "claude", "omitted"),
        "relayed": (router.url, "claude", "summarized"),
        "direct": (d1.url, model, "summarized"),
    }
    results: dict[str, list[Result]] = {name: [] for name in paths}
    cpu_ms: dict[str, list[float]] = {name: [] for name in paths}
    try:
        d1.wait_ready()
        router.wait_ready()
        cpu = psutil.Process(router.process.pid)
        for url, name, display in paths.values():  # warm-up: connections, the prompt cache
            for _ in range(3):
                stream(url, name, args.max_tokens, display)
        for block in range(args.blocks):
            for path, (url, name, display) in paths.items():
                before = sum(cpu.cpu_times()[:2])
                block_results = [stream(url, name, args.max_tokens, display) for _ in range(args.per_block)]
                cpu_ms[path].append((sum(cpu.cpu_times()[:2]) - before) / args.per_block * 1000)
                results[path] += block_results
                ttft = statistics.median(r.ttft for r in block_results) * 1000
                print(
                    f"block {block} {path:10} router CPU {cpu_ms[path][-1]:5.1f} ms/request, TTFT p50 {ttft:5.1f} ms"
                    f"  (load {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
    finally:
        router.stop()
        d1.stop()
        shutil.rmtree(work, ignore_errors=True)
    for path, rs in results.items():
        ttft = statistics.median(r.ttft for r in rs) * 1000
        rate = statistics.median(r.tokens / r.seconds for r in rs)
        print(
            f"{path:10} router CPU {statistics.mean(cpu_ms[path]):5.1f} ms/request "
            f"({args.max_tokens} tokens), TTFT p50 {ttft:5.1f} ms, tokens/s (median) {rate:5.0f}"
        )
    print(
        "reproduce: HF_HUB_OFFLINE=1 python -m benchmarks.bench_messages_relay "
        f"--blocks {args.blocks} --per-block {args.per_block} --max-tokens {args.max_tokens}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
