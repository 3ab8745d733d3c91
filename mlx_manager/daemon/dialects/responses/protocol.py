"""OpenAI's Responses API as this server speaks it: the request, the response object, the events.

Field by field as OpenAI defines them (the official SDK's `types/responses/`), so its clients
parse what we send. What OpenAI defines and this server does not do is refused by name (a
400): hosted tools (web search, file search, MCP...), images and files, background runs,
conversations, prompt templates... Hints with nothing to act on here are accepted: `user`,
`safety_identifier`, `prompt_cache_key` (the prompt cache is automatic), `service_tier`
auto/default, `truncation` disabled, `stream_options.include_obfuscation` (no padding is sent).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mlx_manager.daemon.dialects.common import (
    UNSUPPORTED,
    Strict,
    not_supported,
    refuse_when_set,
)
from mlx_manager.daemon.schemas import FunctionName, ModelId, ReasoningEffort

Status = Literal["in_progress", "completed", "incomplete"]  # of an output item
ResponseStatus = Literal["completed", "failed", "in_progress", "incomplete"]


def _type_of(value: Any, default: str | None = None) -> str | None:
    return value.get("type", default) if isinstance(value, dict) else getattr(value, "type", default)


class Unsupported(BaseModel):
    """Something OpenAI defines that this server cannot take (an image, a hosted tool...),
    refused by its type; subclasses say what kind of thing it is."""

    model_config = ConfigDict(extra="allow")
    what: ClassVar[str] = "input items"
    type: str

    @model_validator(mode="after")
    def refuse(self) -> Unsupported:
        if self.type in ("input_image", "input_file", "input_audio"):
            raise not_supported(f"{self.type} parts are not supported: this server runs text models only")
        raise not_supported(f"{self.what} of type {self.type!r} are not supported by this server")


class UnsupportedPart(Unsupported):
    what = "content parts"


class UnsupportedTool(Unsupported):
    what = "tools"


class UnsupportedToolChoice(Unsupported):
    what = "tool choices"


# -- request: content and input items ------------------------------------------------------------


class InputText(Strict):
    type: Literal["input_text"]
    text: str
    prompt_cache_breakpoint: dict[str, Any] | None = None  # a cache hint: the prompt cache is automatic


class OutputTextParam(Strict):
    """An assistant's text, sent back as history."""

    type: Literal["output_text"]
    text: str
    annotations: list[dict[str, Any]] = []
    logprobs: list[dict[str, Any]] | None = None


class RefusalParam(Strict):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[
    Annotated[InputText, Tag("input_text")]
    | Annotated[OutputTextParam, Tag("output_text")]
    | Annotated[RefusalParam, Tag("refusal")]
    | Annotated[UnsupportedPart, Tag(UNSUPPORTED)],
    Discriminator(lambda v: t if (t := _type_of(v)) in ("input_text", "output_text", "refusal") else UNSUPPORTED),
]


def _text_as_parts(value: Any) -> Any:
    """Content given as a string is one text part."""
    return [{"type": "input_text", "text": value}] if isinstance(value, str) else value


Content = Annotated[list[ContentPart], BeforeValidator(_text_as_parts, json_schema_input_type=str | list[ContentPart])]


def text_of(parts: list[ContentPart]) -> str:
    texts = []
    for part in parts:
        if isinstance(part, (InputText, OutputTextParam)):
            texts.append(part.text)
        elif isinstance(part, RefusalParam):
            texts.append(part.refusal)
    return "".join(texts)


class MessageItem(Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Content
    id: str | None = None
    status: Status | None = None
    phase: Literal["commentary", "final_answer"] | None = None


class DirectCaller(Strict):
    type: Literal["direct"]


class FunctionCallItem(Strict):
    """A call the model made earlier, sent back as history."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: FunctionName
    arguments: str
    id: str | None = None
    status: Status | None = None
    caller: DirectCaller | None = None
    namespace: str | None = None

    refuse_unsupported = field_validator("namespace")(refuse_when_set)


OutputPart = Annotated[
    Annotated[InputText, Tag("input_text")] | Annotated[UnsupportedPart, Tag(UNSUPPORTED)],
    Discriminator(lambda v: "input_text" if _type_of(v) == "input_text" else UNSUPPORTED),
]


class FunctionCallOutputItem(Strict):
    """What a call returned."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: Annotated[list[OutputPart], BeforeValidator(_text_as_parts, json_schema_input_type=str | list[OutputPart])]
    id: str | None = None
    status: Status | None = None
    name: str | None = None
    caller: DirectCaller | None = None
    namespace: str | None = None

    refuse_unsupported = field_validator("namespace")(refuse_when_set)


class SummaryTextParam(Strict):
    type: Literal["summary_text"]
    text: str


class ReasoningTextParam(Strict):
    type: Literal["reasoning_text"]
    text: str


class ReasoningItemParam(Strict):
    """The model's thinking in an earlier turn (some templates show it again)."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[SummaryTextParam] = []
    content: list[ReasoningTextParam] | None = None
    encrypted_content: str | None = None  # never sent by this server, so none can come back
    status: Status | None = None

    refuse_unsupported = field_validator("encrypted_content")(refuse_when_set)

    def text(self) -> str:
        return "".join(part.text for part in self.content or self.summary)


_ITEMS = ("message", "function_call", "function_call_output", "reasoning")

InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItemParam, Tag("reasoning")]
    | Annotated[Unsupported, Tag(UNSUPPORTED)],
    Discriminator(lambda v: t if (t := _type_of(v, "message")) in _ITEMS else UNSUPPORTED),
]


def _text_as_items(value: Any) -> Any:
    """Input given as a string is one user message."""
    return [{"type": "message", "role": "user", "content": value}] if isinstance(value, str) else value


Input = Annotated[list[InputItem], BeforeValidator(_text_as_items, json_schema_input_type=str | list[InputItem])]


# -- request: tools, text, reasoning -------------------------------------------------------------


class FunctionToolParam(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["function"]
    name: FunctionName
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # true: the call's arguments are held to parameters by the engine's grammar
    description: str | None = None
    allowed_callers: list[str] | None = None
    defer_loading: bool | None = None
    output_schema: dict[str, Any] | None = None
    async_: bool | None = Field(None, alias="async")

    refuse_unsupported = field_validator("allowed_callers", "defer_loading", "output_schema", "async_")(refuse_when_set)

    def for_template(self) -> dict[str, Any]:
        function: dict[str, Any] = {
            "name": self.name,
            "parameters": self.parameters or {"type": "object", "properties": {}},
        }
        if self.description is not None:
            function["description"] = self.description
        if self.strict:
            function["strict"] = True
        return {"type": "function", "function": function}


ToolParam = Annotated[
    Annotated[FunctionToolParam, Tag("function")] | Annotated[UnsupportedTool, Tag(UNSUPPORTED)],
    Discriminator(lambda v: "function" if _type_of(v) == "function" else UNSUPPORTED),
]


class ToolChoiceFunction(Strict):
    type: Literal["function"]
    name: FunctionName


class AllowedTool(Strict):
    type: Literal["function"]
    name: FunctionName


class ToolChoiceAllowed(Strict):
    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"]
    tools: list[AllowedTool] = Field(min_length=1)


def _choice_tag(value: Any) -> str:
    if isinstance(value, str):
        return "mode"
    kind = _type_of(value)
    return kind if kind in ("function", "allowed_tools") else UNSUPPORTED


ToolChoiceParam = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("mode")]
    | Annotated[ToolChoiceFunction, Tag("function")]
    | Annotated[ToolChoiceAllowed, Tag("allowed_tools")]
    | Annotated[UnsupportedToolChoice, Tag(UNSUPPORTED)],
    Discriminator(_choice_tag),
]


class FormatText(Strict):
    type: Literal["text"]


class FormatJsonSchema(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["json_schema"]
    name: str = Field(min_length=1, max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class FormatJsonObject(Strict):
    type: Literal["json_object"]


class TextConfig(Strict):
    format: Annotated[FormatText | FormatJsonSchema | FormatJsonObject, Field(discriminator="type")] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None

    @field_validator("verbosity")
    @classmethod
    def only_the_default(cls, verbosity: str | None) -> str | None:
        if verbosity not in (None, "medium"):
            raise not_supported("only 'medium' (the model's own length) is supported")
        return verbosity


class ReasoningParam(Strict):
    effort: ReasoningEffort | None = None
    # No summarizer here: a summary asked for is the thinking itself.
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None  # the deprecated name
    context: str | None = None
    mode: str | None = None

    refuse_unsupported = field_validator("context", "mode")(refuse_when_set)


class StreamOptions(Strict):
    include_obfuscation: bool | None = None


class ResponsesRequest(Strict):
    model: ModelId | None = None  # none: models.default, or the one loaded model
    input: Input = Field(min_length=1)
    instructions: str | None = None
    tools: list[ToolParam] | None = Field(None, max_length=512)
    tool_choice: ToolChoiceParam | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    text: TextConfig | None = None
    reasoning: ReasoningParam | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    store: bool | None = None  # None: true, as with OpenAI; kept in memory only
    previous_response_id: str | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    truncation: str | None = None
    include: list[str] | None = None
    background: bool | None = None
    top_logprobs: int | None = None
    # Defined by OpenAI, unavailable here.
    conversation: Any = None
    prompt: Any = None
    moderation: Any = None
    context_management: Any = None
    max_tool_calls: int | None = None
    access_programs: Any = None
    image: Any = None
    background_options: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: str | None = None

    refuse_unsupported = field_validator(
        "conversation",
        "prompt",
        "moderation",
        "context_management",
        "max_tool_calls",
        "access_programs",
        "image",
        "background_options",
        "prompt_cache_options",
        "prompt_cache_retention",
    )(refuse_when_set)

    @field_validator("service_tier")
    @classmethod
    def one_tier(cls, tier: str | None) -> str | None:
        if tier not in (None, "auto", "default"):
            raise not_supported("this server has one tier: 'auto' or 'default'")
        return tier

    @field_validator("truncation")
    @classmethod
    def no_truncation(cls, truncation: str | None) -> str | None:
        if truncation not in (None, "disabled"):
            raise not_supported("only 'disabled' is supported: a prompt over the model's context is refused")
        return truncation

    @field_validator("include")
    @classmethod
    def nothing_to_include(cls, include: list[str] | None) -> list[str] | None:
        if include:
            raise not_supported(f"{include[0]!r}: nothing extra can be included by this server")
        return include

    @field_validator("background")
    @classmethod
    def in_the_foreground(cls, background: bool | None) -> bool | None:
        if background:
            raise not_supported("background responses are not supported; stream instead")
        return background

    @field_validator("top_logprobs")
    @classmethod
    def no_logprobs(cls, top_logprobs: int | None) -> int | None:
        if top_logprobs:
            raise not_supported("log probabilities are not supported")
        return top_logprobs

    @field_validator("tool_choice")
    @classmethod
    def tool_choice_names_tools(cls, choice: Any, info: ValidationInfo) -> Any:
        names = {t.name for t in info.data.get("tools") or [] if isinstance(t, FunctionToolParam)}
        named = [choice.name] if isinstance(choice, ToolChoiceFunction) else []
        if isinstance(choice, ToolChoiceAllowed):
            named = [t.name for t in choice.tools]
        unknown = [name for name in named if name not in names]
        if unknown:
            raise ValueError(f"it names function {unknown[0]!r}, which is not among the tools")
        if choice == "required" and not names:
            raise ValueError("'required' needs tools")
        return choice

    def wants_summary(self) -> bool:
        return self.reasoning is not None and (self.reasoning.summary or self.reasoning.generate_summary) is not None


# -- the response object -------------------------------------------------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: Status
    content: list[OutputText]


class FunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Status


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class SummaryText(BaseModel):
    type: Literal["summary_text"] = "summary_text"
    text: str


class ReasoningItem(BaseModel):
    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[SummaryText] = []
    content: list[ReasoningText] = []
    status: Status


OutputItem = Annotated[OutputMessage | FunctionCall | ReasoningItem, Field(discriminator="type")]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseError(BaseModel):
    code: Literal["server_error", "rate_limit_exceeded"]
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class FunctionTool(BaseModel):
    type: Literal["function"] = "function"
    name: str
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class Reasoning(BaseModel):
    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class TextFormat(BaseModel):
    type: Literal["text"] = "text"


class Text(BaseModel):
    format: TextFormat = Field(default_factory=TextFormat)


class ResponseObject(BaseModel):
    """A response, as created, streamed, stored and retrieved."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: ResponseStatus
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    instructions: str | None = None
    output: list[OutputItem] = []
    parallel_tool_calls: bool
    previous_response_id: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    reasoning: Reasoning | None = None
    text: Text = Field(default_factory=Text)
    tool_choice: Any = "auto"  # as the request gave it
    tools: list[FunctionTool] = []
    truncation: Literal["disabled"] = "disabled"
    store: bool = True
    background: bool = False
    metadata: dict[str, str] = {}
    usage: ResponseUsage | None = None
    user: str | None = None


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


# -- stream events (each with its place in the stream: sequence_number) --------------------------


class LifecycleEvent(BaseModel):
    """response.created, response.in_progress, response.completed, .incomplete, .failed."""

    type: Literal[
        "response.created", "response.in_progress", "response.completed", "response.incomplete", "response.failed"
    ]
    sequence_number: int
    response: ResponseObject


class OutputItemEvent(BaseModel):
    type: Literal["response.output_item.added", "response.output_item.done"]
    sequence_number: int
    output_index: int
    item: OutputItem


class ContentPartEvent(BaseModel):
    type: Literal["response.content_part.added", "response.content_part.done"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: Annotated[OutputText | ReasoningText, Field(discriminator="type")]


class OutputTextDeltaEvent(BaseModel):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = []


class OutputTextDoneEvent(BaseModel):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = []


class ReasoningTextDeltaEvent(BaseModel):
    type: Literal["response.reasoning_text.delta"] = "response.reasoning_text.delta"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str


class ReasoningTextDoneEvent(BaseModel):
    type: Literal["response.reasoning_text.done"] = "response.reasoning_text.done"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str


class SummaryPartEvent(BaseModel):
    type: Literal["response.reasoning_summary_part.added", "response.reasoning_summary_part.done"]
    sequence_number: int
    item_id: str
    output_index: int
    summary_index: int
    part: SummaryText


class SummaryTextDeltaEvent(BaseModel):
    type: Literal["response.reasoning_summary_text.delta"] = "response.reasoning_summary_text.delta"
    sequence_number: int
    item_id: str
    output_index: int
    summary_index: int
    delta: str


class SummaryTextDoneEvent(BaseModel):
    type: Literal["response.reasoning_summary_text.done"] = "response.reasoning_summary_text.done"
    sequence_number: int
    item_id: str
    output_index: int
    summary_index: int
    text: str


class FunctionCallArgumentsDeltaEvent(BaseModel):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    sequence_number: int
    item_id: str
    output_index: int
    delta: str


class FunctionCallArgumentsDoneEvent(BaseModel):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    sequence_number: int
    item_id: str
    output_index: int
    name: str
    arguments: str
