"""Request and response bodies of the OpenAI API, as far as the daemon serves it.

Requests ignore unknown fields (as OpenAI does, so newer clients keep working) and refuse
known fields with invalid values (422). Chat and completions keep the fields they do not declare
as extras: a field OpenAI defines that this server does not do is refused by name (a 400), by the
one list of fields in openai_fields.py.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, cast

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

# Stop strings: up to 16 of up to 512 characters (OpenAI allows 4); matching them costs
# each generated character one step per stop string.
MAX_STOPS, MAX_STOP_LENGTH = 16, 512
StopString = Annotated[str, Field(max_length=MAX_STOP_LENGTH)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None
TokenId = Annotated[int, Field(ge=0)]  # the upper bound is the model's vocabulary: the engine checks it

# A model id goes to the audit log, the metrics, the logs and the disk: a Hugging Face id
# (org/name@revision) or a folder path, so a line of printable text of bounded length.
MAX_MODEL_ID = 1024


def _printable_model_id(value: str) -> str:
    if not value.isprintable():
        raise PydanticCustomError("model_id", "a model id is printable text: no control or invisible characters")
    return value


ModelId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_MODEL_ID,
        description="A Hugging Face repo id (org/name[@revision]) or a model folder's path.",
    ),
    AfterValidator(_printable_model_id),
]


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class OpenAIRequest(BaseModel):
    """A request object whose undeclared fields are kept (as `model_extra`), for the routes to
    refuse those OpenAI defines and this server does not do (openai_fields.py); the rest is ignored."""

    model_config = ConfigDict(extra="allow")


class StreamOptions(OpenAIRequest):
    include_usage: bool = False


class ContentPart(Lenient):
    type: str
    text: str | None = None


FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,128}$")]


class FunctionCall(Lenient):
    name: FunctionName
    arguments: str  # a JSON object, as text

    def arguments_object(self) -> Any:
        """The arguments as chat templates take them: an object (text that is not JSON stays text)."""
        try:
            return json.loads(self.arguments)
        except ValueError:
            return self.arguments


class ToolCallIn(Lenient):
    """A call an earlier assistant message made, sent back as history."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant: the calls it made
    tool_call_id: str | None = Field(None, validate_default=True)  # tool: the call this message answers
    # assistant: its thinking, which some templates show again (Qwen3 drops old turns' thinking)
    reasoning_content: str | None = None
    reasoning: str | None = None

    @field_validator("tool_calls")
    @classmethod
    def only_assistants_call(cls, calls: list[ToolCallIn] | None, info: ValidationInfo) -> list[ToolCallIn] | None:
        role = info.data.get("role")
        if calls is not None and role != "assistant":
            raise ValueError(f"only assistant messages carry tool calls, not {role!r} messages")
        return calls

    @field_validator("tool_call_id")
    @classmethod
    def tool_results_name_their_call(cls, call_id: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("role") == "tool" and not call_id:
            raise ValueError("a tool message must name the call it answers")
        return call_id

    @field_validator("content")
    @classmethod
    def text_parts_only(cls, content: str | list[ContentPart] | None) -> str | list[ContentPart] | None:
        if isinstance(content, list):
            for part in content:
                if part.type != "text":
                    raise ValueError(f"content parts of type {part.type!r} are not supported; only 'text'")
        return content

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text or "" for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates take it: text content, a developer message as the
        system message, call arguments as objects."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": c.function.arguments_object()},
                }
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        reasoning = self.reasoning_content or self.reasoning
        if reasoning:
            message["reasoning_content"] = reasoning
        return message


MAX_CHOICES = 128  # OpenAI's limit on n
LogitBias = Annotated[dict[TokenId, Annotated[float, Field(ge=-100, le=100)]], Field(max_length=1024)]


class GenerationFields(OpenAIRequest):
    """Fields chat and completions share."""

    model: ModelId | None = None  # none: models.default, or the one loaded model
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stop: Stop = None
    max_tokens: int | None = Field(None, ge=1)
    # None (sent as null by some clients) means the default, as with OpenAI.
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's, but mlx-lm and most local servers take it
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    # Token id (as a JSON object key, text) -> a bias added to its logit.
    logit_bias: LogitBias | None = None
    # Not OpenAI's, but mlx-lm's (and vLLM's): a multiplicative penalty over the last 20 tokens.
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    user: str | None = None
    # {"type": "text" | "json_object" | "json_schema", "json_schema": {...}}: checked, and turned
    # into a grammar, by the route (an unsupported schema is a 400 that names what it uses).
    response_format: dict[str, Any] | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def choices(self) -> int:
        return self.n or 1


class FunctionDefinition(Lenient):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class Tool(Lenient):
    type: str
    function: FunctionDefinition | None = None

    @model_validator(mode="after")
    def a_function(self) -> Tool:
        if self.type != "function":
            raise ValueError(f"tools of type {self.type!r} are not supported; only 'function'")
        if self.function is None:
            raise ValueError("a function tool needs its 'function' definition")
        return self


class NamedFunction(Lenient):
    name: FunctionName


class NamedToolChoice(Lenient):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]


class ChatCompletionRequest(GenerationFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = Field(None, max_length=512)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Not OpenAI's, but vLLM's, mlx-lm's and SGLang's: variables for the chat template.
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: ReasoningEffort | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    def logprobs_count(self) -> int | None:
        """How many alternatives each token's log probability comes with; None: no log probabilities."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("tool_choice")
    @classmethod
    def tool_choice_names_a_tool(cls, choice: ToolChoice | None, info: ValidationInfo) -> ToolChoice | None:
        tools: list[Tool] = info.data.get("tools") or []
        if isinstance(choice, NamedToolChoice):
            names = [t.function.name for t in tools if t.function is not None]
            if choice.function.name not in names:
                raise ValueError(f"it names function {choice.function.name!r}, which is not among the tools")
        elif choice == "required" and not tools:
            raise ValueError("'required' needs tools")
        return choice

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def engine_messages(self) -> list[dict[str, Any]]:
        return [m.for_template() for m in self.messages]

    def offered_tools(self) -> list[dict[str, Any]] | None:
        """The tools as chat templates take them; None when there are none to offer (none given,
        or tool_choice "none", which hides them from the model)."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]


MAX_PROMPTS = 2048


class CompletionRequest(GenerationFields):
    # A string, a list of token ids, or a list of either: several prompts, each with n choices.
    prompt: (
        str
        | list[TokenId]
        | Annotated[list[str], Field(max_length=MAX_PROMPTS)]
        | Annotated[list[list[TokenId]], Field(max_length=MAX_PROMPTS)]
    )
    logprobs: int | None = Field(None, ge=0, le=20)

    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            return list(prompt)
        return [prompt]  # type: ignore[list-item]

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own limit per request


class EmbeddingsRequest(Lenient):
    model: ModelId | None = None  # none: models.default, or the one loaded model
    # A string, a list of strings, a list of token ids (one input) or a list of token id lists.
    input: str | list[str] | list[TokenId] | list[list[TokenId]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    # Not OpenAI's: cut inputs over the model's limit instead of refusing them with a 400.
    truncate: bool = False

    @model_validator(mode="after")
    def some_input(self) -> EmbeddingsRequest:
        value = self.input
        if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], int)):
            self.input = [value]  # type: ignore[assignment]  # one input: a list of one
        if not self.input:
            raise ValueError("input must not be empty")
        if len(self.input) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"input has {len(self.input)} items; at most {MAX_EMBEDDING_INPUTS} per request")
        for index, item in enumerate(self.input):
            if not item:
                raise ValueError(f"input {index} is empty")
        return self

    def inputs(self) -> list[str] | list[list[int]]:
        """The inputs as a list (the validator has made one input a list of one)."""
        return cast("list[str] | list[list[int]]", self.input)


# -- responses ------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # restored from the prompt cache, not computed again


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ChatUsage(Usage):
    completion_tokens_details: CompletionTokensDetails = Field(default_factory=CompletionTokensDetails)


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    # The model's thinking, under both names clients read: `reasoning_content` (DeepSeek, most
    # local servers) and `reasoning` (vLLM and mlx-lm today); null when the model did not think.
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class TopLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprobOut):
    top_logprobs: list[TopLogprobOut]


class ChatLogprobs(BaseModel):
    """Every generated token, thinking and markup included (so its tokens may spell more than `content`)."""

    content: list[TokenLogprobOut] | None
    refusal: list[TokenLogprobOut] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per generated token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "local"
    root: str | None = Field(
        None, description="The folder or Hugging Face id an alias stands for (as vLLM reports it)."
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ReloadResult(BaseModel):
    applied: list[str]
    restart_needed: list[str]
    error: str | None = None


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="The vector, or its float32 little-endian bytes in base64.")


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
