"""The model pool: resolve a model id, load it, keep at most N, unload the idle ones.

Runs on the inference thread only (loading and freeing MLX memory are MLX work).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from mlx_manager.engine.config import EngineConfig
from mlx_manager.engine.errors import (
    EngineStopped,
    ExtraNotInstalled,
    ModelLoadFailed,
    ModelNotAllowed,
    ModelNotFound,
    Overloaded,
)
from mlx_manager.engine.prompt_cache import PromptCache
from mlx_manager.engine.types import CacheStatus, ModelStatus
from mlx_manager.hub.cache import model_identity

log = logging.getLogger("mlx_manager.engine")

# Retry-After of a load refused because every loaded model is busy (models.max_loaded).
BUSY_RETRY_AFTER = 5.0
# A model's weights are read this many bytes at a time; a stop abandons the load between two reads.
LOAD_STEP_BYTES = 256 * 1024 * 1024


@dataclass
class LoadedModel:
    model_id: str  # its one id, whatever spelling loaded it (hub.cache.model_identity)
    path: Path
    model: Any
    tokenizer: Any
    context_length: int | None
    load_seconds: float
    last_used: float = field(default_factory=time.monotonic)
    active_jobs: int = 0
    # Rows of the embedding table: a prompt token id outside it makes MLX read out of bounds.
    vocab_size: int | None = None
    kind: str = "generate"  # or "embed": then `model` is an engine.embedding_model.EmbeddingModel
    prompt_cache: PromptCache | None = None  # made with its first generation; goes with the model
    memory_bytes: int = 0  # MLX memory the load allocated
    by_sequence: bool | None = None  # batches keep a cache per sequence (sequence_caches.py); set at its first


@dataclass(frozen=True)
class ModelAccess:
    """Where models may be loaded from. With `allowed` set, only those. Otherwise a Hugging Face
    repo in the local cache, a model folder in (or being) one of `folders`, a folder `named` by
    the operator (models.preload, `--model`), and, with `any_path`, any folder at all."""

    allowed: tuple[str, ...] = ()
    folders: tuple[str, ...] = ()
    named: tuple[str, ...] = ()
    any_path: bool = False

    @classmethod
    def of(cls, config: EngineConfig) -> ModelAccess:
        return cls(tuple(config.allowed), tuple(config.folders), tuple(config.preload), config.allow_any_path)

    def may_read(self, model_id: str) -> bool:
        """Whether `model_id`, taken as a path, names a folder models may load from. May raise OSError."""
        if self.any_path:
            return True
        target = _lexical(model_id)
        real = target.resolve()
        if any(target == _lexical(n) or real == _lexical(n).resolve() for n in (*self.named, *self.allowed)):
            return True
        for folder in self.folders:  # a folder of model folders, or one model folder
            root = _lexical(folder)
            if root in (target, target.parent) or root.resolve() in (real, real.parent):
                return True
            # `models list` names a model that is a symlink in the folder by the symlink's target
            if root.is_dir() and any(child.is_symlink() and child.resolve() == real for child in root.iterdir()):
                return True
        return False


def _lexical(path: str) -> Path:
    """An absolute path with `~` and `..` worked out, symlinks left alone."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def unknown_model(model_id: str) -> str:
    """The one message for every model that cannot be loaded from here: it says nothing of what the
    disk holds, so a client cannot probe the file system through `model`."""
    return (
        f"model {model_id!r} is neither a local folder nor a Hugging Face repo in the local cache that this daemon"
        " may load (`mlx-manager models list` shows those it may; models.folders, models.allowed and"
        " models.allow_any_path add more)"
    )


def resolve(model_id: str, access: ModelAccess | None = None) -> Path:
    """The folder of a model: one `access` lets the daemon read (a model folder: it holds a
    config.json), or a Hugging Face repo id already in the local cache (never downloads).

    A repo id may name a revision, `org/name@v1.0` or `org/name@<commit>`, as `models pull` takes it.
    ModelNotFound, with the same message, for anything else: no such folder, a folder it may not
    read, a name too long for the OS or one it refuses to look at."""
    access = access or ModelAccess()
    try:
        if access.may_read(model_id):
            path = _lexical(model_id)
            if (path / "config.json").is_file():
                return path.resolve()
    except (OSError, ValueError):
        pass
    repo_id, _, revision = model_id.partition("@")
    if repo_id.count("/") == 1 and not repo_id.startswith((".", "/", "~")):
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
        from huggingface_hub.file_download import repo_folder_name

        # Not in the cache at all (a name routed to another server, say): no need to ask
        # snapshot_download, which takes about 2 ms to say so, on every request.
        if (Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")).is_dir():
            try:
                return Path(snapshot_download(repo_id, revision=revision or None, local_files_only=True)).resolve()
            except (LocalEntryNotFoundError, ValueError, OSError):
                pass
    raise ModelNotFound(unknown_model(model_id))


class ModelPool:
    """The loaded models, least recently used first. `on_change` is called when a load starts
    or ends and when a model goes, so the worker can publish a fresh status. Once `stopping` is
    set, a load in progress is abandoned at its next step (EngineStopped), and so is any new one."""

    def __init__(
        self,
        access: ModelAccess,
        max_loaded: int,
        keep_alive: float,
        load_listeners: list[Callable[[str, float], None]],
        on_change: Callable[[], None] = lambda: None,
        stopping: threading.Event | None = None,
    ) -> None:
        self.load_listeners = load_listeners
        self.stopping = stopping or threading.Event()
        self.abandoned: str | None = None  # the model whose load a stop abandoned
        self.access = access
        self.max_loaded = max_loaded
        self.keep_alive = keep_alive
        self.loading: str | None = None
        self._on_change = on_change
        self._models: OrderedDict[Path, LoadedModel] = OrderedDict()
        self._ids: dict[str, Path] = {}

    def statuses(self, queued: Mapping[Path, int] | None = None) -> tuple[ModelStatus, ...]:
        """What `Engine.status()` shows of each loaded model, least recently used first;
        `queued` counts the jobs waiting for each model's batch."""
        now = time.monotonic()
        return tuple(
            ModelStatus(
                model_id=m.model_id,
                path=str(m.path),
                kind=m.kind,
                active_jobs=m.active_jobs,
                idle_seconds=0.0 if m.active_jobs else now - m.last_used,
                keep_alive=self.keep_alive,
                cache=m.prompt_cache.status() if m.prompt_cache is not None else CacheStatus(),
                memory_bytes=m.memory_bytes,
                queued_jobs=(queued or {}).get(m.path, 0),
            )
            for m in self._models.values()
        )

    def entries(self) -> list[LoadedModel]:
        return list(self._models.values())

    def path_of(self, model_id: str) -> Path | None:
        """The folder of a loaded model known by this id, without touching the disk; else None."""
        path = self._ids.get(model_id)
        return path if path in self._models else None

    def find(self, model_id: str) -> LoadedModel | None:
        """The loaded model this id names (an id it was loaded under, or its folder), never loading it."""
        path = self.path_of(model_id)
        if path is None:
            try:
                path = resolve(model_id, self.access)
            except ModelNotFound:
                return None
        return self._models.get(path)

    def check_allowed(self, model_id: str) -> None:
        allowed = self.access.allowed
        if not allowed or model_id in allowed:
            return
        try:
            real = _lexical(model_id).resolve()
            if any(_lexical(a).resolve() == real for a in allowed):
                return
        except (OSError, ValueError):
            pass
        raise ModelNotAllowed(f"model {model_id!r} is not in models.allowed")

    def load(self, model_id: str) -> LoadedModel:
        """The loaded model for this id, loading it first (which may take seconds, and evicts the
        least recently used model) if it is not loaded yet."""
        self.check_allowed(model_id)
        path = self._ids.get(model_id)
        if path is None or path not in self._models:
            path = resolve(model_id, self.access)
            self._ids[model_id] = path
        entry = self._models.get(path)
        if entry is None:
            self._make_room()
            entry = self._read(model_identity(path), path)
            self._models[path] = entry
            self._on_change()
        self._models.move_to_end(path)
        entry.last_used = time.monotonic()
        return entry

    def _read(self, model_id: str, path: Path) -> LoadedModel:
        """Load a model's weights and tokenizer from its folder."""
        import mlx.core as mx

        from mlx_manager.engine.embedding_model import EmbeddingModel, is_embedding_model
        from mlx_manager.telemetry import model_load_span

        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadFailed(f"could not load {model_id!r}: its config.json is unreadable ({exc})") from None
        embedding = is_embedding_model(path, config)
        self.loading = model_id
        self._on_change()
        log.info("loading %s model %s from %s", "embedding" if embedding else "text", model_id, path)
        before = mx.get_active_memory()
        try:
            with model_load_span(model_id) as span:
                model: Any
                self._check_stopping(model_id)
                if embedding:
                    model = EmbeddingModel(path, config)
                    tokenizer = model.tokenizer
                else:
                    from mlx_lm import load

                    model, tokenizer = load(str(path), lazy=True)[:2]
                    self._read_weights(model_id, model)
                span.memory_bytes = mx.get_active_memory()
        except ExtraNotInstalled as exc:
            raise ExtraNotInstalled(f"could not load {model_id!r}: {exc}", exc.extra) from None
        except (ModelLoadFailed, FileNotFoundError, ValueError, KeyError, OSError, TypeError) as exc:
            raise ModelLoadFailed(f"could not load {model_id!r}: {exc}") from None
        finally:
            self.loading = None
            self._on_change()
        seconds = span.seconds or 0.0
        memory = max(0, mx.get_active_memory() - before)
        log.info("loaded %s model %s from %s in %.2fs", "embedding" if embedding else "text", model_id, path, seconds)
        for listener in self.load_listeners:
            listener(model_id, seconds)
        if embedding:
            return LoadedModel(
                model_id,
                path,
                model,
                tokenizer,
                model.max_tokens,
                seconds,
                vocab_size=model.vocab_size,
                kind="embed",
                memory_bytes=memory,
            )
        context = config.get("max_position_embeddings")
        vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
        return LoadedModel(
            model_id,
            path,
            model,
            tokenizer,
            context if isinstance(context, int) else None,
            seconds,
            vocab_size=vocab if isinstance(vocab, int) else None,
            memory_bytes=memory,
        )

    def _check_stopping(self, model_id: str) -> None:
        if self.stopping.is_set():
            self.abandoned = model_id
            raise EngineStopped(f"the engine stopped while model {model_id!r} was loading")

    def _read_weights(self, model_id: str, model: Any) -> None:
        """Read a lazily loaded model's weights into memory LOAD_STEP_BYTES at a time (what
        `mlx_lm.load` does in one go), so that a stop need not wait for the whole model."""
        import mlx.core as mx
        from mlx.utils import tree_flatten

        step: list[Any] = []
        size = 0
        for _, array in cast(list[tuple[str, Any]], tree_flatten(model.parameters())):
            step.append(array)
            size += array.nbytes
            if size >= LOAD_STEP_BYTES:
                self._check_stopping(model_id)
                mx.eval(step)
                step, size = [], 0
        self._check_stopping(model_id)
        mx.eval(step)

    def _make_room(self) -> None:
        """Unload the least recently used idle models until one more fits under max_loaded; when
        every loaded model is busy, refuse (the limit is never exceeded: it is what memory allows)."""
        while len(self._models) >= self.max_loaded:
            victim = next((p for p, m in self._models.items() if m.active_jobs == 0), None)
            if victim is None:
                raise Overloaded(
                    f"models.max_loaded ({self.max_loaded}) models are loaded and every one is busy; "
                    "retry once one is free",
                    retry_after=BUSY_RETRY_AFTER,
                )
            self._unload(victim, "least recently used")

    def sweep(self) -> None:
        """Unload models idle past keep-alive, and any over max_loaded after a reconfigure."""
        now = time.monotonic()
        if self.keep_alive > 0:
            for path, entry in list(self._models.items()):
                if entry.active_jobs == 0 and now - entry.last_used >= self.keep_alive:
                    self._unload(path, f"idle for {now - entry.last_used:.0f}s")
        if len(self._models) > self.max_loaded:
            self._make_room_below_limit()

    def _make_room_below_limit(self) -> None:
        for path, entry in list(self._models.items()):
            if len(self._models) <= self.max_loaded:
                return
            if entry.active_jobs == 0:
                self._unload(path, "over models.max_loaded")

    def next_sweep_in(self) -> float:
        if self.keep_alive <= 0 or not self._models:
            return 60.0
        now = time.monotonic()
        idle = [self.keep_alive - (now - m.last_used) for m in self._models.values() if m.active_jobs == 0]
        return max(0.05, min(idle, default=60.0))

    def _unload(self, path: Path, why: str) -> None:
        import mlx.core as mx

        entry = self._models.pop(path)
        self._ids = {k: v for k, v in self._ids.items() if v != path}
        if entry.prompt_cache is not None:
            entry.prompt_cache.spill_all()  # to the disk tier, when it is on
        log.info("unloaded model %s (%s)", entry.model_id, why)
        del entry
        gc.collect()
        mx.clear_cache()
        self._on_change()

    def unload(self, entry: LoadedModel, why: str) -> None:
        """Unload this model now; the caller has ended its jobs."""
        self._unload(entry.path, why)

    def unload_all(self) -> None:
        for path in list(self._models):
            self._unload(path, "shutdown")
