"""The model registry's rules, with fake engines: alias picks (weights, sticky users), placement
against the memory budget (refusal, eviction of idle lazy models), unloading after the running
requests, idle unload, a failing load. The live tests (test_many_models.py) do the same with real
models through the SDK; these pin the arithmetic and the ordering."""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import cast

import pytest

from server.config import Alias, ModelSpec, Settings
from server.errors import APIError, InsufficientMemory, ServiceUnavailable
from server.metrics import Metrics
from server.registry import GiB, Registry, Served
from tests.fake_engine import FakeEngine

UNIT = Settings(embedding_model=None, database_url=f"sqlite:///{Path(tempfile.mkdtemp(prefix='llm-unit-')) / 'requests.db'}")


def _loader(fail: set[str] | None = None) -> Callable[[Settings, Callable[[str], None]], Served]:
    def load(settings: Settings, progress: Callable[[str], None]) -> Served:
        progress("loading")
        if settings.model_name in (fail or set()):
            raise ValueError(f"{settings.model_name} is broken")
        engine = FakeEngine([1, 2, 3], ["a", "b", "c"])
        return Served(settings.model_name, engine, tokenizer=None, created=0, fingerprint="fp")  # type: ignore[arg-type]
    return load


def _registry(specs: list[ModelSpec], aliases: tuple[Alias, ...] = (), sizes: dict[str, float] | None = None,
              fail: set[str] | None = None, **settings: object) -> Registry:
    s = replace(UNIT, models=tuple(specs), aliases=aliases, **settings)  # type: ignore[arg-type]
    sizes = sizes or {}

    def estimator(model: Settings, device: str, total: int) -> int | None:
        return int(sizes.get(model.model_name, 0.1) * GiB)

    registry = Registry(s, Metrics(), _loader(fail), estimator)
    for spec in specs:
        registry.declare(spec)
    return registry


async def _ready(registry: Registry, name: str) -> None:
    entry = registry.get(name)
    if entry.spec.preload:  # what the server's start does; a request does not wait for it
        await registry.load(entry)
        await entry.done.wait()
    entry, _ = await registry.resolve(name, None)
    assert entry.state == "ready"


async def test_alias_weights_and_sticky_users() -> None:
    specs = [ModelSpec("a", "/a", preload=False), ModelSpec("b", "/b", preload=False)]
    registry = _registry(specs, (Alias("trial", (("a", 3.0), ("b", 1.0))),))
    await _ready(registry, "a")
    await _ready(registry, "b")
    # without a user: random, 3:1 (10000 draws: 4 standard deviations is +-0.017)
    draws = Counter(registry._pick(registry.aliases["trial"], None).name for _ in range(10000))
    assert abs(draws["a"] / 10000 - 0.75) < 0.02
    # with a user: the same user always gets the same variant, and users split 3:1 too
    users = {f"user-{i}": registry._pick(registry.aliases["trial"], f"user-{i}").name for i in range(4000)}
    assert abs(Counter(users.values())["a"] / 4000 - 0.75) < 0.03
    for user, model in list(users.items())[:50]:
        assert {registry._pick(registry.aliases["trial"], user).name for _ in range(5)} == {model}


async def test_an_alias_skips_a_variant_that_cannot_serve() -> None:
    registry = _registry([ModelSpec("a", "/a"), ModelSpec("b", "/b", preload=False)],
                         (Alias("trial", (("a", 1.0), ("b", 1.0))),), fail={"b"})
    await registry.load(registry.get("a"))
    await registry.get("a").done.wait()
    with pytest.raises(ServiceUnavailable, match="b is broken"):
        await registry.resolve("b", None)
    assert registry.get("b").state == "failed"
    assert {registry._pick(registry.aliases["trial"], f"u{i}").name for i in range(50)} == {"a"}


async def test_a_model_that_does_not_fit_is_refused_before_loading() -> None:
    registry = _registry([ModelSpec("a", "/a"), ModelSpec("big", "/big", preload=False)],
                         sizes={"a": 1.0, "big": 2.5}, memory_budget=3.0)
    await _ready(registry, "a")
    with pytest.raises(InsufficientMemory) as e:
        await registry.resolve("big", None)
    assert e.value.status_code == 507
    assert "needs about 2.50 GiB and 2.00 GiB of the 3.00 GiB memory budget" in e.value.message
    assert registry.get("big").state == "unloaded"  # nothing was started; a later try may fit


async def test_eviction_unloads_the_least_recently_used_idle_lazy_model() -> None:
    specs = [ModelSpec("pinned", "/p"), *(ModelSpec(n, f"/{n}", preload=False) for n in ("x", "y", "z"))]
    registry = _registry(specs, sizes={"pinned": 1.0, "x": 1.0, "y": 1.0, "z": 1.0}, memory_budget=3.0, evict_idle=True)
    await _ready(registry, "pinned")
    await _ready(registry, "x")
    await _ready(registry, "y")
    registry.get("x").touch()  # x used more recently than y
    await _ready(registry, "z")  # no room for 4: y (least recently used) goes, never the preloaded one
    assert {n: e.state for n, e in registry.entries.items()} == {"pinned": "ready", "x": "ready", "y": "unloaded", "z": "ready"}
    assert "evicted to make room for z" in registry.get("y").detail
    # a busy model is not idle: with x and z both running requests, nothing can make room for y
    for name in ("x", "z"):
        admission = registry.get(name).admission
        assert admission is not None
        await admission.acquire(1)
    with pytest.raises(InsufficientMemory):
        await registry.resolve("y", None)


async def test_unload_waits_for_running_requests_and_refuses_new_ones() -> None:
    registry = _registry([ModelSpec("a", "/a")])
    await _ready(registry, "a")
    entry = registry.get("a")
    assert entry.admission is not None and entry.served is not None
    await entry.admission.acquire(1)  # a request is running
    registry.unload(entry, forget=True, why="test")
    with pytest.raises(ServiceUnavailable, match="being unloaded"):
        await registry.resolve("a", None)
    await asyncio.sleep(0.1)
    assert entry.state == "unloading" and not entry.served.engine.dead  # type: ignore[attr-defined]
    engine = entry.served.engine
    entry.admission.release(1)  # it finished
    await asyncio.wait_for(entry.task, 5)  # type: ignore[arg-type]
    assert engine.dead and "a" not in registry.entries  # type: ignore[attr-defined]
    with pytest.raises(APIError, match="does not exist"):
        await registry.resolve("a", None)


async def test_idle_lazy_models_are_unloaded_and_load_again() -> None:
    registry = _registry([ModelSpec("pinned", "/p"), ModelSpec("lazy", "/l", preload=False)])
    await _ready(registry, "pinned")
    await _ready(registry, "lazy")
    reaper = asyncio.create_task(registry.unload_idle(0.2))
    try:
        for _ in range(100):
            await asyncio.sleep(0.05)
            if registry.get("lazy").state == "unloaded":
                break
        assert registry.get("lazy").state == "unloaded" and registry.get("lazy").detail == "idle for 0.2 s"
        assert registry.get("pinned").state == "ready"  # preloaded models stay
        await _ready(registry, "lazy")  # its next request loads it again
        assert registry.get("lazy").requests == 0  # resolve does not count; admission does
    finally:
        reaper.cancel()


async def test_delete_during_a_load_removes_the_model_when_the_load_ends() -> None:
    gate = threading.Event()
    fast = _loader()

    def slow(settings: Settings, progress: Callable[[str], None]) -> Served:
        gate.wait(10)
        return fast(settings, progress)

    s = replace(UNIT, models=(ModelSpec("a", "/a"), ModelSpec("b", "/b")))
    registry = Registry(s, Metrics(), slow, lambda model, device, total: GiB // 10)
    a, b = registry.declare(s.models[0]), registry.declare(s.models[1])
    await registry.load(a)
    await registry.load(b)  # waits for a's load
    await asyncio.sleep(0.05)
    assert b.detail == "waiting for another model's load to finish"
    registry.refresh_gauges()  # a scrape: both have state gauges now
    assert 'llm_model_state{model="a",state="loading"} 1.0' in registry.metrics.render().decode()
    registry.unload(a, forget=True, why="test")  # while it loads
    registry.unload(b, forget=True, why="test")  # while it waits its turn
    assert (a.state, b.state) == ("unloading", "unloading")
    gate.set()
    await asyncio.wait_for(asyncio.gather(*(t for t in (a.task, b.task) if t is not None)), 10)
    for _ in range(100):  # a's engine started: it is shut down, then the model removed
        if not registry.entries:
            break
        await asyncio.sleep(0.02)
    assert registry.entries == {}
    registry.refresh_gauges()
    metrics = registry.metrics.render().decode()
    assert a.served is None and 'model="a"' not in metrics and 'model="b"' not in metrics  # no stale gauges


async def test_a_request_for_a_lazy_model_on_its_way_out_waits_and_loads_it_again() -> None:
    registry = _registry([ModelSpec("lazy", "/l", preload=False)])
    await _ready(registry, "lazy")
    entry = registry.get("lazy")
    assert entry.admission is not None and entry.served is not None
    first_engine = entry.served.engine
    await entry.admission.acquire(1)  # a request is still running
    registry.unload(entry, forget=False, why="idle for 1 s")
    waiting = asyncio.create_task(registry.resolve("lazy", None))
    await asyncio.sleep(0.05)
    assert not waiting.done() and entry.state == "unloading"
    entry.admission.release(1)
    again, _ = await asyncio.wait_for(waiting, 5)
    assert again is entry and entry.state == "ready" and entry.served.engine is not first_engine
    assert first_engine.dead  # type: ignore[attr-defined]


async def test_a_request_goes_only_to_a_model_of_its_kind() -> None:
    registry = _registry([ModelSpec("chat", "/c"), ModelSpec("vectors", "/v", kind="embed")],
                         (Alias("search", (("vectors", 1.0),)),))
    await _ready(registry, "chat")
    await registry.load(registry.get("vectors"))
    await registry.get("vectors").done.wait()
    with pytest.raises(APIError, match="is an embedding model: it serves /v1/embeddings only") as e:
        await registry.resolve("vectors", None)
    assert (e.value.status_code, e.value.param, e.value.code) == (400, "model", "wrong_model_kind")
    with pytest.raises(APIError, match="serves /v1/chat/completions, /v1/completions and /v1/responses only"):
        await registry.resolve("chat", None, kind="embed")
    assert (await registry.resolve("search", None, kind="embed"))[0].name == "vectors"  # through an alias
    assert (await registry.resolve("vectors", None, kind=None))[0].name == "vectors"  # /tokenize: any kind
    assert registry.kind_of("search") == "embed" and registry.kind_of("nope") is None


async def test_state_is_derived_and_a_dead_engine_fails_its_model() -> None:
    registry = _registry([ModelSpec("a", "/a")])
    entry = registry.get("a")
    assert (entry.state, entry.loaded) == ("unloaded", None)
    await _ready(registry, "a")
    assert entry.state == "ready" and entry.loaded is not None and entry.served is entry.loaded.served
    registry.metrics.running.labels("a").set(3)
    engine = entry.served.engine
    registry.engine_died(entry, "the inference engine died: boom")
    assert (entry.state, entry.detail, entry.served, entry.admission) == ("failed", "the inference engine died: boom",
                                                                          None, None)
    assert 'llm_requests_running{model="a"} 0.0' in registry.metrics.render().decode()
    assert entry.task is not None
    await entry.task
    assert engine.dead  # type: ignore[attr-defined]  # what was left of it is shut down
    with pytest.raises(ServiceUnavailable, match="boom"):
        await registry.resolve("a", None)
    registry.declare(ModelSpec("a", "/a"))  # a failed model's name may be declared again
    assert registry.get("a").state == "unloaded"


async def test_a_refused_declaration_is_withdrawn_with_its_gauges() -> None:
    registry = _registry([ModelSpec("a", "/a")], sizes={"a": 1.0, "big": 9.0}, memory_budget=2.0)
    await _ready(registry, "a")
    entry = registry.declare(ModelSpec("big", "/big"))
    registry.refresh_gauges()
    with pytest.raises(InsufficientMemory):
        await registry.load(entry)
    registry.withdraw(entry)
    assert "big" not in registry.entries and 'model="big"' not in registry.metrics.render().decode()


async def test_a_model_deleted_while_its_memory_is_estimated_is_never_loaded() -> None:
    gate, loads = threading.Event(), []

    def estimator(model: Settings, device: str, total: int) -> int:
        gate.wait(10)
        return GiB // 10

    def loader(settings: Settings, progress: Callable[[str], None]) -> Served:
        loads.append(settings.model_name)
        return _loader()(settings, progress)

    registry = Registry(replace(UNIT, models=(ModelSpec("a", "/a"),)), Metrics(), loader, estimator)
    entry = registry.declare(ModelSpec("a", "/a"))
    loading = asyncio.create_task(registry.load(entry))
    await asyncio.sleep(0.05)
    registry.unload(entry, forget=True, why="DELETE")  # while the estimate runs
    gate.set()
    await asyncio.wait_for(loading, 5)
    assert registry.entries == {} and entry.task is None and loads == [] and entry.state == "unloaded"


async def test_an_engine_that_cannot_be_attached_fails_its_model_and_is_shut_down() -> None:
    engines: list[FakeEngine] = []

    def loader(settings: Settings, progress: Callable[[str], None]) -> Served:
        served = _loader()(settings, progress)
        engine = cast(FakeEngine, served.engine)

        def attach() -> None:
            raise RuntimeError("no event loop for it")

        engine.attach_to_loop = attach  # type: ignore[method-assign]
        engines.append(engine)
        return served

    registry = Registry(replace(UNIT, models=(ModelSpec("a", "/a"),)), Metrics(), loader,
                        lambda model, device, total: GiB // 10)
    entry = registry.declare(ModelSpec("a", "/a"))
    await registry.load(entry)
    await asyncio.wait_for(entry.done.wait(), 5)
    assert entry.state == "failed" and "could not be attached" in entry.detail and "no event loop" in entry.detail
    assert entry.loaded is None and engines[0].dead
