"""The prompt cache's disk tier (off unless `cache.disk` is on): entries the memory tier lets go
of are kept as files, so a restarted daemon answers a known conversation's next turn fast.

KV state is derived from prompt text, so these files are as private as the prompts: a 0700
folder of 0600 files under the home folder, written atomically (temp file, then rename). Each
model has its own folder named by its identity (its path and a fingerprint of its weights and
tokenizer), so a model changed at the same path never reuses a stale entry. An entry is two
files: `<id>.safetensors` (the cache, mlx-lm's format) and `<id>.json` (its tokens); the JSON
files are the index, read when the model is loaded. A file that cannot be read is deleted with a
warning and counted as a miss. Past `max_bytes`, the least recently used files go.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_manager.engine.prompt_trie import Trie
from mlx_manager.files import write_atomic

log = logging.getLogger("mlx_manager.engine")


@dataclass
class DiskEntry:
    stem: str
    nbytes: int
    trimmable: bool
    used: float  # last use, for least-recently-used eviction


class DiskTier:
    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self._trie = Trie()
        self._entries: dict[tuple[int, ...], DiskEntry] = {}
        self.bytes = 0
        self._read_index()

    def __len__(self) -> int:
        return len(self._entries)

    def _read_index(self) -> None:
        if not self.folder.is_dir():
            return
        for index in self.folder.glob("*.json"):
            data_file = index.with_suffix(".safetensors")
            try:
                meta = json.loads(index.read_text())
                tokens = tuple(int(t) for t in meta["tokens"])
                entry = DiskEntry(
                    index.stem, data_file.stat().st_size, bool(meta["trimmable"]), data_file.stat().st_mtime
                )
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("prompt cache: %s is unreadable; deleted", index.name)
                self._delete_files(index.stem)
                continue
            self._add(tokens, entry)
        for orphan in self.folder.glob("*.safetensors"):  # a crash between the two writes
            if not orphan.with_suffix(".json").exists():
                orphan.unlink(missing_ok=True)

    def search(self, tokens: list[int]) -> tuple[tuple[int, ...], int] | None:
        """(the entry's tokens, how many of `tokens` it can serve) for the best entry, or None."""
        if not self._entries:
            return None
        return next(iter(self._trie.candidates(tokens)), None)

    def load(self, key: tuple[int, ...]) -> list[Any] | None:
        """The cache stored for `key`; None (and the files deleted) if they cannot be read."""
        from mlx_lm.models.cache import load_prompt_cache

        entry = self._entries[key]
        try:
            cache = load_prompt_cache(str(self.folder / f"{entry.stem}.safetensors"))
        except Exception as exc:  # truncated or corrupt: whatever the reader raises
            log.warning("prompt cache: %s.safetensors is unreadable (%s); deleted", entry.stem, type(exc).__name__)
            self.remove(key)
            return None
        entry.used = time.time()
        return cache

    def save(self, key: tuple[int, ...], cache: list[Any], trimmable: bool) -> None:
        from mlx_lm.models.cache import save_prompt_cache

        if key in self._entries:
            self._entries[key].used = time.time()
            return
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        stem = hashlib.sha256(json.dumps(list(key)).encode()).hexdigest()[:32]
        data_file = self.folder / f"{stem}.safetensors"
        try:
            write_atomic(data_file, lambda path: save_prompt_cache(str(path), cache))
            write_atomic(self.folder / f"{stem}.json", json.dumps({"tokens": list(key), "trimmable": trimmable}))
            nbytes = data_file.stat().st_size
        except OSError as exc:  # a full disk must not stop the serving
            log.warning("prompt cache: could not write %s (%s)", data_file.name, exc)
            self._delete_files(stem)
            return
        self._add(key, DiskEntry(stem, nbytes, trimmable, time.time()))
        self._shrink()

    def remove(self, key: tuple[int, ...]) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self._trie.pop(key)
        self.bytes -= entry.nbytes
        self._delete_files(entry.stem)

    def clear(self) -> None:
        for key in list(self._entries):
            self.remove(key)

    def _add(self, key: tuple[int, ...], entry: DiskEntry) -> None:
        self._trie.add(key, entry, entry.trimmable)
        self._entries[key] = entry
        self.bytes += entry.nbytes

    def _shrink(self) -> None:
        while self._entries and self.bytes > self.max_bytes:
            oldest = min(self._entries, key=lambda k: self._entries[k].used)
            self.remove(oldest)

    def _delete_files(self, stem: str) -> None:
        for suffix in (".safetensors", ".json"):
            (self.folder / f"{stem}{suffix}").unlink(missing_ok=True)


def model_identity(path: Path) -> str:
    """Names a model's disk cache: its path and a fingerprint of what it computes with — its
    config, tokenizer files and weights (each file's size and its first and last MiB; hashing
    whole weights would take seconds at every load)."""
    digest = hashlib.sha256(str(path.resolve()).encode())
    for file in sorted(path.iterdir()):
        if not file.is_file() or not file.name.endswith((".json", ".safetensors", ".model", ".jinja")):
            continue
        digest.update(file.name.encode())
        size = file.stat().st_size
        digest.update(str(size).encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(1 << 20))
            if size > 2 << 20:
                handle.seek(-(1 << 20), os.SEEK_END)
                digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:32]


def folder_usage(folder: Path) -> tuple[int, int]:
    """(entries, bytes) of a disk tier's folder, every model's: what `cache stats` shows when no
    daemon runs. Plain file reads, no MLX."""
    entries = size = 0
    if folder.is_dir():
        for data in folder.glob("*/*.safetensors"):
            entries += 1
            size += data.stat().st_size
    return entries, size


def clear_folder(folder: Path) -> int:
    """Delete every entry of a disk tier's folder, every model's; how many went."""
    gone = 0
    if folder.is_dir():
        for model in folder.iterdir():
            if not model.is_dir():
                continue
            for file in model.iterdir():
                if file.suffix == ".safetensors":
                    gone += 1
                file.unlink(missing_ok=True)
    return gone
