"""Anthropic's Messages API as this server speaks it: the request, the message, the stream events.

Field by field as Anthropic defines them (the official SDK's `types/`), so its clients parse what
we send. What Anthropic defines and this server does not do is refused by name (a 400): image
and document blocks (no vision yet), server tools, containers, MCP servers... `cache_control`
hints are accepted everywhere: the prompt cache needs no markers. `metadata.user_id` is accepted
and kept nowhere (Anthropic uses it to spot abuse; there is no such service here).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

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
from mlx_manager.daemon.schemas import FunctionName, ModelId

# -- request: content blocks ---------------------------------------------------------------------


class UnsupportedBlock(BaseModel):
    """A block type Anthropic defines that this server cannot take: refused by its type."""

    model_config = ConfigDict(extra="allow")
    type: str

    @model_validator(mode="after")
    def refuse(self) -> UnsupportedBlock:
        if self.type in ("image", "document"):
            raise not_supported(f"{self.type} blocks are not supported: this server runs text models only")
        raise not_supported(f"content blocks of type {self.type!r} are not supported by this server")


_BLOCKS = {"text", "tool_use", "tool_result", "thinking"}


def _block_tag(value: Any, known: set[str] = _BLOCKS) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in known else UNSUPPORTED


def _text_as_blocks(value: Any) -> Any:
    """Content given as a string is one text block, as Anthropic reads it."""
    return [{"type": "text", "text": value}] if isinstance(value, str) else value


class CacheControl(Strict):
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlockParam(Strict):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: list[Any] | None = None

    refuse_unsupported = field_validator("citations")(refuse_when_set)


class DirectCaller(Strict):
    type: Literal["direct"]


class ToolUseBlockParam(Strict):
    """A call the assistant made earlier, sent back as history."""

    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: FunctionName
    input: dict[str, Any]
    cache_control: CacheControl | None = None
    caller: DirectCaller | None = None
    toolset_name: str | None = None

    refuse_unsupported = field_validator("toolset_name")(refuse_when_set)


ResultBlockParam = Annotated[
    Annotated[TextBlockParam, Tag("text")] | Annotated[UnsupportedBlock, Tag(UNSUPPORTED)],
    Discriminator(lambda value: _block_tag(value, {"text"})),
]
# A string, or blocks: a string is read as one text block.
ResultContent = Annotated[
    list[ResultBlockParam], BeforeValidator(_text_as_blocks, json_schema_input_type=str | list[ResultBlockParam])
]


class ToolResultBlockParam(Strict):
    """The result of a call, in a user message."""

    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: ResultContent = []
    is_error: bool = False
    cache_control: CacheControl | None = None
    toolset_name: str | None = None

    refuse_unsupported = field_validator("toolset_name")(refuse_when_set)

    def text(self) -> str:
        text = "\n\n".join(b.text for b in self.content if isinstance(b, TextBlockParam))
        return f"Error: {text}" if self.is_error else text  # chat templates have no error flag


class ThinkingBlockParam(Strict):
    """The assistant's thinking in an earlier turn (some templates show it again)."""

    type: Literal["thinking"]
    thinking: str
    signature: str


ContentBlockParam = Annotated[
    Annotated[TextBlockParam, Tag("text")]
    | Annotated[ToolUseBlockParam, Tag("tool_use")]
    | Annotated[ToolResultBlockParam, Tag("tool_result")]
    | Annotated[ThinkingBlockParam, Tag("thinking")]
    | Annotated[UnsupportedBlock, Tag(UNSUPPORTED)],
    Discriminator(_block_tag),
]
MessageContent = Annotated[
    list[ContentBlockParam], BeforeValidator(_text_as_blocks, json_schema_input_type=str | list[ContentBlockParam])
]
SystemContent = Annotated[
    list[TextBlockParam], BeforeValidator(_text_as_blocks, json_schema_input_type=str | list[TextBlockParam])
]
# Blocks each role may send.
_ROLE_BLOCKS = {"user": {"text", "tool_result"}, "assistant": {"text", "tool_use", "thinking"}, "system": {"text"}}


class MessageParam(Strict):
    role: Literal["user", "assistant", "system"]
    content: MessageContent

    @field_validator("content")
    @classmethod
    def blocks_of_its_role(cls, content: list[ContentBlockParam], info: ValidationInfo) -> list[ContentBlockParam]:
        role = info.data.get("role")
        for block in content:
            if role in _ROLE_BLOCKS and block.type not in _ROLE_BLOCKS[role]:
                raise ValueError(f"{role} messages cannot hold {block.type} blocks")
        return content


# -- request: tools, choices, thinking -----------------------------------------------------------


class ToolParam(Strict):
    """A client tool: a function the model may call."""

    name: FunctionName
    input_schema: dict[str, Any]
    description: str | None = None
    type: Literal["custom"] | None = None
    cache_control: CacheControl | None = None
    strict: bool | None = None  # true: the call's input is held to input_schema by the engine's grammar
    input_examples: list[dict[str, Any]] | None = None
    defer_loading: bool | None = None
    allowed_callers: list[str] | None = None
    eager_input_streaming: bool | None = None

    refuse_unsupported = field_validator("input_examples", "defer_loading", "allowed_callers", "eager_input_streaming")(
        refuse_when_set
    )

    def for_template(self) -> dict[str, Any]:
        """As chat templates take tools: an OpenAI function definition."""
        function: dict[str, Any] = {"name": self.name, "parameters": self.input_schema}
        if self.description is not None:
            function["description"] = self.description
        if self.strict:
            function["strict"] = True
        return {"type": "function", "function": function}


class ServerTool(BaseModel):
    """Anthropic's own tools (web search, code execution, bash...): they run on Anthropic's side."""

    model_config = ConfigDict(extra="allow")
    type: str

    @model_validator(mode="after")
    def refuse(self) -> ServerTool:
        raise not_supported(
            f"tools of type {self.type!r} (Anthropic's server tools) are not supported; only client tools"
        )


def _tool_tag(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "custom" if kind in (None, "custom") else UNSUPPORTED


Tool = Annotated[
    Annotated[ToolParam, Tag("custom")] | Annotated[ServerTool, Tag(UNSUPPORTED)],
    Discriminator(_tool_tag),
]


class ToolChoiceAuto(Strict):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(Strict):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(Strict):
    type: Literal["tool"]
    name: FunctionName
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(Strict):
    type: Literal["none"]


ToolChoice = Annotated[ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone, Field(discriminator="type")]


class ThinkingEnabled(Strict):
    type: Literal["enabled"]
    budget_tokens: int = Field(ge=1024)  # Anthropic's floor
    display: Literal["summarized", "omitted"] | None = None


class ThinkingDisabled(Strict):
    type: Literal["disabled"]


class ThinkingAdaptive(Strict):
    type: Literal["adaptive"]
    display: Literal["summarized", "omitted"] | None = None


class UnsupportedThinking(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str

    @model_validator(mode="after")
    def refuse(self) -> UnsupportedThinking:
        raise not_supported(f"thinking of type {self.type!r} is not supported; use enabled, adaptive or disabled")


def _thinking_tag(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in ("enabled", "disabled", "adaptive") else UNSUPPORTED


Thinking = Annotated[
    Annotated[ThinkingEnabled, Tag("enabled")]
    | Annotated[ThinkingDisabled, Tag("disabled")]
    | Annotated[ThinkingAdaptive, Tag("adaptive")]
    | Annotated[UnsupportedThinking, Tag(UNSUPPORTED)],
    Discriminator(_thinking_tag),
]


class JsonOutputFormat(Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Strict):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None  # to the template, as reasoning_effort
    format: JsonOutputFormat | None = None  # enforced by the engine's grammar


class Metadata(Strict):
    user_id: str | None = None


# -- requests ------------------------------------------------------------------------------------


class PromptFields(Strict):
    """What makes the prompt: shared by /v1/messages and /v1/messages/count_tokens."""

    model: ModelId | None = None  # none: models.default, or the one loaded model
    messages: list[MessageParam] = Field(min_length=1)
    system: SystemContent | None = None
    tools: list[Tool] | None = Field(None, max_length=512)
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    cache_control: CacheControl | None = None
    # Defined by Anthropic, meaningless or unavailable here.
    speed: str | None = None
    container: Any = None
    context_management: Any = None
    mcp_servers: Any = None
    diagnostics: Any = None
    inference_geo: str | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None

    refuse_unsupported = field_validator(
        "container",
        "context_management",
        "mcp_servers",
        "diagnostics",
        "inference_geo",
        "user_profile_id",
        "workspace_id",
    )(refuse_when_set)

    @field_validator("speed")
    @classmethod
    def one_speed(cls, speed: str | None) -> str | None:
        if speed not in (None, "standard"):
            raise not_supported("only 'standard': this server has one speed")
        return speed

    @field_validator("messages")
    @classmethod
    def no_prefill(cls, messages: list[MessageParam]) -> list[MessageParam]:
        if messages[-1].role == "assistant":
            raise not_supported(
                "a last message from the assistant (a prefilled answer) is not supported; end with a user message"
            )
        return messages

    @field_validator("tool_choice")
    @classmethod
    def tool_choice_names_a_tool(cls, choice: Any, info: ValidationInfo) -> Any:
        tools = [t for t in info.data.get("tools") or [] if isinstance(t, ToolParam)]
        if isinstance(choice, ToolChoiceTool) and choice.name not in [t.name for t in tools]:
            raise ValueError(f"it names tool {choice.name!r}, which is not among the tools")
        if isinstance(choice, (ToolChoiceAny, ToolChoiceTool)) and not tools:
            raise ValueError(f"{choice.type!r} needs tools")
        return choice

    def system_text(self) -> str | None:
        return "\n\n".join(block.text for block in self.system or []) or None


class MessagesRequest(PromptFields):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = Field(None, max_length=16)
    stream: bool = False
    # Anthropic's ranges: temperature up to 1.
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    metadata: Metadata | None = None
    service_tier: Literal["auto", "standard_only"] | None = None  # one tier here: both mean it

    @model_validator(mode="after")
    def budget_under_max_tokens(self) -> MessagesRequest:
        if isinstance(self.thinking, ThinkingEnabled) and self.thinking.budget_tokens >= self.max_tokens:
            raise ValueError("thinking.budget_tokens must be less than max_tokens")
        return self


class CountTokensRequest(PromptFields):
    pass


# -- responses -----------------------------------------------------------------------------------

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class TextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str
    citations: None = None


class ThinkingBlock(BaseModel):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str = ""  # Anthropic signs Claude's thinking; there is nothing to sign here


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


ContentBlock = Annotated[TextBlock | ThinkingBlock | ToolUseBlock, Field(discriminator="type")]


class Usage(BaseModel):
    input_tokens: int  # of the prompt, those not read from the cache (Anthropic's definition)
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class Message(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ContentBlock]
    stop_reason: StopReason | None
    stop_sequence: str | None = None
    usage: Usage


class TokenCount(BaseModel):
    input_tokens: int


# -- stream events -------------------------------------------------------------------------------


class MessageStartEvent(BaseModel):
    type: Literal["message_start"] = "message_start"
    message: Message


class ContentBlockStartEvent(BaseModel):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: ContentBlock


class TextDelta(BaseModel):
    type: Literal["text_delta"] = "text_delta"
    text: str


class ThinkingDelta(BaseModel):
    type: Literal["thinking_delta"] = "thinking_delta"
    thinking: str


class InputJsonDelta(BaseModel):
    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


class ContentBlockDeltaEvent(BaseModel):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: Annotated[TextDelta | ThinkingDelta | InputJsonDelta, Field(discriminator="type")]


class ContentBlockStopEvent(BaseModel):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class MessageDelta(BaseModel):
    stop_reason: StopReason
    stop_sequence: str | None = None


class MessageDeltaUsage(BaseModel):
    """Cumulative figures at the end of the stream."""

    output_tokens: int
    input_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class MessageDeltaEvent(BaseModel):
    type: Literal["message_delta"] = "message_delta"
    delta: MessageDelta
    usage: MessageDeltaUsage


class MessageStopEvent(BaseModel):
    type: Literal["message_stop"] = "message_stop"


class PingEvent(BaseModel):
    type: Literal["ping"] = "ping"
