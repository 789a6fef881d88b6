"""`/v1/models`: the model list and one model's card."""

from __future__ import annotations

from typing import Literal

from server.protocol.common import Wire


class ModelCard(Wire):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # extras (OpenAI's schema allows them): what serves it and how much context it takes
    engine: str | None = None
    kind: Literal["generate", "embed"] | None = None  # what it serves: chat/completions/responses, or embeddings
    max_model_len: int | None = None
    root: str | None = None
    state: str | None = None  # ready, loading, or unloaded (lazy: its first request loads it)
    variants: dict[str, float] | None = None  # an alias: the models it sends requests to, by share


class ModelList(Wire):
    object: Literal["list"] = "list"
    data: list[ModelCard]
