"""FastAPI app factory and lifespan: the model is prepared and the engine started here, nowhere else.

The HTTP server starts answering at once; the model loads in the background, so `/live` is 200
and `/health` is 503 ("loading") until it is ready. A load that fails is logged with what to do
about it and ends the process with a non-zero exit (through `on_fatal`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

from fastapi import FastAPI

from server import __version__
from server.config import Settings
from server.errors import install_handlers
from server.routes import Served, router

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


def create_app(
    settings: Settings,
    loader: Loader = load_served,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    state = ServerState(settings)

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

    app = FastAPI(
        title="llm-service",
        version=__version__,
        description="OpenAI-compatible LLM inference server",
        lifespan=lifespan,
    )
    app.state.server = state
    install_handlers(app)
    app.include_router(router)
    return app
