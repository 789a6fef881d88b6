"""`/tokenize` and `/detokenize` (vLLM's, at the server's root): a prompt or messages in, token ids
and their count out, and back."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import Field, model_validator

from server.errors import InvalidRequest
from server.protocol.chat import ChatMessage, Tool
from server.protocol.common import INT32_MAX, NO_MULTIMODAL, VLLM_FLAG, Wire, _Request


class TokenizeRequest(_Request):
    """vLLM's two request shapes in one: `prompt` (a completion) or `messages` (a chat)."""

    model: str | None = None  # None: the server's first model
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None  # rendered as chat completions render them

    REFUSED: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        "chat_template": ((None,), f"A request's own chat template: {VLLM_FLAG}."),
        "media_io_kwargs": ((None,), NO_MULTIMODAL),
        "mm_processor_kwargs": ((None,), NO_MULTIMODAL),
    }

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequest("Give exactly one of 'prompt' and 'messages'.", param="prompt")
        if self.tools and self.messages is None:
            raise InvalidRequest("'tools' belong to a conversation: give 'messages'.", param="tools")
        if self.continue_final_message and self.add_generation_prompt:
            raise InvalidRequest("'continue_final_message' and 'add_generation_prompt' cannot both be true.",
                                 param="continue_final_message")
        return self


class TokenizeResponse(Wire):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: Annotated[list[Annotated[int, Field(ge=0, le=INT32_MAX)]], Field(max_length=1 << 20)]


class DetokenizeResponse(Wire):
    prompt: str
