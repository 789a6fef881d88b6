"""What operators and orchestrators call: the probes, `/` and `/metrics`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from server import __version__
from server.web import page as web

router = APIRouter()


async def _readiness(request: Request) -> JSONResponse:
    """Ready when every preloaded model is; a lazy model's state is reported, not required. An
    engine found dead marks its model failed (and, for a preloaded required one, the server not
    ready: the optional default embedding model is served around, as when it fails to load)."""
    state = request.app.state.server
    registry = state.registry
    for entry in registry.ready():
        assert entry.served is not None
        try:
            await entry.served.engine.check_health()
        except Exception as e:  # the engine died: report it, the process stays up for probes
            registry.engine_died(entry, f"the inference engine died: {e!r}")
            if entry.spec.preload and entry.spec.required:  # an optional model dying is served around
                state.fail(f"the inference engine of {entry.name} died: {e!r}")
    entries = list(registry.entries.values())
    first = entries[0] if entries else None
    body: dict[str, Any] = {
        "status": state.status,
        "model": first.name if first else None,
        "engine": first.engine if first else None,
        "models": {e.name: e.state for e in entries},
    }
    if state.status == "ready":
        body["running_requests"] = sum([await e.served.engine.num_active_requests() for e in registry.ready()
                                        if e.served is not None])
        return JSONResponse(body, status_code=200)
    body["detail"] = state.unavailable_reason()
    return JSONResponse(body, status_code=503)


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 when the models are loaded and their engines alive; 503 while loading, after failure."""
    return await _readiness(request)


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Kubernetes readiness: same answer as /health."""
    return await _readiness(request)


@router.get("/live")
async def live() -> dict[str, str]:
    """Kubernetes liveness: the process answers HTTP (a loading model is still alive)."""
    return {"status": "alive"}


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text format; the gauges that are not event-driven are read now."""
    from prometheus_client import CONTENT_TYPE_LATEST

    state = request.app.state.server
    state.registry.refresh_gauges()
    if state.request_log is not None:
        state.metrics.log_backlog.set(state.request_log.backlog())
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/", response_model=None)
async def root(request: Request) -> dict[str, Any] | Response:
    """What this server is, as JSON; a browser gets the chat page (server/web/page.py)."""
    if web.wanted(request):
        return web.page()
    state = request.app.state.server
    return {
        "name": "llm-service",
        "version": __version__,
        "description": "OpenAI-compatible LLM inference server. Point the openai SDK at base_url=<this server>/v1.",
        "model": next(iter(state.registry.entries), None),
        "models": list(state.registry.entries),
        "status": state.status,
        "docs": "/docs",
        "chat": "/chat" if state.settings.chat_page else None,
        "openapi": "/openapi.json",
        "routes": _routes(request),
    }


def _routes(request: Request) -> list[str]:
    """What this server answers, read off its own API description (so the list cannot fall behind),
    and /metrics, which that leaves out."""
    out = []
    for path, item in request.app.openapi()["paths"].items():
        admin = path.startswith("/v1/admin") or path == "/v1/usage"
        out += [f"{method.upper()} {path}{' (admin)' if admin else ''}" for method in item]
    return [*out, "GET /metrics"]
