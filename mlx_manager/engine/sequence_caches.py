"""A batch's KV cache kept as one cache per sequence, on the CPU: a sequence joining or leaving
the batch, or handing its state to the prompt cache, copies nothing.

mlx-lm's `BatchKVCache` keeps a batch in one padded array per layer. A sequence joining is copied
into a new one (`merge`), copied again with the batch's copy before it splits off (`deepcopy`),
and then every running sequence is copied with it into a padded array for all of them
(`extend`); one leaving is copied out (`extract`) and the others gathered into a smaller array
(`filter`). At a conversation's context (2,600 tokens on the bench model: 21 MB a sequence) each
turn's join and finish moved hundreds of megabytes, and a decode step read every sequence's keys
padded to the longest.

`SequenceCaches` holds each sequence's own `KVCache` instead: a decode step writes each sequence's
new key and value into its cache (mlx-lm's `KVCache.update_and_fetch`, in place) and gives the
attention each sequence's keys as they are (`Ragged`), which engine/attention.py reads one
sequence at a time. Joining appends a sequence, leaving drops it, a finished sequence's state is
its own cache. Used where the engine computes the attention itself (the CPU) and only for models
whose every layer has a plain `KVCache` and whose batched step gives mlx-lm's logits
(`batches_by_sequence`, checked once per model).

Measured through the server on the conversation workload of benchmarks/bench_prompt_cache.py: a
step in which a turn joined or finished took 60-85 ms more than a decode round with mlx-lm's
cache, about nothing more now; a decode round of 4 streams at ~2,700 tokens, 11.3 ms instead of
13.4 (median). This module imports mlx-lm: import it on the inference thread, when needed.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from mlx_lm.models.cache import KVCache, _BaseCache

log = logging.getLogger("mlx_manager.engine")


class Ragged:
    """The keys (or the values) of a batch, one array a sequence: (1, kv_heads, its length, dim)."""

    def __init__(self, arrays: list[Any]) -> None:
        self.arrays = arrays


def _own(cache: KVCache, kind: type[KVCache] = KVCache) -> Any:
    """A cache object of its own over the same arrays (MLX copies a shared array on a write)."""
    mine = kind()
    mine.keys, mine.values, mine.offset = cache.keys, cache.values, cache.offset
    return mine


class SequenceCache(KVCache):
    """A plain `KVCache` that batches into `SequenceCaches` (mlx-lm merges the caches of sequences
    joining a batch with the first one's `merge`)."""

    @classmethod
    def adopt(cls, cache: KVCache) -> SequenceCache:
        return _own(cache, cls)

    @classmethod
    def merge(cls, caches: list[Any]) -> SequenceCaches:
        return SequenceCaches(list(caches))


class SequenceCaches(_BaseCache):
    """One layer's caches of a batch, one `KVCache` a sequence (what mlx-lm's `GenerationBatch`
    needs of a `BatchKVCache`)."""

    def __init__(self, caches: list[KVCache]) -> None:
        self.caches = caches
        self._offset: Any = None

    @property
    def offset(self) -> Any:
        """Each sequence's length (the models' rotary embeddings take one position a row)."""
        import mlx.core as mx

        if self._offset is None:
            self._offset = mx.array([cache.offset for cache in self.caches])
        return self._offset

    def update_and_fetch(self, keys: Any, values: Any) -> tuple[Ragged, Ragged]:
        fetched = [cache.update_and_fetch(keys[i : i + 1], values[i : i + 1]) for i, cache in enumerate(self.caches)]
        self._offset = None
        return Ragged([k for k, _ in fetched]), Ragged([v for _, v in fetched])

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None, **_: Any) -> Any:
        """No mask for a step of one token (each sequence sees all its keys); causal for more, per
        sequence (every sequence then reads the same number of tokens: see `prepare`)."""
        if window_size is not None:
            raise NotImplementedError("sequence caches have no sliding window")
        return None if N == 1 else "causal"

    def prepare(self, *, left_padding: Any = None, lengths: Any = None, right_padding: Any = None) -> None:
        if any(left_padding or ()) or any(right_padding or ()):
            raise NotImplementedError("sequence caches read prompts of one length (the engine gives one token)")

    def finalize(self) -> None:
        pass

    def filter(self, batch_indices: Any) -> None:
        self.caches = [self.caches[int(i)] for i in batch_indices]
        self._offset = None

    def extend(self, other: SequenceCaches) -> None:
        self.caches = self.caches + other.caches
        self._offset = None

    def extract(self, idx: int) -> KVCache:
        return _own(self.caches[idx])

    def __deepcopy__(self, memo: dict) -> SequenceCaches:
        return SequenceCaches([_own(cache) for cache in self.caches])

    @property
    def state(self) -> list[Any]:
        return [array for cache in self.caches for array in (cache.keys, cache.values) if array is not None]

    @state.setter
    def state(self, value: Any) -> None:
        raise NotImplementedError("sequence caches are not rebuilt from a state")

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        return min((cache.trim(n) for cache in self.caches), default=0)

    def size(self) -> int:
        return max((cache.offset for cache in self.caches), default=0)

    def empty(self) -> bool:
        return all(cache.keys is None for cache in self.caches)

    @property
    def nbytes(self) -> int:
        return sum(cache.nbytes for cache in self.caches)


def batches_by_sequence(model: Any) -> bool:
    """Whether this model's batches may keep a cache per sequence: the engine computes the
    attention (the CPU), every layer's cache is a plain `KVCache`, and a decode step of two
    sequences of different lengths gives the logits of mlx-lm's `BatchKVCache` (a model that does
    more with the keys than hand them to the attention fails this and keeps mlx-lm's)."""
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

    from mlx_manager.engine import attention

    if not attention.installed() or any(type(layer) is not KVCache for layer in make_prompt_cache(model)):
        return False
    try:
        sequences = []
        for prompt in ([1, 2, 3, 4, 5], [6, 7]):
            cache = make_prompt_cache(model)
            model(mx.array(prompt)[None], cache=cache)
            sequences.append(cache)
        copies = copy.deepcopy(sequences)
        theirs = [BatchKVCache.merge([c[i] for c in sequences]) for i in range(len(sequences[0]))]
        ours = [SequenceCaches([SequenceCache.adopt(c[i]) for c in copies]) for i in range(len(theirs))]
        step = mx.array([[3], [8]])
        expected, got = model(step, cache=theirs)[:, -1], model(step, cache=ours)[:, -1]
        tolerance = 1e-4 if expected.dtype == mx.float32 else 2e-2
        same = bool(mx.allclose(expected, got, rtol=tolerance, atol=tolerance).item())
    except Exception as error:  # noqa: BLE001 - any failure means: keep mlx-lm's batch cache
        log.info("batches keep mlx-lm's batch cache (per-sequence caches failed: %s)", error)
        return False
    if not same:
        log.info("batches keep mlx-lm's batch cache (per-sequence caches gave other logits)")
    return same
