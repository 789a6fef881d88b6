"""The prefix cache: KV of token blocks that earlier sequences computed, reused by later prompts
that start with the same tokens (a shared system prompt, a conversation's history).

A block is BLOCK tokens, keyed as vLLM keys it: by a hash chain, sha256 of (its parent block's
key, its tokens), rooted in the request's `cache_salt` (None is a partition of its own), so a key
names the whole prefix up to its block and a request only ever hits blocks of its own salt. A
block's KV is a copy (`KVCache.read_blocks`): a hit copies it into the sequence's cache row, so a
cached block is never shared with a running sequence and may be evicted at any time.

Blocks are cached memory inside the KV budget, and the cheapest to give back: the running
sequences' rows come first (`Core._reserve` evicts blocks before it grows the cache), and blocks
are evicted least recently used first. A chain is touched leaf first, so its deepest block is
always older than its parent and goes first (a block whose parent is gone can never be hit).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Any

from server.engines.hf.cache import KVCache

BLOCK = 16  # tokens per block (vLLM's default block size)


def chain(tokens: list[int], salt: str | None, known: list[bytes]) -> list[bytes]:
    """The keys of every whole block of `tokens`: `known` (the keys of its first blocks, computed
    before) extended by the rest."""
    keys = list(known)
    parent = keys[-1] if keys else hashlib.sha256(repr(salt).encode()).digest()
    for start in range(len(keys) * BLOCK, len(tokens) - BLOCK + 1, BLOCK):
        parent = hashlib.sha256(parent + array("q", tokens[start:start + BLOCK]).tobytes()).digest()
        keys.append(parent)
    return keys


class PrefixCache:
    """Cached blocks by key, least recently used first. Only the model thread touches it."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        self.blocks: OrderedDict[bytes, Any] = OrderedDict()

    @property
    def tokens(self) -> int:
        """Token positions the cached blocks hold (what they take of the KV budget)."""
        return len(self.blocks) * BLOCK

    def match(self, keys: list[bytes], limit: int) -> list[Any]:
        """The cached blocks of the longest cached prefix of `keys`, at most `limit` blocks."""
        found: list[bytes] = []
        for key in keys[:limit]:
            if key not in self.blocks:
                break
            found.append(key)
        self._touch(found)
        return [self.blocks[k] for k in found]

    def insert(self, row: int, keys: list[bytes], room: int) -> int:
        """Cache the blocks `keys` names, read from cache row `row`, evicting others to stay within
        `room` token positions; returns how many blocks were new. A block that does not fit ends
        the chain: the blocks after it could never be hit."""
        present = [k for k in keys if k in self.blocks]
        self._touch(present)  # ours are now the newest: eviction takes others first
        ours = set(keys)
        new: list[int] = []
        for i, key in enumerate(keys):
            if key in self.blocks:
                continue
            while self.tokens + (len(new) + 1) * BLOCK > room and self.blocks:
                oldest = next(iter(self.blocks))
                if oldest in ours:
                    break
                del self.blocks[oldest]
            if self.tokens + (len(new) + 1) * BLOCK > room:
                break
            new.append(i)
        if new:
            for i, kv in zip(new, self.cache.read_blocks(row, new, BLOCK), strict=True):
                self.blocks[keys[i]] = kv
        self._touch([k for k in keys if k in self.blocks])
        return len(new)

    def evict(self, tokens: int) -> None:
        """Free at least `tokens` positions (all blocks if they hold fewer), oldest first."""
        while self.blocks and tokens > 0:
            self.blocks.popitem(last=False)
            tokens -= BLOCK

    def _touch(self, keys: list[bytes]) -> None:
        # leaf first, so that the chain's first block ends up the most recently used
        for key in reversed(keys):
            self.blocks.move_to_end(key)
