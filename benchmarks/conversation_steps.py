"""Where a conversation's later turn spends its time to first token, step by step, in the engine.

    HF_HUB_OFFLINE=1 python benchmarks/conversation_steps.py [--conversations 4] [--turns 6]
        [--cache-off] [--batch-cache] [--mlx-products] [--mlx-attention] [--default-malloc]

The workload of bench_prompt_cache.py (conversations at once, each a ~650-word system prompt and
short user turns, 48-token answers, every turn resending the history), run on the engine in this
process on the generated "bench" model, with each step of the inference thread timed. Printed:
tokens/s and TTFT p50 (turn 1, later turns), the cached / prompt tokens of some later turns, and
for the first later turns the steps between their submission and their first token with each
step's time: a turn read in one burst shows one long step, a paced one dozens of short ones.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `tests.models` from a checkout

from mlx_manager.bench import distinct_prompt  # noqa: E402
from mlx_manager.engine import allocator, attention  # noqa: E402
from mlx_manager.engine.batch import ModelBatch  # noqa: E402
from mlx_manager.engine.config import EngineConfig  # noqa: E402
from mlx_manager.engine.engine import Engine  # noqa: E402
from mlx_manager.engine.types import Finished, GenerationRequest, SamplingParams, TextDelta  # noqa: E402
from mlx_manager.engine.worker import Worker  # noqa: E402

STEPS: list[tuple[float, float]] = []  # (perf_counter at the step's start, its seconds)


def _time_steps() -> None:
    step = Worker._step_batches

    def timed(self: Any) -> None:
        started = time.perf_counter()
        step(self)
        STEPS.append((started, time.perf_counter() - started))

    Worker._step_batches = timed  # type: ignore[method-assign]


async def conversation(engine: Engine, model: str, n: int, turns: int, out: list[dict[str, Any]]) -> None:
    messages = [{"role": "system", "content": distinct_prompt(650)}]
    for turn in range(1, turns + 1):
        messages.append({"role": "user", "content": distinct_prompt(12)})
        request = GenerationRequest(
            model=model,
            messages=list(messages),
            max_tokens=48,
            sampling=SamplingParams(temperature=0),
            request_id=f"c{n}t{turn}",
        )
        sent = time.perf_counter()
        first, text, finished = None, [], None
        async for event in engine.submit(request):
            if isinstance(event, TextDelta):
                first = first or time.perf_counter()
                text.append(event.text)
            elif isinstance(event, Finished):
                finished = event
        assert first is not None and finished is not None
        out.append(
            {
                "turn": turn,
                "sent": sent,
                "ttft": first - sent,
                "cached": finished.cached_tokens,
                "prompt": finished.prompt_tokens,
            }
        )
        messages.append({"role": "assistant", "content": "".join(text)})


async def main(args: argparse.Namespace) -> None:
    from tests.models import build_model

    if args.mlx_attention:  # A/B: the engine's CPU attention (engine/attention.py) off
        attention.install = lambda: False  # type: ignore[assignment]
    if args.mlx_products:  # A/B: a float32 cache's attention in MLX, not numpy (engine/attention.py `_in_numpy`)
        attention._numpy_can_read = lambda *arrays: False  # type: ignore[assignment]
    if args.default_malloc:  # A/B: glibc's malloc as it comes (engine/allocator.py)
        allocator.tune = lambda: False  # type: ignore[assignment]
    engine = Engine(EngineConfig(allow_any_path=True, **({"cache_max_bytes": 0} if args.cache_off else {})))
    engine.start()  # first: it picks the BLAS before anything imports MLX (build_model does)
    if args.batch_cache:  # A/B: mlx-lm's BatchKVCache for batches, not a cache per sequence
        # (not by importing sequence_caches here: mlx-lm is imported on the inference thread)
        ModelBatch._by_sequence = lambda self: False  # type: ignore[method-assign]
    folder = str(build_model(Path(tempfile.mkdtemp(prefix="conversation-steps-")) / "bench", "bench"))
    try:
        await engine.load(folder)
        async for _ in engine.submit(GenerationRequest(model=folder, prompt="warm up", max_tokens=4)):
            pass
        out: list[dict[str, Any]] = []
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(conversation(engine, folder, n, args.turns, out) for n in range(args.conversations)))
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        engine.stop(timeout=60)
    later = sorted((o for o in out if o["turn"] > 1), key=lambda o: o["sent"])
    print(f"command: HF_HUB_OFFLINE=1 python benchmarks/conversation_steps.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"tokens/s {args.conversations * args.turns * 48 / seconds:.1f} over {seconds:.1f} s ({cpu:.1f} s of CPU)")
    print(f"TTFT p50: turn 1 {statistics.median(o['ttft'] for o in out if o['turn'] == 1):.2f} s, ", end="")
    print(f"later turns {statistics.median(o['ttft'] for o in later):.2f} s")
    print("later turns, cached / prompt tokens:", [(o["cached"], o["prompt"]) for o in later[:6]])
    for o in later[: args.conversations * 2]:
        inside = [seconds for at, seconds in STEPS if o["sent"] <= at <= o["sent"] + o["ttft"]]
        shown = ", ".join(f"{s * 1000:.0f}" for s in inside[:24])
        print(f"turn {o['turn']}: TTFT {o['ttft'] * 1000:.0f} ms over {len(inside)} steps (ms: {shown})")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--mlx-attention", action="store_true", help="MLX's own attention (A/B)")
    parser.add_argument("--mlx-products", action="store_true", help="float32 attention in MLX, not numpy (A/B)")
    parser.add_argument("--default-malloc", action="store_true", help="glibc's malloc untuned (A/B)")
    parser.add_argument("--cache-off", action="store_true", help="no prompt cache (cache.max_bytes = 0; A/B)")
    parser.add_argument("--batch-cache", action="store_true", help="mlx-lm's BatchKVCache, not one per sequence (A/B)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    _time_steps()
    asyncio.run(main(parse(sys.argv[1:])))
