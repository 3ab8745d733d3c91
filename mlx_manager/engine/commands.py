"""What the event loop asks of the inference thread: one frozen dataclass per command.

The engine puts them on a thread-safe queue; the worker matches on their type.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_manager.engine.config import EngineConfig
from mlx_manager.engine.jobs import EmbeddingJob, Job, Reply
from mlx_manager.engine.types import GenerationRequest, ModelStatus


@dataclass(frozen=True)
class Submit:
    """Run a generation: it waits for a batch slot, then streams its events."""

    job: Job


@dataclass(frozen=True)
class Embed:
    """Compute embeddings: queued with the other embedding work, batched across requests."""

    job: EmbeddingJob


@dataclass(frozen=True)
class Cancel:
    """Drop a generation from its batch (or from the waiting line) before the next step."""

    job: Job


@dataclass(frozen=True)
class Load:
    """Load a model, or mark a loaded one as just used; the reply carries its status or the error."""

    model_id: str
    reply: Reply[ModelStatus]


@dataclass(frozen=True)
class Unload:
    """Unload a model now; refused (ModelBusy) while it has jobs, unless `force` fails them first."""

    model_id: str
    force: bool
    reply: Reply[None]


@dataclass(frozen=True)
class CountTokens:
    """Apply the chat template (loading the model if needed) and reply with the prompt's length."""

    request: GenerationRequest
    reply: Reply[int]


@dataclass(frozen=True)
class Reconfigure:
    """New limits and allow-list; models over the new limits go when idle."""

    config: EngineConfig


@dataclass(frozen=True)
class Stop:
    """Fail every job with EngineStopped, unload every model, end the thread."""


@dataclass(frozen=True)
class ClearCache:
    """Forget the prompt cache of every loaded model (its disk tier too); the reply counts the
    entries that went."""

    reply: Reply[int]


Command = Submit | Embed | Cancel | Load | Unload | CountTokens | ClearCache | Reconfigure | Stop
