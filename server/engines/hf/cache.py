"""The KV cache: one K and one V tensor per layer, rows x kv_heads x positions x head_dim.

Running sequences hold rows 0..n-1 (a leaving sequence's row is refilled by the last one, see
`Core._compact`), so a decode step reads one contiguous block; rows and positions grow on demand,
within the KV budget (`--kv-cache-space`), which they share with the prefix cache's blocks
(`prefix.PrefixCache`): `read_blocks` copies a row's blocks out, `write_prefix` copies them back
into another row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Step:
    """What the attention function needs to know about the forward pass in progress."""

    prefill: bool
    row0: int  # first cache row of this batch (rows are contiguous)
    # decode: [rows], where each row's new token goes; prefill after prefix-cache hits: with `rows`,
    # the (row, position) of each new key, for the query slots `fresh` [rows, q] marks
    positions: Any = None
    rows: Any = None  # prefill after hits: [new keys], the cache row of each
    fresh: Any = None  # prefill after hits: bool [rows, q], the query slots that are not padding
    # bool [rows, 1, q, span]: the keys each query may attend to (decode: q = 1; prefill after hits:
    # the row's cached positions and its new ones causally). None: a prefill from position 0
    valid: Any = None
    span: int = 0  # positions to read (the longest row's)


class KVCache:
    """Per-layer K and V tensors [rows, kv_heads, positions, head_dim], grown on demand."""

    def __init__(self, torch: Any, layers: int, kv_heads: int, head_dim: int, dtype: Any, device: Any,
                 max_positions: int) -> None:
        self.torch = torch
        self.max_positions = max_positions
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.k: list[Any] = []
        self.v: list[Any] = []
        self.rows = 0
        self.positions = 0
        self.step: Step | None = None  # the forward pass in progress

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.torch.finfo(self.dtype).bits // 8

    @property
    def allocated(self) -> int:
        """Token positions the tensors hold now (rows x positions)."""
        return self.rows * self.positions

    def plan(self, rows: int, positions: int, max_rows: int, budget_tokens: int) -> tuple[int, int]:
        """The shape `reserve` would grow to (the current one when it fits)."""
        if rows <= self.rows and positions <= self.positions:
            return self.rows, self.positions
        # slack (room to copy less often) takes at most an eighth of the budget, so that in a small
        # budget the prefix cache keeps room for blocks; the exact fit is never refused
        budget_tokens = min(budget_tokens, rows * positions + budget_tokens // 8)
        grow_rows = min(max(rows, 2 * self.rows, 4), max_rows)
        grow_pos = self.positions
        if positions > self.positions:
            grow_pos = min(self.positions + max(256, self.positions // 4), self.max_positions)
        new_rows = max(rows, min(grow_rows, budget_tokens // positions))
        new_pos = max(positions, min(grow_pos, budget_tokens // new_rows))
        return new_rows, new_pos

    def reserve(self, rows: int, positions: int, max_rows: int, budget_tokens: int) -> None:
        """Make room for `rows` x `positions`, with slack to copy less often, within the budget.

        Admission guarantees rows x positions <= budget_tokens, so the exact fit always exists.
        """
        if rows <= self.rows and positions <= self.positions:
            return
        new_rows, new_pos = self.plan(rows, positions, max_rows, budget_tokens)
        keep_rows, keep_pos = min(self.rows, new_rows), min(self.positions, new_pos)
        shape = (new_rows, self.kv_heads, new_pos, self.head_dim)
        for store in (self.k, self.v):
            for i in range(self.layers):
                # zeros, not empty: masked-out positions are multiplied by 0, and 0 * NaN is NaN
                fresh = self.torch.zeros(shape, dtype=self.dtype, device=self.device)
                if i < len(store):
                    fresh[:keep_rows, :, :keep_pos] = store[i][:keep_rows, :, :keep_pos]
                    store[i] = fresh
                else:
                    store.append(fresh)
        self.rows, self.positions = new_rows, new_pos

    def move_row(self, src: int, dst: int, length: int) -> None:
        for store in (self.k, self.v):
            for t in store:
                t[dst, :, :length] = t[src, :, :length]

    def read_blocks(self, row: int, blocks: list[int], size: int) -> list[Any]:
        """Copies of blocks (by index, `size` positions each) of a row: one tensor per block,
        [layers, 2 (K, V), kv_heads, size, head_dim], each its own memory, so that evicting one
        block frees it."""
        torch = self.torch
        idx = torch.cat([torch.arange(b * size, (b + 1) * size) for b in blocks]).to(self.device)
        both = torch.stack([torch.stack((k[row].index_select(1, idx), v[row].index_select(1, idx)))
                            for k, v in zip(self.k, self.v, strict=True)])
        both = both.unflatten(3, (len(blocks), size))  # [layers, 2, heads, blocks, size, dim]
        return [both[:, :, :, i].clone() for i in range(len(blocks))]

    def write_prefix(self, row: int, blocks: list[Any]) -> int:
        """Copy blocks (from `read_blocks`) into a row's first positions; returns how many."""
        kv = self.torch.cat(blocks, dim=3)  # [layers, 2, heads, positions, dim]
        n = kv.shape[3]
        for i, (k, v) in enumerate(zip(self.k, self.v, strict=True)):
            k[row, :, :n] = kv[i, 0]
            v[row, :, :n] = kv[i, 1]
        return int(n)

    def release(self) -> None:
        self.k, self.v = [], []
        self.rows = self.positions = 0
