"""`/v1/completions`: the request, the response (also each stream chunk)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_serializer, model_validator

from server.engines.base import FinishReason
from server.errors import InvalidRequest, UnsupportedParameter
from server.protocol.common import (
    MAX_COMPLETION_LOGPROBS,
    VLLM_FLAG,
    PromptLogprobs,
    ResponseFormat,
    SamplingFields,
    TokenId,
    Usage,
    Wire,
    listed,
    refused_common,
)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    echo: bool | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None
    response_format: ResponseFormat | None = None  # vLLM's: the same formats as chat

    REFUSED: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        **refused_common(),
        "suffix": ((None, ""), "Fill-in-the-middle (a suffix after the completion) is not supported."),
        "prompt_embeds": ((None,), f"Prompt embeddings: {VLLM_FLAG} (--enable-prompt-embeds)."),
    }

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

    def prompts(self) -> list[str | list[int]]:
        return listed(self.prompt)


class CompletionLogprobs(Wire):
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


class CompletionChoice(Wire):
    KEEP_NULL = frozenset({"logprobs", "finish_reason"})
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's extras
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class Completion(Wire):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None
