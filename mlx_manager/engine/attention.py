"""Attention on the CPU with a fast exponential, a block of queries at a time.

MLX's CPU backend has no fused attention: `mx.fast.scaled_dot_product_attention` there computes
all the scores, a softmax and the weighted sum. Its `exp` is scalar code, about 25 ns an element
on this class of machine, while an add or a multiply takes under 1 ns; and a prompt chunk's
scores (8 heads x 512 queries x 2,500 keys: 40 MB) pass through memory several times. At a
2,000-token context the attention is most of a prompt chunk's forward pass. The same holds for
every server built on MLX's CPU backend, mlx_lm.server included.

Here:
- the exponential is element-wise arithmetic that MLX compiles into one loop (`mx.compile` builds
  it with the system's C++ compiler, once per machine; it is cached on disk): e^x = 2^n e^r, with
  n the nearest integer to x / ln 2 (the float rounding trick), r the rest (ln 2 subtracted in two
  parts, so r is exact) and e^r a degree-6 polynomial, then 2^n put in the float's exponent bits.
  Its relative error is below 1e-6 (MLX's own `exp` has 4e-6);
- the queries go in blocks whose scores fit the CPU's cache (`BLOCK_SCORES`) through the softmax;
- a float32 cache's attention is computed in numpy, on MLX's buffers in place (`_in_numpy`): MLX's
  `cblas_sgemm` for a decode step's single row reads the cache about twice over (numpy's `matmul`
  calls `sgemv`), and numpy's `exp` is vectorized. A half-precision cache stays in MLX (numpy
  has no bfloat16, and no BLAS for float16) with the compiled exponential below;
- a batch whose cache is kept per sequence (sequence_caches.py) hands over each sequence's keys
  and values as they are, of their own lengths (`Ragged`): each sequence's attention is computed
  as it would be alone (`_per_sequence`), without the padding a batch's common array needs.

Everything else is MLX's computation: the scores in float32, the mask applied as -inf, the row
maximum subtracted (inside the exponential's pass, for a prompt's block), the weights cast to the
values' type; they are normalized after the product with the values, one pass less over them.
Measured on the "bench" test model (`benchmarks/conversation_steps.py --mlx-attention` for the
A/B): a 512-token chunk at a 2,000-token context, 450 ms instead of 800-1,000; 64 tokens at 3,000,
75 ms instead of 135-155 (numpy's, see `_in_numpy`, faster still); a decode round of 4 streams at
~2,700 tokens, 24 ms instead of 31 with numpy's products.

`install()` replaces `mx.fast.scaled_dot_product_attention` for the process, on the CPU only
(with Metal, MLX's fused kernel is used as it is). Small attentions (a decode step at a short
context), attention sinks and unusual masks go to MLX's own function.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

LOG2E = 1.4426950408889634
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 in two parts: n * LN2_HI is exact in float32
ROUND = 12582912.0  # 1.5 * 2^23: adding it rounds a float32 of magnitude < 2^22 to an integer
COEFFICIENTS = [1 / math.factorial(k) for k in range(6, -1, -1)]  # e^r, |r| <= ln(2)/2: error < 2e-7
MIN_SCORES = 1 << 13  # below this many scores, MLX's own attention (measured break-even here: ~8,000)
BLOCK_SCORES = 1 << 20  # scores computed at once (4 MiB): a prompt chunk's queries go in blocks

_original: list[Any] = []


def _exp_parts(x: Any) -> tuple[Any, Any]:
    """exp(x) for x <= 0 as (e^r, the bits of 2^n), x = n ln 2 + r; 0 below -88 (2^-127)."""
    import mlx.core as mx

    x = mx.maximum(x, -127 * math.log(2))
    t = x * LOG2E + ROUND
    n = t - ROUND
    r = (x - n * LN2_HI) - n * LN2_LO
    p = COEFFICIENTS[0]
    for c in COEFFICIENTS[1:]:
        p = p * r + c
    return p, (t - (ROUND - 127.0)).astype(mx.int32) << 23


def _exp(x: Any, shift: Any) -> Any:
    import mlx.core as mx

    p, bits = _exp_parts(x - shift)
    return p * bits.view(mx.float32)


_shapeless: list[Any] = []
TRACES = 32  # shapes the one-pass exponential keeps a trace of (about 35 KB each) before it starts over


class _Traced:
    """`_exp` compiled for each shape it is given, `TRACES` shapes at most: MLX keeps every
    shape's trace of a compiled function until the function goes, and looks them up one by one."""

    def __init__(self) -> None:
        self.shapes: set[tuple[tuple[int, ...], ...]] = set()
        self.compiled: Any = None

    def __call__(self, x: Any, shift: Any) -> Any:
        import mlx.core as mx

        shapes = (x.shape, shift.shape)
        if shapes not in self.shapes and (self.compiled is None or len(self.shapes) >= TRACES):
            self.compiled, self.shapes = mx.compile(_exp), set()
        self.shapes.add(shapes)
        return self.compiled(x, shift)


_traced = _Traced()


def fast_exp(x: Any, shift: Any = 0.0) -> Any:
    """exp(x - shift) of float32 `x`, `shift` (broadcast: a softmax's row maxima) >= x.

    A prompt's block of queries (more than one row) gets the one-pass kernel, the subtraction in
    it: MLX compiles the bit cast of 2^n into it only for a known shape, and a chunk's few shapes
    pay for their trace (measured on 1.8 M scores: 5 ms instead of 16-18). A decode step brings a
    new shape every time (tracing again cost about 0.5 ms of CPU a call), so its few scores go
    through the kernel compiled once for every shape, which leaves the cast and the product to two
    more passes."""
    import mlx.core as mx

    if x.ndim >= 2 and x.shape[-2] > 1:
        return _traced(x, mx.array(shift) if isinstance(shift, float) else shift)
    if not _shapeless:
        _shapeless.append(mx.compile(_exp_parts, shapeless=True))
    p, bits = _shapeless[0](x - shift)
    return p * bits.view(mx.float32)


def attention(
    queries: Any, keys: Any, values: Any, *, scale: float, mask: Any = None, sinks: Any = None, **options: Any
) -> Any:
    """`mx.fast.scaled_dot_product_attention`, with the fast exponential when it pays."""
    import mlx.core as mx

    original = _original[0]
    if not isinstance(keys, mx.array):  # a batch of sequences of their own lengths (engine/sequence_caches.py)
        plain_mask = isinstance(mask, str | None) and mask in (None, "causal")
        if sinks is not None or options or not plain_mask:
            raise NotImplementedError("attention sinks, options or a mask array over sequence caches")
        return _per_sequence(queries, keys.arrays, values.arrays, scale, mask)
    batch, heads, length, dim = queries.shape
    kv_heads, size = keys.shape[1], keys.shape[2]
    usual_mask = mask is None or mask == "causal" if isinstance(mask, str | None) else mask.ndim in (2, 4)
    if (
        sinks is not None
        or options  # a stream, or `force_fused`
        or not usual_mask
        or _mlx_own(queries.shape, keys.shape)
        or mx.default_device() != mx.cpu
    ):
        return original(queries, keys, values, scale=scale, mask=mask, sinks=sinks, **options)
    if _numpy_can_read(queries, keys, values, mask):
        return _in_numpy(queries, keys, values, scale, mask)
    q = (queries * scale).reshape(batch, kv_heads, heads // kv_heads, length, dim)
    keys_t, values = keys[:, :, None].swapaxes(-1, -2), values[:, :, None]
    out = [
        _softmax_weighted(q[..., first:last, :], keys_t, values, block_mask)
        for first, last, block_mask in _blocks(mx, mask, (batch, heads, kv_heads, length, size))
    ]
    joined = out[0] if len(out) == 1 else mx.concatenate(out, axis=-2)
    return joined.reshape(batch, heads, length, joined.shape[-1])


def _mlx_own(queries: tuple[int, ...], keys: tuple[int, ...]) -> bool:
    """Whether attention of these shapes goes to MLX's own function: too few scores to pay for
    ours, or query heads that do not group evenly over the kv heads."""
    batch, heads, length, _ = queries
    return batch * heads * length * keys[2] < MIN_SCORES or heads % keys[1] != 0


def _blocks(xp: Any, mask: Any, shape: tuple[int, int, int, int, int]) -> Iterator[tuple[int, int, Any]]:
    """The blocks of query rows whose scores stay in the CPU's cache through the softmax's passes:
    (first, last, the block's mask). `mask` is None, "causal", or an array of `xp` (mlx.core or
    numpy) of shape (length or 1, size) or (batch or 1, heads or 1, length or 1, size); a block's
    mask is True where a query sees a key, and a 4-D one is grouped by kv head, as the queries are:
    (batch or 1, kv_heads or 1, repeats or 1, rows or 1, size)."""
    batch, heads, kv_heads, length, size = shape
    if mask is not None and not isinstance(mask, str) and mask.ndim == 4:
        grouped = (kv_heads, heads // kv_heads) if mask.shape[1] > 1 else (1, 1)
        mask = mask.reshape(mask.shape[0], *grouped, *mask.shape[2:])
    rows = max(1, BLOCK_SCORES // (batch * heads * size))
    for first in range(0, length, rows):
        last = min(length, first + rows)
        if isinstance(mask, str):  # causal: query i (of the last `length` positions) sees keys up to its own
            yield first, last, xp.arange(size - length + first, size - length + last)[:, None] >= xp.arange(size)[None]
        elif mask is not None and mask.shape[-2] > 1:
            yield first, last, mask[..., first:last, :]
        else:
            yield first, last, mask


def _softmax_weighted(q: Any, keys_t: Any, values: Any, mask: Any) -> Any:
    import mlx.core as mx

    scores = (q @ keys_t).astype(mx.float32)  # (batch, kv_heads, repeats, rows, size)
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf) if mask.dtype == mx.bool_ else scores + mask.astype(mx.float32)
    weights = fast_exp(scores, mx.max(scores, axis=-1, keepdims=True))
    # Normalized after the product: a pass over the (rows, size) weights less.
    total = mx.sum(weights, axis=-1, keepdims=True)
    return ((weights.astype(values.dtype) @ values) / total).astype(values.dtype)


def _numpy_can_read(queries: Any, keys: Any, values: Any, mask: Any) -> bool:
    """Whether numpy can take these as they are: float32 (a half-precision model's are not)."""
    import mlx.core as mx

    masked = isinstance(mask, mx.array)
    return all(a.dtype == mx.float32 for a in (queries, keys, values)) and (
        not masked or mask.dtype in (mx.float32, mx.bool_)
    )


def _in_numpy(queries: Any, keys: Any, values: Any, scale: float, mask: Any) -> Any:
    """The attention of a float32 cache in numpy, on MLX's buffers in place.

    MLX's CPU backend computes every product with `cblas_sgemm`, which for a few rows packs the
    whole other operand (the keys, then the values) before it starts: a decode step's cache
    passes through memory about twice. numpy's `matmul` calls `sgemv` for one row; its `exp` is
    vectorized (about 0.5 ns an element here, against the compiled polynomial's 2-3). The inputs
    are evaluated here (the graph before the attention is computed now rather than a moment
    later) and read in place; only the result is copied back. Measured on the bench model's
    shapes: a decode step of 4 streams x 8 heads x 2,800 keys, ~3.6 ms instead of 6-7; a 70-query
    block at 2,600 keys, 13 ms instead of 23; 512 queries, 115 ms instead of 320."""
    import mlx.core as mx
    import numpy as np

    mx.eval(queries, keys, values, *([mask] if isinstance(mask, mx.array) else []))
    masks = np.asarray(mask) if isinstance(mask, mx.array) else mask
    return mx.array(_numpy_attention(np.asarray(queries), np.asarray(keys), np.asarray(values), scale, masks))


def _per_sequence(queries: Any, keys: list[Any], values: list[Any], scale: float, mask: Any) -> Any:
    """A batch's attention, each sequence (row of `queries`) over its own keys and values (`mask`:
    None or "causal", the same for each): what `attention` gives each alone, so a sequence's
    output, to the last bit, does not depend on the batch it is in. When every sequence alone
    would go to numpy (`_in_numpy`), all are computed into one buffer; else each goes to MLX's own
    attention, left lazy like the rest of the step (an evaluation here, before it was known which
    way they go, cut every decode step into one evaluation a layer: measured in process, rounds of
    4 single-turn requests, a decode step's CPU use 1.39 -> 1.63 cores and 5.5-7.0 ms -> 5.1-5.4)."""
    import mlx.core as mx
    import numpy as np

    one, pairs = (1, *queries.shape[1:]), list(zip(keys, values, strict=True))
    if any(_mlx_own(one, k.shape) or not _numpy_can_read(queries, k, v, None) for k, v in pairs):
        alone = [attention(queries[i : i + 1], k, v, scale=scale, mask=mask) for i, (k, v) in enumerate(pairs)]
        return mx.concatenate(alone)
    mx.eval(queries, keys, values)
    q = np.asarray(queries)
    out = np.empty((*q.shape[:-1], values[0].shape[-1]), np.float32)
    for i, (k, v) in enumerate(pairs):
        out[i : i + 1] = _numpy_attention(q[i : i + 1], np.asarray(k), np.asarray(v), scale, mask)
    return mx.array(out)


def _numpy_attention(queries: Any, k: Any, v: Any, scale: float, masks: Any) -> Any:
    """Attention over numpy arrays (queries (batch, heads, length, dim), keys and values (batch,
    kv_heads, size, dim)); `masks`: None, "causal" or a numpy array (see `_blocks`)."""
    import numpy as np

    batch, heads, length, dim = queries.shape
    kv_heads, size = k.shape[1], k.shape[2]
    repeats = heads // kv_heads
    q = queries.reshape(batch, kv_heads, repeats, length, dim) * np.float32(scale)
    out = np.empty((batch, kv_heads, repeats, length, v.shape[-1]), np.float32)
    for first, last, seen in _blocks(np, masks, (batch, heads, kv_heads, length, size)):
        block = q[..., first:last, :].reshape(batch, kv_heads, repeats * (last - first), dim)
        # The rows of a kv head's queries together: its keys are read once for all of them.
        # (A handful of rows go as keys @ queries^T: numpy's sgemv for one, a thin sgemm else.)
        if block.shape[-2] <= 8:
            scores = np.matmul(k, block.swapaxes(-1, -2)).swapaxes(-1, -2)
        else:
            scores = np.matmul(block, k.swapaxes(-1, -2))
        scores = scores.reshape(batch, kv_heads, repeats, last - first, size)
        if seen is not None and seen.dtype == np.bool_:
            np.copyto(scores, np.float32(-np.inf), where=~seen)
        elif seen is not None:  # additive
            scores += seen
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        total = scores.sum(axis=-1, keepdims=True)
        weighted = np.matmul(scores.reshape(batch, kv_heads, -1, size), v)
        out[..., first:last, :] = weighted.reshape(batch, kv_heads, repeats, last - first, -1) / total
    return out.reshape(batch, heads, length, v.shape[-1])


def installed() -> bool:
    """Whether `attention` computes every model's attention in this process (see `install`)."""
    return bool(_original)


def install() -> bool:
    """Use `attention` for every model in this process when MLX computes on the CPU; whether it is."""
    import mlx.core as mx

    if _original:
        return True
    if mx.metal.is_available():
        return False
    _original.append(mx.fast.scaled_dot_product_attention)
    mx.fast.scaled_dot_product_attention = attention  # type: ignore[assignment]
    return True
