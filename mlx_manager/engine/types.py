"""What callers hand the engine and what they get back. No MLX here: the daemon imports this freely."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI sampling fields, mapped onto mlx-lm's sampler. temperature 0 is greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None


@dataclass
class GenerationRequest:
    """One generation: either `prompt` (completions) or `messages` (chat), never both."""

    model: str
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    max_tokens: int = 512
    stop: list[str] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""


@dataclass(frozen=True)
class Started:
    """First event of every job: the prompt is tokenized and the job is in the batch."""

    prompt_tokens: int


@dataclass(frozen=True)
class TextDelta:
    """New text (complete UTF-8 characters only, stop strings held back)."""

    text: str


@dataclass(frozen=True)
class Finished:
    """Last event of a job that ran to its end."""

    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int


Event = Started | TextDelta | Finished


@dataclass
class EmbeddingRequest:
    """Vectors for one or more inputs: all texts, or all token id lists."""

    model: str
    inputs: list[str] | list[list[int]]
    dimensions: int | None = None  # cut each vector to its first N values (then re-normalised)
    truncate: bool = False  # cut inputs over the model's limit instead of refusing them
    request_id: str = ""


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: Any  # numpy float32 array, one row per input, in input order
    prompt_tokens: int


@dataclass(frozen=True)
class ModelStatus:
    """One loaded model as `Engine.status()` shows it."""

    model_id: str
    path: str
    kind: str  # "generate" or "embed"
    active_jobs: int
    idle_seconds: float  # since its last use (0 while it has jobs)
    keep_alive: float  # seconds idle before it is unloaded; 0: never
    memory_bytes: int = 0  # MLX memory its load took (weights and what loading them allocated)
    queued_jobs: int = 0  # generations waiting for a batch slot on it


@dataclass(frozen=True)
class EngineStatus:
    loaded: list[str]
    queue_depth: int
    active_jobs: int
    loading: str | None
    running: bool
    blas: str | None = None  # the optimised BLAS library MLX uses; None: MLX's own
    models: tuple[ModelStatus, ...] = ()
