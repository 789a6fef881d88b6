"""The models this server serves: their names and aliases, each one's state and engine, and the
load/unload lifecycle. Where models fit in memory is `server.placement`'s (pure) decision.

A model goes `unloaded` (declared lazy) -> `loading` -> `ready` -> `unloading` -> gone (DELETE),
or back to `unloaded` (a lazy model idle for --idle-unload, or evicted to make room); a load that
fails leaves it `failed` with the reason, and the server serves the others on. Loads run one at a
time, in a worker thread: the event loop keeps serving the other models, the memory a load took
is measured around it, and two engines never race for the same memory.

Each entry owns its transitions (`Entry.begin_load`, `loaded`, `fail`, `begin_unload`,
`unloaded`); its state is derived from what it holds (its loaded engine, the phase in progress,
a failure), never stored beside it. Only this module changes entries: routes read them, and ask
the registry (`declare`, `load`, `unload`, `engine_died`) for the rest.

A model has a kind: `generate` (chat, completions, responses) or `embed` (embeddings). A request
to the wrong kind is a 400 naming the routes the model serves.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

from server import placement, system
from server.config import DEFAULT_SOURCE, Alias, Kind, ModelSpec, Settings
from server.errors import Conflict, InvalidRequest, ModelNotFound, ServiceUnavailable
from server.limits import Admission
from server.metrics import MODEL_STATES, Metrics
from server.placement import GiB, Holding, Memory
from server.placement import estimate as estimate

if TYPE_CHECKING:
    from server.engines.base import Embedder, Engine
    from server.tokenizer import Tokenizer

log = logging.getLogger(__name__)

State = Literal["unloaded", "loading", "ready", "failed", "unloading"]
# blocking, in a worker thread: prepares the model and starts its engine, reporting its phase
Loader = Callable[[Settings, Callable[[str], None]], "Served"]
# blocking: bytes the model will hold on `device` (of `total` bytes); None: not knowable yet
Estimator = Callable[[Settings, str, int], "int | None"]
# what each kind of model serves (in the message of a request to the wrong kind)
ROUTES: dict[str, str] = {"generate": "/v1/chat/completions, /v1/completions and /v1/responses",
                          "embed": "/v1/embeddings"}


@dataclass
class Served:
    """What the routes need once the model is loaded: its engine (a generating `Engine`, or an
    `Embedder` for an embedding model) and its tokenizer."""

    name: str
    engine: Engine | Embedder
    tokenizer: Tokenizer
    created: int
    fingerprint: str
    path: str | None = None  # the local folder it was loaded from
    kind: Kind = "generate"

    def generator(self) -> Engine:
        """The engine of a generating model (the registry resolved it by its kind)."""
        assert self.kind == "generate", f"{self.name} is an embedding model"
        return cast("Engine", self.engine)

    def embedder(self) -> Embedder:
        assert self.kind == "embed", f"{self.name} is not an embedding model"
        return cast("Embedder", self.engine)


@dataclass
class Loaded:
    """A ready model's parts, present together or not at all."""

    served: Served
    admission: Admission  # its engine's slots and bounded queue


@dataclass
class Entry:
    """One model: what was declared, its loaded parts once ready, and the phase in progress."""

    spec: ModelSpec
    settings: Settings  # the engine settings it runs with
    loaded: Loaded | None = None
    phase: Literal["loading", "unloading"] | None = None
    failure: str | None = None  # why its last load failed (or its engine died)
    detail: str = ""  # the phase's progress, or why it was unloaded
    since: float = field(default_factory=time.time)  # when its state last changed
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
    def kind(self) -> Kind:
        return self.spec.kind

    @property
    def state(self) -> State:
        if self.phase is not None:
            return self.phase
        if self.failure is not None:
            return "failed"
        return "ready" if self.loaded is not None else "unloaded"

    @property
    def served(self) -> Served | None:
        return self.loaded.served if self.loaded is not None else None

    @property
    def admission(self) -> Admission | None:
        return self.loaded.admission if self.loaded is not None else None

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
        admission = self.admission
        return admission is not None and bool(admission.in_use or admission.waiting)

    @property
    def usable(self) -> bool:
        """A request for it can be served now or once it loads."""
        return self.state in ("ready", "loading", "unloaded")

    # ------------------------------------------------------------------ transitions (the registry drives them)

    def _changed(self, detail: str) -> None:
        self.detail, self.since = detail, time.time()

    def begin_load(self, need: int | None, detail: str) -> None:
        self.phase, self.failure = "loading", None
        self.estimated_bytes, self.measured_bytes = need, None
        self.done.clear()
        self._changed(detail)

    def progress(self, detail: str) -> None:
        """The phase's progress (a loader's thread calls it: one assignment)."""
        self.detail = detail

    def loaded_with(self, loaded: Loaded, seconds: float) -> None:
        """Its load ended well; it is ready unless an unload was asked for meanwhile."""
        self.loaded, self.load_seconds = loaded, seconds
        self.last_used = time.monotonic()
        if self.phase == "loading":
            self.phase = None
            self._changed("")
        self.done.set()

    def fail(self, reason: str) -> None:
        """Its load failed, or its engine died: it serves nothing until declared again."""
        self.phase, self.loaded, self.failure = None, None, reason
        self._changed(reason)
        self.done.set()

    def begin_unload(self, why: str) -> None:
        self.phase = "unloading"
        self._changed(why)

    def unloaded(self) -> Served | None:
        """It no longer takes work: its parts are handed back (to shut its engine down), and it
        is `unloaded` (its next request loads it again)."""
        served = self.served
        self.loaded, self.phase, self.measured_bytes = None, None, None
        self._changed(self.detail)
        return served

    def admitted(self) -> None:
        self.requests += 1
        self.touch()

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
            "kind": self.kind,
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
        self.memory: Memory | None = None  # measured at the first placement

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

    def withdraw(self, entry: Entry) -> None:
        """Take back a declaration that was refused before anything ran (it did not fit)."""
        if entry.state in ("unloaded", "failed"):
            self._remove(entry)

    def get(self, name: str) -> Entry:
        entry = self.entries.get(name)
        if entry is None:
            raise ModelNotFound(name)
        return entry

    def ready(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.state == "ready"]

    def busy(self) -> bool:
        return any(e.busy for e in self.entries.values())

    def kind_of(self, name: str) -> Kind | None:
        """The kind of the model (or the alias's models) called `name`; None if there is none."""
        alias = self.aliases.get(name)
        entry = self.entries.get(alias.variants[0][0] if alias is not None else name)
        return entry.kind if entry is not None else None

    async def resolve(self, name: str, user: str | None,
                      wait: Callable[[Awaitable[None]], Awaitable[None]] | None = None,
                      kind: Kind | None = "generate") -> tuple[Entry, Alias | None]:
        """The ready model a request for `name` goes to (an alias picks a variant, sticky per
        `user`). A lazy model is loaded, and the request waits for it up to --load-wait, through
        `wait` when given (the routes stop waiting when the client leaves). A model of another
        `kind` than the route serves (None: any) is a 400 that says where to send it."""
        alias = self.aliases.get(name)
        entry = self._pick(alias, user) if alias is not None else self.get(name)
        if kind is not None and entry.kind != kind:
            what = "an embedding model" if entry.kind == "embed" else "a text generation model"
            raise InvalidRequest(f"The model {name!r} is {what}: it serves {ROUTES[entry.kind]} only.",
                                 param="model", code="wrong_model_kind")
        if entry.state != "ready":
            await (wait or (lambda work: work))(self._make_ready(entry))
        if entry.state != "ready":
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

    # ------------------------------------------------------------------ memory

    def used(self, besides: Entry | None = None) -> int:
        return sum(e.footprint for e in self.entries.values() if e is not besides and e.holds_memory)

    def _holdings(self, besides: Entry) -> list[Holding]:
        return [Holding(e.name, e.footprint, e.idle_lazy, e.last_used)
                for e in self.entries.values() if e is not besides and e.holds_memory]

    # ------------------------------------------------------------------ loading and unloading

    async def load(self, entry: Entry) -> None:
        """Start loading `entry` and return (poll its state); 507 if it does not fit."""
        if self.memory is None:
            self.memory = await asyncio.to_thread(Memory.measure, self.settings)
        memory = self.memory
        need = await asyncio.to_thread(self.estimator, entry.settings, memory.device, memory.total)
        if entry.state != "unloaded" and entry.state != "failed":
            return  # another request started it while this one estimated
        if entry.forget or self.entries.get(entry.name) is not entry:
            return  # deleted (or replaced) while this one estimated: nothing may load it now
        victims = [self.entries[name] for name in
                   placement.fit(entry.name, need, self._holdings(entry), memory, self.settings.evict_idle)]
        entry.begin_load(need, "waiting for another model's load to finish" if self._one_load.locked() else "starting")
        for victim in victims:
            log.info("evicting idle model %s (%.2f GiB) to make room for %s", victim.name, victim.footprint / GiB, entry.name)
            self.unload(victim, forget=False, why=f"evicted to make room for {entry.name}")
        entry.task = asyncio.create_task(self._load(entry, victims))

    async def _load(self, entry: Entry, victims: list[Entry]) -> None:
        for victim in victims:  # their memory must be free before this load takes it
            if victim.task is not None:
                await asyncio.gather(victim.task, return_exceptions=True)
        assert self.memory is not None
        device = self.memory.device
        async with self._one_load:
            if entry.state != "loading":  # deleted while it waited its turn
                entry.unloaded()
                entry.done.set()
                if entry.forget:
                    self._remove(entry)
                return
            entry.progress("starting")
            before = await asyncio.to_thread(system.used_bytes, device)
            started = time.monotonic()
            try:
                served = await asyncio.to_thread(self.loader, entry.settings, entry.progress)
            except Exception as e:
                message = str(e) or type(e).__name__
                log.error("could not load model %s: %s", entry.name, message)
                if not isinstance(e, RuntimeError | ValueError | OSError):
                    log.exception("load failure details")
                entry.fail(message)
                if entry.forget:  # DELETE came while it loaded
                    self._remove(entry)
                return
            try:
                entry.measured_bytes = max(await asyncio.to_thread(system.used_bytes, device) - before, 0)
                served.engine.attach_to_loop()
                admission = Admission(served.engine.info.max_num_seqs, self.settings.max_queued_requests,
                                      self._gauges(entry))
            except Exception as e:  # the engine started but cannot serve: it must not run on unowned
                log.exception("model %s: its engine started but could not be attached", entry.name)
                entry.fail(f"its engine started but could not be attached: {e!r}")
                await self._shut_down(entry.name, served)
                if entry.forget:
                    self._remove(entry)
                return
        entry.idle.set()
        entry.loaded_with(Loaded(served, admission), time.monotonic() - started)
        if entry.state == "unloading":  # DELETE came while it loaded
            entry.task = asyncio.create_task(self._unload(entry))
            return
        log.info("model %s (%s) ready on the %s engine in %.1f s (max context %d tokens, ~%.2f GiB)",
                 entry.name, entry.kind, served.engine.info.name, entry.load_seconds or 0,
                 served.engine.info.max_model_len, entry.footprint / GiB)

    def _gauges(self, entry: Entry) -> Callable[[int, int], None]:
        """The admission's report of running and waiting requests: gauges, and the idle event
        an unload waits on."""
        name = entry.name

        def report(running: int, waiting: int) -> None:
            if self.entries.get(name) is not entry:
                return  # removed: its series are gone and must not come back
            self.metrics.running.labels(name).set(running)
            self.metrics.waiting.labels(name).set(waiting)
            if running or waiting:
                entry.idle.clear()
            else:
                entry.idle.set()

        return report

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
        entry.begin_unload(why)
        log.info("unloading model %s: %s", entry.name, why)
        if not loading:  # a load in progress finishes first, then `_load` hands over to `_unload`
            entry.task = asyncio.create_task(self._unload(entry))

    async def _unload(self, entry: Entry) -> None:
        while entry.busy:  # running and queued requests finish first
            await entry.idle.wait()
        served = entry.unloaded()
        if served is not None:
            await self._shut_down(entry.name, served)
        self.metrics.running.labels(entry.name).set(0)
        self.metrics.waiting.labels(entry.name).set(0)
        if entry.forget:
            self._remove(entry)
            log.info("model %s unloaded and removed", entry.name)
        else:
            log.info("model %s unloaded (%s); its next request loads it again", entry.name, entry.detail)

    async def _shut_down(self, name: str, served: Served) -> None:
        try:
            await served.engine.shutdown()
        except Exception:
            log.exception("model %s: engine shutdown failed", name)

    def engine_died(self, entry: Entry, reason: str) -> None:
        """A health check found its engine dead: it fails (and serves nothing) until declared
        again, and what is left of its engine (processes, threads, memory) is shut down."""
        log.error("model %s: %s", entry.name, reason)
        served = entry.served
        entry.fail(reason)
        self.metrics.running.labels(entry.name).set(0)
        self.metrics.waiting.labels(entry.name).set(0)
        if served is not None:
            entry.task = asyncio.create_task(self._shut_down(entry.name, served))

    def refresh_gauges(self) -> None:
        """The per-model gauges that are read, not event-driven (at each /metrics scrape)."""
        m = self.metrics
        for entry in self.entries.values():
            for state in MODEL_STATES:
                m.model_state.labels(entry.name, state).set(1 if entry.state == state else 0)
            m.model_memory.labels(entry.name).set(entry.footprint if entry.holds_memory else 0)
            served = entry.served
            if served is not None and served.kind == "generate":
                m.kv_cache.labels(entry.name).set(served.generator().kv_cache_usage())

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
            served = entry.unloaded() if entry.loaded is not None else None
            if served is not None:
                await served.engine.shutdown()
