"""Loading and unloading on request, with real tiny MLX models: the memory a load takes, an unload
refused while the model has jobs, and a forced one that ends those jobs cleanly first."""

from __future__ import annotations

import asyncio

import pytest

from mlx_manager.engine.config import EngineConfig
from mlx_manager.engine.engine import Engine
from mlx_manager.engine.errors import ModelBusy, ModelNotLoaded, ModelUnloaded
from mlx_manager.engine.types import GenerationRequest, SamplingParams, Started, TextDelta

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


def long_request(model: str) -> GenerationRequest:
    return GenerationRequest(model=model, prompt="hello", max_tokens=100_000, sampling=GREEDY)


async def started(job) -> None:
    """Wait until the job runs and has produced text."""
    async for event in job:
        if isinstance(event, TextDelta):
            return
        assert isinstance(event, Started)


def test_load_reports_memory_and_unload_frees_the_model(engine, fast_model):
    async def main():
        e = engine()
        status = await e.load(fast_model)
        assert status.model_id == fast_model and status.memory_bytes > 100_000  # the fast model's weights: ~600 kB
        assert e.status().models[0].memory_bytes == status.memory_bytes
        await e.unload(fast_model)
        assert e.status().loaded == []
        with pytest.raises(ModelNotLoaded, match="is not loaded"):
            await e.unload(fast_model)

    asyncio.run(main())


def test_unload_is_refused_while_the_model_has_jobs_and_forced_it_ends_them(engine, fast_model):
    async def main():
        e = engine(max_batch_size=1)
        running = e.submit(long_request(fast_model))
        await started(running)
        waiting = e.submit(long_request(fast_model))  # no slot: it waits for the running one
        while e.status().models[0].queued_jobs != 1:
            await asyncio.sleep(0.01)
        with pytest.raises(ModelBusy, match="2 job"):
            await e.unload(fast_model)
        assert e.status().loaded == [fast_model]

        await e.unload(fast_model, force=True)
        for job in (running, waiting):
            with pytest.raises(ModelUnloaded, match="was unloaded"):
                async for _ in job:
                    pass
        status = e.status()
        assert status.loaded == [] and status.active_jobs == 0 and status.queue_depth == 0
        # The engine goes on: the next request loads the model again.
        async for event in e.submit(GenerationRequest(model=fast_model, prompt="hi", max_tokens=4, sampling=GREEDY)):
            last = event
        assert last.completion_tokens == 4

    asyncio.run(main())
