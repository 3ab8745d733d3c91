"""Typed engine errors: the HTTP layer maps each to a problem document."""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises to a caller."""


class ModelNotFound(EngineError):
    """No such local folder, and no cached Hugging Face repo of that id."""


class ModelNotAllowed(EngineError):
    """The model is not on the `models.allowed` list."""


class ModelLoadFailed(EngineError):
    """The model exists but could not be loaded (bad weights, unsupported architecture...)."""


class ExtraNotInstalled(ModelLoadFailed):
    """The model needs an optional part of mlx-manager (an extra, e.g. `embeddings`) that is not
    installed; `install` is the command that adds it."""

    def __init__(self, message: str, extra: str) -> None:
        super().__init__(message)
        self.extra = extra
        self.install = f"pip install 'mlx-manager[{extra}]'"


class ChatTemplateMissing(EngineError):
    """A chat request for a model whose tokenizer has no chat template."""


class InvalidRequest(EngineError):
    """The request cannot be run as given (empty prompt, a token id the model does not know...);
    `param` names the request field at fault, when one is."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthExceeded(InvalidRequest):
    """The prompt, or the prompt and max_tokens together, do not fit the model's context."""


class Overloaded(EngineError):
    """The queue of waiting jobs is full; try again later."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineStopped(EngineError):
    """The engine is shutting down or stopped and takes no new work."""


class GenerationFailed(EngineError):
    """An error inside MLX while generating this job; other jobs are unaffected."""


class WrongModelKind(EngineError):
    """An embedding model asked to generate, or a generative model asked for embeddings."""


class ToolsNotSupported(EngineError):
    """A request with tools for a model whose chat template has no tool-call format."""


class ModelNotLoaded(EngineError):
    """An unload asked for a model that is not loaded."""


class ModelBusy(EngineError):
    """An unload (not forced) asked for a model that still has jobs running or waiting."""


class ModelUnloaded(EngineError):
    """The job's model was unloaded by a forced unload while the job ran or waited."""
