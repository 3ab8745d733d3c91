"""The tests' random models never end on their own: every answer runs to its `max_tokens`, so a
test may count tokens even when it samples at the default temperature."""

from __future__ import annotations

import random

import pytest

from tests.models import EOS


@pytest.mark.parametrize("name", ["fast_model", "slow_model"])
def test_end_of_sequence_is_far_below_every_other_token(request, name):
    import mlx.core as mx
    from mlx_lm import load

    model, tokenizer = load(request.getfixturevalue(name))
    assert tokenizer.eos_token_ids == {EOS}
    rng = random.Random(0)
    for _ in range(8):
        prompt = [rng.randrange(1, tokenizer.vocab_size) for _ in range(rng.randrange(1, 48))]
        logits = model(mx.array(prompt)[None])[0]
        below = logits.max(axis=-1) - logits[:, EOS]
        # e^-50: not once in any number of sampled tokens a test suite could draw.
        assert below.min().item() > 50
