"""The admin API: models loaded and unloaded at run time, and what the machine has.

    GET    /v1/admin/models          every model: state, engine, memory, requests served; aliases
    POST   /v1/admin/models          load one (202; poll GET .../{name} for its progress)
    GET    /v1/admin/models/{name}   one model's state (and a load's progress)
    DELETE /v1/admin/models/{name}   unload it once its running requests finish (202)
    GET    /v1/admin/system          CPU, memory, GPUs, the memory budget and who holds it
    GET    /v1/usage                 requests and tokens per key and model (OpenAI's usage URL)

All of it needs an admin key when keys are configured.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server import system
from server.config import ModelSpec, ModelSpecError, SettingsError
from server.errors import InvalidRequest, PayloadTooLarge
from server.gate import access
from server.registry import GiB, Registry
from server.store import utcnow

router = APIRouter(prefix="/v1/admin")
usage_router = APIRouter()
MAX_BODY = 64 << 10


def _registry(request: Request, what: str) -> Registry:
    state = request.app.state.server
    state.keys.require_admin(access(request).key, what)
    registry: Registry = state.registry
    return registry


def _memory(registry: Registry) -> dict[str, Any]:
    used, memory = registry.used(), registry.memory
    return {"device": memory.device if memory else None, "budget_bytes": memory.budget if memory else None,
            "used_bytes": used, "free_bytes": memory.budget - used if memory else None}


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    registry = _registry(request, "GET /v1/admin/models")
    return {
        "object": "list",
        "data": [e.describe() for e in registry.entries.values()],
        "aliases": {a.name: a.describe() for a in registry.aliases.values()},
        "memory": _memory(registry),
    }


@router.post("/models", status_code=202)
async def load_model(request: Request) -> JSONResponse:
    """Declare a model and start loading it; the answer is its state ("loading"). With
    `"preload": false` it is only declared, and its first request loads it (201)."""
    registry = _registry(request, "POST /v1/admin/models")
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise PayloadTooLarge(f"A model declaration is at most {MAX_BODY} bytes.")
    try:
        body = json.loads(raw or b"null")
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"We could not parse the JSON body of your request ({e}).") from None
    try:
        spec = ModelSpec.from_dict(body)
    except ModelSpecError as e:
        raise InvalidRequest(f"Invalid model: {e}.") from None
    try:
        entry = registry.declare(spec)
    except SettingsError as e:
        raise InvalidRequest(f"Invalid value in 'settings': {e}.", param=f"settings.{e.name}") from None
    if not spec.preload:
        return JSONResponse(entry.describe(), status_code=201)
    try:
        await registry.load(entry)
    except BaseException:
        registry.withdraw(entry)  # refused (does not fit): nothing was declared
        raise
    return JSONResponse(entry.describe(), status_code=202, headers={"location": f"/v1/admin/models/{spec.name}"})


@router.get("/models/{name:path}")
async def get_model(name: str, request: Request) -> dict[str, Any]:
    return _registry(request, "GET /v1/admin/models/{name}").get(name).describe()


@router.delete("/models/{name:path}")
async def unload_model(name: str, request: Request) -> JSONResponse:
    """Unload and forget a model. Requests running on it (or queued for it) finish first; new
    ones get 503 while it unloads and 404 once it is gone. 202 while it unloads, 200 when it was
    not loaded (gone at once)."""
    registry = _registry(request, "DELETE /v1/admin/models/{name}")
    entry = registry.get(name)
    registry.unload(entry, forget=True, why="unloaded through the admin API")
    gone = registry.entries.get(name) is not entry
    body = entry.describe()
    if gone:
        body["state"] = "removed"
    return JSONResponse(body, status_code=200 if gone else 202)


@router.get("/system")
async def system_info(request: Request) -> dict[str, Any]:
    registry = _registry(request, "GET /v1/admin/system")
    snapshot = await asyncio.to_thread(system.snapshot)
    loaded = [e for e in registry.entries.values() if e.holds_memory]
    return {
        "object": "system",
        **snapshot,
        "memory_budget": _memory(registry),
        "models": [{"id": e.name, "kind": e.kind, "state": e.state, "engine": e.engine,
                    "footprint_bytes": e.footprint, "footprint_gib": round(e.footprint / GiB, 2)} for e in loaded],
    }


def _when(value: str | None, default: datetime, param: str) -> datetime:
    """Unix seconds or ISO 8601 (UTC when no zone is given), as naive UTC."""
    if value is None:
        return default
    try:
        when = datetime.fromtimestamp(float(value), tz=timezone.utc)
    except (ValueError, OverflowError, OSError):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidRequest(f"Invalid value for '{param}': give unix seconds or an ISO 8601 time.",
                                 param=param) from None
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc).replace(tzinfo=None)
    return when


@usage_router.get("/v1/usage")
async def usage(request: Request, start: str | None = None, end: str | None = None) -> dict[str, Any]:
    """Requests and tokens per key and model over [start, end) (default: the last 24 hours).
    Needs an admin key when keys are configured."""
    state = request.app.state.server
    state.keys.require_admin(access(request).key, "GET /v1/usage")
    now = utcnow()
    t0, t1 = _when(start, now - timedelta(days=1), "start"), _when(end, now + timedelta(seconds=1), "end")
    if t1 <= t0:
        raise InvalidRequest("'end' must be after 'start'.", param="end")
    log = state.request_log
    await asyncio.to_thread(log.wait_written, 2.0)  # include the requests that just ended
    data = await asyncio.to_thread(log.usage, t0, t1)
    return {"object": "usage", "start": t0.isoformat() + "Z", "end": t1.isoformat() + "Z", "data": data}
