"""Benchmark: the engine's tokens/s against mlx-lm's own loops, side by side in one run.

    python -m benchmarks.bench_engine [--rounds 5] [--size bench] [--tokens 128]

- 1 job through the engine vs plain `mlx_lm.stream_generate` (target >= 0.95x)
- 8 concurrent jobs vs `mlx_lm.batch_generate` on the same 8 prompts (target >= 0.95x)

Every round runs both sides back to back with fresh, distinct prompts, so machine noise
hits both alike; the figures are the medians over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time

from tests.models import build_model


def _prompts(tokenizer, n: int, round_no: int, length: int = 32) -> list[list[int]]:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    out = []
    for i in range(n):
        text = " ".join(words[(i * 7 + round_no * 3 + k) % len(words)] for k in range(length)) + f" {round_no}-{i}"
        out.append(tokenizer.encode(text)[:length])
    return out


def bench_mlx_single(model, tokenizer, prompt, max_tokens) -> float:
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import greedy_sampler

    start = time.perf_counter()
    n = 0
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=greedy_sampler):
        n = response.generation_tokens
    return n / (time.perf_counter() - start)


def bench_mlx_batch(model, tokenizer, prompts, max_tokens) -> float:
    from mlx_lm import batch_generate

    start = time.perf_counter()
    result = batch_generate(model, tokenizer, prompts, max_tokens=max_tokens, return_token_ids=True)
    return sum(len(t) for t in result.token_ids) / (time.perf_counter() - start)


async def bench_engine(engine, model_id, prompts, max_tokens) -> float:
    from mlx_manager.engine.types import Finished, GenerationRequest, SamplingParams

    async def one(prompt):
        job = engine.submit(
            GenerationRequest(
                model=model_id, prompt=prompt, max_tokens=max_tokens, sampling=SamplingParams(temperature=0)
            )
        )
        async for event in job:
            if isinstance(event, Finished):
                return event.completion_tokens
        return 0

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(p) for p in prompts))
    return sum(counts) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", default="bench")
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()

    from mlx_lm import load

    from mlx_manager.engine.config import EngineConfig
    from mlx_manager.engine.engine import Engine

    folder = build_model(tempfile.mkdtemp(prefix="mlx-bench-") + "/model", args.size)
    model, tokenizer = load(str(folder))
    engine = Engine(EngineConfig(max_batch_size=32, allow_any_path=True))
    engine.start()
    loop = asyncio.new_event_loop()
    loop.run_until_complete(engine.load(str(folder)))
    # Warm-up both paths once.
    bench_mlx_single(model, tokenizer, _prompts(tokenizer, 1, 99)[0], 16)
    loop.run_until_complete(bench_engine(engine, str(folder), _prompts(tokenizer, 8, 99), 16))

    figures: dict[str, list[float]] = {k: [] for k in ("mlx_single", "engine_single", "mlx_batch8", "engine_batch8")}
    for r in range(args.rounds):
        single = _prompts(tokenizer, 1, r)
        eight = _prompts(tokenizer, 8, r + 1000)
        figures["mlx_single"].append(bench_mlx_single(model, tokenizer, single[0], args.tokens))
        figures["engine_single"].append(loop.run_until_complete(bench_engine(engine, str(folder), single, args.tokens)))
        figures["mlx_batch8"].append(bench_mlx_batch(model, tokenizer, eight, args.tokens))
        figures["engine_batch8"].append(loop.run_until_complete(bench_engine(engine, str(folder), eight, args.tokens)))
    engine.stop()

    med = {k: statistics.median(v) for k, v in figures.items()}
    print(f"model: {args.size} ({folder}), {args.tokens} new tokens, greedy, median of {args.rounds} rounds")
    print(
        f"1 job : engine {med['engine_single']:8.1f} tok/s | stream_generate {med['mlx_single']:8.1f} tok/s"
        f" | ratio {med['engine_single'] / med['mlx_single']:.3f} (target >= 0.95)"
    )
    print(
        f"8 jobs: engine {med['engine_batch8']:8.1f} tok/s | batch_generate  {med['mlx_batch8']:8.1f} tok/s"
        f" | ratio {med['engine_batch8'] / med['mlx_batch8']:.3f} (target >= 0.95)"
    )
    print(
        "reproduce: HF_HUB_OFFLINE=1 python -m benchmarks.bench_engine"
        f" --rounds {args.rounds} --size {args.size} --tokens {args.tokens}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
