"""FastAPI app factory and lifespan: the model is prepared and the engine started here, nowhere else.

The HTTP server starts answering at once; the preloaded models load in the background (one at a
time, see registry.py), so `/live` is 200 and `/health` is 503 ("loading") until they are ready.
A preload that fails is logged with what to do about it and ends the process with a non-zero exit
(through `on_fatal`); models loaded later (lazy ones, the admin API) that fail are reported as
failed and the server serves on.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Literal

import httpx
from fastapi import FastAPI

from server import __version__, admin, openapi, ops
from server.api import (
    batches,
    chat,
    completions,
    conversations,
    embeddings,
    files,
    models,
    responses,
    tokenize,
)
from server.auth import Keys
from server.batches import Batches, Runner
from server.config import Settings
from server.errors import APIError, install_handlers
from server.files import Files
from server.gate import Gate
from server.limits import KeyLimits, Limits
from server.metrics import Metrics
from server.redis_limits import RedisKeyLimits
from server.registry import Estimator, Loader, Registry, Served, estimate
from server.store import RequestLog, Stored, utcnow
from server.web import page as web

if TYPE_CHECKING:
    from server.api.responses import Live
    from server.engines.base import Embedder, Engine

log = logging.getLogger(__name__)

Status = Literal["loading", "ready", "failed", "stopping"]
RENDER_THREADS = 2
SWEEP_SECONDS = 3600.0  # how often responses and conversations past their retention are deleted


@dataclass
class ServerState:
    settings: Settings
    registry: Registry
    metrics: Metrics
    status: Status = "loading"  # the server's: "ready" once every preloaded model is
    detail: str = ""
    started: int = field(default_factory=lambda: int(time.time()))
    keys: Keys = field(default_factory=lambda: Keys([]))
    key_limits: Limits = field(default_factory=KeyLimits)  # RedisKeyLimits with --redis-url
    request_log: RequestLog | None = None
    stored: Stored | None = None  # stored responses and conversations (the request log's database)
    background: dict[str, Live] = field(default_factory=dict)  # background responses running here
    runner: str = ""  # this instance, as background responses record who runs them
    files: Files | None = None  # the Batch API's files and batches (the request log's database)
    batches: Batches | None = None
    batch_runner: Runner | None = None
    loop: asyncio.AbstractEventLoop | None = None  # the serving loop, for signal handlers
    # templating and tokenizing prompts: off the event loop (probes and streams keep being served),
    # in a bounded pool (a burst of huge prompts waits its turn instead of taking every thread)
    render_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=RENDER_THREADS, thread_name_prefix="render"))

    def drain(self, timeout: float, then: Callable[[], None]) -> asyncio.Task[None]:
        """Refuse new work (503, readiness false), wait up to `timeout` s for admitted requests
        to finish, then call `then` (which stops the HTTP server)."""
        self.status = "stopping"
        paused = asyncio.ensure_future(self.batch_runner.pause()) if self.batch_runner is not None else None

        async def wait() -> None:
            deadline = time.monotonic() + timeout
            while self.registry.busy():
                if time.monotonic() >= deadline:
                    left = [(e.admission.in_use, e.admission.waiting) for e in self.registry.entries.values()
                            if e.admission is not None]
                    log.warning("shutdown timeout: aborting %d running and %d queued sequences",
                                sum(r for r, _ in left), sum(w for _, w in left))
                    break
                await asyncio.sleep(0.05)
            if paused is not None:
                await paused
            then()

        return asyncio.ensure_future(wait())

    def fail(self, detail: str) -> None:
        self.status = "failed"
        self.detail = detail

    def unavailable_reason(self) -> str:
        if self.status == "loading":
            loading = [e.name for e in self.registry.entries.values() if e.spec.preload and e.state == "loading"]
            many = len(loading) > 1
            return f"The model{'s' if many else ''} {', '.join(loading)} {'are' if many else 'is'} still loading; retry shortly."
        if self.status == "stopping":
            return "The server is shutting down."
        return f"The server cannot serve: {self.detail}"


async def keep_store(state: ServerState) -> None:
    """The stored responses' upkeep: at start, background responses this instance was running
    when it last stopped are marked failed (never silently lost); then, hourly, whatever is past
    its retention is deleted. A database that is down is retried at the next round."""
    stored, settings = state.stored, state.settings
    assert stored is not None
    failed = False
    started = utcnow()
    while True:
        try:
            await asyncio.to_thread(stored.ensure_schema)
            if not failed:
                n = await asyncio.to_thread(stored.fail_unfinished, state.runner, {
                    "code": "server_error",
                    "message": "The server restarted before this response finished; create it again."}, started)
                failed = True
                if n:
                    log.warning("%d response(s) unfinished at the last stop are marked failed", n)
            before = utcnow() - timedelta(days=settings.response_retention)
            responses, conversations = await asyncio.to_thread(stored.sweep, before)
            if responses or conversations:
                log.info("retention: deleted %d stored response(s) and %d conversation(s) older than %g days",
                         responses, conversations, settings.response_retention)
            if state.files is not None and (expired := await asyncio.to_thread(state.files.sweep)):
                log.info("deleted %d file(s) past their expires_after", expired)
        except Exception as e:  # the database is down: the next round retries
            state.metrics.log_errors.inc()
            log.warning("response store upkeep failed (%s: %s); retrying later", type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "")
            await asyncio.sleep(10 if not failed else SWEEP_SECONDS)
            continue
        await asyncio.sleep(SWEEP_SECONDS)


async def stop_background(state: ServerState) -> None:
    """Background responses still running at shutdown end as failed, and say why."""
    running = list(state.background.values())
    for live in running:
        if live.task is not None:
            live.task.cancel()
    await asyncio.gather(*(live.task for live in running if live.task is not None), return_exceptions=True)
    for live in running:
        live.obj["status"] = "failed"
        live.obj["error"] = {"code": "server_error", "message": "The server shut down before this background "
                             "response finished; create it again."}
        try:
            await asyncio.to_thread(live.put(state.stored))  # after its task's own last write
        except Exception as e:
            log.error("background response %s: its failure could not be stored (%s)", live.id, type(e).__name__)


def load_served(settings: Settings, progress: Callable[[str], None]) -> Served:
    """Resolve the model source, load its tokenizer, start the engine (blocking)."""
    from server import engines
    from server import models as model_files
    from server.tokenizer import Tokenizer

    embeds = settings.model_kind == "embed"
    name, why = engines.pick_embedder(settings.engine) if embeds else engines.pick(settings.engine)
    progress("preparing the model files")
    path = model_files.resolve(settings)
    progress("loading the tokenizer")
    tokenizer = Tokenizer(path, trust_remote_code=settings.trust_remote_code)
    what = "embedding engine" if embeds else "engine"
    progress(f"starting the {name} {what}")
    log.info("starting the %s %s (%s) for %s (%s)", name, what, why, settings.model_name, path)
    engine: Engine | Embedder = (engines.embedder_class(name)[0].start(path, settings, tokenizer) if embeds
                                 else engines.engine_class(name)[0].start(path, settings, tokenizer))
    return Served(
        name=settings.model_name,
        engine=engine,
        tokenizer=tokenizer,
        created=int(time.time()),
        fingerprint=f"fp_llm-service-{__version__}-{engine.info.name}",
        path=str(path),
        kind=settings.model_kind,
    )


def create_app(
    settings: Settings,
    loader: Loader = load_served,
    on_fatal: Callable[[str], None] | None = None,
    keys: Keys | None = None,
    estimator: Estimator = estimate,
) -> FastAPI:
    metrics = Metrics()
    registry = Registry(settings, metrics, loader, estimator)
    for spec in settings.served_models:
        registry.declare(spec)
    state = ServerState(settings, registry, metrics,
                        keys=keys or Keys.from_settings(settings.api_key, settings.api_keys_file))
    shared_limits: RedisKeyLimits | None = None
    if settings.redis_url is not None:
        shared_limits = RedisKeyLimits(settings.redis_url, metrics, policy="closed" if settings.limits_on_redis_failure == "closed" else "open",
                                       lease=settings.limits_lease, timeout=settings.redis_timeout)
        state.key_limits = shared_limits

    async def preload() -> None:
        """Load every model declared with preload; the server is ready when all are. One that
        fails ends the process (through `on_fatal`): a start with a broken model is a broken
        deployment. Lazy models wait for their first request."""
        entries = [e for e in registry.entries.values() if e.spec.preload]
        started = time.monotonic()
        for entry in entries:
            try:
                await registry.load(entry)
            except APIError as e:  # does not fit the memory budget
                entry.fail(e.message)
        await asyncio.gather(*(e.done.wait() for e in entries if e.state == "loading"))
        for entry in entries:
            if entry.state == "failed" and not entry.spec.required:
                log.warning("the default embedding model %s did not load, and the server serves without it "
                            "(/v1/embeddings answers 503 with this reason; --embedding-model none silences this): %s",
                            entry.name, entry.detail)
        failed = [e for e in entries if e.state == "failed" and e.spec.required]
        if failed:
            message = " ".join(f"{e.name}: {e.detail}" for e in failed) if len(entries) > 1 else failed[0].detail
            state.fail(message)
            if on_fatal is not None:
                on_fatal(message)
            return
        if state.status == "loading":
            state.status = "ready"
            if len(entries) > 1:
                log.info("all %d preloaded models ready in %.1f s", len(entries), time.monotonic() - started)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        state.request_log = RequestLog(settings.request_log_url, settings.request_log_buffer,
                                       on_dropped=metrics.log_dropped.inc, on_error=metrics.log_errors.inc)
        state.request_log.start()
        if shared_limits is not None:
            shared_limits.start()
            log.info("per-key limits: in Redis at %s, shared by every replica (on failure: %s)",
                     shared_limits.where, settings.limits_on_redis_failure)
        log.info("request log: %s", state.request_log.db.url.render_as_string(hide_password=True))
        state.stored = Stored(state.request_log.db)
        state.runner = f"{socket.gethostname()}:{settings.port}"
        state.files = Files(state.request_log.db, settings.files_folder)
        state.batches = Batches(state.request_log.db, state.files, settings.batch_window)
        # batch lines go through this app itself, as requests do (gate, limits, pipeline, log)
        batch_client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://llm-service.batch",
                                         timeout=None)
        state.batch_runner = Runner(state, state.batches, batch_client)
        batch_work = asyncio.create_task(state.batch_runner.run())
        sweeper = asyncio.create_task(keep_store(state))
        loading = asyncio.create_task(preload())
        reaper = (asyncio.create_task(registry.unload_idle(settings.idle_unload))
                  if settings.idle_unload is not None else None)
        try:
            yield
        finally:
            state.status = "stopping"
            if reaper is not None:
                reaper.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            sweeper.cancel()
            state.batch_runner.paused = True  # no round starts; the one in progress ends (a claim is not cut)
            state.batch_runner.wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(batch_work), 10)
            except TimeoutError:
                batch_work.cancel()
            await state.batch_runner.pause()
            await batch_client.aclose()
            await stop_background(state)
            await state.key_limits.close()
            await registry.close()
            state.render_pool.shutdown(wait=False, cancel_futures=True)
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
    for router in (chat.router, completions.router, embeddings.router, responses.router, conversations.router,
                   files.router, batches.router, models.router, tokenize.router, ops.router, admin.router,
                   admin.usage_router):
        app.include_router(router)
    if settings.chat_page:
        web.install(app)
    app.add_middleware(Gate, state=state)
    openapi.install(app)
    return app
