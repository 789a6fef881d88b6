"""Past one machine: 3 replicas (Transformers engine) sharing one Redis, behind Debian's nginx
running our deploy/nginx.conf. Per-key limits hold for the key across the replicas, a dead
replica's slots come back within its lease, a Redis outage is met by each replica's policy, and a
conversation's turns stay on the replica that holds its prefix in cache."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
import yaml

from benchmarks import affinity
from benchmarks.servers import Gateway
from tests.conftest import MODEL, RedisProcess
from tests.server_process import ServerProcess
from tests.test_deploy import tool

RPM, CONC, LEASE, FREE = "sk-rpm-00000001", "sk-conc-0000002", "sk-lease-000003", "sk-free-0000004"
LEASE_SECONDS = 3.0
HI = [{"role": "user", "content": "Say hi."}]


@dataclass
class Cluster:
    redis: RedisProcess
    replicas: list[ServerProcess]  # replica 2 refuses limited keys when Redis is down
    gateway: Gateway


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("replicas")
    keys = folder / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [
        {"name": "rpm", "key": RPM, "requests_per_minute": 30},
        {"name": "conc", "key": CONC, "max_concurrent": 2},
        {"name": "lease", "key": LEASE, "max_concurrent": 1},
        {"name": "free", "key": FREE},
    ]}))
    redis = RedisProcess("redis-replicas").start()
    # a generous --redis-timeout: three replicas on two busy cores must not fail open by accident
    # here (the 50 ms bound is tested in test_limits.py)
    common = ("--engine", "transformers", "--api-keys-file", str(keys), "--redis-url", redis.url,
              "--redis-timeout", "2", "--limits-lease", str(LEASE_SECONDS), "--max-num-seqs", "4", "--kv-cache-space", "0.5")
    # one torch thread each: three replicas' OpenMP threads spinning on two cores slow decoding
    # down ~10x (as three processes on a 2-core box would in production: size threads per replica)
    replicas = [ServerProcess(*common, *(("--limits-on-redis-failure", "closed") if i == 2 else ()), name=f"replica-{i}",
                              env={"OMP_NUM_THREADS": "1"})
                for i in range(3)]
    gateway = None
    try:
        for replica in replicas:
            replica.wait_ready()
        gateway = Gateway(tool("nginx"), [r.port for r in replicas], folder / "nginx")
        yield Cluster(redis, replicas, gateway)
    finally:
        if gateway is not None:
            gateway.stop()
        for replica in replicas:
            replica.stop()
        redis.stop()


def _chat(base: str, key: str, *, max_tokens: int = 1, request_id: str | None = None, **extra: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if request_id:
        headers["X-Request-Id"] = request_id
    return httpx.post(f"{base}/v1/chat/completions", headers=headers, timeout=120,
                      json={"model": MODEL, "messages": HI, "max_tokens": max_tokens, **extra})


def _served(replica: ServerProcess) -> int:
    text = httpx.get(f"{replica.url}/metrics").text
    return int(sum(float(v) for v in re.findall(
        r'^llm_requests_total\{[^}]*route="/v1/chat/completions"[^}]*status="200"[^}]*\} (\S+)', text, re.M)))


def test_a_keys_requests_per_minute_hold_across_replicas(cluster: Cluster) -> None:
    """90 requests in ~6 s through nginx to a 30-rpm key: 30 answered, not 30 per replica."""
    before = [_served(r) for r in cluster.replicas]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=cluster.gateway.url, timeout=120) as client:
            async def one(i: int) -> httpx.Response:
                await asyncio.sleep(i / 15)  # 15 a second: inside nginx's own per-address limit
                return await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {RPM}"},
                                         json={"model": MODEL, "messages": HI, "max_tokens": 1})
            return await asyncio.gather(*(one(i) for i in range(90)))

    responses = asyncio.run(run())
    statuses = [r.status_code for r in responses]
    outcomes = Counter((r.status_code, r.json().get("error", {}).get("type")) for r in responses)
    assert statuses.count(200) == 30 and statuses.count(429) == 60, outcomes
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["type"] == "requests" and "limit 30 per minute" in refused.json()["error"]["message"]
    assert refused.headers["x-ratelimit-remaining-requests"] == "0" and int(refused.headers["retry-after"]) >= 1
    served = [_served(r) - b for r, b in zip(cluster.replicas, before, strict=True)]
    assert sum(served) == 30 and sum(1 for n in served if n) >= 2, served  # spread over replicas, counted once


def test_a_keys_concurrency_holds_across_replicas(cluster: Cluster) -> None:
    """6 streams at once for a key allowed 2: nginx spreads them over 3 replicas, 2 run."""
    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=cluster.gateway.url, timeout=120) as client:
            async def one() -> int:
                r = await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {CONC}"},
                                      json={"model": MODEL, "messages": HI, "max_tokens": 48, "ignore_eos": True})
                if r.status_code == 429:
                    assert "concurrent requests" in r.json()["error"]["message"]
                return r.status_code
            return await asyncio.gather(*(one() for _ in range(6)))

    statuses = asyncio.run(run())
    assert sorted(statuses) == [200, 200, 429, 429, 429, 429], statuses


def test_a_killed_replicas_slot_comes_back_within_its_lease(cluster: Cluster) -> None:
    doomed, other = cluster.replicas[0], cluster.replicas[1]
    client = openai.OpenAI(base_url=doomed.base_url, api_key=LEASE, max_retries=0)
    stream = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4000, stream=True,  # type: ignore[arg-type]
                                            extra_body={"ignore_eos": True})
    next(iter(stream))  # it runs, holding the key's one slot
    time.sleep(LEASE_SECONDS / 3 + 0.5)  # past a renewal: the slot is held by renewing, not by luck
    refused = _chat(other.url, LEASE)
    assert refused.status_code == 429 and "concurrent" in refused.json()["error"]["message"]
    doomed.proc.send_signal(signal.SIGKILL)  # no shutdown: nothing frees the slot but its lease
    killed = time.monotonic()
    while (r := _chat(other.url, LEASE)).status_code == 429:
        assert time.monotonic() - killed < LEASE_SECONDS + 1.5, "the dead replica's slot outlived its lease"
        time.sleep(0.2)
    assert r.status_code == 200
    stream.close()


def test_a_redis_outage_is_met_by_each_replicas_policy(cluster: Cluster) -> None:
    open_replica, closed_replica = cluster.replicas[1], cluster.replicas[2]
    cluster.redis.stop()
    try:
        for _ in range(3):  # open: served (uncounted), again and again
            assert _chat(open_replica.url, LEASE).status_code == 200
        refused = _chat(closed_replica.url, LEASE)
        assert refused.status_code == 503
        assert "Redis" in refused.json()["error"]["message"] and refused.headers["retry-after"] == "1"
        assert _chat(closed_replica.url, FREE).status_code == 200  # a key without limits never needs Redis
        metrics = httpx.get(f"{open_replica.url}/metrics").text
        assert re.search(r'^llm_limits_store_failures_total\{op="admit"\} [1-9]', metrics, re.M)
        assert re.search(r"^llm_limits_store_up 0", metrics, re.M)
    finally:
        cluster.redis.start()
    time.sleep(1.2)  # a replica leaves Redis alone for a second after a failure
    assert _chat(closed_replica.url, LEASE).status_code == 200
    assert re.search(r"^llm_limits_store_up 1", httpx.get(f"{closed_replica.url}/metrics").text, re.M)


def test_a_conversations_turns_stay_where_its_prefix_is_cached(cluster: Cluster) -> None:
    """benchmarks/affinity.py's chats, shortened: with X-Session-Id a chat's turns stay on one replica
    and find their history in its cache; without, they move between replicas."""
    assert sum(r.proc.poll() is None for r in cluster.replicas) >= 2
    key = {"Authorization": f"Bearer {FREE}"}
    with httpx.Client(timeout=120) as client:
        (kept,) = affinity.run_mode(client, cluster.gateway, "affinity", 1, 5, 16, key, together=False)
        # one request at a time: nginx's least-connections choice is then round robin, and 3 chats
        # over 2 or 3 replicas must move
        moved = affinity.run_mode(client, cluster.gateway, "none", 3, 2, 16, key, together=False)
    assert len({t.replica for t in kept.turns}) == 1, kept.turns
    cached = [t.cached_tokens for t in kept.turns]
    assert cached[1] > 0 and all(b > a for a, b in zip(cached[1:], cached[2:], strict=False)), cached
    assert any(len({t.replica for t in chat.turns}) > 1 for chat in moved), [c.turns for c in moved]
