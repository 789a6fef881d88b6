"""The probes and `/` (`server/ops.py`): what orchestrators and people read."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class Readiness(BaseModel):
    """`/health` and `/ready`: 200 when every preloaded model serves, else 503 with `detail`."""

    status: Literal["loading", "ready", "failed", "stopping"]
    model: str | None  # the first model
    engine: str | None
    models: dict[str, Literal["unloaded", "loading", "ready", "failed", "unloading"]]
    running_requests: int | None = None  # when ready
    detail: str | None = None  # when not: why


class Liveness(BaseModel):
    status: Literal["alive"]


class ServerInfo(BaseModel):
    """`GET /`: what this server is, its models and routes."""

    name: str
    version: str
    description: str
    model: str | None
    models: list[str]
    status: Literal["loading", "ready", "failed", "stopping"]
    docs: str
    openapi: str
    routes: list[str]
