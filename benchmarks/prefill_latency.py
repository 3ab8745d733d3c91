"""A long prompt arriving while streams decode, and a long prompt cancelled mid-prefill (issue 24, item 5).

    HF_HUB_OFFLINE=1 python benchmarks/prefill_latency.py [--size bench] [--streams 4] [--prompt-tokens 4000]

(a) `--streams` streams decode; one `--prompt-tokens` prompt arrives. Their inter-token latency
    (ITL) while it is read is compared with the ITL of the same streams over the same tokens in a
    control run without the prompt ("alone": a round's cost grows with their context, so their
    first tokens would be an unfair baseline). Target: p95 at most 2x; the mean, the share of gaps
    over twice the control's p95 and the longest gap are shown too.
    The same run with fixed `server.prefill_chunk` chunks in every step (the pacing switched
    off) is shown beside it.
(b) The same prompt alone, cancelled in the middle of its prefill: how long the engine takes to
    let go of it, against the time of the chunk it was reading (target: within one chunk; no
    chunk starts after the cancel), and how soon a short request sent at the cancel gets its
    first token.

The engine runs in this process on the generated test model (`tests/models.py`); each token's
time is taken on the inference thread as the batch delivers it (`ModelBatch._deliver` is wrapped
for that, and only here).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import math
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `tests.models` from a checkout

from mlx_manager.engine import batch as batch_module  # noqa: E402
from mlx_manager.engine import pacing  # noqa: E402
from mlx_manager.engine.config import EngineConfig  # noqa: E402
from mlx_manager.engine.engine import Engine  # noqa: E402
from mlx_manager.engine.types import Finished, GenerationRequest, SamplingParams, Started  # noqa: E402

GREEDY = SamplingParams(temperature=0)
STAMPS: dict[str, list[float]] = defaultdict(list)  # request id -> perf_counter() of each token
CHUNKS: list[tuple[float, float]] = []  # (start, end) perf_counter() of each prompt read


def _stamp_tokens() -> None:
    deliver = batch_module.ModelBatch._deliver

    def timed(self: Any, slot: Any, *args: Any) -> bool:
        STAMPS[slot.job.request.request_id].append(time.perf_counter())
        return deliver(self, slot, *args)

    batch_module.ModelBatch._deliver = timed  # type: ignore[method-assign,assignment]
    read_chunk = batch_module.read_chunk

    def timed_read(entry: Any, cache: list[Any], chunk: list[int]) -> None:
        started = time.perf_counter()
        read_chunk(entry, cache, chunk)
        CHUNKS.append((started, time.perf_counter()))

    batch_module.read_chunk = timed_read


def _request(model: str, prompt: str | list[int], max_tokens: int, request_id: str) -> GenerationRequest:
    return GenerationRequest(model=model, prompt=prompt, max_tokens=max_tokens, sampling=GREEDY, request_id=request_id)


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


async def _until_started(job: Any) -> None:
    async for event in job:
        if isinstance(event, Started):
            return


async def _drain(job: Any) -> None:
    async for event in job:
        if isinstance(event, Finished):
            return


async def _streams(engine: Engine, model: str, streams: int, tag: str, tokens: list[int]) -> list[Any]:
    """`streams` greedy streams, the same prompts whatever the tag, until stream i has `tokens[i]` tokens."""
    running = [engine.submit(_request(model, f"stream {i} says", 100_000, f"{tag}-stream-{i}")) for i in range(streams)]
    while any(len(STAMPS[f"{tag}-stream-{i}"]) < tokens[i] for i in range(streams)):
        await asyncio.sleep(0.02)
    return running


async def _stop(engine: Engine, jobs: list[Any]) -> None:
    for job in jobs:
        job.cancel()
    while engine.status().active_jobs:
        await asyncio.sleep(0.01)


def _token_gaps(stamps: list[float], first: int, last: int) -> list[float]:
    """The gaps before tokens first..last-1 (0-based)."""
    return [stamps[k] - stamps[k - 1] for k in range(max(first, 1), last)]


async def arrival(engine: Engine, model: str, streams: int, prompt: list[int], tag: str) -> dict[str, float]:
    """Streams decode; a long prompt arrives. Then the control: the same streams again, alone.
    The streams' ITL while the prompt is read, against the control's over the same tokens (their
    context grows as they decode, and with it the cost of a round)."""
    running = await _streams(engine, model, streams, tag, [60] * streams)
    long = engine.submit(_request(model, prompt, 1, f"{tag}-long"))
    arrived = time.perf_counter()
    await _drain(long)
    first_token = STAMPS[f"{tag}-long"][0]
    await _stop(engine, running)
    stamps = [STAMPS[f"{tag}-stream-{i}"] for i in range(streams)]
    spans = [(bisect.bisect_left(own, arrived), bisect.bisect_right(own, first_token)) for own in stamps]
    await _stop(engine, await _streams(engine, model, streams, f"{tag}-control", [last + 1 for _, last in spans]))
    during, alone = [], []
    for i, (first, last) in enumerate(spans):
        during += _token_gaps(STAMPS[f"{tag}-stream-{i}"], first, last)
        alone += _token_gaps(STAMPS[f"{tag}-control-stream-{i}"], first, last)
    return {
        "alone_p50": statistics.median(alone),
        "alone_p95": _p(alone, 0.95),
        "alone_mean": statistics.fmean(alone),
        "during_p50": statistics.median(during),
        "during_p95": _p(during, 0.95),
        "during_mean": statistics.fmean(during),
        "during_slow": sum(gap > 2 * _p(alone, 0.95) for gap in during) / len(during),
        "during_max": max(during),
        "prefill_s": first_token - arrived,
        "tokens_during": len(during),
    }


async def cancel_mid_prefill(engine: Engine, model: str, prompt: list[int], chunk: int) -> dict[str, float]:
    """The prompt read alone (timed), then again and cancelled halfway: how soon is the engine free?"""
    alone = engine.submit(_request(model, prompt, 1, "alone"))
    started = time.perf_counter()
    await _drain(alone)
    prefill = STAMPS["alone"][0] - started
    chunks = math.ceil(len(prompt) / chunk)
    victim = engine.submit(_request(model, list(reversed(prompt)), 1, "victim"))  # not a prompt-cache hit
    await _until_started(victim)
    await asyncio.sleep(prefill / 2)
    cancelled = time.perf_counter()
    victim.cancel()
    short = engine.submit(_request(model, "a short question", 5, "short"))
    await _drain(short)
    assert victim.stopped_at is not None
    in_flight = [(a, b) for a, b in CHUNKS if a <= cancelled <= b]
    return {
        "chunk_in_flight_s": in_flight[0][1] - in_flight[0][0] if in_flight else 0.0,
        "chunks_after_cancel": sum(cancelled < a < victim.stopped_at for a, _ in CHUNKS),
        "prefill_s": prefill,
        "chunk_s": prefill / chunks,
        "chunks": chunks,
        "freed_s": victim.stopped_at - cancelled,
        "short_first_token_s": STAMPS["short"][0] - cancelled,
    }


async def main(args: argparse.Namespace) -> None:
    from tests.models import build_model

    engine = Engine(EngineConfig(prefill_chunk=args.chunk, cache_max_bytes=0, max_batch_size=32, allow_any_path=True))
    engine.start()  # first: it picks the BLAS before anything imports MLX (build_model does)
    folder = build_model(Path(tempfile.mkdtemp(prefix="prefill-bench-")) / args.size, args.size)
    model = str(folder)
    try:
        await engine.load(model)
        words = list(range(8, 1000))
        prompt = (words * (args.prompt_tokens // len(words) + 1))[: args.prompt_tokens]
        await _drain(engine.submit(_request(model, prompt[:600], 4, "warm-up")))
        paced = await arrival(engine, model, args.streams, prompt, "paced")
        real_plan = pacing.PrefillPacer.plan
        pacing.PrefillPacer.plan = lambda self, limit, streams, prompts: pacing.Plan(limit)  # type: ignore[method-assign]
        fixed = await arrival(engine, model, args.streams, prompt, "fixed")
        pacing.PrefillPacer.plan = real_plan  # type: ignore[method-assign]
        cancel = await cancel_mid_prefill(engine, model, prompt, args.chunk)
    finally:
        engine.stop(timeout=120)  # a step of a long prompt may still be running
    command = "HF_HUB_OFFLINE=1 python benchmarks/prefill_latency.py " + " ".join(sys.argv[1:])
    print(f"command: {command.strip()}")
    print(f"model: generated '{args.size}' test model; BLAS: {engine.status().blas or 'bundled'}")
    print(
        f"(a) {args.streams} streams decoding; one {args.prompt_tokens}-token prompt arrives"
        f" (prefill_chunk {args.chunk})"
    )
    print(
        "| chunks | ITL p50 alone | ITL p95 alone | ITL p50 during | ITL p95 during | p95 ratio (target <= 2) "
        "| mean ratio | gaps > 2x p95 alone | max gap | prefill |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in (("paced (now)", paced), (f"fixed {args.chunk} (before)", fixed)):
        print(
            f"| {name} | {r['alone_p50'] * 1000:.1f} ms | {r['alone_p95'] * 1000:.1f} ms "
            f"| {r['during_p50'] * 1000:.1f} ms | {r['during_p95'] * 1000:.1f} ms "
            f"| {r['during_p95'] / r['alone_p95']:.2f} | {r['during_mean'] / r['alone_mean']:.2f} "
            f"| {r['during_slow']:.1%} | {r['during_max'] * 1000:.0f} ms | {r['prefill_s']:.1f} s |"
        )
    print(
        f"(b) the {args.prompt_tokens}-token prompt alone: read in {cancel['prefill_s']:.1f} s, "
        f"{cancel['chunks']} chunks of {args.chunk} ({cancel['chunk_s'] * 1000:.0f} ms a chunk on average)"
    )
    print(
        f"    cancelled halfway: the engine let go {cancel['freed_s'] * 1000:.0f} ms later; the chunk it was "
        f"reading took {cancel['chunk_in_flight_s'] * 1000:.0f} ms, and {cancel['chunks_after_cancel']} chunks "
        "started after the cancel (target: within one chunk)"
    )
    print(
        f"    a 5-token request sent at the cancel had its first token {cancel['short_first_token_s'] * 1000:.0f} ms "
        "after it"
    )


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="bench", help="test model size (tests/models.py): fast, bench, slow")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=4000)
    parser.add_argument("--chunk", type=int, default=512, help="server.prefill_chunk")
    return parser.parse_args(argv)


if __name__ == "__main__":
    _stamp_tokens()
    asyncio.run(main(parse(sys.argv[1:])))
