"""The inference engine: the only package that imports mlx / mlx_lm.

Callers (the daemon) use `Engine` and the types below; MLX itself is imported lazily by
the inference thread, so importing this package stays cheap.

    engine = Engine(EngineConfig(...)); engine.start()
    job = engine.submit(GenerationRequest(model=..., messages=[...]))   # may raise Overloaded
    try:
        async for event in job:          # Started, TextDelta..., Finished; or raises EngineError
            ...
    finally:
        job.cancel()                     # no-op once finished; frees the batch slot otherwise

    vectors = await engine.submit_embedding(EmbeddingRequest(model=..., inputs=[...])).result()
"""

from mlx_manager.engine.engine import EmbeddingJob, Engine, EngineConfig, EngineStatus, Job
from mlx_manager.engine.errors import (
    ChatTemplateMissing,
    EngineError,
    EngineStopped,
    GenerationFailed,
    InvalidRequest,
    ModelLoadFailed,
    ModelNotAllowed,
    ModelNotFound,
    Overloaded,
    WrongModelKind,
)
from mlx_manager.engine.types import (
    EmbeddingRequest,
    EmbeddingResult,
    Event,
    Finished,
    GenerationRequest,
    SamplingParams,
    Started,
    TextDelta,
)

__all__ = [
    "ChatTemplateMissing",
    "EmbeddingJob",
    "EmbeddingRequest",
    "EmbeddingResult",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineStatus",
    "EngineStopped",
    "Event",
    "Finished",
    "GenerationFailed",
    "GenerationRequest",
    "InvalidRequest",
    "Job",
    "ModelLoadFailed",
    "ModelNotAllowed",
    "ModelNotFound",
    "Overloaded",
    "SamplingParams",
    "Started",
    "TextDelta",
    "WrongModelKind",
]
