"""OpenAI wire schemas: requests, responses, stream chunks.

Requests forbid unknown fields, so a field we do not support is a 400 that names it instead of
being silently ignored. Responses drop fields that are absent (`None`) unless OpenAI sends them as
an explicit null (listed in `KEEP_NULL`), so an object-typed field such as
`usage.prompt_tokens_details` is never `null`.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from server.errors import InvalidRequest, UnsupportedParameter

# OpenAI's documented bounds
MAX_N = 128
MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5


# --------------------------------------------------------------------------- requests


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    # passed through to the chat template, which may use it
    name: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        # only an assistant turn may come without content (OpenAI: when it made tool calls)
        if self.content is None and self.role != "assistant":
            raise InvalidRequest(f"Missing required parameter: 'content' of a {self.role} message.", param="messages.content")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Request):
    include_usage: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class _SamplingFields(_Request):
    """Fields shared by both generation routes (OpenAI's and vLLM's extras)."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    user: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=2)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None  # no end-of-sequence before this many

    @model_validator(mode="after")
    def _check_common(self) -> _SamplingFields:
        if self.top_k is not None and self.top_k < -1:
            raise InvalidRequest(
                "Invalid value for 'top_k': must be -1 or 0 (disabled) or at least 1.", param="top_k"
            )
        if self.min_tokens and self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequest("Invalid value for 'min_tokens': must not exceed 'max_tokens'.", param="min_tokens")
        stops = self.stop_list()
        if len(stops) > MAX_STOP_SEQUENCES:
            raise InvalidRequest(
                f"Invalid value for 'stop': at most {MAX_STOP_SEQUENCES} sequences are allowed.",
                param="stop",
            )
        if any(s == "" for s in stops):
            raise InvalidRequest("Invalid value for 'stop': stop sequences must not be empty.", param="stop")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest(
                "Invalid value for 'stream_options': only allowed when 'stream' is true.",
                param="stream_options",
            )
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    # accepted only at values that change nothing; anything else is refused by name
    response_format: ResponseFormat | None = None
    store: bool | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest(
                "Invalid value for 'top_logprobs': 'logprobs' must be true to use 'top_logprobs'.",
                param="top_logprobs",
            )
        if self.response_format is not None and self.response_format.type != "text":
            raise UnsupportedParameter(
                "response_format", f"Only {{'type': 'text'}} is supported, not '{self.response_format.type}'."
            )
        if self.store:
            raise UnsupportedParameter("store", "This server does not store completions.")
        if self.parallel_tool_calls is not None:
            raise UnsupportedParameter("parallel_tool_calls", "Tool calls are not supported.")
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise InvalidRequest(
                "Give 'max_completion_tokens' or 'max_tokens', not two different values.",
                param="max_completion_tokens",
            )
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise UnsupportedParameter("best_of", "Only best_of equal to n is supported.")
        prompts = self.prompt
        if isinstance(prompts, list) and len(prompts) == 0:
            raise InvalidRequest("Invalid value for 'prompt': must not be empty.", param="prompt")
        if isinstance(prompts, list) and any(isinstance(p, list) and not p for p in prompts):
            raise InvalidRequest("Invalid value for 'prompt': token lists must not be empty.", param="prompt")
        return self

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts as a list: strings, or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [[int(x) for x in p if isinstance(x, int)]]
        if all(isinstance(x, str) for x in p):
            return [str(x) for x in p]
        return [[int(t) for t in x] for x in p if isinstance(x, list)]


# --------------------------------------------------------------------------- responses


class _Wire(BaseModel):
    """Response object: `None` fields are omitted, except those OpenAI sends as explicit null."""

    KEEP_NULL: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: Any) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None or k in self.KEEP_NULL}


class PromptTokensDetails(_Wire):
    cached_tokens: int = 0


class Usage(_Wire):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(_Wire):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(_Wire):
    KEEP_NULL = frozenset({"bytes"})
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Wire):
    KEEP_NULL = frozenset({"content", "refusal"})
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class AssistantMessage(_Wire):
    KEEP_NULL = frozenset({"content", "refusal"})
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


FinishReason = Literal["stop", "length"]


class ChatChoice(_Wire):
    KEEP_NULL = frozenset({"logprobs"})
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(_Wire):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class Delta(_Wire):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Wire):
    KEEP_NULL = frozenset({"finish_reason"})
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Wire):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(_Wire):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]

    @model_serializer(mode="plain")
    def _plain(self) -> dict[str, Any]:
        # the first echoed prompt token has no logprob: OpenAI sends null inside these lists
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


class CompletionChoice(_Wire):
    KEEP_NULL = frozenset({"logprobs", "finish_reason"})
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class Completion(_Wire):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Wire):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # extras (OpenAI's schema allows them): what serves it and how much context it takes
    engine: str | None = None
    max_model_len: int | None = None
    root: str | None = None
    state: str | None = None  # ready, loading, or unloaded (lazy: its first request loads it)
    variants: dict[str, float] | None = None  # an alias: the models it sends requests to, by share


class ModelList(_Wire):
    object: Literal["list"] = "list"
    data: list[ModelCard]
