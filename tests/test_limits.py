"""Per-key limits, counted in this process (`KeyLimits`) and in Redis (`RedisKeyLimits`, a real
redis-server): the same rules, the same words, on a clock the test turns. Then what only Redis
does: replicas sharing counts, leases that free a dead replica's slots, and a Redis that is down
or slow (bounded waits, the failure policy, the metric)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from server.auth import Key, digest
from server.errors import RateLimited, ServiceUnavailable
from server.limits import KeyLimits, Limits
from server.metrics import Metrics
from server.redis_limits import RedisKeyLimits
from tests.conftest import RedisProcess
from tests.server_process import free_port

Factory = Callable[[], Limits]


def _key(**limits: int) -> Key:
    return Key(name=f"k-{uuid.uuid4().hex[:8]}", digest=digest("sk-12345678"), **limits)  # type: ignore[arg-type]


@pytest.fixture(params=["local", "redis"])
async def counters(request: pytest.FixtureRequest, redis_server: RedisProcess) -> AsyncIterator[tuple[Factory, list[float]]]:
    """A factory of limits on one shared count (Redis: each call is another replica), and the clock."""
    now = [1000.0]
    made: list[Limits] = []
    local = KeyLimits(clock=lambda: now[0])

    def make() -> Limits:
        if request.param == "local":
            return local
        limits = RedisKeyLimits(redis_server.url, Metrics(), clock=lambda: now[0], timeout=1.0)
        made.append(limits)
        return limits

    yield make, now
    for limits in made:
        await limits.close()


async def test_limits_recover_after_the_window(counters: tuple[Factory, list[float]]) -> None:
    make, now = counters
    limits = make()
    key = _key(requests_per_minute=2, tokens_per_minute=100)
    (await limits.admit(key, 10)).close(5)
    now[0] += 30
    (await limits.admit(key, 10)).close(10)
    await asyncio.sleep(0.05)  # Redis: the corrections are written off the request's path
    with pytest.raises(RateLimited) as e:
        await limits.admit(key, 10)
    assert e.value.reason == "requests" and e.value.headers["retry-after"] == "30"
    assert e.value.message == "Rate limit reached for requests: limit 2 per minute, used 2. Please try again in 30s."
    now[0] += 30.5  # the first request left the window
    assert (await limits.headers(key))["x-ratelimit-remaining-requests"] == "1"
    assert (await limits.headers(key))["x-ratelimit-remaining-tokens"] == "90"
    await limits.admit(key, 80)
    with pytest.raises(RateLimited) as e:
        await limits.admit(key, 1)  # 10 + 80 + 1 > 100 ... and the request limit is reached too
    now[0] += 60
    assert (await limits.headers(key))["x-ratelimit-remaining-tokens"] == "100"


async def test_tokens_wait_for_the_oldest_reservations_to_leave(counters: tuple[Factory, list[float]]) -> None:
    make, now = counters
    limits = make()
    key = _key(tokens_per_minute=100)
    await limits.admit(key, 40)
    now[0] += 10
    await limits.admit(key, 40)
    now[0] += 10
    with pytest.raises(RateLimited) as e:
        await limits.admit(key, 50)  # room for 50 once the first 40 have left: at +60 from the first
    assert e.value.reason == "tokens" and e.value.headers["retry-after"] == "40"
    assert e.value.headers["x-ratelimit-remaining-tokens"] == "20"
    with pytest.raises(RateLimited) as e:
        await limits.admit(key, 101)
    assert "more than this key's limit of 100" in e.value.message and "retry-after" not in e.value.headers


async def test_a_refused_oversized_request_still_costs_its_key(counters: tuple[Factory, list[float]]) -> None:
    make, _ = counters
    limits = make()
    key = _key(requests_per_minute=2, tokens_per_minute=10_000)
    await limits.charge(key, 9_000)
    assert (await limits.headers(key))["x-ratelimit-remaining-requests"] == "1"
    assert (await limits.headers(key))["x-ratelimit-remaining-tokens"] == "1000"
    with pytest.raises(RateLimited):
        await limits.admit(key, 2_000)


async def test_concurrency_is_held_until_close_and_counted_across_replicas(
        counters: tuple[Factory, list[float]]) -> None:
    make, _ = counters
    a, b = make(), make()  # two replicas (in-process: the same one)
    key = _key(max_concurrent=2)
    first, _second = await a.admit(key, 1), await b.admit(key, 1)
    for limits in (a, b):
        with pytest.raises(RateLimited) as e:
            await limits.admit(key, 1)
        assert e.value.reason == "concurrency"
    first.close()
    first.close()  # a second close frees nothing more
    await asyncio.sleep(0.05)
    await b.admit(key, 1)
    with pytest.raises(RateLimited):
        await a.admit(key, 1)


async def test_two_replicas_share_one_count(redis_server: RedisProcess) -> None:
    """Real time and Redis' clock: 3 replicas admitting a 10-rpm key at once admit exactly 10."""
    replicas = [RedisKeyLimits(redis_server.url, Metrics(), timeout=1.0) for _ in range(3)]
    key = _key(requests_per_minute=10)

    async def one(limits: RedisKeyLimits) -> bool:
        try:
            (await limits.admit(key, 1)).close(1)
            return True
        except RateLimited:
            return False

    results = await asyncio.gather(*(one(replicas[i % 3]) for i in range(30)))
    assert sum(results) == 10
    assert (await replicas[2].headers(key))["x-ratelimit-remaining-requests"] == "0"
    for limits in replicas:
        await limits.close()


async def test_a_dead_replicas_slot_is_freed_by_its_lease_and_a_live_one_is_renewed(redis_server: RedisProcess) -> None:
    key = _key(max_concurrent=1)
    live = RedisKeyLimits(redis_server.url, Metrics(), lease=0.6, timeout=1.0)
    live.start()  # renews every 0.2 s
    ticket = await live.admit(key, 1)
    dead = RedisKeyLimits(redis_server.url, Metrics(), lease=0.6, timeout=1.0)  # never renews: as if killed
    await asyncio.sleep(1.5)  # well past one lease: the renewals kept it
    with pytest.raises(RateLimited):
        await dead.admit(key, 1)
    ticket.close()
    await asyncio.sleep(0.05)
    await dead.admit(key, 1)  # dead's own slot now, and dead never renews it
    started = time.monotonic()
    while True:
        try:
            await live.admit(key, 1)
            break
        except RateLimited:
            assert time.monotonic() - started < 2, "the dead replica's slot outlived its lease"
            await asyncio.sleep(0.05)
    assert time.monotonic() - started >= 0.4
    for limits in (live, dead):
        await limits.close()


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_redis_down_is_decided_by_the_policy_at_once(policy: str) -> None:
    metrics = Metrics()
    limits = RedisKeyLimits(f"redis://127.0.0.1:{free_port()}/0", metrics, policy=policy)  # type: ignore[arg-type]
    key = _key(requests_per_minute=1)
    for _ in range(3):  # the first fails within the bound, the next ones at once (Redis is known down)
        started = time.monotonic()
        if policy == "open":
            (await limits.admit(key, 1)).close(1)  # served, and not counted: 3 pass a 1-rpm key
        else:
            with pytest.raises(ServiceUnavailable) as e:
                await limits.admit(key, 1)
            assert "Redis" in e.value.message and e.value.headers["retry-after"] == "1"
        assert time.monotonic() - started < 0.2
    assert await limits.headers(key) == {}  # no counts: no headers rather than wrong ones
    assert await limits.admit(None, 1) is not None  # a key without limits never asks Redis
    assert metrics.limits_store_failures.labels("admit")._value.get() == 3
    assert metrics.limits_store_up._value.get() == 0
    await limits.close()


async def test_a_slow_redis_costs_a_request_at_most_the_bound() -> None:
    redis = RedisProcess("redis-slow").start()
    try:
        metrics = Metrics()
        limits = RedisKeyLimits(redis.url, metrics, timeout=0.05)
        key, one = _key(requests_per_minute=100), _key(max_concurrent=1)
        (await limits.admit(key, 1)).close(1)
        assert metrics.limits_store_up._value.get() == 1
        import redis.asyncio as aioredis
        blocker = aioredis.Redis.from_url(redis.url)
        busy = asyncio.create_task(blocker.execute_command("DEBUG", "SLEEP", "0.5"))  # Redis stalls
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await limits.admit(one, 1)  # open: served without waiting for the count
        assert time.monotonic() - started < 0.15
        await limits.admit(key, 1)  # at once: Redis is known to be down for a second
        assert time.monotonic() - started < 0.2
        assert metrics.limits_store_failures.labels("admit")._value.get() == 2
        await busy
        await blocker.aclose()
        await asyncio.sleep(1.0)  # past the second it is left alone: asked again, and it answers
        # the stalled admission ran when Redis woke, but its lease was freed: `one` has its slot
        (await limits.admit(one, 1)).close()
        (await limits.admit(key, 1)).close(1)
        assert metrics.limits_store_up._value.get() == 1
        assert (await limits.headers(key))["x-ratelimit-remaining-requests"] == "98"
        await limits.close()
    finally:
        redis.stop()
