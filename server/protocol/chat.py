"""`/v1/chat/completions`: the request, the response and its stream chunks."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from server.engines.base import FinishReason
from server.errors import InvalidRequest, UnsupportedParameter
from server.protocol.common import (
    MAX_TOP_LOGPROBS,
    NO_MULTIMODAL,
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
    "tool_reference": "Tool search (deferred tools) is not supported: give the tools in 'tools'.",
    "thinking": "A thinking part is a reasoning model's earlier thinking; vLLM would read it as plain text of "
                "the message, putting the thinking into the conversation as if said. Send it as the message's "
                "'reasoning' instead, which the chat template places where the model expects it.",
}
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
FUNCTIONS = ("The legacy 'functions' / 'function_call' fields (deprecated by OpenAI) are not served: send the "
             "same function in 'tools' ({'type': 'function', 'function': {...}}) and choose it with 'tool_choice'.")
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class FunctionCallIn(_Request):
    PARAM_PREFIX = "messages.tool_calls.function."
    name: str
    arguments: str


class ToolCallIn(_Request):
    """An earlier assistant turn's tool call, as the client sends it back."""

    PARAM_PREFIX = "messages.tool_calls."
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn

    @model_validator(mode="before")
    @classmethod
    def _call_function_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type", "function") != "function":
            kind = str(data.get("type"))[:40]
            raise UnsupportedParameter(f"messages.tool_calls.{kind}", "Only function tool calls are supported.")
        return data


class FunctionDefinition(_Request):
    PARAM_PREFIX = "tools.function."
    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema; none: any arguments object
    strict: bool | None = None  # the arguments are always enforced: true and false are both met


class Tool(_Request):
    PARAM_PREFIX = "tools."
    type: Literal["function"]
    function: FunctionDefinition

    @model_validator(mode="before")
    @classmethod
    def _function_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") != "function":
            raise UnsupportedParameter(f"tools.type.{str(data.get('type'))[:40]}", "Only function tools are supported "
                                       "(custom and built-in tools are not).")
        return data


class FunctionName(_Request):
    PARAM_PREFIX = "tool_choice.function."
    name: str


class NamedToolChoice(_Request):
    PARAM_PREFIX = "tool_choice."
    type: Literal["function"]
    function: FunctionName


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
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    # passed through to the chat template, which may use them
    name: str | None = None
    reasoning: str | None = None  # vLLM: an earlier turn's reasoning (reasoning_content: its old name)
    task: str | None = None  # vLLM: a model-specific task marker (DeepSeek V4)
    refusal: str | None = None  # an assistant's earlier refusal: its text when it has no content
    tool_calls: list[ToolCallIn] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    PARAM_PREFIX = "messages."
    REFUSED: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        "function_call": ((None,), FUNCTIONS),
        "tools": ((None, []), "Tools are given in the request's 'tools', not in a message."),
        "audio": ((None,), NO_MULTIMODAL),
        **{name: ((None,), HARMONY) for name in ("author", "channel", "recipient", "content_type")},
    }

    @model_validator(mode="before")
    @classmethod
    def _before(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        role = data.get("role")
        if role == "function":
            raise UnsupportedParameter("messages.role.function", "Function messages are the deprecated form of "
                                       "tool messages: send {'role': 'tool', 'tool_call_id': ..., 'content': ...}.")
        if isinstance(role, str) and role not in CHAT_ROLES:
            raise UnsupportedParameter(f"messages.role.{role[:40]}", "Only system, developer, user, assistant "
                                       "and tool messages are served (vLLM passes other roles to the chat "
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
        if self.tool_calls and self.role != "assistant":
            raise InvalidRequest("Only assistant messages carry 'tool_calls'.", param="messages.tool_calls")
        if (self.tool_call_id is None) == (self.role == "tool"):
            raise InvalidRequest("A tool message needs 'tool_call_id' (the call it answers), and only tool "
                                 "messages take it.", param="messages.tool_call_id")
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
        if self.tool_calls:  # templates read the arguments as an object (vLLM parses them the same way)
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": _loads(c.function.arguments)}}
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        return msg


def _loads(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def refuse_other_tool_choices(data: Any, named: str) -> Any:
    """A `tool_choice` object other than a named function is refused by its type (a request's
    before-validator; `named` shows the surface's named form)."""
    choice = data.get("tool_choice") if isinstance(data, dict) else None
    if isinstance(choice, dict) and choice.get("type") != "function":
        kind = str(choice.get("type"))[:40]
        why = {"allowed_tools": "Restricting the tools per request is not supported: send only the allowed tools "
                                "in 'tools' (with tool_choice 'auto' or 'required')."}.get(
            kind, f"Only function tools are supported: a named choice is {named}.")
        raise UnsupportedParameter(f"tool_choice.{kind}", why)
    return data


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's chat extras
    echo: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    documents: Annotated[list[dict[str, str]], Field(max_length=1024)] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_prompt_text: bool | None = None
    # hints
    store: bool | None = None  # chat completions are never stored here
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    include_reasoning: bool | None = None
    modalities: list[Literal["text", "audio"]] | None = None  # ["text"] is what it does anyway; audio refused

    REFUSED: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        **refused_common(),
        "functions": ((None, []), FUNCTIONS),
        "function_call": ((None,), FUNCTIONS),
        "audio": ((None,), NO_MULTIMODAL),
        "prediction": ((None,), "Predicted outputs (speculative decoding from a given text) are not supported."),
        "web_search_options": ((None,), "This server has no web search."),
        "moderation": ((None,), "No moderation model runs here (its 'score' would add results and 'block' "
                                "would change the reply, so it cannot be taken as a hint)."),
        "chat_template": ((None,), f"A request's own chat template: {VLLM_FLAG} (--trust-request-chat-template)."),
        "media_io_kwargs": ((None,), NO_MULTIMODAL),
        "mm_processor_kwargs": ((None,), NO_MULTIMODAL),
    }

    @model_validator(mode="before")
    @classmethod
    def _tool_choice_kind(cls, data: Any) -> Any:
        return refuse_other_tool_choices(data, "{'type': 'function', 'function': {'name': ...}}")

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
        called: set[str] = set()
        for m in self.messages:  # as OpenAI: a tool message answers a call made before it
            called.update(c.id for c in m.tool_calls or [])
            if m.role == "tool" and m.tool_call_id not in called:
                raise InvalidRequest(f"Invalid value for 'messages': the tool message with tool_call_id "
                                     f"{str(m.tool_call_id)[:64]!r} does not answer a call of an earlier assistant "
                                     "message's 'tool_calls'.", param="messages.tool_call_id")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise InvalidRequest("Invalid value for 'tools': function names must be unique.", param="tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise InvalidRequest(f"Invalid value for 'tool_choice': no tool is named "
                                 f"{self.tool_choice.function.name[:64]!r}.", param="tool_choice")
        if self.tool_choice == "required" and not names:
            raise InvalidRequest("Invalid value for 'tool_choice': 'required' needs 'tools'.", param="tool_choice")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise InvalidRequest("'continue_final_message' needs the last message to be an assistant message "
                                 "to continue.", param="continue_final_message")
        return self

    @property
    def calls_tools(self) -> bool:
        """Whether the answer may hold tool calls (tools given, and tool_choice not "none")."""
        return bool(self.tools) and self.tool_choice != "none"

    def tool_choice_for_grammar(self) -> str | dict[str, Any]:
        if isinstance(self.tool_choice, NamedToolChoice):
            return {"type": "function", "function": {"name": self.tool_choice.function.name}}
        return self.tool_choice or "auto"

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

# an engine's reasons, and the chat API's own: the answer is tool calls
ChatFinishReason = FinishReason | Literal["tool_calls"]


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


class FunctionCall(Wire):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(Wire):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(Wire):
    KEEP_NULL = frozenset({"content", "refusal"})
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(Wire):
    KEEP_NULL = frozenset({"logprobs"})
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: ChatFinishReason
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


class FunctionCallDelta(Wire):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(Wire):
    """One call's piece of a chunk: its first carries id, type and name; later ones arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class Delta(Wire):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(Wire):
    KEEP_NULL = frozenset({"finish_reason"})
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: ChatFinishReason | None = None
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
