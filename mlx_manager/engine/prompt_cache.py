"""The prompt cache of one model: the KV state of earlier prompts, found by longest common prefix.

A job's prompt is looked up before it is prefilled: the longest cached prefix is restored (a
copy, so the entry stays valid for the next user; MLX shares the buffers until one side writes)
and only the rest of the prompt is computed. When a job ends, its state (prompt plus generated
tokens) is kept, so a conversation's next turn, which resends all of it, pays only for what is
new; two conversations with the same system prompt share that prefix.

A trimmable cache (plain KV) can serve any prefix of an entry: its copy is trimmed back to the
common prefix. A cache that cannot be trimmed (rotating windows that wrapped, state-space
layers) only serves prompts that extend an entry exactly. Entries are evicted least recently
used first, past `max_entries` or `max_bytes`; with a disk tier (prompt_cache_disk.py) they go
there instead of away, and come back when a prompt needs them. Runs on the inference thread only.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from mlx_manager.engine.prompt_cache_disk import DiskTier
from mlx_manager.engine.prompt_trie import Trie
from mlx_manager.engine.types import CacheStatus


def _prefix(cache: list[Any], reuse: int, length: int) -> list[Any]:
    """The state of the first `reuse` of an entry's `length` tokens, the entry left as it is.

    Plain KV layers get views of those tokens only: new arrays over the entry's buffers, which
    MLX copies on the first write (the next token always outgrows a view's length), so a chat
    template's few shared tokens do not copy a long conversation's whole state. Any other cache
    (rotating, quantized, state-space) is deep-copied and trimmed."""
    from mlx_lm.models.cache import KVCache

    if all(type(layer) is KVCache and layer.keys is not None for layer in cache):
        views = []
        for layer in cache:
            view = KVCache()
            view.keys, view.values = layer.keys[..., :reuse, :], layer.values[..., :reuse, :]
            view.offset = reuse
            views.append(view)
        return views
    copied = copy.deepcopy(cache)
    if reuse < length:
        for layer in copied:
            layer.trim(length - reuse)
    return copied


@dataclass
class _Entry:
    cache: list[Any]
    nbytes: int
    trimmable: bool


class PromptCache:
    def __init__(self, max_bytes: int, max_entries: int, disk: DiskTier | None = None) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.disk = disk
        self.hits = self.misses = self.cached_tokens = 0
        self.bytes = 0
        self._trie = Trie()
        self._lru: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()  # least recently used first

    def status(self) -> CacheStatus:
        disk = self.disk
        return CacheStatus(
            self.hits,
            self.misses,
            self.cached_tokens,
            len(self._lru),
            self.bytes,
            disk_entries=len(disk) if disk else 0,
            disk_bytes=disk.bytes if disk else 0,
        )

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0 and self.max_entries > 0

    def fetch(self, tokens: list[int]) -> tuple[list[Any] | None, int]:
        """(a copy of the cached state of the longest prefix of `tokens` it has, its length), or
        (None, 0). At least the last token is always left to compute: it gives the first logits."""
        if not self.enabled or len(tokens) < 2:
            return self._miss()
        self._promote(tokens)
        found = self._trie.candidates(tokens)
        if not found:
            return self._miss()
        key, reuse = found[0]  # the best
        self._lru.move_to_end(key)
        self.hits += 1
        self.cached_tokens += reuse
        return _prefix(self._lru[key].cache, reuse, len(key)), reuse

    def _promote(self, tokens: list[int]) -> None:
        """Bring the disk tier's best entry for `tokens` into memory if it serves more of them."""
        if self.disk is None:
            return
        on_disk = self.disk.search(tokens)
        if on_disk is None:
            return
        key, reuse = on_disk
        if key in self._lru or reuse <= self._best_in_memory(tokens):
            return
        cache = self.disk.load(key)
        if cache is not None:
            self._keep(key, cache)

    def _best_in_memory(self, tokens: list[int]) -> int:
        return next((reuse for _, reuse in self._trie.candidates(tokens)), 0)

    def _miss(self) -> tuple[None, int]:
        if self.enabled:
            self.misses += 1
        return None, 0

    def store(self, tokens: list[int], cache: list[Any]) -> None:
        """Keep the state of `tokens` (exactly the tokens `cache` holds) for later prompts."""
        if not self.enabled or not tokens:
            return
        import mlx.core as mx

        mx.eval([layer.state for layer in cache])
        self._keep(tuple(tokens), cache)

    def _keep(self, key: tuple[int, ...], cache: list[Any]) -> None:
        entry = _Entry(cache, sum(layer.nbytes for layer in cache), all(layer.is_trimmable() for layer in cache))
        if entry.nbytes > self.max_bytes:
            self._spill(key, entry)
            return
        self._remove(key)
        self._trie.add(key, entry, entry.trimmable)
        self._lru[key] = entry
        self.bytes += entry.nbytes
        if entry.trimmable:  # an entry can serve all its prefixes: shorter ones only take space
            for length in self._trie.pop_prefixes(key):
                self._forget(key[:length])
        self.shrink()

    def spill_all(self) -> None:
        """Write every entry to the disk tier (the model is about to go, or the engine to stop)."""
        for key, entry in list(self._lru.items()):
            self._spill(key, entry)

    def _spill(self, key: tuple[int, ...], entry: _Entry) -> None:
        if self.disk is not None:
            self.disk.save(key, entry.cache, entry.trimmable)

    def shrink(self) -> None:
        """Evict least recently used entries until the limits hold (also after they changed)."""
        while self._lru and (len(self._lru) > self.max_entries or self.bytes > self.max_bytes):
            key = next(iter(self._lru))
            self._spill(key, self._lru[key])
            self._remove(key)

    def clear(self) -> None:
        """Forget every entry, on disk too."""
        self._trie = Trie()
        self._lru.clear()
        self.bytes = 0
        if self.disk is not None:
            self.disk.clear()

    def _remove(self, key: tuple[int, ...]) -> None:
        if key in self._lru:
            self._trie.pop(key)
            self._forget(key)

    def _forget(self, key: tuple[int, ...]) -> None:
        entry = self._lru.pop(key, None)
        if entry is not None:
            self.bytes -= entry.nbytes
