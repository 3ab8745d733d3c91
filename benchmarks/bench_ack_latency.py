"""Benchmark: what `audit.durability = "acknowledged"` adds at the end of a response.

    HF_HUB_OFFLINE=1 python -m benchmarks.bench_ack_latency [--clients 8] [--requests 48] [--rounds 4] [--fsync]

Under "acknowledged" (the default) a streamed answer's closing events (the finish_reason chunk and
`[DONE]`) wait for the commit of its audit row, which it shares with the rows of the requests
finishing alongside (group commit); under "batched" they go out at once and the row follows within
the writer's window. The figure is the *tail*: from the chunk carrying the last generated text to
the end of the stream, as the client sees it.

One mlx-manager daemon (a real process, the generated "fast" model) serves both: the setting is
live, so each round rewrites config.toml and POSTs /admin/reload, and rounds alternate A, B, A, B
(A = acknowledged, B = batched) so machine noise hits both alike. Each round runs `--requests`
streamed chat completions, `--clients` at a time. Printed: each round pair's tail p50 / p95 and
the whole run's, and the added p50 (A - B). Target (issue 24 item 8): added p50 <= 5 ms at 8 clients.
`--fsync` runs the daemon with `audit.fsync = true` (every commit synced to the disk).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.servers import Server, start_servers
from mlx_manager.bench import percentile
from tests.models import build_model

MODES = ("acknowledged", "batched")


async def one(client: httpx.AsyncClient, model: str, max_tokens: int, n: int) -> float:
    """One streamed chat completion; the seconds from its last text chunk to the end of the stream."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Count the ways, take {n}."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    last_text = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                last_text = time.perf_counter()
    ended = time.perf_counter()
    if last_text is None:
        raise SystemExit("a stream carried no text: the tail cannot be measured")
    return ended - last_text


async def round_of(client: httpx.AsyncClient, model: str, clients: int, requests: int, max_tokens: int) -> list[float]:
    """`requests` requests, `clients` at a time; their tails."""
    numbers = iter(range(requests))
    tails: list[float] = []

    async def worker() -> None:
        for n in numbers:
            tails.append(await one(client, model, max_tokens, n))

    await asyncio.gather(*(worker() for _ in range(clients)))
    return tails


def write_config(home: Path, mode: str, fsync: bool) -> None:
    (home / "config.toml").write_text(f'[audit]\ndurability = "{mode}"\nfsync = {str(fsync).lower()}\n')


def set_durability(home: Path, url: str, mode: str, fsync: bool) -> None:
    write_config(home, mode, fsync)
    token = (home / "admin.token").read_text().strip()
    answer = httpx.post(f"{url}/admin/reload", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    answer.raise_for_status()


def fsync_ms(folder: Path, times: int = 20) -> float:
    """The median time to write and fsync a small file in `folder`: what one commit costs the disk at least."""
    path = folder / "fsync-probe"
    spent = []
    with open(path, "wb") as probe:
        for _ in range(times):
            started = time.perf_counter()
            probe.write(b"x" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
            spent.append(time.perf_counter() - started)
    path.unlink()
    return statistics.median(spent) * 1000


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.2f} / {(percentile(values, 95) or 0.0) * 1000:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48, help="requests per round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each mode, interleaved")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--fsync", action="store_true", help="audit.fsync = true: every commit synced to the disk")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mlx-bench-ack-"))
    model = str(build_model(work / "model", "fast"))
    home = work / "home-0"  # the home start_servers gives its first server
    home.mkdir()
    write_config(home, "acknowledged", args.fsync)
    server = Server("mlx-manager", "ours", {})
    tails: dict[str, list[list[float]]] = {mode: [] for mode in MODES}

    async def measure() -> None:
        limits = httpx.Limits(max_connections=args.clients)
        async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as client:
            await round_of(client, model, args.clients, args.clients, args.max_tokens)  # warm up
            for _ in range(args.rounds):
                for mode in MODES:
                    set_durability(home, server.url, mode, args.fsync)
                    tails[mode].append(await round_of(client, model, args.clients, args.requests, args.max_tokens))

    with start_servers([server], model, work):
        asyncio.run(measure())

    print(
        f"\ntail = last text chunk -> end of stream, ms p50 / p95;"
        f" {args.clients} clients, {args.requests} requests a round, audit.fsync = {str(args.fsync).lower()}"
    )
    print("| round | acknowledged | batched | added p50 |")
    print("| --- | --- | --- | --- |")
    for i, (a, b) in enumerate(zip(tails["acknowledged"], tails["batched"], strict=True), 1):
        added = (statistics.median(a) - statistics.median(b)) * 1000
        print(f"| {i} | {ms(a)} | {ms(b)} | {added:+.2f} |")
    a = [t for r in tails["acknowledged"] for t in r]
    b = [t for r in tails["batched"] for t in r]
    added = (statistics.median(a) - statistics.median(b)) * 1000
    print(f"| all | {ms(a)} | {ms(b)} | {added:+.2f} |")
    verdict = "meets" if added <= 5 else "misses"
    print(f"\nadded p50 {added:+.2f} ms: {verdict} the target (<= 5 ms); load: {os.getloadavg()[0]:.2f} (1 min)")
    print(f"one fsync of 4 KB in the home folder (the least a commit costs here): {fsync_ms(home):.2f} ms p50")
    print("reproduce: HF_HUB_OFFLINE=1 python -m benchmarks.bench_ack_latency " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
