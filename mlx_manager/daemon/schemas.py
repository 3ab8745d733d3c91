"""Request and response bodies of the OpenAI API, as far as the daemon serves it.

Requests ignore unknown fields (as OpenAI does, so newer clients keep working) and refuse
known fields with invalid values (422). Fields OpenAI defines that have no meaning here
(penalties, logit_bias, user...) are accepted and ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Stop = str | Annotated[list[str], Field(max_length=16)] | None
TokenId = Annotated[int, Field(ge=0)]  # the upper bound is the model's vocabulary: the engine checks it


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(Lenient):
    include_usage: bool = False


class ContentPart(Lenient):
    type: str
    text: str | None = None


class Message(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

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


class GenerationFields(Lenient):
    """Fields chat and completions share."""

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
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
    user: str | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(GenerationFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def engine_messages(self) -> list[dict[str, Any]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(GenerationFields):
    # One prompt only (n = 1): a string, a list of token ids, or a one-element list of either.
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    echo: bool = False

    @model_validator(mode="after")
    def one_prompt(self) -> CompletionRequest:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError("only one prompt per request is supported")
            self.prompt = prompt[0]
        if self.echo:
            raise ValueError("echo is not supported")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own limit per request


class EmbeddingsRequest(Lenient):
    model: str = Field(min_length=1)
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
            self.input = [value]
        if not self.input:
            raise ValueError("input must not be empty")
        if len(self.input) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"input has {len(self.input)} items; at most {MAX_EMBEDDING_INPUTS} per request")
        for index, item in enumerate(self.input):
            if not item:
                raise ValueError(f"input {index} is empty")
        return self


# -- responses ------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


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
