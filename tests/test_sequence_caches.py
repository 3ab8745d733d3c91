"""A batch's cache kept per sequence (mlx_manager/engine/sequence_caches.py): mlx-lm's
`BatchGenerator` over it must say what it says over its own `BatchKVCache`, token for token, with
sequences of different lengths joining and leaving; the state a finished sequence hands over
must be its own arrays (nothing copied); and a model it does not fit keeps mlx-lm's cache."""

from __future__ import annotations

import copy

import mlx.core as mx
import pytest

from mlx_manager.engine import attention

pytestmark = pytest.mark.skipif(mx.metal.is_available(), reason="with Metal, batches keep mlx-lm's cache")


@pytest.fixture(scope="module")
def model(fast_model):
    from mlx_lm import load

    attention.install()
    return load(fast_model)[0]


def _prefilled(model, prompt: list[int]) -> list:
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.array(prompt[:-1])[None], cache=cache)
    mx.eval([layer.state for layer in cache])
    return cache


PROMPTS = [[5 + i % 300 for i in range(n)] for n in (40, 7, 130, 64)]
MAX_TOKENS = [30, 12, 25, 18]  # the second leaves early; the last two join after a few steps


def _generate(model, by_sequence: bool) -> tuple[dict[int, list[int]], dict[int, tuple], list[type]]:
    """Greedy tokens a sequence, the (tokens, keys) of each finished sequence's handed-over state,
    and the cache types the running batch held."""
    from mlx_lm.generate import BatchGenerator

    from mlx_manager.engine.sequence_caches import SequenceCache

    generator = BatchGenerator(model, stop_tokens=[], completion_batch_size=8, prefill_batch_size=8)
    tokens: dict[int, list[int]] = {}
    handed: dict[int, tuple] = {}
    seen: list[type] = []

    def insert(i: int) -> None:
        cache = _prefilled(model, PROMPTS[i])
        if by_sequence:
            cache = [SequenceCache.adopt(layer) for layer in cache]
        (uid,) = generator.insert(
            [PROMPTS[i][-1:]], max_tokens=[MAX_TOKENS[i]], caches=[cache], all_tokens=[PROMPTS[i][:-1]]
        )
        tokens[uid] = []

    insert(0)
    insert(1)
    for step in range(60):
        if step == 3:
            insert(2)
        if step == 5:
            insert(3)
        _, responses = generator.next()
        seen += [type(layer) for layer in generator._generation_batch.prompt_cache]
        for r in responses:
            tokens[r.uid].append(r.token)
            if r.finish_reason is not None:
                handed[r.uid] = (list(r.all_tokens), r.prompt_cache)
        if len(handed) == len(PROMPTS):
            break
    generator.close()
    return tokens, handed, seen


def test_a_batch_of_sequence_caches_says_what_mlx_lm_batch_cache_says(model):
    from mlx_lm.models.cache import BatchKVCache, KVCache

    from mlx_manager.engine.sequence_caches import SequenceCaches

    theirs, their_states, their_types = _generate(model, by_sequence=False)
    ours, our_states, our_types = _generate(model, by_sequence=True)
    assert set(their_types) == {BatchKVCache} and set(our_types) == {SequenceCaches}
    assert ours == theirs and [len(t) for t in ours.values()] == MAX_TOKENS
    for uid, (held, cache) in our_states.items():
        their_held, their_cache = their_states[uid]
        assert held == their_held  # the prompt and every token but the last, as mlx-lm hands them over
        assert all(type(layer) is KVCache and layer.offset == len(held) for layer in cache)
        for mine, other in zip(cache, their_cache, strict=True):
            k, _ = mine.keys_and_values()
            assert mx.allclose(k, other.keys[..., : other.offset, :], atol=1e-5).item()


def test_joining_leaving_and_handing_over_copy_nothing(model):
    from mlx_manager.engine.sequence_caches import SequenceCache, SequenceCaches

    caches = [SequenceCache.adopt(_prefilled(model, prompt)[0]) for prompt in PROMPTS]
    arrays = [cache.keys for cache in caches]
    batch = SequenceCache.merge(caches[:2])
    batch.extend(SequenceCache.merge(caches[2:]))
    batch.filter([0, 2, 3])
    assert [cache.keys for cache in batch.caches] == [arrays[0], arrays[2], arrays[3]]  # the same arrays
    handed = batch.extract(1)
    assert handed.keys is arrays[2] and handed.offset == len(PROMPTS[2]) - 1
    copied = copy.deepcopy(batch)
    assert isinstance(copied, SequenceCaches) and copied.caches[0] is not batch.caches[0]
    assert copied.caches[0].keys is arrays[0]


def test_models_it_does_not_fit_keep_mlx_lm_batch_cache(model, monkeypatch):
    from mlx_lm.models.cache import RotatingKVCache

    from mlx_manager.engine.sequence_caches import batches_by_sequence

    assert batches_by_sequence(model)

    class SlidingWindow:  # a model whose layers keep a rotating window: not a plain KV cache
        def __init__(self, inner):
            self.inner, self.layers = inner, inner.layers

        def __call__(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

        def make_cache(self):
            return [RotatingKVCache(max_size=64) for _ in self.layers]

    assert not batches_by_sequence(SlidingWindow(model))

    class ReadsTheKeys:  # a model that does more with the keys than hand them to the attention
        def __init__(self, inner):
            self.inner, self.layers = inner, inner.layers

        def __call__(self, inputs, cache=None):
            if cache is not None and cache[0].size() > 0:
                zeros = mx.zeros((inputs.shape[0], 4, 1, 16))
                keys, _ = cache[0].update_and_fetch(zeros, zeros)
                _ = keys.shape  # mlx-lm's batch cache gives an array here; the sequence caches do not
                cache[0].trim(1)
            return self.inner(inputs, cache=cache)

    assert not batches_by_sequence(ReadsTheKeys(model))
    monkeypatch.setattr(attention, "_original", [])  # the engine does not compute the attention (Metal)
    assert not batches_by_sequence(model)


@pytest.mark.parametrize(
    ("sizes", "alone_in_numpy"),
    [((5, 9, 3), [False] * 3), ((2500, 3100, 2800), [True] * 3), ((40, 3100, 900), [False, True, False])],
    ids=["short", "long", "mixed"],
)
def test_each_sequence_gets_what_it_would_get_alone_to_the_bit(model, sizes, alone_in_numpy):
    # A request's logprobs must not depend on who else is in the batch: short attentions go to
    # MLX's own function alone, long ones to numpy; a batch does the same for each sequence.
    from mlx_manager.engine.sequence_caches import Ragged

    assert [4 * n >= attention.MIN_SCORES for n in sizes] == alone_in_numpy  # else MLX's own function
    queries = mx.random.normal((len(sizes), 4, 1, 16), key=mx.random.key(1))
    keys = [mx.random.normal((1, 4, n, 16), key=mx.random.key(10 + i)) for i, n in enumerate(sizes)]
    values = [mx.random.normal((1, 4, n, 16), key=mx.random.key(20 + i)) for i, n in enumerate(sizes)]
    batch = mx.fast.scaled_dot_product_attention(queries, Ragged(keys), Ragged(values), scale=0.25, mask=None)
    for i, (k, v) in enumerate(zip(keys, values, strict=True)):
        alone = mx.fast.scaled_dot_product_attention(queries[i : i + 1], k, v, scale=0.25, mask=None)
        assert mx.array_equal(batch[i : i + 1], alone).item()
