"""The models this server serves: each one's declaration, state and engine, the aliases in front
of them, and where they fit in memory.

A model goes `unloaded` (declared lazy) -> `loading` -> `ready` -> `unloading` -> gone (DELETE),
or back to `unloaded` (a lazy model idle for --idle-unload, or evicted to make room); a load that
fails leaves it `failed` with the reason, and the server serves the others on. Loads run one at a
time, in a worker thread: the event loop keeps serving the other models, the memory a load took
is measured around it, and two engines never race for the same memory.

Placement: before a load, the model's footprint is estimated from its files and engine settings
(weights + KV cache + the engine's overhead) and checked against --memory-budget beside the
footprints of the models already there (each the larger of its estimate and what its load
measured). A model that does not fit is refused with 507 before anything is allocated, or, with
--evict-idle, the least recently used idle lazy models are unloaded first to make room.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from server import system
from server.config import DEFAULT_SOURCE, Alias, ModelSpec, Settings
from server.engines.base import Engine
from server.errors import Conflict, InsufficientMemory, ModelNotFound, ServiceUnavailable
from server.limits import Admission
from server.metrics import MODEL_STATES, Metrics
from server.tokenizer import Tokenizer

log = logging.getLogger(__name__)

GiB = 1 << 30
State = Literal["unloaded", "loading", "ready", "failed", "unloading"]
# blocking, in a worker thread: prepares the model and starts its engine, reporting its phase
Loader = Callable[[Settings, Callable[[str], None]], "Served"]
# blocking: bytes the model will hold on `device` (of `total` bytes); None: not knowable yet
Estimator = Callable[[Settings, str, int], "int | None"]
# without --memory-budget the models may take this share of the device's memory
DEFAULT_BUDGET_SHARE = 0.9


def estimate(settings: Settings, device: str, total: int) -> int | None:
    """Weights from the model's files, KV cache and overhead from its engine's rules."""
    from server import engines, models

    weights = models.weights_bytes(settings)
    if weights is None:
        return None
    engine_class, _ = engines.engine_class(settings.engine)
    return engine_class.footprint(weights, settings, device, total)


@dataclass
class Served:
    """What the routes need once the model is loaded (a ready Entry has one)."""

    name: str
    engine: Engine
    tokenizer: Tokenizer
    created: int
    fingerprint: str
    path: str | None = None  # the local folder it was loaded from


@dataclass
class Entry:
    """One model: what was declared, what state it is in, its engine once ready."""

    spec: ModelSpec
    settings: Settings  # the engine settings it runs with
    state: State = "unloaded"
    detail: str = ""  # the phase of a load or unload in progress, or why it failed
    since: float = field(default_factory=time.time)  # when `state` last changed
    served: Served | None = None
    admission: Admission | None = None
    estimated_bytes: int | None = None
    measured_bytes: int | None = None
    load_seconds: float | None = None
    requests: int = 0  # requests admitted to it since it was declared
    last_used: float = field(default_factory=time.monotonic)
    done: asyncio.Event = field(default_factory=asyncio.Event)  # set when a load ends, either way
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while no request runs or waits
    task: asyncio.Task[None] | None = None  # its load or unload in progress
    forget: bool = False  # unloading for good (DELETE), not back to `unloaded`

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def footprint(self) -> int:
        return max(self.estimated_bytes or 0, self.measured_bytes or 0)

    @property
    def engine(self) -> str:
        """The engine serving it, else the one it is declared for (maybe "auto")."""
        return self.served.engine.info.name if self.served is not None else self.settings.engine

    @property
    def idle_lazy(self) -> bool:
        """A lazy model that is loaded and has no request: what --idle-unload and eviction unload."""
        return self.state == "ready" and not self.spec.preload and not self.busy

    @property
    def holds_memory(self) -> bool:
        return self.state in ("loading", "ready", "unloading")

    @property
    def busy(self) -> bool:
        """Requests are running on it or waiting for it."""
        return self.admission is not None and bool(self.admission.in_use or self.admission.waiting)

    @property
    def usable(self) -> bool:
        """A request for it can be served now or once it loads."""
        return self.state in ("ready", "loading", "unloaded")

    def set(self, state: State, detail: str = "") -> None:
        self.state, self.detail, self.since = state, detail, time.time()

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def unavailable(self) -> ServiceUnavailable:
        if self.state == "loading":
            return ServiceUnavailable(f"The model {self.name} is loading ({self.detail}); retry shortly.",
                                      code="model_loading", headers={"retry-after": "5"})
        if self.state == "unloading":
            return ServiceUnavailable(f"The model {self.name} is being unloaded ({self.detail}).",
                                      code="model_unloading", headers={"retry-after": "5"})
        return ServiceUnavailable(f"The model {self.name} is not available: it failed to load: {self.detail}",
                                  code="model_failed")

    def describe(self) -> dict[str, Any]:
        served, admission = self.served, self.admission
        out: dict[str, Any] = {
            "object": "model.status",
            "id": self.name,
            "state": self.state,
            "detail": self.detail or None,
            "state_since": int(self.since),
            "engine": self.engine,
            "source": self.spec.source or DEFAULT_SOURCE,
            "preload": self.spec.preload,
            "settings": dict(self.spec.settings),
            "max_model_len": served.engine.info.max_model_len if served else None,
            "memory": {"estimated_bytes": self.estimated_bytes, "measured_bytes": self.measured_bytes,
                       "footprint_bytes": self.footprint},
            "load_seconds": None if self.load_seconds is None else round(self.load_seconds, 1),
            "requests_served": self.requests,
            "running": admission.in_use if admission else 0,
            "waiting": admission.waiting if admission else 0,
            "idle_seconds": round(time.monotonic() - self.last_used, 1),
        }
        if self.state == "loading":
            out["progress"] = {"phase": self.detail, "elapsed_seconds": round(time.time() - self.since, 1)}
        return out


def _unit(alias: str, user: str) -> float:
    """A stable number in [0, 1) for (alias, user): the same user keeps the same variant."""
    digest = hashlib.sha256(f"{alias}\0{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class Registry:
    """Every model of the server by name, and the aliases in front of them."""

    def __init__(self, settings: Settings, metrics: Metrics, loader: Loader, estimator: Estimator = estimate) -> None:
        self.settings = settings
        self.metrics = metrics
        self.loader = loader
        self.estimator = estimator
        self.entries: dict[str, Entry] = {}
        self.aliases: dict[str, Alias] = {a.name: a for a in settings.aliases}
        for alias in settings.aliases:  # every arm's series from 0, so rate() sees its first request
            for model, _ in alias.variants:
                metrics.alias_requests.labels(alias.name, model)
        self._one_load = asyncio.Lock()
        self.device = ""  # where models go ("cuda" or "cpu"), known at the first placement
        self.total = 0
        self.budget = 0

    # ------------------------------------------------------------------ declaring and finding

    def declare(self, spec: ModelSpec) -> Entry:
        """Add a model (unloaded); SettingsError for bad engine settings, 409 for a taken name.
        A failed model's name can be declared again (that retries it)."""
        if spec.name in self.aliases:
            raise Conflict(f"{spec.name!r} is an alias; pick another name for the model.", param="name")
        existing = self.entries.get(spec.name)
        if existing is not None and existing.state != "failed":
            raise Conflict(f"A model named {spec.name!r} exists already ({existing.state}); "
                           f"DELETE /v1/admin/models/{spec.name} first to replace it.", param="name")
        entry = Entry(spec, spec.engine_settings(self.settings))
        self.entries[spec.name] = entry
        return entry

    def get(self, name: str) -> Entry:
        entry = self.entries.get(name)
        if entry is None:
            raise ModelNotFound(name)
        return entry

    def ready(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.state == "ready" and e.served is not None]

    def busy(self) -> bool:
        return any(e.busy for e in self.entries.values())

    async def resolve(self, name: str, user: str | None,
                      wait: Callable[[Awaitable[None]], Awaitable[None]] | None = None) -> tuple[Entry, Alias | None]:
        """The ready model a request for `name` goes to (an alias picks a variant, sticky per
        `user`). A lazy model is loaded, and the request waits for it up to --load-wait, through
        `wait` when given (the routes stop waiting when the client leaves)."""
        alias = self.aliases.get(name)
        entry = self._pick(alias, user) if alias is not None else self.get(name)
        if entry.state != "ready":
            await (wait or (lambda work: work))(self._make_ready(entry))
        if entry.state != "ready" or entry.admission is None:
            raise entry.unavailable()
        if alias is not None:
            self.metrics.alias_requests.labels(alias.name, entry.name).inc()
        return entry, alias

    async def _make_ready(self, entry: Entry) -> None:
        if entry.state == "unloading" and not entry.forget and entry.task is not None:
            # an idle or evicted lazy model on its way out: let it finish, then load it again
            try:
                await asyncio.wait_for(asyncio.shield(entry.task), self.settings.load_wait)
            except TimeoutError:
                pass
        if entry.state == "unloaded":
            await self.load(entry)
        if entry.state == "loading" and not entry.spec.preload and self.settings.load_wait > 0:
            try:
                await asyncio.wait_for(entry.done.wait(), self.settings.load_wait)
            except TimeoutError:
                pass

    def usable_variants(self, alias: Alias) -> list[tuple[Entry, float]]:
        return [(self.entries[m], w) for m, w in alias.variants if m in self.entries and self.entries[m].usable]

    def _pick(self, alias: Alias, user: str | None) -> Entry:
        # the variants that can serve; weights renormalized over them
        usable = self.usable_variants(alias)
        if not usable:
            raise ServiceUnavailable(f"No model behind the alias {alias.name!r} is available.", code="model_unavailable")
        total = sum(w for _, w in usable)
        point = (_unit(alias.name, user) if user else random.random()) * total
        for entry, weight in usable:
            point -= weight
            if point < 0:
                return entry
        return usable[-1][0]

    # ------------------------------------------------------------------ placement

    async def _measure_device(self) -> None:
        if not self.device:
            self.device = await asyncio.to_thread(system.device)
            self.total = system.device_total_bytes(self.device)
            budget = self.settings.memory_budget
            self.budget = int(budget * GiB) if budget is not None else int(self.total * DEFAULT_BUDGET_SHARE)

    def used(self, besides: Entry | None = None) -> int:
        return sum(e.footprint for e in self.entries.values() if e is not besides and e.holds_memory)

    def _place(self, entry: Entry, need: int | None) -> list[Entry]:
        """The models to evict so `entry` fits (usually none); 507 when it cannot fit."""
        if need is None:
            return []
        used = self.used(besides=entry)
        if used + need <= self.budget:
            return []
        victims: list[Entry] = []
        idle_lazy = sorted((e for e in self.entries.values() if e is not entry and e.idle_lazy),
                           key=lambda e: e.last_used)
        if self.settings.evict_idle:
            for victim in idle_lazy:
                victims.append(victim)
                used -= victim.footprint
                if used + need <= self.budget:
                    return victims
        loaded = ", ".join(f"{e.name} {e.footprint / GiB:.2f}" for e in self.entries.values()
                           if e is not entry and e.holds_memory) or "none"
        raise InsufficientMemory(
            f"The model {entry.name} does not fit: it needs about {need / GiB:.2f} GiB and "
            f"{(self.budget - self.used(besides=entry)) / GiB:.2f} GiB of the {self.budget / GiB:.2f} GiB "
            f"memory budget ({self.device}) are free (loaded, GiB: {loaded}). Unload a model, give this "
            "one a smaller KV cache (settings: kv_cache_space) or raise --memory-budget"
            + ("; --evict-idle would unload idle lazy models to make room." if idle_lazy and not self.settings.evict_idle else "."),
        )

    # ------------------------------------------------------------------ loading and unloading

    async def load(self, entry: Entry) -> None:
        """Start loading `entry` and return (poll its state); 507 if it does not fit."""
        await self._measure_device()
        need = await asyncio.to_thread(self.estimator, entry.settings, self.device, self.total)
        if entry.state != "unloaded" and entry.state != "failed":
            return  # another request started it while this one estimated
        victims = self._place(entry, need)
        entry.estimated_bytes, entry.measured_bytes = need, None
        entry.done.clear()
        entry.set("loading", "waiting for another model's load to finish" if self._one_load.locked() else "starting")
        for victim in victims:
            log.info("evicting idle model %s (%.2f GiB) to make room for %s", victim.name, victim.footprint / GiB, entry.name)
            self.unload(victim, forget=False, why=f"evicted to make room for {entry.name}")
        entry.task = asyncio.create_task(self._load(entry, victims))

    async def _load(self, entry: Entry, victims: list[Entry]) -> None:
        for victim in victims:  # their memory must be free before this load takes it
            if victim.task is not None:
                await asyncio.gather(victim.task, return_exceptions=True)
        async with self._one_load:
            if entry.state != "loading":  # deleted while it waited its turn
                if entry.forget:
                    self._remove(entry)
                entry.done.set()
                return
            entry.detail = "starting"
            before = await asyncio.to_thread(system.used_bytes, self.device)
            started = time.monotonic()

            def progress(phase: str) -> None:  # called from the loader's thread: one assignment
                entry.detail = phase

            try:
                served = await asyncio.to_thread(self.loader, entry.settings, progress)
            except Exception as e:
                message = str(e) or type(e).__name__
                log.error("could not load model %s: %s", entry.name, message)
                if not isinstance(e, RuntimeError | ValueError | OSError):
                    log.exception("load failure details")
                entry.set("failed", message)
                if entry.forget:  # DELETE came while it loaded
                    self._remove(entry)
                entry.done.set()
                return
            entry.measured_bytes = max(await asyncio.to_thread(system.used_bytes, self.device) - before, 0)
        entry.load_seconds = time.monotonic() - started
        served.engine.attach_to_loop()
        name = entry.name

        def gauges(running: int, waiting: int) -> None:
            self.metrics.running.labels(name).set(running)
            self.metrics.waiting.labels(name).set(waiting)
            if running or waiting:
                entry.idle.clear()
            else:
                entry.idle.set()

        entry.idle.set()

        entry.admission = Admission(served.engine.info.max_num_seqs, self.settings.max_queued_requests, gauges)
        entry.served = served
        entry.touch()
        if entry.state == "unloading":  # DELETE came while it loaded
            entry.done.set()
            entry.task = asyncio.create_task(self._unload(entry))
            return
        entry.set("ready")
        entry.done.set()
        log.info("model %s ready on the %s engine in %.1f s (max context %d tokens, ~%.2f GiB)",
                 name, served.engine.info.name, entry.load_seconds, served.engine.info.max_model_len,
                 entry.footprint / GiB)

    def unload(self, entry: Entry, forget: bool, why: str) -> None:
        """Unload `entry` once the requests running on or waiting for it finish; new ones get 503
        meanwhile. `forget`: remove it (DELETE); else it goes back to `unloaded` (lazy)."""
        entry.forget = entry.forget or forget
        if entry.state in ("unloaded", "failed"):
            if entry.forget:
                self._remove(entry)
            return
        if entry.state == "unloading":
            return
        loading = entry.state == "loading"
        entry.set("unloading", why)
        log.info("unloading model %s: %s", entry.name, why)
        if not loading:  # a load in progress finishes first, then `_load` hands over to `_unload`
            entry.task = asyncio.create_task(self._unload(entry))

    async def _unload(self, entry: Entry) -> None:
        while entry.busy:  # running and queued requests finish first
            await entry.idle.wait()
        served = entry.served
        entry.served, entry.admission = None, None
        if served is not None:
            try:
                await served.engine.shutdown()
            except Exception:
                log.exception("model %s: engine shutdown failed", entry.name)
        self.metrics.running.labels(entry.name).set(0)
        self.metrics.waiting.labels(entry.name).set(0)
        if entry.forget:
            self._remove(entry)
            log.info("model %s unloaded and removed", entry.name)
        else:
            entry.measured_bytes = None
            entry.set("unloaded", entry.detail)
            log.info("model %s unloaded (%s); its next request loads it again", entry.name, entry.detail)

    def refresh_gauges(self) -> None:
        """The per-model gauges that are read, not event-driven (at each /metrics scrape)."""
        m = self.metrics
        for entry in self.entries.values():
            for state in MODEL_STATES:
                m.model_state.labels(entry.name, state).set(1 if entry.state == state else 0)
            m.model_memory.labels(entry.name).set(entry.footprint if entry.holds_memory else 0)
            if entry.served is not None:
                m.kv_cache.labels(entry.name).set(entry.served.engine.kv_cache_usage())

    def _remove(self, entry: Entry) -> None:
        if self.entries.get(entry.name) is entry:
            del self.entries[entry.name]
            self.metrics.forget_model(entry.name)

    async def unload_idle(self, idle: float) -> None:
        """Runs while the server serves (--idle-unload): unloads lazy models idle that long."""
        while True:
            await asyncio.sleep(min(5.0, idle / 4))
            now = time.monotonic()
            for entry in list(self.entries.values()):
                if entry.idle_lazy and now - entry.last_used >= idle:
                    self.unload(entry, forget=False, why=f"idle for {idle:g} s")

    async def close(self) -> None:
        """Server shutdown: let loads in progress finish (a thread cannot be interrupted), then
        stop every engine."""
        tasks = [e.task for e in self.entries.values() if e.task is not None and not e.task.done()]
        for entry in self.entries.values():
            if entry.state == "unloading" and entry.task is not None and entry.served is not None:
                entry.task.cancel()  # it waits for requests, which the shutdown has ended
        await asyncio.gather(*tasks, return_exceptions=True)
        for entry in list(self.entries.values()):
            if entry.served is not None:
                await entry.served.engine.shutdown()
                entry.served = None
