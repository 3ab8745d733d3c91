"""The engine's CPU attention (mlx_manager/engine/attention.py) and malloc tuning (allocator.py).

The attention must give what MLX's own `mx.fast.scaled_dot_product_attention` gives, for every
mask a model hands it; the models' greedy output must not change."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_manager.engine import attention

pytestmark = pytest.mark.skipif(mx.metal.is_available(), reason="with Metal, MLX's fused attention is used as it is")


@pytest.fixture(scope="module")
def mlx_own():
    attention.install()
    return attention._original[0]


@pytest.mark.parametrize("shape", [(100_001,), (1, 8, 1, 2, 6_250 + 1)], ids=["a decode step's", "a prompt block's"])
def test_the_fast_exponential_is_as_exact_as_mlx_own(shape):
    x = np.linspace(-87, 0, int(np.prod(shape)), dtype=np.float32).reshape(shape)
    exact = np.exp(x.astype(np.float64))
    fast = np.array(attention.fast_exp(mx.array(x)))
    assert np.max(np.abs(fast - exact) / exact) < 1e-6
    assert np.max(np.abs(np.array(mx.exp(mx.array(x))) - exact) / exact) > 1e-6  # MLX's own is coarser
    assert np.array(attention.fast_exp(mx.array([-np.inf, -200.0, 0.0], dtype=mx.float32))).tolist() == [0, 0, 1]


def test_the_prompt_blocks_exponential_keeps_a_bounded_number_of_traces():
    # MLX keeps a compiled function's trace of every shape it saw: a long-running daemon reads
    # prompts of every length.
    for size in range(100, 100 + 3 * attention.TRACES):
        x = -mx.abs(mx.random.normal((8, 2, size)))
        assert mx.allclose(attention.fast_exp(x), mx.exp(x), rtol=1e-5).item()
    assert 0 < len(attention._traced.shapes) <= attention.TRACES


def _causal(length: int, size: int) -> mx.array:
    return mx.arange(size - length, size)[:, None] >= mx.arange(size)[None]


CASES = {
    "prompt chunk, causal": ((1, 8, 8, 64, 1500, 32), "causal"),
    "prompt chunk over several blocks, causal": ((1, 8, 8, 300, 2600, 32), "causal"),
    "left-padded batch over several blocks": ((3, 8, 4, 140, 2000, 32), "padded"),
    "grouped query heads": ((1, 8, 2, 16, 1016, 64), "causal"),
    "decode batch, no mask": ((4, 8, 8, 1, 3000, 32), None),
    "decode batch, left-padded": ((3, 8, 8, 1, 2500, 32), "padded"),
    "decode, grouped query heads": ((2, 8, 2, 1, 2100, 64), "causal"),
    "decode, additive mask": ((2, 4, 4, 1, 2200, 32), "additive"),
    "decode, per-head boolean mask": ((2, 4, 4, 1, 2300, 16), "per-head"),
    "left-padded batch, boolean mask": ((3, 8, 4, 5, 900, 32), "padded"),
    "additive mask": ((1, 4, 4, 32, 1200, 32), "additive"),
    "per-head boolean mask": ((2, 4, 4, 8, 1100, 16), "per-head"),
}


@pytest.mark.parametrize("case", CASES)
def test_attention_matches_mlx_own(mlx_own, case, monkeypatch):
    (batch, heads, kv_heads, length, size, dim), kind = CASES[case]
    queries = mx.random.normal((batch, heads, length, dim), key=mx.random.key(1))
    keys = mx.random.normal((batch, kv_heads, size, dim), key=mx.random.key(2))
    values = mx.random.normal((batch, kv_heads, size, dim), key=mx.random.key(3))
    mask: object = kind
    if kind == "padded":
        mask = _causal(length, size)[None, None] & (mx.array([0, 3, 100])[:, None, None, None] <= mx.arange(size))
    elif kind == "additive":
        mask = mx.where(_causal(length, size), 0.0, -1e9)
    elif kind == "per-head":
        mask = mx.random.uniform(shape=(batch, heads, length, size), key=mx.random.key(4)) > 0.3
    assert batch * heads * length * size >= attention.MIN_SCORES  # the fast path, not a fallback
    in_numpy = []
    numpy_path = attention._in_numpy
    monkeypatch.setattr(attention, "_in_numpy", lambda *args: in_numpy.append(1) or numpy_path(*args))
    expected = mlx_own(queries, keys, values, scale=dim**-0.5, mask=mask)
    got = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=dim**-0.5, mask=mask)
    assert in_numpy == [1]  # float32: numpy's products and exp
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert mx.allclose(got, expected, atol=1e-6, rtol=1e-5).item()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_models_get_mlx_own_rounding(mlx_own, dtype):
    kind = getattr(mx, dtype)
    queries = mx.random.normal((1, 8, 64, 32), key=mx.random.key(5)).astype(kind)
    keys, values = (mx.random.normal((1, 2, 1500, 32), key=mx.random.key(k)).astype(kind) for k in (6, 7))
    expected = mlx_own(queries, keys, values, scale=32**-0.5, mask="causal")
    got = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=32**-0.5, mask="causal")
    assert got.dtype == expected.dtype == kind
    assert mx.allclose(got.astype(mx.float32), expected.astype(mx.float32), atol=2e-3).item()


def test_small_or_unusual_attention_goes_to_mlx(mlx_own):
    queries, keys = mx.ones((1, 2, 1, 8)), mx.ones((1, 2, 4, 8))
    sinks = mx.zeros((2,))
    for mask, extra in ((None, {}), ("causal", {"sinks": sinks})):
        got = mx.fast.scaled_dot_product_attention(queries, keys, keys, scale=1.0, mask=mask, **extra)
        assert mx.array_equal(got, mlx_own(queries, keys, keys, scale=1.0, mask=mask, **extra)).item()


ALLOCATOR = """
import json
from mlx_manager.engine import allocator
print(json.dumps(allocator.tune()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
@pytest.mark.parametrize(("env", "tuned"), [({}, True), ({"MALLOC_TRIM_THRESHOLD_": "1000000"}, False)])
def test_malloc_is_tuned_unless_the_user_tuned_it(env, tuned):
    import os

    done = subprocess.run(
        [sys.executable, "-c", ALLOCATOR], capture_output=True, text=True, timeout=60, env={**os.environ, **env}
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) is tuned
