"""`/v1/embeddings`: the request and the response, in OpenAI's shape (with vLLM's extras)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from server.errors import InvalidRequest
from server.protocol.common import INT64_MAX, INT64_MIN, TokenId, Wire, _Request, listed

# OpenAI's bound: at most 2048 inputs in one request
MAX_INPUTS = 2048


class EmbeddingRequest(_Request):
    model: str
    input: str | list[str] | list[TokenId] | list[list[TokenId]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None  # only the model's own: none here can shorten
    user: str | None = None
    # vLLM's extras
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = None  # -1: the model's context
    truncation_side: Literal["left", "right"] | None = None  # None: right (the end of a text goes)
    add_special_tokens: bool = True
    priority: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] = 0
    request_id: str | None = None

    REFUSED: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        # vLLM's: the vectors are what the model's sentence-transformers config makes (normalized
        # when it has a Normalize module), as float32
        "use_activation": ((None, True), "The vectors are pooled and normalized as the model's own "
                                         "configuration says; this server does not change that per request."),
        "padding": ((None,), "Inputs are batched by the engine, which pads them itself."),
        "cache_salt": ((None,), "Embedding models here keep no prefix cache."),
        "mm_processor_kwargs": ((None,), "This server serves text models: images, audio, video and files are "
                                         "not supported."),
        "embed_dtype": ((None, "float32"), "Vectors are float32 ('float' JSON numbers or base64 of "
                                           "little-endian float32)."),
        "endianness": ((None, "little", "native"), "base64 vectors are little-endian float32, as OpenAI sends them."),
    }

    @model_validator(mode="after")
    def _check_input(self) -> EmbeddingRequest:
        items = self.input
        if isinstance(items, str):
            items = [items]
        if not items:
            raise InvalidRequest("Invalid value for 'input': must not be empty.", param="input")
        if len(items) > MAX_INPUTS and not all(isinstance(x, int) for x in items):
            raise InvalidRequest(f"Invalid value for 'input': at most {MAX_INPUTS} inputs per request.", param="input")
        for i, x in enumerate(items):
            if isinstance(x, str | list) and not x:
                raise InvalidRequest(f"Invalid value for 'input': input[{i}] is empty.", param="input")
        if self.truncate_prompt_tokens == 0:
            raise InvalidRequest("Invalid value for 'truncate_prompt_tokens': -1 (the model's context) or at least 1.",
                                 param="truncate_prompt_tokens")
        return self

    def inputs(self) -> list[str | list[int]]:
        return listed(self.input)


class Embedding(Wire):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingUsage(Wire):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(Wire):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
