"""The admin API (`/v1/admin/*`) and `/v1/usage`: what a model declaration takes, and what the
routes answer. `config.ModelSpec.from_dict` validates a declaration; `ModelDeclaration` describes
the same body for /openapi.json, its settings typed as `config.Settings` types them."""

from __future__ import annotations

from typing import Any, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from server.config import DEFAULT_SOURCE, ENGINES, EXECUTOR_BACKENDS, MODEL_SETTINGS, Settings


def _declaration_schema(schema: dict[str, Any]) -> None:
    """The engine names and each setting's type from `config`, where they are defined."""
    hints = get_type_hints(Settings)
    props = schema["properties"]
    props["engine"] = {"enum": [*ENGINES, None], "default": None,
                       "description": "Default: the server's --engine."}
    settings = {name: TypeAdapter(hints[name]).json_schema() for name in MODEL_SETTINGS}
    settings["distributed_executor_backend"] = {"enum": [*EXECUTOR_BACKENDS, None]}
    props["settings"] = {
        "type": ["object", "null"],
        "additionalProperties": False,
        "properties": settings,
        "description": "Engine settings for this model (as the server's flags of the same names); "
                       "the server's flags apply to the rest.",
    }


class ModelDeclaration(BaseModel):
    """`POST /v1/admin/models`: a model to declare (and, unless `preload` is false, load now);
    a models file's entry has the same fields."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_declaration_schema)

    name: str = Field(pattern=r"^\S(.*\S)?$", description="The name requests use for it.")
    source: str | None = Field(
        None, min_length=1, description=f"A local folder, a .gguf file or a hub id; '{DEFAULT_SOURCE}' "
                                        "or absent: the embedded default model of its kind.")
    engine: str | None = None
    kind: Literal["generate", "embed"] = Field(
        "generate", description="generate: chat, completions and responses; embed: /v1/embeddings.")
    preload: bool = Field(True, description="false: only declare it; its first request loads it.")
    settings: dict[str, Any] | None = None


class ModelMemory(BaseModel):
    estimated_bytes: int | None
    measured_bytes: int | None
    footprint_bytes: int


class LoadProgress(BaseModel):
    phase: str
    elapsed_seconds: float


class ModelStatus(BaseModel):
    """One model as the registry holds it (`registry.Entry.describe`)."""

    object: Literal["model.status"]
    id: str
    kind: Literal["generate", "embed"]
    state: Literal["unloaded", "loading", "ready", "failed", "unloading", "removed"]
    detail: str | None  # the phase of a load in progress, or why it failed
    state_since: int
    engine: str
    source: str
    preload: bool
    settings: dict[str, Any]
    max_model_len: int | None
    memory: ModelMemory
    load_seconds: float | None
    requests_served: int
    running: int
    waiting: int
    idle_seconds: float
    progress: LoadProgress | None = None  # while loading


class MemoryBudget(BaseModel):
    device: str | None
    budget_bytes: int | None
    used_bytes: int
    free_bytes: int | None


class AdminModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelStatus]
    aliases: dict[str, dict[str, float]]  # alias -> {model: share of its requests}
    memory: MemoryBudget


class LoadedModel(BaseModel):
    kind: Literal["generate", "embed"]
    id: str
    state: str
    engine: str
    footprint_bytes: int
    footprint_gib: float


class SystemInfo(BaseModel):
    """CPU, memory and GPUs now (`system.snapshot`), and who holds the memory budget."""

    model_config = ConfigDict(extra="allow")

    object: Literal["system"]
    cpu: dict[str, Any]
    memory: dict[str, Any]
    gpus: list[dict[str, Any]]
    memory_budget: MemoryBudget
    models: list[LoadedModel]


class UsageRow(BaseModel):
    key_name: str | None  # None: requests without a key (keys off)
    model: str | None  # None: requests that never reached a model
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class UsageReport(BaseModel):
    """`GET /v1/usage`: requests and tokens per key and model over [start, end)."""

    object: Literal["usage"]
    start: str
    end: str
    data: list[UsageRow]
