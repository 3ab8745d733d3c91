"""The waiting embedding requests of every model, run in batches on the inference thread.

Work is batched across requests: each step takes up to `MAX_BATCH` sequences from the waiting
requests, shortest first within a request so that padding stays small, and runs one forward pass.
A step is sized by the speed measured on the steps before it to take about `STEP_SECONDS`, so
that text generation running beside it is never held up for long, and a cancelled request (a
timeout, a client gone) is dropped before the next step: its work really stops.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from mlx_manager.engine.embedding_model import EmbeddingModel
from mlx_manager.engine.errors import InvalidRequest
from mlx_manager.engine.jobs import EmbeddingJob
from mlx_manager.engine.pool import LoadedModel
from mlx_manager.engine.types import EmbeddingResult

MAX_BATCH = 64
MAX_BATCH_TOKENS = 16384
STEP_SECONDS = 0.25
FIRST_STEP_TOKENS = 256  # before any speed is known


@dataclass
class Progress:
    """One job's inputs as token ids and how far the steps got through them."""

    entry: LoadedModel
    tokens: list[list[int]]
    order: list[int] = field(default_factory=list)  # input indexes, shortest first: batches pad less
    cursor: int = 0
    vectors: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.order = sorted(range(len(self.tokens)), key=lambda i: len(self.tokens[i]))
        self.vectors = [None] * len(self.tokens)

    @property
    def complete(self) -> bool:
        return self.cursor >= len(self.order)


def _progress(job: EmbeddingJob) -> Progress:
    progress = job.work
    assert isinstance(progress, Progress)
    return progress


def _model(entry: LoadedModel) -> EmbeddingModel:
    model = entry.model
    assert isinstance(model, EmbeddingModel)
    return model


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
        request, model = job.request, _model(entry)
        if isinstance(request.inputs[0], str):
            tokens = model.tokenize([str(text) for text in request.inputs], request.truncate)
        else:
            tokens = model.check_ids([list(ids) for ids in request.inputs], request.truncate)
        if any(not ids for ids in tokens):
            raise InvalidRequest("an input is empty")
        if request.dimensions is not None and request.dimensions > model.dimensions:
            raise InvalidRequest(
                f"dimensions is {request.dimensions}; model {request.model!r} makes vectors of {model.dimensions}"
            )
        job.work = Progress(entry, tokens)
        job.prompt_tokens = sum(len(ids) for ids in tokens)
        self.jobs.append(job)

    def drop_cancelled(self) -> list[EmbeddingJob]:
        dropped = [job for job in self.jobs if job.cancelled]
        if dropped:
            self.jobs = deque(job for job in self.jobs if not job.cancelled)
        return dropped

    def step(self) -> list[EmbeddingJob]:
        """One forward pass over the next sequences of the first model in line; returns finished jobs."""
        entry = _progress(self.jobs[0]).entry
        model = _model(entry)
        budget = self._budget(model)
        taken: list[tuple[Progress, int]] = []
        stepped: dict[EmbeddingJob, Progress] = {}
        width = 0
        for job in self.jobs:
            progress = _progress(job)
            if progress.entry is not entry:
                continue
            while not progress.complete and len(taken) < MAX_BATCH:
                index = progress.order[progress.cursor]
                new_width = max(width, len(progress.tokens[index]))
                if taken and new_width * (len(taken) + 1) > budget:
                    break
                taken.append((progress, index))
                stepped[job] = progress
                width = new_width
                progress.cursor += 1
            if len(taken) >= MAX_BATCH or (taken and not progress.complete):
                break
        for job in stepped:
            job.begin()
        started = time.perf_counter()
        vectors = model.embed([progress.tokens[index] for progress, index in taken])
        rate = width * len(taken) / max(time.perf_counter() - started, 1e-6)
        previous = model.tokens_per_second
        model.tokens_per_second = rate if previous is None else 0.5 * previous + 0.5 * rate
        for row, (progress, index) in enumerate(taken):
            progress.vectors[index] = vectors[row]
        finished = [job for job, progress in stepped.items() if progress.complete]
        for job in finished:
            self.jobs.remove(job)
        return finished

    def fail(self, entry: LoadedModel) -> list[EmbeddingJob]:
        """After a failed step: take every job of that model out of line."""
        failed = [job for job in self.jobs if _progress(job).entry is entry]
        self.jobs = deque(job for job in self.jobs if _progress(job).entry is not entry)
        return failed


def entry_of(job: EmbeddingJob) -> LoadedModel:
    """The model a queued job runs on."""
    return _progress(job).entry


def result_of(job: EmbeddingJob) -> EmbeddingResult:
    import numpy as np

    progress = _progress(job)
    vectors = np.stack(progress.vectors)
    dimensions = job.request.dimensions
    if dimensions is not None and dimensions < vectors.shape[1]:
        vectors = vectors[:, :dimensions]
        if _model(progress.entry).pooling.normalize:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return EmbeddingResult(vectors=np.ascontiguousarray(vectors, dtype=np.float32), prompt_tokens=job.prompt_tokens)
