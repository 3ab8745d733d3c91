"""Benchmark: what structured output costs — tokens/s with a JSON schema against without, and the
grammar's compile time, cold and from the cache.

    HF_HUB_OFFLINE=1 python -m benchmarks.bench_structured [--requests 16] [--max-tokens 64] [--rounds 3]

One mlx-manager daemon (a real process) serves the generated "bench" model. At 1 and at 8
concurrent clients, the same number of requests run with a `response_format` JSON schema and
without one, interleaved round by round so machine noise hits both alike. The schema (an array of
at least 200 integers) cannot be finished within max_tokens, so every request of both kinds
generates exactly max_tokens tokens: tokens/s compare like with like. Compile times are measured
in this process on the model's tokenizer, with the engine's own functions, for a typical
10-field nested schema: the first compile (cold) and the ones after it (a cache hit).
Targets (issue 18): constrained tokens/s >= 0.9x unconstrained at 1 and 8 clients; compiling a
typical schema <= 50 ms, a cache hit <= 1 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.servers import Server, start_servers
from tests.models import build_model

LONG_ARRAY = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 200}
TYPICAL = {  # 10 fields, nested
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "name": {"type": "string", "maxLength": 40},
        "email": {"type": "string", "format": "email"},
        "active": {"type": "boolean"},
        "role": {"enum": ["admin", "user", "guest"]},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
        "created": {"type": "string", "format": "date"},
        "manager": {"type": ["integer", "null"]},
    },
    "required": ["id", "name", "role", "address"],
    "additionalProperties": False,
}


def response_format(schema: dict, name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


async def level(client, model: str, clients: int, requests: int, max_tokens: int, schema: dict | None) -> float:
    """tokens/s of `requests` requests, `clients` at a time."""
    extra = {"response_format": response_format(schema, "long")} if schema else {}
    pending = iter(range(requests))
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        for i in pending:
            reply = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": f"list {i}"}],
                max_tokens=max_tokens,
                temperature=0,
                **extra,
            )
            tokens += reply.usage.completion_tokens

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return tokens / (time.perf_counter() - started)


def compile_times(model: str) -> tuple[float, float, float]:
    """(ms to read the tokenizer into the grammar engine, once per model; ms to compile the
    typical schema cold; median ms of a cache hit), in this process, on the model's tokenizer."""
    from mlx_lm.tokenizer_utils import load

    from mlx_manager.engine.constraints import compile_constraint, json_schema_spec, tokenizer_view

    tokenizer = load(Path(model))
    started = time.perf_counter()
    tokenizer_view(tokenizer)
    view_ms = (time.perf_counter() - started) * 1000
    cold = compile_constraint(json_schema_spec(TYPICAL, name="typical"), tokenizer)
    assert not cold.cache_hit
    hits = [compile_constraint(json_schema_spec(TYPICAL, name="typical"), tokenizer) for _ in range(20)]
    assert all(h.cache_hit for h in hits)
    return view_ms, cold.compile_ms, statistics.median(h.compile_ms for h in hits)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mlx-bench-structured-"))
    model = str(build_model(work / "model", "bench"))
    server = Server("mlx-manager", "ours", {})

    async def measure(url: str) -> dict[int, tuple[list[float], list[float]]]:
        from openai import AsyncOpenAI

        results: dict[int, tuple[list[float], list[float]]] = {1: ([], []), 8: ([], [])}
        async with AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600) as client:
            await level(client, model, 1, 2, 8, LONG_ARRAY)  # warm both paths
            for _ in range(args.rounds):
                for clients, (free, held) in results.items():
                    free.append(await level(client, model, clients, args.requests, args.max_tokens, None))
                    held.append(await level(client, model, clients, args.requests, args.max_tokens, LONG_ARRAY))
        return results

    with start_servers([server], model, work):
        results = asyncio.run(measure(server.url))
    view, cold, hit = compile_times(model)

    print("\n| clients | tokens/s without schema | with schema | ratio |")
    print("| --- | --- | --- | --- |")
    for clients, (free, held) in results.items():
        a, b = statistics.median(free), statistics.median(held)
        print(f"| {clients} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")
    print(
        f"\ntypical schema (10 fields, nested): compile {cold:.1f} ms cold, {hit:.3f} ms from the cache"
        f" (reading the tokenizer, once per model: {view:.0f} ms)"
    )
    print("reproduce: HF_HUB_OFFLINE=1 python -m benchmarks.bench_structured " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
