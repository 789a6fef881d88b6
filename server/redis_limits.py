"""Per-key limits counted in Redis (`--redis-url`), so a key's requests per minute, tokens per
minute and concurrency hold across every replica that shares the Redis.

Each key has, under one hash tag (so a Redis Cluster keeps them on one shard):
- `req`: a sorted set of its requests in the window, scored by when they came (ms);
- `tok` + `tokn`: a sorted set of its token reservations by time, and their sizes in a hash
  (corrected to what the request really used when it ends);
- `conc`: a sorted set of its running requests, scored by when their lease expires. A replica
  renews the leases of its running requests every third of `--limits-lease`; a replica that dies
  stops renewing, and its slots are free again within one lease.

Every decision is one Lua script (expire, count, decide, record), so two replicas admitting at the
same moment cannot both take the last slot. Times come from Redis' own clock (`TIME`), not the
replicas'. The rules and the words of a 429 are `server.limits`'.

No request waits on Redis for more than `--redis-timeout` (50 ms). When Redis fails or is slow,
`--limits-on-redis-failure` decides: `open` (the default) serves the request without counting it,
`closed` answers 503. Each operation that could not use Redis is counted in
`llm_limits_store_failures_total{op}`, and after a failure Redis is left alone for a second (the
requests of that second are decided by the policy at once, without waiting), then tried again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from server.auth import Key
from server.errors import ServiceUnavailable
from server.limits import UNLIMITED, WINDOW, Snapshot, Ticket, headers, limited, refusal
from server.metrics import Metrics

log = logging.getLogger(__name__)

Policy = Literal["open", "closed"]
DOWN_SECONDS = 1.0  # after a failure, Redis is not asked again for this long

# `now` in ms: ARGV[1] when the caller gives its clock (tests), else Redis' own
_NOW = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# KEYS: req, tok, tokn, conc. ARGV: now_ms ('' = Redis' clock), id, tokens, rpm, tpm, conc (-1 = no
# limit), lease_ms, window_ms, mode (admit | charge | peek), room (admit: tpm - tokens).
# Returns {verdict, now, requests, tokens, concurrent, oldest_request, oldest_tokens, token_wait_at}:
# verdict 1 = recorded, 0 = refused (the caller words the 429 from the counts), 2 = peek; times in
# ms, -1 when there is none; token_wait_at: when the window's tokens drop to `room` (admit only).
_ADMIT = _NOW + """
local id, tokens = ARGV[2], tonumber(ARGV[3])
local rpm, tpm, conc = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local lease, window, mode, room = tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9], tonumber(ARGV[10])
local edge = now - window
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', edge)
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', edge)
for i = 1, #old, 500 do
  redis.call('HDEL', KEYS[3], unpack(old, i, math.min(i + 499, #old)))
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', edge)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local used = 0
for _, v in ipairs(redis.call('HVALS', KEYS[3])) do used = used + tonumber(v) end
local nreq, nconc = redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[4])
local function oldest(k)
  local o = redis.call('ZRANGE', k, 0, 0, 'WITHSCORES')
  if #o == 0 then return -1 end
  return tonumber(o[2])
end
local verdict, wait_at = 2, -1
if mode == 'admit' then
  verdict = 1
  if (rpm >= 0 and nreq >= rpm) or (conc >= 0 and nconc >= conc) or (tpm >= 0 and used + tokens > tpm) then
    verdict = 0
  end
  if tpm >= 0 and tokens <= tpm and used + tokens > tpm then
    local total = used
    local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
    for i = 1, #entries, 2 do
      total = total - tonumber(redis.call('HGET', KEYS[3], entries[i]) or '0')
      if total <= room then wait_at = tonumber(entries[i + 1]) break end
    end
  end
end
if verdict == 1 or mode == 'charge' then
  redis.call('ZADD', KEYS[1], now, id)
  redis.call('ZADD', KEYS[2], now, id)
  redis.call('HSET', KEYS[3], id, tokens)
  nreq, used = nreq + 1, used + tokens
  if mode == 'admit' and conc >= 0 then
    redis.call('ZADD', KEYS[4], now + lease, id)
    nconc = nconc + 1
  end
  for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], window + lease) end
end
return {verdict, now, nreq, used, nconc, oldest(KEYS[1]), oldest(KEYS[2]), wait_at}
"""

# KEYS: tokn, conc. ARGV: id, used tokens ('' = keep the reservation). The request has ended.
_RELEASE = """
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[2] ~= '' and redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
return 0
"""

# KEYS: conc. ARGV: now_ms ('' = Redis' clock), lease_ms, ids... Leases of requests still running.
_RENEW = _NOW + """
for i = 3, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + 60000)
return 0
"""


class StoreDown(Exception):
    """Redis could not answer in time (or is known to be down for a moment)."""


def _keys(name: str) -> list[str]:
    tag = f"llm-service:limits:{{{name}}}"
    return [f"{tag}:req", f"{tag}:tok", f"{tag}:tokn", f"{tag}:conc"]


@dataclass
class RedisTicket:
    limits: RedisKeyLimits
    key: Key
    id: str
    leased: bool  # holds a concurrency lease
    closed: bool = False

    def close(self, used_tokens: int | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self.limits.release(self, used_tokens)


@dataclass
class RedisKeyLimits:
    """Per-key counts in Redis, shared by every replica that points at it."""

    url: str
    metrics: Metrics
    policy: Policy = "open"
    lease: float = 30.0  # seconds a running request's concurrency slot outlives its replica
    timeout: float = 0.05  # seconds any request may wait on Redis
    clock: Callable[[], float] | None = None  # seconds; None: Redis' own clock (tests pass one)
    client: Any = field(init=False)
    running: dict[str, RedisTicket] = field(default_factory=dict, init=False)  # by id: leases to renew
    pending: set[asyncio.Task[None]] = field(default_factory=set, init=False)  # releases in flight
    down_until: float = field(default=0.0, init=False)
    renewer: asyncio.Task[None] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        # no retries of its own; requests are bounded by `_call`'s wait_for (a cancelled command
        # drops its connection), work off their path (freeing a lease) may wait longer
        self.client = aioredis.Redis.from_url(
            self.url, socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0), decode_responses=True)
        self.admit_script = self.client.register_script(_ADMIT)
        self.release_script = self.client.register_script(_RELEASE)
        self.renew_script = self.client.register_script(_RENEW)
        self.metrics.limits_store_up.set(1)

    @property
    def where(self) -> str:
        """The URL without its password, for logs."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()

    def start(self) -> None:
        """Renew the leases of this replica's running requests (on the serving loop)."""
        self.renewer = asyncio.create_task(self._renew_forever())

    def _now_ms(self) -> str:
        return "" if self.clock is None else str(int(self.clock() * 1000))

    async def _call(self, op: str, work: Callable[[], Awaitable[Any]]) -> Any:
        """`work` against Redis within the bound; StoreDown when it fails, is slow, or failed a
        moment ago."""
        if time.monotonic() < self.down_until:
            self.metrics.limits_store_failures.labels(op).inc()
            raise StoreDown("Redis failed less than a second ago")
        try:
            result = await asyncio.wait_for(work(), self.timeout)
        except (RedisError, OSError, TimeoutError) as e:
            self.metrics.limits_store_failures.labels(op).inc()
            if self.down_until == 0.0:  # say it once per outage, not once per request
                log.warning("Redis at %s failed (%s: %s); per-key limits are %s until it answers",
                            self.where, type(e).__name__, e,
                            "not enforced" if self.policy == "open" else "refusing limited keys (503)")
            self.metrics.limits_store_up.set(0)
            self.down_until = time.monotonic() + DOWN_SECONDS
            raise StoreDown(str(e) or type(e).__name__) from e
        if self.down_until:
            log.warning("Redis at %s answers again; per-key limits are shared again", self.where)
            self.down_until = 0.0
            self.metrics.limits_store_up.set(1)
        return result

    def _unavailable(self) -> ServiceUnavailable:
        return ServiceUnavailable(
            "This key's rate limits are kept in Redis, which this server cannot reach right now; requests "
            "of keys with limits are refused until it answers again (--limits-on-redis-failure closed). "
            "Please retry shortly.", headers={"retry-after": "1"})

    async def _run(self, key: Key, mode: str, tokens: int, id: str = "") -> tuple[int, Snapshot, float | None]:
        rpm, tpm, conc = key.requests_per_minute, key.tokens_per_minute, key.max_concurrent
        args = [self._now_ms(), id, tokens, -1 if rpm is None else rpm, -1 if tpm is None else tpm,
                -1 if conc is None else conc, int(self.lease * 1000), int(WINDOW * 1000), mode,
                (tpm or 0) - tokens]
        out = await self._call(mode, lambda: self.admit_script(keys=_keys(key.name), args=args))
        verdict, now, nreq, used, nconc, old_req, old_tok, wait_at = (int(v) for v in out)
        snap = Snapshot(now / 1000, nreq, used, nconc, old_req / 1000 if old_req >= 0 else None,
                        old_tok / 1000 if old_tok >= 0 else None)
        return verdict, snap, (wait_at / 1000 if wait_at >= 0 else None)

    async def admit(self, key: Key | None, tokens: int) -> Ticket:
        if key is None or not limited(key):
            return UNLIMITED
        id = uuid.uuid4().hex
        try:
            verdict, snap, wait_at = await self._run(key, "admit", tokens, id)
        except StoreDown:
            # a script that timed out may still run when Redis catches up: its request then counts
            # (conservative), but its lease must not hold a slot nobody renews or frees
            if key.max_concurrent is not None:
                self._background(self._forget(key, id))
            if self.policy == "closed":
                raise self._unavailable() from None
            return UNLIMITED  # open: served without waiting for the count
        if verdict == 0:
            err = refusal(key, tokens, snap,
                          lambda room: max(wait_at + WINDOW - snap.now, 0.001) if wait_at is not None else WINDOW)
            if err is not None:
                raise err
            raise RuntimeError(f"Redis refused a request the limits' rules admit: {snap}")
        ticket = RedisTicket(self, key, id, leased=key.max_concurrent is not None)
        if ticket.leased:
            self.running[id] = ticket
        return ticket

    async def charge(self, key: Key | None, tokens: int) -> None:
        if key is None or not limited(key):
            return
        try:
            await self._run(key, "charge", tokens, uuid.uuid4().hex)
        except StoreDown:
            pass  # counted in the failures metric; a refused request is not worth a 503

    async def headers(self, key: Key | None) -> dict[str, str]:
        if key is None or not limited(key):
            return {}
        try:
            _, snap, _ = await self._run(key, "peek", 0)
        except StoreDown:
            return {}  # no counts to show: the headers are left out rather than guessed
        return headers(key, snap)

    def release(self, ticket: RedisTicket, used_tokens: int | None) -> None:
        """A request ended: free its slot and correct its reservation, off the request's path."""
        self.running.pop(ticket.id, None)
        keys = _keys(ticket.key.name)
        args = [ticket.id, "" if used_tokens is None else used_tokens]

        async def work() -> None:
            try:
                await self._call("release", lambda: self.release_script(keys=[keys[2], keys[3]], args=args))
            except StoreDown:
                pass  # the lease ends it: the slot is free again within --limits-lease

        self._background(work())

    async def _forget(self, key: Key, id: str) -> None:
        """Free the lease of an admission that timed out, if its script ran after all: off every
        request's path, so it may wait for Redis up to a lease."""
        keys = _keys(key.name)
        try:
            await asyncio.wait_for(self.release_script(keys=[keys[2], keys[3]], args=[id, ""]), self.lease)
        except (RedisError, OSError, TimeoutError) as e:
            log.debug("could not free the lease of a timed-out admission (it expires by itself): %s", e)

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            by_key: dict[str, list[str]] = {}
            for ticket in list(self.running.values()):
                by_key.setdefault(ticket.key.name, []).append(ticket.id)
            for name, ids in by_key.items():
                work = functools.partial(self.renew_script, keys=[_keys(name)[3]],
                                         args=[self._now_ms(), int(self.lease * 1000), *ids])
                try:
                    await self._call("renew", work)
                except StoreDown:
                    pass  # tried again in a third of a lease; a lease lasts three of them

    async def close(self) -> None:
        if self.renewer is not None:
            self.renewer.cancel()
        if self.pending:
            await asyncio.wait(self.pending, timeout=1.0)
            for task in self.pending:
                task.cancel()
        await self.client.aclose()
