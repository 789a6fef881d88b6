"""FastAPI app factory and lifespan: the model is prepared and the engine started here, nowhere else.

The HTTP server starts answering at once; the model loads in the background, so `/live` is 200
and `/health` is 503 ("loading") until it is ready. A load that fails is logged with what to do
about it and ends the process with a non-zero exit (through `on_fatal`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import __version__
from server.auth import Keys
from server.config import Settings
from server.errors import AuthenticationError, install_handlers
from server.limits import Admission, KeyLimits
from server.metrics import Metrics
from server.routes import Served, router
from server.store import RequestLog, Row, utcnow

log = logging.getLogger(__name__)

Status = Literal["loading", "ready", "failed", "stopping"]
# blocking: prepares the model and starts an engine; runs in a worker thread
Loader = Callable[[Settings], Served]


@dataclass
class ServerState:
    settings: Settings
    status: Status = "loading"
    detail: str = ""
    served: Served | None = None
    model_path: str | None = None
    started: int = field(default_factory=lambda: int(time.time()))
    keys: Keys = field(default_factory=lambda: Keys([]))
    key_limits: KeyLimits = field(default_factory=KeyLimits)
    metrics: Metrics = field(default_factory=Metrics)
    admission: Admission | None = None  # sized from the engine once it is ready
    request_log: RequestLog | None = None
    loop: asyncio.AbstractEventLoop | None = None  # the serving loop, for signal handlers

    def drain(self, timeout: float, then: Callable[[], None]) -> asyncio.Task[None]:
        """Refuse new work (503, readiness false), wait up to `timeout` s for admitted requests
        to finish, then call `then` (which stops the HTTP server)."""
        self.status = "stopping"

        async def wait() -> None:
            deadline = time.monotonic() + timeout
            while self.admission is not None and (self.admission.in_use or self.admission.waiting):
                if time.monotonic() >= deadline:
                    log.warning("shutdown timeout: aborting %d running and %d queued sequences",
                                self.admission.in_use, self.admission.waiting)
                    break
                await asyncio.sleep(0.05)
            then()

        return asyncio.ensure_future(wait())

    def fail(self, detail: str) -> None:
        self.status = "failed"
        self.detail = detail

    def unavailable_reason(self) -> str:
        if self.status == "loading":
            return f"The model {self.settings.model_name} is still loading; retry shortly."
        if self.status == "stopping":
            return "The server is shutting down."
        return f"The model {self.settings.model_name} is not available: {self.detail}"


def load_served(settings: Settings) -> Served:
    """Resolve the model source, load its tokenizer, start the engine."""
    from server import engines, models
    from server.engines.base import Engine
    from server.tokenizer import Tokenizer

    name, why = engines.pick(settings.engine)
    path = models.resolve(settings)
    tokenizer = Tokenizer(path, trust_remote_code=settings.trust_remote_code)
    log.info("starting the %s engine (%s) for %s (%s)", name, why, settings.model_name, path)
    engine: Engine
    if name == "vllm":
        from server.engines.vllm_engine import VLLMEngine

        engine = VLLMEngine.start(path, settings)
    else:
        from server.engines.hf_engine import HFEngine

        engine = HFEngine.start(path, settings, tokenizer)
    return Served(
        name=settings.model_name,
        engine=engine,
        tokenizer=tokenizer,
        created=int(time.time()),
        fingerprint=f"fp_llm-service-{__version__}-{engine.info.name}",
    )


# route labels for metrics: the paths we serve, never raw client paths (unbounded cardinality)
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/usage", "/health", "/ready", "/live", "/metrics", "/")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def _route(path: str) -> str:
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return path if path in ROUTES else "other"


class Gate:
    """Every HTTP request passes here first: it gets an `x-request-id` (the client's when it sent
    a sane one), `/v1/*` (and `/metrics` when so set) needs a key when keys are configured, a
    limited key's rate-limit headers go on every response, and the response is counted."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        path: str = scope["path"]
        status = 500
        arrived, started = utcnow(), time.monotonic()
        key = None
        try:
            if path.startswith("/v1/") or (path == "/metrics" and state.settings.metrics_require_key):
                try:
                    key = state.keys.authenticate(headers.get("authorization"))
                except AuthenticationError as e:
                    status = e.status_code
                    response = JSONResponse(e.to_dict(), status_code=status, headers={
                        "x-request-id": request_id, "www-authenticate": "Bearer"})
                    await response(scope, receive, send)
                    return
            scope["state"]["key"] = key

            async def send_with_headers(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    out = MutableHeaders(scope=message)
                    out["x-request-id"] = request_id
                    for name, value in state.key_limits.headers(key).items():
                        if name not in out:
                            out[name] = value
                await send(message)

            await self.app(scope, receive, send_with_headers)
        finally:
            state.metrics.requests.labels(_route(path), state.settings.model_name, str(status)).inc()
            if state.request_log is not None and path.startswith("/v1/"):
                note: dict[str, object] = scope["state"].get("log", {})
                served = state.served
                state.request_log.record(Row(
                    time=arrived, request_id=request_id, route=_route(path), status=status,
                    latency_ms=(time.monotonic() - started) * 1000, key_name=key.name if key else None,
                    model=state.settings.model_name, engine=served.engine.info.name if served else None,
                    **note,  # type: ignore[arg-type]
                ))


def create_app(
    settings: Settings,
    loader: Loader = load_served,
    on_fatal: Callable[[str], None] | None = None,
    keys: Keys | None = None,
) -> FastAPI:
    state = ServerState(settings, keys=keys or Keys.from_settings(settings.api_key, settings.api_keys_file))

    async def load() -> None:
        started = time.monotonic()
        try:
            served = await asyncio.to_thread(loader, settings)
        except Exception as e:
            message = str(e) or type(e).__name__
            log.error("could not load model %s: %s", settings.model_name, message)
            if not isinstance(e, RuntimeError | ValueError | OSError):
                log.exception("load failure details")
            state.fail(message)
            if on_fatal is not None:
                on_fatal(message)
            return
        attach = getattr(served.engine, "attach_to_loop", None)
        if callable(attach):
            attach()
        model = served.name

        def gauges(running: int, waiting: int) -> None:
            state.metrics.running.labels(model).set(running)
            state.metrics.waiting.labels(model).set(waiting)

        state.admission = Admission(served.engine.info.max_num_seqs, settings.max_queued_requests, gauges)
        state.served = served
        state.model_path = str(getattr(served.tokenizer.hf, "name_or_path", "")) or None
        state.status = "ready"
        log.info(
            "model %s ready on the %s engine in %.1f s (max context %d tokens)",
            served.name, served.engine.info.name, time.monotonic() - started,
            served.engine.info.max_model_len,
        )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        metrics = state.metrics
        state.request_log = RequestLog(settings.request_log_url, settings.request_log_buffer,
                                       on_dropped=metrics.log_dropped.inc, on_error=metrics.log_errors.inc)
        state.request_log.start()
        log.info("request log: %s", state.request_log.db.url.render_as_string(hide_password=True))
        loading = asyncio.create_task(load())
        try:
            yield
        finally:
            state.status = "stopping"
            if not loading.done():
                # the load runs in a thread that cannot be interrupted; let it finish, then stop
                await asyncio.gather(loading, return_exceptions=True)
            if state.served is not None:
                await state.served.engine.shutdown()
            # last: the rows of requests the shutdown ended are in the buffer by now
            await asyncio.to_thread(state.request_log.stop)

    app = FastAPI(
        title="llm-service",
        version=__version__,
        description="OpenAI-compatible LLM inference server",
        lifespan=lifespan,
    )
    app.state.server = state
    install_handlers(app)
    app.include_router(router)
    app.add_middleware(Gate, state=state)
    return app

