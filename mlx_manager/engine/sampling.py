"""OpenAI sampling fields to mlx-lm samplers; a seeded request gets its own random key.

mlx-lm's samplers draw from MLX's global random state, which every job in a batch shares;
a request with a `seed` carries its own key so that its tokens depend on its seed alone.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler, make_sampler

from mlx_manager.engine.types import SamplingParams

Sampler = Callable[[mx.array], mx.array]


def sampler_for(params: SamplingParams) -> Sampler:
    if params.temperature == 0:
        return greedy_sampler  # shared object: a batch of greedy jobs samples in one call
    if params.seed is None:
        return make_sampler(temp=params.temperature, top_p=params.top_p, min_p=params.min_p, top_k=params.top_k)
    return _seeded_sampler(params, params.seed)


def _seeded_sampler(params: SamplingParams, seed: int) -> Sampler:
    key = mx.random.key(seed % 2**64)  # MLX takes a uint64; OpenAI clients may send any integer
    temp = params.temperature

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, subkey = mx.random.split(key)
        if 0 < params.top_p < 1.0:
            logprobs = apply_top_p(logprobs, params.top_p)
        if params.min_p > 0:
            logprobs = apply_min_p(logprobs, params.min_p)
        if params.top_k > 0:
            logprobs = apply_top_k(logprobs, params.top_k)
        return mx.random.categorical(logprobs * (1.0 / temp), key=subkey)

    return sample
