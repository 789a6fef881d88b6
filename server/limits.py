"""Limits: per-key requests, tokens and concurrency, and the server's bounded queue.

Per key (from the keys file): requests per minute and tokens per minute over a rolling 60-second
window, and concurrent requests. Tokens are reserved at admission as prompt + max_tokens (the most
a request can use) and corrected to what it really used when it ends. Over a limit: 429 with
`Retry-After`. Every response to a key with limits carries OpenAI's headers
`x-ratelimit-{limit,remaining,reset}-{requests,tokens}`.

Where the counts live is the one seam with two implementations: `KeyLimits` here counts in this
process (each replica its own), `server.redis_limits.RedisKeyLimits` counts in Redis, shared by
every replica (`--redis-url`). Both decide with the same rules and say the same words.

Server-wide: at most `running` sequences are handed to the engine at once (its batch size); up to
`--max-queued-requests` more requests wait for a slot, in order of `priority` (lower first), then
of arrival; beyond that a request gets
429 `server_overloaded` at once instead of an unbounded wait.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from server.auth import Key
from server.errors import Overloaded, RateLimited

WINDOW = 60.0


def _duration(seconds: float) -> str:
    """OpenAI's reset format: `1s`, `6m0s`, `250ms`."""
    if seconds < 1:
        return f"{max(int(seconds * 1000), 1)}ms"
    s = math.ceil(seconds)
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"


def limited(key: Key | None) -> bool:
    return key is not None and any(
        v is not None for v in (key.requests_per_minute, key.tokens_per_minute, key.max_concurrent)
    )


@dataclass(frozen=True)
class Snapshot:
    """A key's counts in the window as of `now` (seconds, on the counter's own clock)."""

    now: float
    requests: int
    tokens: int
    concurrent: int
    oldest_request: float | None  # when the oldest request in the window came
    oldest_tokens: float | None  # when the oldest token reservation in the window was made


def headers(key: Key, snap: Snapshot) -> dict[str, str]:
    """OpenAI's rate-limit headers for `key` as `snap` counts it."""
    out: dict[str, str] = {}
    if key.requests_per_minute is not None:
        out["x-ratelimit-limit-requests"] = str(key.requests_per_minute)
        out["x-ratelimit-remaining-requests"] = str(max(key.requests_per_minute - snap.requests, 0))
        reset = snap.oldest_request + WINDOW - snap.now if snap.oldest_request is not None else 0.0
        out["x-ratelimit-reset-requests"] = _duration(reset) if reset > 0 else "0s"
    if key.tokens_per_minute is not None:
        out["x-ratelimit-limit-tokens"] = str(key.tokens_per_minute)
        out["x-ratelimit-remaining-tokens"] = str(max(key.tokens_per_minute - snap.tokens, 0))
        reset = snap.oldest_tokens + WINDOW - snap.now if snap.oldest_tokens is not None else 0.0
        out["x-ratelimit-reset-tokens"] = _duration(reset) if reset > 0 else "0s"
    return out


def refusal(key: Key, tokens: int, snap: Snapshot, token_wait: Callable[[int], float]) -> RateLimited | None:
    """Why `key` may not start a request of `tokens` now (a 429 to raise), or None when it may.
    `token_wait(room)`: seconds until the window's tokens drop to `room` or less."""
    rpm, tpm, conc = key.requests_per_minute, key.tokens_per_minute, key.max_concurrent
    if rpm is not None and snap.requests >= rpm:
        wait = (snap.oldest_request or snap.now) + WINDOW - snap.now
        return _reject(key, snap, "requests", wait, f"Rate limit reached for requests: limit {rpm} per minute, "
                       f"used {snap.requests}. Please try again in {_duration(wait)}.")
    if tpm is not None:
        if tokens > tpm:
            return _reject(key, snap, "tokens", WINDOW, f"This request may use {tokens} tokens (prompt + "
                           f"max_tokens), more than this key's limit of {tpm} per minute. Lower max_tokens.",
                           retry=False)
        if snap.tokens + tokens > tpm:
            wait = token_wait(tpm - tokens)
            return _reject(key, snap, "tokens", wait, f"Rate limit reached for tokens: limit {tpm} per minute, "
                           f"used {snap.tokens}, requested {tokens}. Please try again in {_duration(wait)}.")
    if conc is not None and snap.concurrent >= conc:
        return _reject(key, snap, "concurrency", 1.0, f"Too many concurrent requests for this key: limit {conc}. "
                       "Retry when one of them has finished.")
    return None


def _reject(key: Key, snap: Snapshot, reason: str, wait: float, message: str, retry: bool = True) -> RateLimited:
    out = headers(key, snap)
    if retry:
        out["retry-after"] = str(max(math.ceil(wait), 1))
    err = RateLimited(message, headers=out, reason=reason)
    err.type = "tokens" if reason == "tokens" else "requests"  # OpenAI's 429 types
    return err


class Ticket(Protocol):
    """One admitted request's hold on its key's limits; `close` exactly once (more is a no-op),
    with the tokens it really used when known."""

    def close(self, used_tokens: int | None = None) -> None: ...


class Limits(Protocol):
    """Where per-key counts live: this process (`KeyLimits`) or Redis (`RedisKeyLimits`)."""

    async def admit(self, key: Key | None, tokens: int) -> Ticket:
        """Count a request against its key's limits, or raise 429 saying which and when to retry."""
        ...

    async def charge(self, key: Key | None, tokens: int) -> None:
        """Count a request that was refused for its size (a prompt too long for the context)
        against its key's requests and tokens, without admitting it: sending huge prompts is not
        free. Never raises; the next request sees the cost."""
        ...

    async def headers(self, key: Key | None) -> dict[str, str]:
        """OpenAI's rate-limit headers for `key` as of now (empty for keys without limits)."""
        ...

    async def close(self) -> None:
        """Finish what is pending (shutdown)."""
        ...


@dataclass
class _Usage:
    requests: deque[float] = field(default_factory=deque)  # admission times
    tokens: deque[list[float]] = field(default_factory=deque)  # [time, tokens] per request
    concurrent: int = 0

    def expire(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW:
            self.tokens.popleft()

    def snapshot(self, now: float) -> Snapshot:
        return Snapshot(now, len(self.requests), int(sum(n for _, n in self.tokens)), self.concurrent,
                        self.requests[0] if self.requests else None, self.tokens[0][0] if self.tokens else None)

    def token_wait(self, room: int, now: float) -> float:
        """Seconds until the window's token sum drops to `room` or less."""
        total = int(sum(n for _, n in self.tokens))
        for t, n in self.tokens:
            total -= int(n)
            if total <= room:
                return max(t + WINDOW - now, 0.001)
        return WINDOW


@dataclass
class LocalTicket:
    usage: _Usage | None
    entry: list[float] | None
    closed: bool = False

    def close(self, used_tokens: int | None = None) -> None:
        if self.closed or self.usage is None:
            return
        self.closed = True
        self.usage.concurrent -= 1
        if self.entry is not None and used_tokens is not None:
            self.entry[1] = used_tokens  # the reservation becomes what was really used


UNLIMITED = LocalTicket(None, None)  # a key without limits holds nothing


class KeyLimits:
    """Per-key counts in this process: each replica counts its own."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._usage: dict[str, _Usage] = {}

    def _get(self, key: Key, now: float) -> _Usage:
        usage = self._usage.setdefault(key.name, _Usage())
        usage.expire(now)
        return usage

    async def admit(self, key: Key | None, tokens: int) -> Ticket:
        if key is None or not limited(key):
            return UNLIMITED
        now = self.clock()
        usage = self._get(key, now)
        err = refusal(key, tokens, usage.snapshot(now), lambda room: usage.token_wait(room, now))
        if err is not None:
            raise err
        usage.requests.append(now)
        entry = [now, float(tokens)]
        usage.tokens.append(entry)
        usage.concurrent += 1
        return LocalTicket(usage, entry)

    async def charge(self, key: Key | None, tokens: int) -> None:
        if key is None or not limited(key):
            return
        now = self.clock()
        usage = self._get(key, now)
        usage.requests.append(now)
        usage.tokens.append([now, float(tokens)])

    async def headers(self, key: Key | None) -> dict[str, str]:
        if key is None or not limited(key):
            return {}
        now = self.clock()
        return headers(key, self._get(key, now).snapshot(now))

    async def close(self) -> None:
        """Nothing is pending: every count is already in this process."""


class Admission:
    """At most `capacity` sequences in the engine; up to `max_queued` requests wait for room, the
    one with the best (lowest) priority first, and among equals the one that came first. A
    waiting request is never admitted ahead of one with a better priority, and a batch line
    (`background`) never ahead of an interactive request, whatever their priorities."""

    def __init__(self, running: int, max_queued: int, on_change: Callable[[int, int], None] | None = None) -> None:
        self.capacity = running
        self.max_queued = max_queued
        self.in_use = 0
        # heap: (background, priority, arrival, n, waiter)
        self.queue: list[tuple[bool, int, int, int, asyncio.Future[None]]] = []
        self.arrivals = itertools.count()
        self.on_change = on_change or (lambda running, waiting: None)

    @property
    def waiting(self) -> int:
        return len(self.queue)

    async def acquire(self, n: int, priority: int = 0, background: bool = False) -> None:
        """Take `n` slots (one per sequence), waiting in line if need be; 429 if the line is full."""
        n = min(n, self.capacity)  # a request wider than the batch runs alone
        if not self.queue and self.in_use + n <= self.capacity:
            self.in_use += n
            self.on_change(self.in_use, self.waiting)
            return
        # batch lines never take an interactive request's place in the line
        queued = len(self.queue) if background else sum(1 for e in self.queue if not e[0])
        if queued >= self.max_queued:
            raise Overloaded(
                f"The server is at capacity ({self.in_use} sequences running, {len(self.queue)} requests "
                "queued). Please retry shortly.",
                headers={"retry-after": "1"},
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (background, priority, next(self.arrivals), n, waiter)
        heapq.heappush(self.queue, entry)
        self.on_change(self.in_use, self.waiting)
        try:
            await waiter
        except BaseException:
            if entry in self.queue:
                self.queue.remove(entry)
                heapq.heapify(self.queue)
            elif waiter.done() and not waiter.cancelled():
                self.release(n)  # it was granted just as the client left: give it back
            self.on_change(self.in_use, self.waiting)
            raise

    def release(self, n: int) -> None:
        n = min(n, self.capacity)
        self.in_use -= n
        while self.queue and self.in_use + self.queue[0][3] <= self.capacity:
            _, _, _, want, waiter = heapq.heappop(self.queue)
            if waiter.done():  # its client left; its own handler is about to notice
                continue
            self.in_use += want
            waiter.set_result(None)
        self.on_change(self.in_use, self.waiting)
