"""`/v1/responses` and `/v1/conversations`: the requests, the input items, and the objects sent back.

Input items are validated here and normalized into the stored form OpenAI lists them in (every item
with an `id` and a `status`, message content as a list of parts), so that a stored response's
input, a conversation's items and a chain rebuilt from `previous_response_id` all read the same.
The response object and its items are built as the dicts they are sent and stored as
(`api/responses.py`); `Response` here describes them for /openapi.json.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, ConfigDict, Discriminator, Field, Tag, model_validator

from server import structured
from server.engines.base import Constraint
from server.errors import InvalidRequest, UnsupportedParameter
from server.protocol.chat import (
    FUNCTION_NAME,
    NO_MULTIMODAL,
    PromptCacheBreakpoint,
    Tool,
    refuse_other_tool_choices,
)
from server.protocol.common import (
    INT32_MAX,
    MAX_TOKEN_LIST,
    MAX_TOP_LOGPROBS,
    Int64,
    StructuredOutputs,
    TokenId,
    Wire,
    _check_metadata,
    _Request,
    refused_common,
)

VLLM_REFUSED = ("ec_transfer_params", "kv_transfer_params", "mm_payload", "return_mm_kwargs", "vllm_xargs",
                "watermarking")
MAX_ITEMS = 2048  # input items in one request (OpenAI: "a list of one or many")
MAX_CONVERSATION_ADD = 20  # OpenAI: items added to a conversation in one call
# include values: what they would add; ours produce no such parts (see the README)
INCLUDABLE = {
    "message.output_text.logprobs": "implemented",
    "reasoning.encrypted_content": "no reasoning items are produced here, so there is none to include",
}
REFUSED_INCLUDE = ("file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
                   "message.input_image.image_url", "computer_call_output.output.image_url",
                   "code_interpreter_call.outputs")
REFUSED_TOOLS = {
    "file_search": "This server has no vector stores.",
    "web_search": "This server has no web search.",
    "web_search_preview": "This server has no web search.",
    "computer": "Computer use is not supported.",
    "computer_use_preview": "Computer use is not supported.",
    "code_interpreter": "This server runs no code.",
    "image_generation": NO_MULTIMODAL,
    "mcp": "Remote MCP servers are not called by this server: run the MCP client in your app and give its tools "
           "as function tools.",
    "local_shell": "This server runs no shell.",
    "shell": "This server runs no shell.",
    "apply_patch": "This server applies no patches.",
    "custom": "Custom (free-form grammar) tools are not supported: use function tools.",
}
TEXT_PART = {"input_text": "text", "output_text": "text", "text": "text", "refusal": "refusal"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ContentPart(_Request):
    """A text part of an input message (input_text; an earlier answer's output_text or refusal)."""

    type: str
    text: str | None = None
    refusal: str | None = None
    annotations: list[Any] | None = None  # of an earlier answer: carried, not read
    prompt_cache_breakpoint: PromptCacheBreakpoint | None = None  # a hint: our prefix cache works per block
    logprobs: list[Any] | None = None
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type not in TEXT_PART:
            why = NO_MULTIMODAL if self.type.startswith("input_") else "Only text content parts are supported."
            raise UnsupportedParameter(f"input.content.{self.type[:40]}",
                                       f"Content parts of type {self.type[:40]!r} are not supported. {why}")
        holder = TEXT_PART[self.type]
        if getattr(self, holder) is None:
            raise InvalidRequest(f"Missing required parameter: '{holder}' of a {self.type} content part.",
                                 param="input.content")
        if self.model_extra:
            name = next(iter(self.model_extra))
            raise UnsupportedParameter(f"input.content.{name[:40]}", f"The {self.type} part does not take it.")
        return self

    @property
    def value(self) -> str:
        return (self.refusal if self.type == "refusal" else self.text) or ""


class MessageIn(_Request):
    PARAM_PREFIX = "input."
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]
    id: Annotated[str, Field(max_length=128)] | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None  # an earlier answer's: a hint

    def item(self) -> dict[str, Any]:
        if isinstance(self.content, str):
            kind = "output_text" if self.role == "assistant" else "input_text"
            parts: list[dict[str, Any]] = [{"type": kind, "text": self.content}]
        else:
            parts = [p.model_dump(exclude_none=True) for p in self.content]
        for p in parts:
            if p["type"] == "output_text":
                p.setdefault("annotations", [])
        return {"id": self.id or new_id("msg"), "type": "message", "role": self.role, "content": parts,
                "status": self.status or "completed"}


class FunctionCallIn(_Request):
    PARAM_PREFIX = "input."
    type: Literal["function_call"]
    call_id: Annotated[str, Field(min_length=1, max_length=128)]
    name: str
    arguments: str
    id: Annotated[str, Field(max_length=128)] | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    def item(self) -> dict[str, Any]:
        return {"id": self.id or new_id("fc"), "type": "function_call", "call_id": self.call_id, "name": self.name,
                "arguments": self.arguments, "status": self.status or "completed"}


class FunctionCallOutputIn(_Request):
    PARAM_PREFIX = "input."
    type: Literal["function_call_output"]
    call_id: Annotated[str, Field(min_length=1, max_length=128)]
    output: str | list[ContentPart]
    id: Annotated[str, Field(max_length=128)] | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    def item(self) -> dict[str, Any]:
        output = self.output if isinstance(self.output, str) else "".join(p.value for p in self.output)
        return {"id": self.id or new_id("fco"), "type": "function_call_output", "call_id": self.call_id,
                "output": output, "status": self.status or "completed"}


KINDS = ("message", "function_call", "function_call_output")


def _kind(data: Any) -> str | None:
    return data.get("type", "message") if isinstance(data, dict) else None


def _known_kinds(items: Any) -> Any:
    """Items of other kinds are refused by name (a message may leave its `type` out)."""
    for data in items if isinstance(items, list) else []:
        kind = _kind(data)
        if isinstance(data, dict) and kind not in KINDS:
            why = {"item_reference": "Item references are not resolved here: send the item itself, or continue "
                                     "with 'previous_response_id' or 'conversation'.",
                   "reasoning": "This server produces no reasoning items, so it takes none back."}.get(
                str(kind), "Only message, function_call and function_call_output items are served.")
            raise UnsupportedParameter(f"input.type.{str(kind)[:40]}", why)
    return items


InputItem = Annotated[
    Annotated[MessageIn, Tag("message")] | Annotated[FunctionCallIn, Tag("function_call")]
    | Annotated[FunctionCallOutputIn, Tag("function_call_output")],
    Discriminator(_kind),
]
InputItems = Annotated[list[InputItem], BeforeValidator(_known_kinds)]
# a string, or items: chosen by shape, so that an item's error names the item's field (not the string's)
Input = Annotated[
    Annotated[str, Tag("text")] | Annotated[Annotated[InputItems, Field(min_length=1, max_length=MAX_ITEMS)], Tag("items")],
    Discriminator(lambda v: "text" if isinstance(v, str) else "items"),
]


class FunctionTool(_Request):
    """A function tool, in the Responses API's flat form."""

    PARAM_PREFIX = "tools."
    type: Literal["function"]
    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # the arguments are always enforced
    REFUSED: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        "defer_loading": ((None, False), "Tool search (deferred tools) is not supported."),
        "allowed_callers": ((None, ["direct"]), "Programmatic tool calling is not supported."),
        "output_schema": ((None,), "Tool output schemas are not used by this server."),
        "async": ((None, False), "Asynchronous function calls are not supported."),
    }

    @model_validator(mode="before")
    @classmethod
    def _function_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") != "function":
            kind = str(data.get("type"))[:40]
            raise UnsupportedParameter(f"tools.type.{kind}", REFUSED_TOOLS.get(
                kind, "Only function tools are supported."))
        return data

    def chat(self) -> Tool:
        function = {k: v for k, v in (("name", self.name), ("description", self.description),
                                      ("parameters", self.parameters), ("strict", self.strict)) if v is not None}
        return Tool.model_validate({"type": "function", "function": function})


class NamedFunction(_Request):
    PARAM_PREFIX = "tool_choice."
    type: Literal["function"]
    name: str


class TextFormat(_Request):
    """`text.format`: plain text, any JSON object, or JSON matching a schema (always enforced)."""

    PARAM_PREFIX = "text.format."
    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")] | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _fields_of_type(self) -> TextFormat:
        if self.type == "json_schema":
            if self.name is None or self.schema_ is None:
                missing = "name" if self.name is None else "schema"
                raise InvalidRequest(f"Missing required parameter: 'text.format.{missing}'.",
                                     param=f"text.format.{missing}")
        elif any(v is not None for v in (self.name, self.schema_, self.description, self.strict)):
            raise InvalidRequest(f"A text.format of type {self.type!r} takes only 'type'.", param="text.format")
        return self

    def constraint(self) -> Constraint | None:
        if self.type == "json_object":
            return structured.json_object()
        if self.type == "json_schema" and self.schema_ is not None:
            return structured.json_schema(self.schema_, "text.format.schema")
        return None


class TextConfig(_Request):
    PARAM_PREFIX = "text."
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # a hint


class Reasoning(_Request):
    """A reasoning model's effort and summary: hints (no reasoning runs here; see the README)."""

    PARAM_PREFIX = "reasoning."
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class CacheOptions(_Request):
    """OpenAI's prompt-cache controls on responses: hints (our prefix cache is automatic, per block)."""

    PARAM_PREFIX = "prompt_cache_options."
    mode: Literal["implicit", "explicit"] | None = None
    ttl: Literal["30m", "12h"] | None = None
    REFUSED: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        "prewarm": ((None, False), "Filling the prompt cache without generating is not offered: send the request."),
        "comparison_response_id": ((None,), "Prompt-cache diagnostics are not produced here."),
    }


class ConversationRef(_Request):
    PARAM_PREFIX = "conversation."
    id: str


class StreamOptions(_Request):
    PARAM_PREFIX = "stream_options."
    include_obfuscation: bool | None = None  # a hint: padding against length side channels


class CreateResponse(_Request):
    """`POST /v1/responses`."""

    model: str
    input: Input | None = None  # none: only what previous_response_id or conversation holds
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: Annotated[list[FunctionTool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    include: list[str] | None = None
    store: bool | None = None
    background: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    previous_response_id: Annotated[str, Field(max_length=128)] | None = None
    conversation: Annotated[str, Field(max_length=128)] | ConversationRef | None = None
    truncation: Literal["auto", "disabled"] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: Annotated[str, Field(max_length=256)] | None = None
    # vLLM's extras (as on chat completions)
    seed: Int64 | None = None
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=2)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_TOKEN_LIST)] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    structured_outputs: StructuredOutputs | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    priority: Annotated[int, Field(ge=-INT32_MAX, le=INT32_MAX)] | None = None
    cache_salt: str | None = None
    request_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._:+=-]{1,128}$")] | None = None
    # hints
    session_id: Annotated[str, Field(max_length=1024)] | None = None
    include_reasoning: bool | None = None
    reasoning: Reasoning | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast", "ultrafast"] | None = None
    prompt_cache_key: Annotated[str, Field(max_length=1024)] | None = None
    prompt_cache_retention: Literal["in-memory", "in_memory", "24h"] | None = None
    prompt_cache_options: CacheOptions | None = None
    REFUSED: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        "prompt": ((None,), "Stored prompt templates are an OpenAI dashboard feature: send the text as "
                            "'instructions' and 'input'."),
        "max_tool_calls": ((None,), "A cap on built-in tool calls: this server runs no built-in tools; limit "
                                    "function calls with 'parallel_tool_calls' and 'tool_choice'."),
        "context_management": ((None, []), "Server-side context compaction is not supported; use "
                                           "'truncation': 'auto' to drop the oldest items."),
        "moderation": ((None,), "No moderation model runs here."),
        "image": ((None,), NO_MULTIMODAL),
        "access_programs": ((None, {}, {"cyber": "standard"}), "OpenAI's access programs are account programs "
                                                                 "of its own models; none applies here."),
        "background_options": ((None, {}, {"completion_window": "soonest"}),
                               "Background responses here run as soon as the engine has room; later completion "
                               "windows are not offered."),
        **{k: v for k, v in refused_common().items() if k in VLLM_REFUSED},
        "media_io_kwargs": ((None,), NO_MULTIMODAL),
        "mm_processor_kwargs": ((None,), NO_MULTIMODAL),
        "enable_response_messages": ((None, False), "vLLM's raw prompt and output messages (Harmony models) are "
                                                    "not returned; the output items carry the answer."),
        "previous_input_messages": ((None, []), "vLLM's Harmony message history: send earlier turns as input "
                                                "items, or continue with 'previous_response_id' or 'conversation'."),
    }
    # vLLM's extras whose chat-completions refusal applies here too
    SAMPLING: ClassVar[tuple[str, ...]] = (
        "seed", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "stop",
        "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "skip_special_tokens", "structured_outputs",
        "chat_template_kwargs", "priority", "cache_salt", "request_id")

    @model_validator(mode="after")
    def _check(self) -> CreateResponse:
        for value in self.include or []:
            if value not in INCLUDABLE:
                why = ("It includes output of built-in tools or images, which this server does not produce."
                       if value in REFUSED_INCLUDE else "It is not an includable value.")
                raise UnsupportedParameter(f"include.{value[:60]}", why)
        if self.metadata is not None:
            _check_metadata(self.metadata)
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("Invalid value for 'stream_options': only allowed when 'stream' is true.",
                                 param="stream_options")
        if self.previous_response_id is not None and self.conversation is not None:
            raise InvalidRequest("Give 'previous_response_id' or 'conversation', not both.", param="conversation")
        if self.background and self.store is False:
            raise InvalidRequest("A background response must be stored: 'background' needs 'store' true.",
                                 param="background")
        names = [t.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise InvalidRequest("Invalid value for 'tools': function names must be unique.", param="tools")
        if isinstance(self.tool_choice, NamedFunction) and self.tool_choice.name not in names:
            raise InvalidRequest(f"Invalid value for 'tool_choice': no tool is named {self.tool_choice.name[:64]!r}.",
                                 param="tool_choice")
        if self.tool_choice == "required" and not names:
            raise InvalidRequest("Invalid value for 'tool_choice': 'required' needs 'tools'.", param="tool_choice")
        return self

    @model_validator(mode="before")
    @classmethod
    def _tool_choice_kind(cls, data: Any) -> Any:
        return refuse_other_tool_choices(data, "{'type': 'function', 'name': ...}")

    def items(self) -> list[dict[str, Any]]:
        """The input as stored items (a string is one user message)."""
        if isinstance(self.input, str):
            return [MessageIn(role="user", content=self.input).item()]
        return [item.item() for item in self.input or []]

    @property
    def conversation_id(self) -> str | None:
        if isinstance(self.conversation, ConversationRef):
            return self.conversation.id
        return self.conversation

    @property
    def logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or [])


class _Items(_Request):
    """A conversations request: its items' refusals name `items` (the item schemas say `input`)."""

    @model_validator(mode="wrap")
    @classmethod
    def _named_items(cls, data: Any, handler: Any) -> Any:
        try:
            return handler(data)
        except InvalidRequest as e:
            if e.param is not None and e.param.startswith("input"):
                e.param = "items" + e.param[len("input"):]
                e.args = (e.message.replace("'input", "'items"),)
                e.message = e.args[0]
            raise


class CreateConversation(_Items):
    """`POST /v1/conversations`."""

    items: Annotated[InputItems, Field(max_length=MAX_CONVERSATION_ADD)] | None = None
    metadata: dict[str, str] | None = None
    safety_identifier: Annotated[str, Field(max_length=256)] | None = None  # a hint: kept in the request log

    @model_validator(mode="after")
    def _check(self) -> CreateConversation:
        if self.metadata is not None:
            _check_metadata(self.metadata)
        return self


class UpdateConversation(_Request):
    """`POST /v1/conversations/{id}`: its metadata, replaced."""

    metadata: dict[str, str]

    @model_validator(mode="after")
    def _check(self) -> UpdateConversation:
        _check_metadata(self.metadata)
        return self


class AddItems(_Items):
    """`POST /v1/conversations/{id}/items`."""

    items: Annotated[InputItems, Field(min_length=1, max_length=MAX_CONVERSATION_ADD)]


# --------------------------------------------------------------------------- what is sent back
# (described for /openapi.json; built as dicts in api/responses.py and api/conversations.py)


class OutputText(Wire):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any]
    logprobs: list[Any] | None = None


class OutputMessage(Wire):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class FunctionCallOut(Wire):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class InputTokensDetails(Wire):
    cached_tokens: int
    cache_write_tokens: int = 0


class OutputTokensDetails(Wire):
    reasoning_tokens: int = 0


class ResponseUsage(Wire):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseError(Wire):
    code: str
    message: str


class IncompleteDetails(Wire):
    reason: Literal["max_output_tokens", "content_filter"]


class Response(Wire):
    KEEP_NULL = frozenset({"error", "incomplete_details", "instructions", "max_output_tokens",
                           "previous_response_id", "usage", "conversation", "completed_at", "user",
                           "top_logprobs", "temperature", "top_p", "safety_identifier", "prompt_cache_key"})
    id: str
    object: Literal["response"] = "response"
    created_at: float
    completed_at: float | None = None
    status: Literal["completed", "incomplete", "failed", "in_progress", "queued", "cancelled"]
    background: bool
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputMessage | FunctionCallOut]
    parallel_tool_calls: bool
    previous_response_id: str | None = None
    conversation: ConversationRef | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = None
    tool_choice: Any
    tools: list[Any]
    text: dict[str, Any]
    truncation: Literal["auto", "disabled"]
    usage: ResponseUsage | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    metadata: dict[str, str]
    store: bool
    service_tier: str = "default"


class ResponseStreamEvent(Wire):
    """One event of a Responses stream (`event:` names its `type`); the rest of its fields are
    those of OpenAI's event of that type (`response.output_text.delta`: item_id, output_index,
    content_index, delta, logprobs; ...)."""

    model_config = ConfigDict(extra="allow")
    type: str
    sequence_number: int


class ResponseDeleted(Wire):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool


class ConversationObject(Wire):
    id: str
    object: Literal["conversation"] = "conversation"
    created_at: int
    metadata: dict[str, str]


class ConversationDeleted(Wire):
    id: str
    object: Literal["conversation.deleted"] = "conversation.deleted"
    deleted: bool


class StoredItem(Wire):
    """An item as stored and listed: a message (its content parts), a function call, or its output."""

    id: str
    type: Literal["message", "function_call", "function_call_output"]
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: list[dict[str, Any]] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None


class ItemList(Wire):
    """A page of items (or of conversations: our `GET /v1/conversations`)."""

    KEEP_NULL = frozenset({"first_id", "last_id"})
    object: Literal["list"] = "list"
    data: list[Any]
    first_id: str | None
    last_id: str | None
    has_more: bool
