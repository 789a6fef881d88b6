"""`/v1/chat/completions`: the request, the response and its stream chunks."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from server.engines.base import FinishReason
from server.errors import InvalidRequest, UnsupportedParameter
from server.protocol.common import (
    MAX_TOP_LOGPROBS,
    NO_MULTIMODAL,
    NOT_YET,
    VLLM_FLAG,
    PromptLogprobs,
    ResponseFormat,
    SamplingFields,
    Usage,
    Wire,
    _Request,
    refused_common,
)

HARMONY = ("It belongs to gpt-oss's Harmony message format; this server renders messages with the model's "
           "chat template.")


# part type -> the field that holds its text; vLLM reads the Responses API's text parts as text
TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}
# part type -> why it is refused (any other type: not a kind this server knows)
REFUSED_PARTS = {
    **{t: NO_MULTIMODAL for t in ("image_url", "input_audio", "file", "input_image", "audio_url", "video_url",
                                  "image_embeds", "audio_embeds", "video_embeds")},
    "prompt_embeds": f"Prompt embeddings: {VLLM_FLAG} (--enable-prompt-embeds).",
    "tool_reference": NOT_YET,
    "thinking": "A thinking part is a reasoning model's earlier thinking; vLLM would read it as plain text of "
                "the message, putting the thinking into the conversation as if said. Send it as the message's "
                "'reasoning' instead, which the chat template places where the model expects it.",
}
CHAT_ROLES = ("system", "developer", "user", "assistant")


class PromptCacheBreakpoint(_Request):
    """OpenAI's explicit end of a reusable prefix: a hint (our prefix cache works per block)."""

    mode: Literal["explicit"]
    ttl: Literal["30m", "12h"] | None = None


class ContentPart(_Request):
    """A part of a message's content: text (or an assistant's refusal, which is text too)."""

    type: str
    text: str | None = None
    refusal: str | None = None
    prompt_cache_breakpoint: PromptCacheBreakpoint | None = None  # a hint, on text parts
    # other part types are refused by their type, not by their fields
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type not in TEXT_PARTS:
            why = REFUSED_PARTS.get(self.type, "Only text content parts are supported.")
            raise UnsupportedParameter(f"messages.content.{self.type[:40]}",
                                       f"Content parts of type {self.type[:40]!r} are not supported. {why}")
        holder = TEXT_PARTS[self.type]
        extra = [*(self.model_extra or ()), *(["text"] if holder == "refusal" and self.text is not None else []),
                 *(["refusal"] if holder == "text" and self.refusal is not None else []),
                 *(["prompt_cache_breakpoint"] if holder == "refusal" and self.prompt_cache_breakpoint else [])]
        if extra:
            raise UnsupportedParameter(f"messages.content.{extra[0]}",
                                       f"A {self.type} content part takes 'type' and '{holder}' only"
                                       + (" (and 'prompt_cache_breakpoint')." if holder == "text" else "."))
        if getattr(self, holder) is None:
            raise InvalidRequest(f"Missing required parameter: '{holder}' of a {self.type} content part.",
                                 param="messages.content")
        return self

    @property
    def value(self) -> str:
        return (self.refusal if self.type == "refusal" else self.text) or ""


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    # passed through to the chat template, which may use them
    name: str | None = None
    reasoning: str | None = None  # vLLM: an earlier turn's reasoning (reasoning_content: its old name)
    task: str | None = None  # vLLM: a model-specific task marker (DeepSeek V4)
    refusal: str | None = None  # an assistant's earlier refusal: its text when it has no content
    PARAM_PREFIX = "messages."
    REFUSED: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        "tool_calls": ((None, []), NOT_YET),
        "function_call": ((None,), NOT_YET),
        "tool_call_id": ((None,), f"It belongs to tool messages. {NOT_YET}"),
        "tools": ((None, []), NOT_YET),
        "audio": ((None,), NO_MULTIMODAL),
        **{name: ((None,), HARMONY) for name in ("author", "channel", "recipient", "content_type")},
    }

    @model_validator(mode="before")
    @classmethod
    def _before(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        role = data.get("role")
        if role in ("tool", "function"):
            raise UnsupportedParameter(f"messages.role.{role}", f"{role.capitalize()} messages "
                                       f"need tool support. {NOT_YET}")
        if isinstance(role, str) and role not in CHAT_ROLES:
            raise UnsupportedParameter(f"messages.role.{role[:40]}", "Only system, developer, user and "
                                       "assistant messages are served (vLLM passes other roles to the chat "
                                       "template, which then renders a turn the model was not trained on).")
        content = data.get("content")
        if isinstance(content, list) and any(isinstance(part, str) for part in content):
            raise UnsupportedParameter("messages.content", "Content parts are objects such as "
                                       '{"type": "text", "text": "..."}; a bare string in the list is vLLM\'s '
                                       "shorthand, not OpenAI's. Send the text as 'content' itself, or as text parts.")
        if "reasoning_content" in data:  # vLLM's old name; 'reasoning' wins when both are set
            data = dict(data)
            old = data.pop("reasoning_content")
            if data.get("reasoning") is None:
                data["reasoning"] = old
        return data

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        # only an assistant turn may come without content (OpenAI: when it made tool calls)
        if self.content is None and self.role != "assistant":
            raise InvalidRequest(f"Missing required parameter: 'content' of a {self.role} message.", param="messages.content")
        return self

    def text(self) -> str:
        if self.content is None:
            return self.refusal or ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.value for part in self.content)

    def for_template(self) -> dict[str, Any]:
        # "developer" is OpenAI's newer name for the system role; templates know "system"
        msg: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.name is not None:
            msg["name"] = self.name
        if self.reasoning is not None:  # both names, as vLLM passes them: templates read one or the other
            msg["reasoning"] = msg["reasoning_content"] = self.reasoning
        if self.task is not None:
            msg["task"] = self.task
        return msg


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None  # only {"type": "text"} so far
    # vLLM's chat extras
    echo: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    documents: Annotated[list[dict[str, str]], Field(max_length=1024)] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_prompt_text: bool | None = None
    # hints
    store: bool | None = None  # chat completions are never stored here
    parallel_tool_calls: bool | None = None  # without tools it changes nothing
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    include_reasoning: bool | None = None
    modalities: list[Literal["text", "audio"]] | None = None  # ["text"] is what it does anyway; audio refused

    REFUSED: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        **refused_common(),
        "tools": ((None, []), NOT_YET),
        "tool_choice": ((None, "none"), NOT_YET),
        "functions": ((None, []), NOT_YET + " (and 'functions' is deprecated: use 'tools')"),
        "function_call": ((None, "none"), NOT_YET + " (and 'function_call' is deprecated: use 'tool_choice')"),
        "audio": ((None,), NO_MULTIMODAL),
        "prediction": ((None,), "Predicted outputs (speculative decoding from a given text) are not supported."),
        "web_search_options": ((None,), "This server has no web search."),
        "moderation": ((None,), "No moderation model runs here (its 'score' would add results and 'block' "
                                "would change the reply, so it cannot be taken as a hint)."),
        "chat_template": ((None,), f"A request's own chat template: {VLLM_FLAG} (--trust-request-chat-template)."),
        "media_io_kwargs": ((None,), NO_MULTIMODAL),
        "mm_processor_kwargs": ((None,), NO_MULTIMODAL),
    }

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise InvalidRequest(
                "Invalid value for 'top_logprobs': 'logprobs' must be true to use 'top_logprobs'.",
                param="top_logprobs",
            )
        if self.modalities and "audio" in self.modalities:
            raise UnsupportedParameter("modalities", f"Only ['text'] is supported: {NO_MULTIMODAL}")
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise InvalidRequest(
                "Give 'max_completion_tokens' or 'max_tokens', not two different values.",
                param="max_completion_tokens",
            )
        if self.continue_final_message and self.add_generation_prompt:
            raise InvalidRequest("'continue_final_message' and 'add_generation_prompt' cannot both be true: "
                                 "set 'add_generation_prompt' to false to continue the final message.",
                                 param="continue_final_message")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise InvalidRequest("'continue_final_message' needs the last message to be an assistant message "
                                 "to continue.", param="continue_final_message")
        return self

    def requested_max_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    @property
    def generation_prompt(self) -> bool:
        # vLLM: continuing the final message means no new turn is opened
        if self.add_generation_prompt is None:
            return not self.continue_final_message
        return self.add_generation_prompt

    def echoed(self) -> str:
        """vLLM's chat `echo`: the last message's content when it has the answer's role."""
        if not self.echo:
            return ""
        role = "assistant" if self.generation_prompt else self.messages[-1].role
        last = self.messages[-1]
        return last.text() if last.role == role else ""


# --------------------------------------------------------------------------- responses


class TopLogprob(Wire):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(Wire):
    KEEP_NULL = frozenset({"bytes"})
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Wire):
    KEEP_NULL = frozenset({"content", "refusal"})
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class AssistantMessage(Wire):
    KEEP_NULL = frozenset({"content", "refusal"})
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class ChatChoice(Wire):
    KEEP_NULL = frozenset({"logprobs"})
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason
    token_ids: list[int] | None = None  # vLLM's return_token_ids


class ChatCompletion(Wire):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's extras
    prompt_token_ids: list[int] | None = None
    prompt_text: str | None = None


class Delta(Wire):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(Wire):
    KEEP_NULL = frozenset({"finish_reason"})
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(Wire):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = None
    prompt_text: str | None = None
