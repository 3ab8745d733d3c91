"""The prompt cache with real models: same output with and without it, exact cached token
counts, bounded memory, nothing kept of cancelled work."""

from __future__ import annotations

import asyncio
import gc
import os
from pathlib import Path

import psutil
import pytest

from mlx_manager.engine.config import EngineConfig
from mlx_manager.engine.engine import Engine
from mlx_manager.engine.types import Finished, GenerationRequest, SamplingParams, Started, TextDelta
from tests.daemon_server import serving, wait_until

GREEDY = SamplingParams(temperature=0)
SYSTEM = "You are a careful assistant who answers in short sentences. " * 12


@pytest.fixture
def engine():
    engines = []

    def make(**config) -> Engine:
        # The tests' models live in temporary folders: loaded by path unless a test says otherwise.
        e = Engine(EngineConfig(**{"allow_any_path": True, **config}))
        e.start()
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.stop()


async def run(e: Engine, request: GenerationRequest) -> tuple[str, Finished]:
    text = ""
    async for event in e.submit(request):
        if isinstance(event, TextDelta):
            text += event.text
        elif isinstance(event, Finished):
            return text, event
    raise AssertionError("no Finished event")


async def conversation(e: Engine, model: str, name: str, turns: int = 6) -> list[tuple[str, Finished]]:
    messages = [{"role": "system", "content": SYSTEM}]
    results = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"{name}, turn {turn}: what comes next?"})
        request = GenerationRequest(model=model, messages=list(messages), max_tokens=20, sampling=GREEDY)
        text, finished = await run(e, request)
        results.append((text, finished))
        messages.append({"role": "assistant", "content": text})
    return results


def texts(results):
    return [text for text, _ in results]


def test_a_six_turn_conversation_says_the_same_with_the_cache_on_and_off(engine, fast_model):
    async def main(cache_max_bytes: int):
        return await conversation(engine(cache_max_bytes=cache_max_bytes), fast_model, "alone")

    cached, uncached = asyncio.run(main(1 << 30)), asyncio.run(main(0))
    assert texts(cached) == texts(uncached)
    assert all(f.cached_tokens == 0 for _, f in uncached)
    # From the second turn on, at least the whole previous prompt comes from the cache.
    for (_, before), (_, after) in zip(cached, cached[1:], strict=False):
        assert after.cached_tokens >= before.prompt_tokens
    assert [f.prompt_tokens for _, f in cached] == [f.prompt_tokens for _, f in uncached]


def test_eight_concurrent_conversations_say_the_same_with_the_cache_on_and_off(engine, fast_model):
    async def main(cache_max_bytes: int):
        e = engine(cache_max_bytes=cache_max_bytes)
        return await asyncio.gather(*(conversation(e, fast_model, f"user {i}") for i in range(8)))

    cached, uncached = asyncio.run(main(1 << 30)), asyncio.run(main(0))
    assert [texts(c) for c in cached] == [texts(c) for c in uncached]
    assert len({tuple(texts(c)) for c in cached}) > 1  # the conversations really differ
    assert all(f.cached_tokens > 0 for c in cached for _, f in c[1:])


def test_cached_tokens_are_the_prefix_the_engine_reused(engine, fast_model):
    from mlx_lm.tokenizer_utils import load

    tokenizer = load(Path(fast_model))

    async def main():
        e = engine()
        prompt = "def main():\n    return 42\n" * 8
        _, first = await run(e, GenerationRequest(model=fast_model, prompt=prompt, max_tokens=8, sampling=GREEDY))
        _, again = await run(e, GenerationRequest(model=fast_model, prompt=prompt, max_tokens=8, sampling=GREEDY))
        # Two conversations with the same system prompt share its tokens, and only those.
        a = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "first question"}]
        b = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "another one entirely"}]
        _, one = await run(e, GenerationRequest(model=fast_model, messages=a, max_tokens=4, sampling=GREEDY))
        _, two = await run(e, GenerationRequest(model=fast_model, messages=b, max_tokens=4, sampling=GREEDY))
        return first, again, one, two, a, b

    first, again, one, two, a, b = asyncio.run(main())
    assert first.cached_tokens == 0
    assert again.cached_tokens == again.prompt_tokens - 1  # all but the last token, which gives the logits
    tokens_a = tokenizer.apply_chat_template(a, add_generation_prompt=True)
    tokens_b = tokenizer.apply_chat_template(b, add_generation_prompt=True)
    shared = next(i for i, (x, y) in enumerate(zip(tokens_a, tokens_b, strict=False)) if x != y)
    assert one.cached_tokens == 0 and two.cached_tokens == shared


def test_the_cache_stays_within_its_limits_and_memory_stays_bounded(engine, fast_model):
    limit = 2 * 1024 * 1024

    async def main(e, start, count):
        for i in range(start, start + count):
            prompt = f"conversation {i}: " + "some words to remember " * 20
            await run(e, GenerationRequest(model=fast_model, prompt=prompt, max_tokens=4, sampling=GREEDY))
        return e.status().models[0].cache

    e = engine(cache_max_bytes=limit, cache_max_entries=1000)
    process = psutil.Process(os.getpid())
    asyncio.run(main(e, 0, 50))
    gc.collect()
    after_50 = process.memory_info().rss
    status = asyncio.run(main(e, 50, 150))
    gc.collect()
    after_200 = process.memory_info().rss
    assert 0 < status.bytes <= limit
    assert status.entries < 200  # the least recently used went
    assert status.hits + status.misses == 200
    assert status.cached_tokens < 200 * 8  # only the few tokens the prompts share: "conversation 1..."
    # 150 more conversations cost no more than a little allocator noise.
    assert after_200 - after_50 < 64 * 1024 * 1024


def test_the_entry_limit_evicts_least_recently_used(engine, fast_model):
    async def main():
        e = engine(cache_max_entries=2)
        prompts = [f"{name} says: " + "filler text " * 10 for name in ("alpha", "bravo", "charlie")]
        for prompt in prompts:
            await run(e, GenerationRequest(model=fast_model, prompt=prompt, max_tokens=2, sampling=GREEDY))
        # Newest first, so that asking again evicts nothing the next question needs.
        results = [
            await run(e, GenerationRequest(model=fast_model, prompt=p, max_tokens=2, sampling=GREEDY))
            for p in reversed(prompts)
        ]
        return [f.cached_tokens for _, f in reversed(results)], e.status().models[0].cache

    reused, status = asyncio.run(main())
    assert status.entries == 2
    assert reused[0] == 0  # alpha's was evicted when charlie's came in
    assert reused[1] > 0 and reused[2] > 0


def test_cancelled_and_timed_out_work_leaves_nothing_in_the_cache(engine, slow_model):
    async def main():
        e = engine(prefill_chunk=32)
        prompt = "a long prompt that takes a while to read " * 60
        job = e.submit(GenerationRequest(model=slow_model, prompt=prompt, max_tokens=50, sampling=GREEDY))
        async for event in job:
            assert isinstance(event, Started)
            break
        job.cancel()  # in the middle of its prefill
        assert await asyncio.to_thread(wait_until, lambda: e.status().active_jobs == 0, 60)
        return e.status().models[0].cache

    status = asyncio.run(main())
    assert status.entries == 0 and status.bytes == 0


def test_usage_and_the_audit_row_report_cached_tokens(fast_model):
    from tests.test_daemon_audit import row_for

    with serving(fast_model) as server:
        client = server.openai()
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}]
        client.chat.completions.create(model=fast_model, messages=messages, max_tokens=4, temperature=0)
        raw = client.chat.completions.with_raw_response.create(
            model=fast_model, messages=messages, max_tokens=4, temperature=0
        )
        usage = raw.parse().usage
        assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1
        chunks = list(
            client.chat.completions.create(
                model=fast_model,
                messages=messages,
                max_tokens=4,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1
        row = row_for(server, raw.headers["x-request-id"])
        assert row["cached_tokens"] == usage.prompt_tokens - 1


def test_the_disk_tier_serves_a_known_prompt_after_a_restart_and_only_for_the_same_model(engine, tmp_path):
    from tests.models import build_model

    model = str(build_model(tmp_path / "model", "fast", seed=1))
    folder = tmp_path / "prompt-cache"
    prompt = "a conversation the daemon has seen before " * 12

    async def ask(e):
        _, finished = await run(e, GenerationRequest(model=model, prompt=prompt, max_tokens=4, sampling=GREEDY))
        return finished

    first = engine(cache_disk_folder=str(folder))
    assert asyncio.run(ask(first)).cached_tokens == 0
    first.stop()  # the memory tier goes to disk
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    assert {p.suffix for p in files} == {".json", ".safetensors"}
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in files)
    assert all(p.stat().st_mode & 0o777 == 0o700 for p in folder.iterdir())

    restarted = asyncio.run(ask(engine(cache_disk_folder=str(folder))))
    assert restarted.cached_tokens == restarted.prompt_tokens - 1

    build_model(tmp_path / "model", "fast", seed=2)  # other weights at the same path
    assert asyncio.run(ask(engine(cache_disk_folder=str(folder)))).cached_tokens == 0


def test_a_corrupt_disk_entry_is_a_miss_and_goes(engine, tmp_path, fast_model, caplog):
    folder = tmp_path / "prompt-cache"
    prompt = "a prompt whose cache file will be damaged " * 12

    async def ask(e):
        _, finished = await run(e, GenerationRequest(model=fast_model, prompt=prompt, max_tokens=4, sampling=GREEDY))
        return finished

    first = engine(cache_disk_folder=str(folder))
    asyncio.run(ask(first))
    first.stop()
    [data] = folder.rglob("*.safetensors")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])  # truncated
    finished = asyncio.run(ask(engine(cache_disk_folder=str(folder))))
    assert finished.cached_tokens == 0
    assert not data.exists()
    assert "unreadable" in caplog.text


def test_a_short_shared_prefix_takes_only_its_tokens_and_leaves_the_entry_whole(fast_model):
    # Prompts that share a system prompt with a long conversation: reusing it must not copy the
    # conversation's whole state, and reading on from it must not touch the entry.
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_manager.engine.prompt_cache import PromptCache

    model, _ = load(fast_model)
    history = [(7 * i) % 500 + 3 for i in range(600)]
    state = make_prompt_cache(model)
    model(mx.array(history)[None], cache=state)
    cached = PromptCache(max_bytes=1 << 30, max_entries=8)
    cached.store(history, state)
    entry = cached._lru[tuple(history)].cache
    before = [np.array(layer.keys[..., :600, :]) for layer in entry]

    prompt = history[:40] + [500, 501, 502, 503]  # (the model has 512 tokens)
    got, reused = cached.fetch(prompt)
    assert reused == 40 and all(layer.keys.shape[2] == 40 and layer.offset == 40 for layer in got)
    assert cached.fetch(history[:5] + [500, 501, 502, 503]) == (None, 0)  # a few tokens are no hit (MIN_REUSE)
    logits = model(mx.array(prompt[40:])[None], cache=got)[0, -1]
    fresh = model(mx.array(prompt)[None], cache=make_prompt_cache(model))[0, -1]
    assert mx.allclose(logits, fresh, atol=1e-4).item()
    assert all(np.array_equal(np.array(layer.keys[..., :600, :]), b) for layer, b in zip(entry, before, strict=True))
    assert all(layer.offset == 600 for layer in entry)
