"""The engine with real tiny MLX models: batching, determinism, cancellation, the pool, the queue."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable

import pytest

from mlx_manager.engine.config import EngineConfig
from mlx_manager.engine.engine import Engine
from mlx_manager.engine.errors import (
    ChatTemplateMissing,
    GenerationFailed,
    InvalidRequest,
    ModelNotAllowed,
    ModelNotFound,
    Overloaded,
)
from mlx_manager.engine.types import Finished, GenerationRequest, SamplingParams, Started, TextDelta
from tests.daemon_server import wait_until

GREEDY = SamplingParams(temperature=0)


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


async def collect(job):
    """Run a job to its end: (text, Finished event, events seen)."""
    text, events = [], []
    async for event in job:
        events.append(event)
        if isinstance(event, TextDelta):
            text.append(event.text)
    return "".join(text), events[-1], events


async def until(predicate: Callable[[], object], timeout: float = 60) -> bool:
    """Await a state the engine's thread will reach; the timeout is a generous ceiling, not a deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def request(model, prompt="hello", max_tokens=24, **kw) -> GenerationRequest:
    sampling = kw.pop("sampling", GREEDY)
    return GenerationRequest(model=model, prompt=prompt, max_tokens=max_tokens, sampling=sampling, **kw)


def test_events_and_usage(engine, fast_model):
    async def main():
        e = engine()
        text, finished, events = await collect(e.submit(request(fast_model, max_tokens=16)))
        assert isinstance(events[0], Started) and events[0].prompt_tokens > 0
        assert finished == Finished("length", events[0].prompt_tokens, 16)
        assert text

    asyncio.run(main())


def test_chat_uses_the_template(engine, fast_model):
    async def main():
        e = engine()
        job = e.submit(GenerationRequest(model=fast_model, messages=[{"role": "user", "content": "hi"}], max_tokens=4))
        _, finished, events = await collect(job)
        # <|user|> hi <|end|> <|assistant|>: the template's tokens around one word.
        assert events[0].prompt_tokens >= 4
        assert finished.completion_tokens == 4

    asyncio.run(main())


def test_greedy_is_deterministic_alone_and_in_a_batch_of_8(engine, fast_model):
    async def main():
        e = engine()
        prompts = [f"prompt number {i} says" for i in range(8)]
        alone = [await collect(e.submit(request(fast_model, p, 32))) for p in prompts]
        together = await asyncio.gather(*(collect(e.submit(request(fast_model, p, 32))) for p in prompts))

        # Some join while others are already generating (continuous batching).
        async def late(i, p):
            await asyncio.sleep(0.003 * i)
            return await collect(e.submit(request(fast_model, p, 32)))

        staggered = await asyncio.gather(*(late(i, p) for i, p in enumerate(prompts)))
        assert [t for t, _, _ in together] == [t for t, _, _ in alone]
        assert [t for t, _, _ in staggered] == [t for t, _, _ in alone]
        assert len({t for t, _, _ in alone}) > 1  # the prompts really give different texts

    asyncio.run(main())


def test_eight_concurrent_jobs_finish_with_their_own_limits(engine, fast_model):
    async def main():
        e = engine()
        jobs = [e.submit(request(fast_model, f"job {i}", max_tokens=5 + i)) for i in range(8)]
        results = await asyncio.gather(*(collect(j) for j in jobs))
        for i, (_, finished, _) in enumerate(results):
            assert finished.finish_reason == "length"
            assert finished.completion_tokens == 5 + i
        assert e.status().active_jobs == 0

    asyncio.run(main())


def test_stop_strings_end_the_text_and_are_not_sent(engine, fast_model):
    async def main():
        e = engine()
        full, _, _ = await collect(e.submit(request(fast_model, "stop test", 40)))
        stop = full[10:13]
        assert len(stop) == 3
        text, finished, _ = await collect(e.submit(request(fast_model, "stop test", 40, stop=[stop])))
        assert finished.finish_reason == "stop"
        assert text == full[: full.index(stop)]
        assert finished.completion_tokens < 40

    asyncio.run(main())


def test_seed_makes_sampling_repeatable(engine, fast_model):
    async def main():
        e = engine()
        seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
        a = await collect(e.submit(request(fast_model, "sample", 24, sampling=seeded)))
        b = await collect(e.submit(request(fast_model, "sample", 24, sampling=seeded)))
        reseeded = SamplingParams(temperature=1.0, seed=99)
        other = await collect(e.submit(request(fast_model, "sample", 24, sampling=reseeded)))
        assert a[0] == b[0]
        assert a[0] != other[0]

    asyncio.run(main())


def test_cancel_stops_within_one_step_and_others_finish(engine, slow_model):
    async def main():
        e = engine()
        victim = e.submit(request(slow_model, "the victim", max_tokens=2000))
        other = e.submit(request(slow_model, "the survivor", max_tokens=12))
        other_task = asyncio.create_task(collect(other))
        seen = 0
        async for event in victim:
            if isinstance(event, TextDelta):
                seen += 1
            if victim.completion_tokens >= 3:
                break
        at_cancel = victim.completion_tokens
        victim.cancel()
        _, finished, _ = await other_task
        assert await until(lambda: victim.done and victim.stopped_at is not None)
        assert victim.completion_tokens <= at_cancel + 1  # let go within one step
        assert finished == Finished("length", finished.prompt_tokens, 12)
        assert await until(lambda: e.status().active_jobs == 0)

    asyncio.run(main())


def test_cancel_while_waiting_for_a_slot(engine, fast_model):
    async def main():
        e = engine(max_batch_size=1)
        first = e.submit(request(fast_model, max_tokens=200))
        waiting = e.submit(request(fast_model, max_tokens=200))
        waiting.cancel()
        await collect(first)
        assert await until(lambda: waiting.done)
        assert waiting.completion_tokens == 0
        assert await until(lambda: e.status().queue_depth == 0)

    asyncio.run(main())


def test_a_cancelled_waiting_job_leaves_the_queue_at_once(engine, slow_model):
    """Not when the worker next looks (after the running job's step): at the cancel itself."""

    async def main():
        e = engine(max_batch_size=1)
        running = e.submit(request(slow_model, max_tokens=5000))
        async for event in running:
            if isinstance(event, Started):
                break
        waiting = [e.submit(request(slow_model, max_tokens=5)) for _ in range(3)]
        assert e.status().queue_depth == 3
        waiting[1].cancel()
        assert e.status().queue_depth == 2  # at once, from the caller's thread
        assert await asyncio.to_thread(wait_until, lambda: waiting[1].done, 10)
        # And out of the worker's line too (its next snapshot counts the two others).
        assert await asyncio.to_thread(wait_until, lambda: e.status().models[0].queued_jobs == 2, 10)
        for job in (waiting[0], waiting[2]):
            job.cancel()
        assert e.status().queue_depth == 0
        running.cancel()
        assert await asyncio.to_thread(wait_until, lambda: e.status().active_jobs == 0, 10)
        assert e.status().queue_depth == 0

    asyncio.run(main())


async def stream_tokens_while_read(e: Engine, model: str, prompt: list[int], warm: int = 0) -> int:
    """A stream decodes (at least `warm` tokens first); `prompt` arrives: how many tokens the
    stream got between the prompt's start and its first (and only) token."""
    stream = e.submit(request(model, "a running stream", max_tokens=100000))
    async for event in stream:
        if isinstance(event, TextDelta):
            break
    assert await until(lambda: stream.completion_tokens > warm)
    joining = e.submit(GenerationRequest(model=model, prompt=prompt, max_tokens=1, sampling=GREEDY))
    async for event in joining:
        if isinstance(event, Started):
            break
    before = stream.completion_tokens
    await collect(joining)
    during = stream.completion_tokens - before
    stream.cancel()
    return during


def test_a_long_prompt_is_read_between_the_tokens_of_running_streams(engine, fast_model, monkeypatch):
    """While a stream decodes, a long prompt arriving is read in a burst and then in time-boxed
    reads, each followed by GAP_ROUNDS decode-only rounds, not `prefill_chunk` at once: the stream
    keeps getting tokens all through the prefill, and at most one of its tokens in GAP_ROUNDS + 1
    waits for a read."""
    from mlx_manager.engine.batch import ModelBatch
    from mlx_manager.engine.pacing import GAP_ROUNDS, Plan

    steps: list[tuple[bool, int]] = []  # (a stream was decoding, prompt tokens read) of each step
    real = ModelBatch.step

    def counted(self: ModelBatch, plan: Plan) -> tuple[list, int]:
        decoding = self.streams > 0
        finished, read = real(self, plan)
        steps.append((decoding, read))
        return finished, read

    monkeypatch.setattr(ModelBatch, "step", counted)
    prompt = list(range(10, 500)) * 6  # 2,940 tokens: 6 chunks of 512 at once
    during = asyncio.run(stream_tokens_while_read(engine(prefill_chunk=512), fast_model, prompt, warm=5))
    # Unpaced, each of the 6 chunks holds up the stream once: about 6 tokens during the prefill.
    assert during > 3 * (len(prompt) // 512), during
    reads = [i for i, (decoding, read) in enumerate(steps) if decoding and read]
    assert len(reads) >= 2, steps  # the burst did not read it all: paced reads followed
    assert sum(read for _, read in steps) >= len(prompt), steps
    # A read is one step (the joining prompt's last token: one more); the rounds between reads read nothing.
    gaps = [b - a - 1 for a, b in zip(reads, reads[1:], strict=False) if b - a > 1]
    assert gaps and min(gaps) >= GAP_ROUNDS, gaps


def test_a_short_prompt_joining_running_streams_is_read_in_one_burst(engine, fast_model):
    """A conversation's next turn (or any short prompt) joining while a stream decodes is read
    alone in one step, not paced a token or two a step: its first token comes after about one
    step of the running stream, which waits that once."""
    prompt = list(range(10, 74))  # 64 new tokens
    # warm: the engine times a decode round alone first (the burst is sized in decode rounds).
    during = asyncio.run(stream_tokens_while_read(engine(prefill_chunk=512), fast_model, prompt, warm=20))
    # Paced, 64 tokens take dozens of steps; in a burst, the stream gets a token or two meanwhile.
    assert during <= 3, during


def test_a_joining_prompts_first_read_is_sized_from_the_models_last_read(fast_model, monkeypatch):
    """Each read passes through the whole KV cache once, so a conversation's next turn should be
    one read: its first is sized from the last timed read of any prompt of the model; with none
    timed yet, it starts at FIRST_READ tokens and grows."""
    from types import SimpleNamespace

    from mlx_lm import load

    from mlx_manager.engine import batch
    from mlx_manager.engine.pacing import Box

    reads: list[int] = []
    real = batch.read_chunk
    monkeypatch.setattr(
        batch, "read_chunk", lambda entry, cache, chunk: reads.append(len(chunk)) or real(entry, cache, chunk)
    )
    entry = SimpleNamespace(model=load(fast_model)[0])
    box = Box(seconds=30.0, tokens=512)
    first = batch.Prefill(entry, [], None, [], list(range(10, 70)))  # type: ignore[arg-type]
    first.read_for(box)
    assert reads[0] == batch.FIRST_READ and sum(reads) == 59, reads
    reads.clear()
    joining = batch.Prefill(entry, [], None, [], list(range(20, 80)))  # type: ignore[arg-type]
    joining.read_for(box, first.per_token)
    assert reads == [59]  # all but its last token (each choice's own) at once


def test_prompts_that_arrive_together_are_read_at_the_full_chunk(engine, fast_model, monkeypatch):
    """Nobody decodes while prompts are read, so no pacing: the lone job that starts first and
    moves into the batch when the second comes is still reading, and is not counted as decoding."""
    from mlx_manager.engine.batch import ModelBatch
    from mlx_manager.engine.pacing import Plan

    steps = []
    real = ModelBatch.step

    def counted(self: ModelBatch, plan: Plan) -> tuple[list, int]:
        steps.append(plan.chunk)
        return real(self, plan)

    monkeypatch.setattr(ModelBatch, "step", counted)

    async def main():
        e = engine(prefill_chunk=512)
        prompts = [list(range(10, 500)) * 6, list(range(11, 501)) * 6]  # 2,940 tokens each: 6 chunks of 512
        jobs = [e.submit(GenerationRequest(model=fast_model, prompt=p, max_tokens=1, sampling=GREEDY)) for p in prompts]
        await asyncio.gather(*(collect(job) for job in jobs))

    asyncio.run(main())
    assert all(chunk == 512 for chunk in steps), steps
    assert len(steps) <= 2 * 6 + 2, steps


def test_the_pacer_gives_a_burst_then_reads_between_runs_of_decode_rounds():
    from mlx_manager.engine.pacing import BURST_ROUNDS, GAP_ROUNDS, MAX_READS, READ_ROUNDS, Box, Plan, PrefillPacer

    pacer = PrefillPacer()
    assert pacer.plan(512, streams=0, prompts=2) == Plan(512)  # nobody waits: the whole chunk, each prompt
    # Nothing timed yet: a decode-only round (timed), or a joining prompt read in one go if it fits.
    assert pacer.plan(512, streams=4, prompts=1) == Plan(0, Box(None, 512))
    pacer.observe(0.010, decoding=True, prompt_tokens=0)
    burst, read = Box(BURST_ROUNDS * 0.010, 512), Box(READ_ROUNDS * 0.010, 512)
    assert pacer.plan(512, streams=4, prompts=1) == Plan(0, burst, read)
    pacer.observe(0.200, decoding=True, prompt_tokens=90)  # a read: the next waits GAP_ROUNDS decode rounds
    for _ in range(GAP_ROUNDS):
        plan = pacer.plan(512, streams=4, prompts=1)
        assert plan.chunk == 0 and plan.paced is None and plan.first is not None, plan
        pacer.observe(0.010, decoding=True, prompt_tokens=0)
    assert pacer.plan(512, streams=4, prompts=1).paced == Box(READ_ROUNDS * 0.010, 512)
    # One freak round does not move the time boxes; dearer rounds (a longer context, a busier machine) do.
    pacer.observe(5.0, decoding=True, prompt_tokens=0)
    assert pacer.decode_seconds == 0.010
    for _ in range(7):
        pacer.observe(0.020, decoding=True, prompt_tokens=0)
    assert pacer.plan(512, streams=4, prompts=1).paced == Box(READ_ROUNDS * 0.020, 512)
    assert pacer.plan(64, streams=4, prompts=1).paced == Box(READ_ROUNDS * 0.020, 64)  # never above the setting
    # More prompts waiting than streams decoding: longer reads (each waiting request about as much as each stream).
    assert pacer.plan(512, streams=1, prompts=2).paced == Box(2 * READ_ROUNDS * 0.020, 512)
    assert pacer.plan(512, streams=1, prompts=9).paced == Box(MAX_READS * READ_ROUNDS * 0.020, 512)


def test_queue_limit_refuses_with_overloaded(engine, slow_model):
    async def main():
        e = engine(max_batch_size=1, queue_limit=2)
        running = e.submit(request(slow_model, max_tokens=5000))
        async for event in running:
            if isinstance(event, Started):
                break
        waiting = [e.submit(request(slow_model, max_tokens=5)) for _ in range(2)]
        assert e.status().queue_depth == 2
        with pytest.raises(Overloaded) as refused:
            e.submit(request(slow_model, max_tokens=5))
        assert refused.value.retry_after > 0
        assert "server.queue_limit = 2" in str(refused.value)
        for job in [running, *waiting]:
            job.cancel()

    asyncio.run(main())


def test_allow_list_refuses_an_unlisted_model(engine, fast_model, no_template_model):
    async def main():
        e = engine(allowed=[fast_model])
        with pytest.raises(ModelNotAllowed, match="models.allowed"):
            await collect(e.submit(request(no_template_model)))
        await collect(e.submit(request(fast_model, max_tokens=2)))
        assert e.known_models() == [fast_model]

    asyncio.run(main())


def test_unknown_model_and_missing_template_are_clear_errors(engine, tmp_path, no_template_model):
    async def main():
        e = engine()
        with pytest.raises(ModelNotFound, match="neither a local folder nor"):
            await collect(e.submit(request(str(tmp_path / "nothing-here"))))
        with pytest.raises(ModelNotFound):
            await collect(e.submit(request("some-org/not-cached-model")))
        with pytest.raises(ChatTemplateMissing, match="no chat template"):
            messages = [{"role": "user", "content": "x"}]
            await collect(e.submit(GenerationRequest(model=no_template_model, messages=messages)))
        with pytest.raises(InvalidRequest, match="empty"):
            await collect(e.submit(request(no_template_model, prompt="")))
        # The thread is still serving.
        _, finished, _ = await collect(e.submit(request(no_template_model, max_tokens=3)))
        assert finished.completion_tokens == 3

    asyncio.run(main())


def test_lru_unloads_the_least_recently_used(engine, fast_model, tmp_path):
    a, b, c = fast_model, str(tmp_path / "b"), str(tmp_path / "c")
    shutil.copytree(fast_model, b)
    shutil.copytree(fast_model, c)

    async def main():
        e = engine(max_loaded=2)
        await e.load(a)
        await e.load(b)
        await collect(e.submit(request(a, max_tokens=2)))  # a is now the most recently used
        await e.load(c)
        assert sorted(e.status().loaded) == sorted([a, c])

    asyncio.run(main())


def test_keep_alive_unloads_an_idle_model(engine, fast_model):
    async def main():
        e = engine(keep_alive=0.5)
        await collect(e.submit(request(fast_model, max_tokens=2)))
        assert e.status().loaded == [fast_model]
        assert await until(lambda: not e.status().loaded)
        assert e.status().loaded == []

    asyncio.run(main())


def test_a_failing_step_fails_only_that_job(engine, fast_model, monkeypatch):
    """A sampler that raises inside the MLX step stands in for an MLX error in one job."""
    import mlx_manager.engine.sampling as sampling

    real = sampling.sampler_for

    def sampler_for(params):
        if params.seed == 666:

            def broken(logprobs):
                raise ValueError("simulated MLX failure")

            return broken
        return real(params)

    monkeypatch.setattr(sampling, "sampler_for", sampler_for)

    async def main():
        e = engine()
        healthy = e.submit(request(fast_model, "healthy", max_tokens=300))
        healthy_task = asyncio.create_task(collect(healthy))
        assert await until(lambda: healthy.completion_tokens > 0)  # generating: the broken job joins its batch
        broken = e.submit(request(fast_model, "broken", sampling=SamplingParams(temperature=1, seed=666)))
        with pytest.raises(GenerationFailed):
            await collect(broken)
        _, finished, _ = await healthy_task
        assert finished.completion_tokens == 300

    asyncio.run(main())


def test_a_loop_that_fails_answers_every_job_and_refuses_new_work(engine, fast_model, monkeypatch):
    """A bug that escapes the loop (not one job's step, which test_a_failing_step_fails_only_that_job
    covers) stops the engine: its jobs end with EngineStopped and new work is refused, not queued
    for a loop that is gone (which would wait forever)."""
    from mlx_manager.engine.errors import EngineStopped
    from mlx_manager.engine.worker import Worker

    real = Worker._step_batches

    def step_batches(self):
        if any(slot.job.completion_tokens for batch in self.batches.values() for slot in batch.slots.values()):
            raise RuntimeError("simulated bug in the loop")
        real(self)

    monkeypatch.setattr(Worker, "_step_batches", step_batches)

    async def main():
        e = engine()
        job = e.submit(request(fast_model, max_tokens=100))
        with pytest.raises(EngineStopped):
            await asyncio.wait_for(collect(job), 120)
        assert await until(lambda: not e.status().running)
        with pytest.raises(EngineStopped):
            e.submit(request(fast_model))
        with pytest.raises(EngineStopped):
            await asyncio.wait_for(e.load(fast_model), 120)
        with pytest.raises(EngineStopped):
            await asyncio.wait_for(e.count_tokens(request(fast_model)), 120)

    asyncio.run(main())


def test_stop_fails_waiting_jobs_and_refuses_new_ones(fast_model):
    from mlx_manager.engine.errors import EngineStopped

    async def main():
        e = Engine(EngineConfig(preload=[fast_model]))  # preloaded: its folder may be loaded by path
        e.start()
        job = e.submit(request(fast_model, max_tokens=100000))
        async for event in job:
            if isinstance(event, TextDelta):
                break
        await asyncio.wait_for(asyncio.to_thread(e.stop), 120)  # it does not wait for the 100000 tokens
        with pytest.raises(EngineStopped):
            await collect(job)
        with pytest.raises(EngineStopped):
            e.submit(request(fast_model))

    asyncio.run(main())


def test_deltas_that_piled_up_can_be_taken_at_once(engine, fast_model):
    async def main():
        e = engine()
        full, _, _ = await collect(e.submit(request(fast_model, "pile up", 40)))
        job = e.submit(request(fast_model, "pile up", 40))
        while not job.done:  # let the model run ahead of this consumer
            await asyncio.sleep(0.01)
        text = []
        async for event in job:
            if isinstance(event, TextDelta):
                text.append(event.text + job.take_ready_text())
        assert "".join(text) == full
        assert len(text) < 5  # far fewer pieces than tokens

    asyncio.run(main())
