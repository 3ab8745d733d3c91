"""Embedding models on the inference thread: load with mlx-embeddings, tokenize, batch, pool.

Pooling follows the model's sentence-transformers files when it has them (`modules.json`,
`1_Pooling/config.json`, `sentence_bert_config.json`): mean, CLS, max or last-token pooling, then
L2 normalisation if the model has a Normalize module — what sentence-transformers itself does.
Without them, mlx-embeddings' own `text_embeds` is used.

Work is batched across requests: each step takes up to `MAX_BATCH` sequences from the waiting
requests, shortest first within a request so that padding stays small, and runs one forward pass.
A step is sized by the speed measured on the steps before it to take about `STEP_SECONDS`, so
that text generation running beside it is never held up for long, and a cancelled request (a
timeout, a client gone) is dropped before the next step: its work really stops.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlx_manager.engine.errors import InvalidRequest, ModelLoadFailed
from mlx_manager.engine.types import EmbeddingResult

if TYPE_CHECKING:
    from mlx_manager.engine.engine import EmbeddingJob
    from mlx_manager.engine.pool import LoadedModel

log = logging.getLogger("mlx_manager.engine")

MAX_BATCH = 64
MAX_BATCH_TOKENS = 16384
STEP_SECONDS = 0.25
FIRST_STEP_TOKENS = 256  # before any speed is known
# Encoder-only architectures: they cannot generate, whatever files come with them.
ENCODER_TYPES = {"bert", "xlm-roberta", "xlm_roberta", "modernbert"}


def is_embedding_model(path: Path, config: dict) -> bool:
    """A sentence-transformers folder, or an encoder-only architecture."""
    return (path / "modules.json").exists() or config.get("model_type") in ENCODER_TYPES


@dataclass(frozen=True)
class Pooling:
    mode: str = "text_embeds"  # "mean", "cls", "max", "lasttoken", or mlx-embeddings' own
    normalize: bool = True


def _read_json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


SUPPORTED_MODULES = (".Transformer", ".Pooling", ".Normalize")


def pooling_of(path: Path) -> Pooling:
    modules = _read_json(path / "modules.json")
    if not isinstance(modules, list):
        return Pooling()
    for module in modules:
        kind = str(module.get("type", "")) if isinstance(module, dict) else repr(module)
        if not kind.endswith(SUPPORTED_MODULES):
            raise ModelLoadFailed(f"its sentence-transformers module {kind!r} is not supported")
    normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
    pooling_dir = next((m.get("path", "") for m in modules if str(m.get("type", "")).endswith(".Pooling")), None)
    if pooling_dir is None:
        return Pooling(normalize=normalize)
    config = _read_json(path / pooling_dir / "config.json") or {}
    mode = config.get("pooling_mode")
    if not mode:
        flags = {
            "cls": "pooling_mode_cls_token",
            "mean": "pooling_mode_mean_tokens",
            "max": "pooling_mode_max_tokens",
            "lasttoken": "pooling_mode_lasttoken",
        }
        mode = next((name for name, key in flags.items() if config.get(key)), "mean")
    return Pooling(mode=mode, normalize=normalize)


class EmbeddingModel:
    """One loaded embedding model: its tokenizer, its limits, and a batched forward pass."""

    def __init__(self, path: Path, config: dict) -> None:
        try:
            from mlx_embeddings.utils import load
        except ImportError as exc:  # mlx-embeddings or one of its imports is missing
            raise ModelLoadFailed(f"embedding models need mlx-embeddings, which failed to import: {exc}") from None
        self.model, wrapper = load(str(path))
        self.tokenizer = getattr(wrapper, "_tokenizer", wrapper)
        self.pooling = pooling_of(path)
        st_config = _read_json(path / "sentence_bert_config.json") or {}
        limits = [st_config.get("max_seq_length"), config.get("max_position_embeddings")]
        limits.append(getattr(self.tokenizer, "model_max_length", None))
        self.max_tokens = min(n for n in limits if isinstance(n, int) and 0 < n < 1_000_000)
        self.vocab_size = config.get("vocab_size") if isinstance(config.get("vocab_size"), int) else len(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.tokens_per_second: float | None = None  # padded tokens, measured by EmbeddingQueue
        self.dimensions = int(self.embed([self.tokenize(["dimension probe"], truncate=True)[0]]).shape[1])

    def tokenize(self, texts: list[str], truncate: bool) -> list[list[int]]:
        encoded = self.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        return [self._fit(list(ids), i, truncate) for i, ids in enumerate(encoded)]

    def check_ids(self, inputs: list[list[int]], truncate: bool) -> list[list[int]]:
        for i, ids in enumerate(inputs):
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise InvalidRequest(f"input {i}: token ids must be between 0 and {self.vocab_size - 1}")
        return [self._fit(list(ids), i, truncate) for i, ids in enumerate(inputs)]

    def _fit(self, ids: list[int], index: int, truncate: bool) -> list[int]:
        if len(ids) <= self.max_tokens:
            return ids
        if not truncate:
            raise InvalidRequest(
                f"input {index} has {len(ids)} tokens; this model takes at most {self.max_tokens}"
                " (send \"truncate\": true to cut longer inputs to the limit)"
            )
        # Keep the final special token (e.g. [SEP]) when the tokenizer added one.
        last = ids[-1]
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        return ids[: self.max_tokens - 1] + [last] if last in special else ids[: self.max_tokens]

    def embed(self, sequences: list[list[int]]) -> Any:
        """Vectors (numpy float32, one row per sequence) for token sequences, in one forward pass."""
        import mlx.core as mx
        import numpy as np

        width = max(len(s) for s in sequences)
        ids = np.full((len(sequences), width), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(sequences), width), dtype=np.int32)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        mask_mx = mx.array(mask)
        output = self.model(mx.array(ids), attention_mask=mask_mx)
        hidden = getattr(output, "last_hidden_state", None)
        mode = self.pooling.mode
        if mode == "text_embeds" or hidden is None:
            vectors = output.text_embeds
        else:
            vectors = _pool(hidden, mask_mx, mode)
            if self.pooling.normalize:
                vectors = vectors / mx.maximum(mx.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
        return np.array(vectors.astype(mx.float32))


def _pool(hidden: Any, mask: Any, mode: str) -> Any:
    import mlx.core as mx

    hidden = hidden.astype(mx.float32)
    weights = mask[..., None].astype(mx.float32)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "lasttoken":
        last = mask.sum(axis=1) - 1
        return mx.take_along_axis(hidden, last[:, None, None].astype(mx.int32), axis=1)[:, 0]
    if mode == "max":
        return mx.where(weights > 0, hidden, -1e9).max(axis=1)
    return (hidden * weights).sum(axis=1) / mx.maximum(weights.sum(axis=1), 1e-9)


class EmbeddingQueue:
    """The waiting embedding requests of every model; `step()` runs one batch."""

    def __init__(self) -> None:
        self.jobs: deque[EmbeddingJob] = deque()

    @staticmethod
    def _budget(model: EmbeddingModel) -> int:
        """Padded tokens for the next step of this model: about STEP_SECONDS of work."""
        rate = model.tokens_per_second
        if rate is None:
            return FIRST_STEP_TOKENS
        return max(1, min(MAX_BATCH_TOKENS, int(rate * STEP_SECONDS)))

    def __bool__(self) -> bool:
        return bool(self.jobs)

    def add(self, job: EmbeddingJob, entry: LoadedModel) -> None:
        """Tokenize and check a job (raises InvalidRequest), then queue it."""
        request, model = job.request, entry.model
        if isinstance(request.inputs[0], str):
            tokens = model.tokenize(list(request.inputs), request.truncate)
        else:
            tokens = model.check_ids([list(ids) for ids in request.inputs], request.truncate)
        if any(not ids for ids in tokens):
            raise InvalidRequest("an input is empty")
        if request.dimensions is not None and request.dimensions > model.dimensions:
            raise InvalidRequest(
                f"dimensions is {request.dimensions}; model {request.model!r} makes vectors of {model.dimensions}"
            )
        job.prepare(entry, tokens)
        self.jobs.append(job)

    def drop_cancelled(self) -> list[EmbeddingJob]:
        dropped = [job for job in self.jobs if job.cancelled]
        if dropped:
            self.jobs = deque(job for job in self.jobs if not job.cancelled)
        return dropped

    def step(self) -> list[EmbeddingJob]:
        """One forward pass over the next sequences of the first model in line; returns finished jobs."""
        entry = self.jobs[0].entry
        budget = self._budget(entry.model)
        taken: list[tuple[EmbeddingJob, int]] = []
        width = 0
        for job in self.jobs:
            if job.entry is not entry:
                continue
            while job.cursor < len(job.order) and len(taken) < MAX_BATCH:
                index = job.order[job.cursor]
                new_width = max(width, len(job.tokens[index]))
                if taken and new_width * (len(taken) + 1) > budget:
                    break
                taken.append((job, index))
                width = new_width
                job.cursor += 1
            if len(taken) >= MAX_BATCH or (taken and job.cursor < len(job.order)):
                break
        for job in dict.fromkeys(job for job, _ in taken):
            job.start()
        started = time.perf_counter()
        vectors = entry.model.embed([job.tokens[index] for job, index in taken])
        rate = width * len(taken) / max(time.perf_counter() - started, 1e-6)
        previous = entry.model.tokens_per_second
        entry.model.tokens_per_second = rate if previous is None else 0.5 * previous + 0.5 * rate
        for row, (job, index) in enumerate(taken):
            job.vectors[index] = vectors[row]
        finished = [job for job in dict.fromkeys(job for job, _ in taken) if job.cursor >= len(job.order)]
        for job in finished:
            self.jobs.remove(job)
        return finished

    def fail(self, entry: LoadedModel) -> list[EmbeddingJob]:
        """After a failed step: take every job of that model out of line."""
        failed = [job for job in self.jobs if job.entry is entry]
        self.jobs = deque(job for job in self.jobs if job.entry is not entry)
        return failed


def result_of(job: EmbeddingJob) -> EmbeddingResult:
    import numpy as np

    vectors = np.stack(job.vectors)
    dimensions = job.request.dimensions
    if dimensions is not None and dimensions < vectors.shape[1]:
        vectors = vectors[:, :dimensions]
        if job.entry.model.pooling.normalize:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return EmbeddingResult(vectors=np.ascontiguousarray(vectors, dtype=np.float32), prompt_tokens=job.prompt_tokens)
