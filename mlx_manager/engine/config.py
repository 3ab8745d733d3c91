"""The engine's limits, as the daemon derives them from its settings."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineConfig:
    allowed: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)  # folders of model folders requests may load by path
    allow_any_path: bool = False  # any folder on the machine may be loaded by its path
    max_loaded: int = 2
    keep_alive: float = 1800.0
    preload: list[str] = field(default_factory=list)
    queue_limit: int = 64
    max_batch_size: int = 32
    blas: str = "auto"  # see engine/blas.py
    prefill_chunk: int = 512  # prompt tokens read per step, between decode steps of running streams
    cache_max_bytes: int = 1 << 30  # each model's prompt cache; 0 turns it off
    cache_max_entries: int = 64
    cache_disk_folder: str | None = None  # the prompt cache's disk tier; None: off
    cache_disk_max_bytes: int = 10 << 30
