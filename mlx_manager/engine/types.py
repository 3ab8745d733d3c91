"""What callers hand the engine and what they get back. No MLX here: the daemon imports this freely."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mlx_manager.engine.constraints import GrammarSpec


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI sampling fields, mapped onto mlx-lm's sampler. temperature 0 is greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None


@dataclass(frozen=True)
class Penalties:
    """OpenAI's frequency and presence penalties (-2 to 2, over the generated tokens), its
    `logit_bias` (token id -> -100 to 100, added to the logits), and mlx-lm's multiplicative
    `repetition_penalty` over the last 20 tokens, prompt included (an extension; 1 or None: off)."""

    frequency: float = 0.0
    presence: float = 0.0
    repetition: float | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)


@dataclass
class GenerationRequest:
    """One generation: either `prompt` (completions) or `messages` (chat), never both.

    `messages` are what the model's chat template takes (text content, assistant `tool_calls`
    with arguments as objects, `tool` messages). `tools` (OpenAI function definitions) go to
    the template and turn on parsing of the model's tool calls; `template_kwargs` are extra
    template variables such as `enable_thinking`. With `parallel_tool_calls` false the
    generation ends after the first complete call."""

    model: str
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    max_tokens: int = 512
    stop: list[str] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    tools: list[dict[str, Any]] | None = None
    parallel_tool_calls: bool = True
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    reasoning_effort: str | None = None  # anything but "none" needs a model that thinks
    # What the answer must obey: a validated response_format grammar (constraints.py), and
    # tool_choice "required" or {"type": "function", "function": {"name": ...}} to force a call.
    constraint: GrammarSpec | None = None
    tool_choice: str | dict[str, Any] | None = None
    penalties: Penalties = field(default_factory=Penalties)
    # Report each generated token's log probability and this many of the most likely (0-20) at
    # its step, as `Logprobs` events; None: none.
    logprobs: int | None = None
    # `max_tokens` is the server's default, not the client's: cut it to what the context leaves
    # instead of refusing a prompt that leaves less.
    max_tokens_is_default: bool = False


@dataclass(frozen=True)
class Started:
    """First event of every job: the prompt is tokenized and the job is in the batch."""

    prompt_tokens: int
    grammar_compile_ms: float | None = None  # a constrained job: compiling its grammar (a cache hit is ~0)


@dataclass(frozen=True)
class TextDelta:
    """New answer text (complete UTF-8 characters only, stop strings and markup held back)."""

    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    """New text of the model's thinking section (its think tags are not part of it)."""

    text: str


@dataclass(frozen=True)
class TopLogprob:
    token: str  # its text; bytes that are not whole UTF-8 characters as \xNN escapes
    bytes: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its log probability and the most likely tokens at its step."""

    token: str
    bytes: bytes
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Logprobs:
    """The log probabilities of generated tokens, sent just before the text they make (which a
    stop string or markup may hold back, or leave out)."""

    tokens: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class ToolCall:
    """One complete tool call the model made: `arguments` is a JSON object, as text."""

    index: int  # 0, 1, ... in the order the model made them
    id: str
    name: str
    arguments: str


FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True)
class Finished:
    """Last event of a job that ran to its end."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int = 0  # of completion_tokens, those of the thinking section
    stop_sequence: str | None = None  # the stop string that ended the answer, if one did
    cached_tokens: int = 0  # of prompt_tokens, those restored from the prompt cache


Event = Started | TextDelta | ReasoningDelta | ToolCall | Logprobs | Finished


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
class CacheStatus:
    """What a model's prompt cache did and holds."""

    hits: int = 0  # prompts that reused a cached prefix
    misses: int = 0
    cached_tokens: int = 0  # prompt tokens not computed again, in all
    entries: int = 0
    bytes: int = 0
    disk_entries: int = 0  # the disk tier, when it is on
    disk_bytes: int = 0


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
    cache: CacheStatus = CacheStatus()


@dataclass(frozen=True)
class EngineStatus:
    loaded: list[str]
    queue_depth: int
    active_jobs: int
    loading: str | None
    running: bool
    blas: str | None = None  # the optimised BLAS library MLX uses; None: MLX's own
    models: tuple[ModelStatus, ...] = ()
