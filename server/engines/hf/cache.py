"""The KV cache: one K and one V tensor per layer, rows x kv_heads x positions x head_dim.

Running sequences hold rows 0..n-1 (a leaving sequence's row is refilled by the last one, see
`Core._compact`), so a decode step reads one contiguous block; rows and positions grow on demand,
within the KV budget (`--kv-cache-space`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Step:
    """What the attention function needs to know about the forward pass in progress."""

    prefill: bool
    row0: int  # first cache row of this batch (rows are contiguous)
    positions: Any = None  # decode: tensor [rows], where each row's new token goes
    valid: Any = None  # decode: bool tensor [rows, 1, 1, T], keys each row may attend to
    span: int = 0  # decode: positions to read (longest row + 1)


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

    def reserve(self, rows: int, positions: int, max_rows: int, budget_tokens: int) -> None:
        """Make room for `rows` x `positions`, with slack to copy less often, within the budget.

        Admission guarantees rows x positions <= budget_tokens, so the exact fit always exists.
        """
        if rows <= self.rows and positions <= self.positions:
            return
        grow_rows = min(max(rows, 2 * self.rows, 4), max_rows)
        grow_pos = self.positions
        if positions > self.positions:
            grow_pos = min(self.positions + max(256, self.positions // 4), self.max_positions)
        new_rows = max(rows, min(grow_rows, budget_tokens // positions))
        new_pos = max(positions, min(grow_pos, budget_tokens // new_rows))
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

    def release(self) -> None:
        self.k, self.v = [], []
        self.rows = self.positions = 0
