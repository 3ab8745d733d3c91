"""Measure any OpenAI-compatible server with closed-loop load; compare two side by side.

C workers each send requests back to back (distinct prompts, so no prompt cache flatters a
server) through the official async `openai` client, and every figure comes from what the
client saw: time to first token, request latency, completion tokens.

In conversation mode (`turns` > 1) each worker holds conversations instead: a system prompt
of its own, then `turns` user messages, each request resending the whole history as chat
clients do, so a server's prompt cache shows in the later turns' time to first token.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

WORDS = (
    "river stone cloud lantern orbit maple signal harbor copper meadow violet engine candle "
    "falcon quartz ribbon summit thistle velvet window yonder zephyr anchor bramble cedar "
    "dune ember fjord glacier hollow island juniper kestrel lagoon mosaic nectar"
).split()


class BenchError(Exception):
    """The server cannot be benchmarked (unreachable, not OpenAI-compatible, no model)."""


@dataclass
class RequestResult:
    ok: bool
    latency: float
    ttft: float | None = None
    completion_tokens: int = 0
    error: str | None = None
    turn: int = 1
    text: str = ""


@dataclass
class LevelReport:
    url: str
    concurrency: int
    requests: int
    errors: dict[str, int]
    completion_tokens: int
    seconds: float
    tokens_per_second: float
    ttft_p50: float | None
    ttft_p95: float | None
    latency_p50: float | None
    latency_p95: float | None
    tokens_per_second_per_request: float | None
    ttft_first_turn_p50: float | None = None  # conversation mode only
    ttft_later_turns_p50: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class BenchPlan:
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 8])
    requests: int = 16
    max_tokens: int = 128
    prompt_tokens: int = 64
    stream: bool = True
    turns: int = 1  # more: conversations of this many turns; `requests` counts conversations
    system_tokens: int = 0  # words of each conversation's system prompt


_prompt_counter = itertools.count()
# Starts every prompt: no two runs of `bench` send a prompt the server could have cached before.
_RUN = os.urandom(4).hex()


def distinct_prompt(words: int) -> str:
    """A prompt no other request (of this run or an earlier one) has used: the words depend on a
    counter, and the first one on the run."""
    n = next(_prompt_counter)
    picked = [WORDS[(n * 7 + i * (n % 5 + 1)) % len(WORDS)] for i in range(max(1, words - 3))]
    return f"{_RUN} request {n}: " + " ".join(picked)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _client(url: str):
    from openai import AsyncOpenAI

    # A daemon with API keys needs one: the same variable that adds a key to the daemon gives it here.
    key = os.environ.get("MLX_MANAGER_API_KEY") or os.environ.get("OPENAI_API_KEY") or "bench"
    return AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key=key, max_retries=0, timeout=600)


async def resolve_model(url: str, model: str | None) -> str:
    """Check the server speaks the OpenAI API and pick the model to use.

    With a model given, a one-token chat completion is the probe (some servers' /v1/models
    breaks in ways that say nothing about serving); without one, /v1/models names it.
    """
    import openai

    client = _client(url)
    try:
        if model:
            await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "ping"}], max_tokens=1
            )
            return model
        models = await client.models.list()
    except openai.APIConnectionError:
        raise BenchError(f"cannot connect to {url}: is the server running?") from None
    except openai.APIStatusError as exc:
        what = "POST /v1/chat/completions" if model else "GET /v1/models"
        raise BenchError(f"{url} refused the probe ({what}: HTTP {exc.status_code}): {exc.message}") from None
    except Exception as exc:  # a non-JSON answer, a TLS error...
        raise BenchError(f"{url} does not look like an OpenAI-compatible server: {type(exc).__name__}") from None
    finally:
        await client.close()
    ids = [m.id for m in models.data]
    if not ids:
        raise BenchError(f"{url} lists no models; pass --model")
    return ids[0]


async def one_conversation(client, model: str, plan: BenchPlan) -> list[RequestResult]:
    """`plan.turns` requests, each with the whole conversation so far; stops at the first error."""
    messages = []
    if plan.system_tokens:
        messages.append({"role": "system", "content": distinct_prompt(plan.system_tokens)})
    results = []
    for turn in range(1, plan.turns + 1):
        messages.append({"role": "user", "content": distinct_prompt(plan.prompt_tokens)})
        result = await one_request(client, model, plan, list(messages))
        result.turn = turn
        results.append(result)
        if not result.ok:
            break
        messages.append({"role": "assistant", "content": result.text})
    return results


async def one_request(client, model: str, plan: BenchPlan, messages: list[dict] | None = None) -> RequestResult:
    import openai

    started = time.perf_counter()
    messages = messages or [{"role": "user", "content": distinct_prompt(plan.prompt_tokens)}]
    try:
        if not plan.stream:
            response = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=plan.max_tokens, temperature=0
            )
            tokens = response.usage.completion_tokens if response.usage else 0
            text = response.choices[0].message.content or ""
            return RequestResult(True, time.perf_counter() - started, completion_tokens=tokens, text=text)
        stream = await client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=plan.max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        ttft, chunks, usage_tokens, parts = None, 0, None, []
        async for chunk in stream:
            if chunk.usage is not None:
                usage_tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                chunks += 1
                parts.append(chunk.choices[0].delta.content)
                if ttft is None:
                    ttft = time.perf_counter() - started
        tokens = usage_tokens if usage_tokens is not None else chunks
        return RequestResult(True, time.perf_counter() - started, ttft, tokens, text="".join(parts))
    except openai.APIStatusError as exc:
        return RequestResult(False, time.perf_counter() - started, error=f"http {exc.status_code}")
    except openai.APITimeoutError:
        return RequestResult(False, time.perf_counter() - started, error="timeout")
    except openai.APIConnectionError:
        return RequestResult(False, time.perf_counter() - started, error="connection")


async def run_level(
    url: str, model: str, concurrency: int, plan: BenchPlan, tick: Callable[[], None] | None = None
) -> LevelReport:
    """Closed loop: `concurrency` workers share `plan.requests` requests."""
    client = _client(url)
    remaining = itertools.count()
    results: list[RequestResult] = []

    async def worker() -> None:
        while next(remaining) < plan.requests:
            if plan.turns > 1:
                results.extend(await one_conversation(client, model, plan))
            else:
                results.append(await one_request(client, model, plan))
            if tick:
                tick()

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    seconds = time.perf_counter() - started
    return summarize(url, concurrency, results, seconds)


def summarize(url: str, concurrency: int, results: list[RequestResult], seconds: float) -> LevelReport:
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "error"] = errors.get(r.error or "error", 0) + 1
    tokens = sum(r.completion_tokens for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    latencies = [r.latency for r in ok]
    per_request = [r.completion_tokens / r.latency for r in ok if r.latency > 0]
    conversation = any(r.turn > 1 for r in results)
    return LevelReport(
        url=url,
        concurrency=concurrency,
        requests=len(results),
        errors=errors,
        completion_tokens=tokens,
        seconds=seconds,
        tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
        ttft_p50=percentile(ttfts, 50),
        ttft_p95=percentile(ttfts, 95),
        latency_p50=percentile(latencies, 50),
        latency_p95=percentile(latencies, 95),
        tokens_per_second_per_request=statistics.fmean(per_request) if per_request else None,
        ttft_first_turn_p50=percentile([r.ttft for r in ok if r.turn == 1 and r.ttft is not None], 50)
        if conversation
        else None,
        ttft_later_turns_p50=percentile([r.ttft for r in ok if r.turn > 1 and r.ttft is not None], 50)
        if conversation
        else None,
    )


async def run_bench(
    urls: list[str], models: list[str | None], plan: BenchPlan, tick: Callable[[], None] | None = None
) -> list[list[LevelReport]]:
    """Per concurrency level, run each server in turn (A, B, A, B ...): noise hits both alike."""
    resolved = [await resolve_model(url, model) for url, model in zip(urls, models, strict=True)]
    warm = BenchPlan(concurrency=[1], requests=1, max_tokens=8, prompt_tokens=plan.prompt_tokens, stream=plan.stream)
    for url, model in zip(urls, resolved, strict=True):
        await run_level(url, model, 1, warm)
    reports: list[list[LevelReport]] = [[] for _ in urls]
    for level in plan.concurrency:
        for i, (url, model) in enumerate(zip(urls, resolved, strict=True)):
            reports[i].append(await run_level(url, model, level, plan, tick))
    return reports


RATIO_FIELDS = (
    "tokens_per_second",
    "ttft_p50",
    "ttft_p95",
    "latency_p50",
    "latency_p95",
    "tokens_per_second_per_request",
    "ttft_first_turn_p50",
    "ttft_later_turns_p50",
)


def ratios(a: LevelReport, b: LevelReport) -> dict[str, float | None]:
    """A/B for each figure (None where either side has no value)."""
    out: dict[str, float | None] = {}
    for name in RATIO_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        out[name] = x / y if x is not None and y else None
    return out
