"""Where models fit in memory: the device's budget, a model's estimated footprint, and which
idle models a load would evict. Decisions are pure functions over numbers; only `estimate` and
`Memory.measure` look at the machine (file sizes, the device's total).

Before a load, the model's footprint is estimated from its files and engine settings (weights +
KV cache or batch activations + the engine's overhead) and checked against --memory-budget beside
the footprints of the models already there (each the larger of its estimate and what its load
measured). A model that does not fit is refused with 507 before anything is allocated, or, with
--evict-idle, the least recently used idle lazy models are unloaded first to make room.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from server import system
from server.config import Settings
from server.errors import InsufficientMemory

GiB = 1 << 30
# without --memory-budget the models may take this share of the device's memory
DEFAULT_BUDGET_SHARE = 0.9


def estimate(settings: Settings, device: str, total: int) -> int | None:
    """Weights from the model's files, the rest from its engine's rules (blocking: reads file
    sizes). None when it cannot be known before the load (a hub model not yet downloaded)."""
    from server import engines, models

    weights = models.weights_bytes(settings)
    if weights is None:
        return None
    if settings.model_kind == "embed":
        embedder, _ = engines.embedder_class(settings.engine)
        return embedder.footprint(weights, settings, device, total)
    engine, _ = engines.engine_class(settings.engine)
    return engine.footprint(weights, settings, device, total)


@dataclass(frozen=True)
class Memory:
    """The device models go to ("cuda" or "cpu"), its size, and the share they may take."""

    device: str
    total: int
    budget: int

    @classmethod
    def measure(cls, settings: Settings) -> Memory:
        """Blocking (finds the device)."""
        device = system.device()
        total = system.device_total_bytes(device)
        budget = settings.memory_budget
        return cls(device, total, int(budget * GiB) if budget is not None else int(total * DEFAULT_BUDGET_SHARE))


@dataclass(frozen=True)
class Holding:
    """A model holding memory, as placement sees it."""

    name: str
    footprint: int
    evictable: bool  # an idle lazy model: what --evict-idle may unload
    last_used: float  # monotonic seconds: the least recently used go first


def fit(name: str, need: int | None, holdings: Sequence[Holding], memory: Memory, evict_idle: bool) -> list[str]:
    """The models to evict so `name` (needing `need` bytes) fits beside `holdings` (usually none);
    InsufficientMemory (507) when it cannot fit. An unknown need is let through: its load
    measures it."""
    if need is None:
        return []
    used = sum(h.footprint for h in holdings)
    if used + need <= memory.budget:
        return []
    idle = sorted((h for h in holdings if h.evictable), key=lambda h: h.last_used)
    victims: list[str] = []
    if evict_idle:
        for victim in idle:
            victims.append(victim.name)
            used -= victim.footprint
            if used + need <= memory.budget:
                return victims
    total_used = sum(h.footprint for h in holdings)
    loaded = ", ".join(f"{h.name} {h.footprint / GiB:.2f}" for h in holdings) or "none"
    raise InsufficientMemory(
        f"The model {name} does not fit: it needs about {need / GiB:.2f} GiB and "
        f"{(memory.budget - total_used) / GiB:.2f} GiB of the {memory.budget / GiB:.2f} GiB "
        f"memory budget ({memory.device}) are free (loaded, GiB: {loaded}). Unload a model, give this "
        "one a smaller KV cache (settings: kv_cache_space) or raise --memory-budget"
        + ("; --evict-idle would unload idle lazy models to make room." if idle and not evict_idle else "."),
    )
