"""The engine's KV cache: one contiguous (B, Hkv, S_max, D) K and V buffer per layer.

Rows are left-padded to a common prompt length, so slot `s` holds the same step for every row and
a decode step writes one column. `valid[b, s]` is False for padding. Finished rows can be dropped
with `keep_rows`, which compacts every buffer along the batch dimension; a row can also be
refilled with another prompt's KV (`put_rows`, right-aligned to the filled slots), after `shift`
has moved every row's slots to make room (`Engine.generate` with `max_batch`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cost_model.spec import ModelSpec


class KVCache:
    def __init__(self, spec: ModelSpec, batch: int, max_len: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        shape = (batch, spec.num_kv_heads, max_len, spec.head_dim)  # (B, Hkv, S_max, D)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(spec.num_layers)]
        self.values = [torch.empty(shape, device=device, dtype=dtype)
                       for _ in range(spec.num_layers)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # (B, S_max)
        self.length = 0  # filled slots
        self.max_len = max_len

    def write(self, layer_idx: int, start: int, k: Tensor, v: Tensor,
              rows: slice = slice(None)) -> None:
        """Store k, v (b, Hkv, T, D) of `rows` at slots [start, start + T)."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: slot {end} > capacity {self.max_len}")
        self.keys[layer_idx][rows, :, start:end] = k
        self.values[layer_idx][rows, :, start:end] = v

    def view(self, layer_idx: int, length: int) -> tuple[Tensor, Tensor]:
        """K, V (B, Hkv, length, D) of the first `length` slots."""
        return self.keys[layer_idx][:, :, :length], self.values[layer_idx][:, :, :length]

    def keep_rows(self, rows: Tensor) -> None:
        """Drop every row not listed in `rows` (a 1-D index tensor).

        With `rows` ascending (as `Engine.generate` passes them) the kept rows move down in
        place, each copying only its filled slots [0, length): nothing is allocated, and the
        buffers become views of their first rows. A fresh copy of the whole cache per finished
        row, which this replaces, often ran at page-fault speed: SmolLM2 at 64 rows x 1024
        slots (2.7 GB) took 0.7-1.0 s per call in one-off timings on the project's CPU box,
        several decode steps, against 0.09 s in place.
        Otherwise (rows in another order) the buffers are gathered anew, layer by layer.
        """
        keep = rows.tolist()
        if keep == sorted(keep):
            moves = [(dst, src) for dst, src in enumerate(keep) if dst != src]
            for buffers in (self.keys, self.values):
                for layer_idx, t in enumerate(buffers):
                    for dst, src in moves:  # dst < src, ascending: a source is read before
                        t[dst, :, :self.length].copy_(t[src, :, :self.length])  # it is written
                    buffers[layer_idx] = t[:len(keep)]
        else:
            for buffers in (self.keys, self.values):
                for layer_idx, t in enumerate(buffers):
                    buffers[layer_idx] = t.index_select(0, rows.to(t.device))
        self.valid = self.valid.index_select(0, rows)

    def put_rows(self, rows: Tensor, other: KVCache) -> None:
        """Store `other`'s filled slots [0, other.length) in `rows` (a 1-D index tensor) at
        slots [length - other.length, length), right-aligned as left padding is; the rest of
        those rows becomes padding (`valid` False)."""
        span = other.length
        if span > self.length:
            raise ValueError(f"{span} slots do not fit before slot {self.length}: shift first")
        start = self.length - span
        for mine, theirs in ((self.keys, other.keys), (self.values, other.values)):
            for t, src in zip(mine, theirs):
                t[rows, :, start:self.length] = src[:, :, :span]
        self.valid[rows] = False
        self.valid[rows, start:self.length] = other.valid[:, :span]

    def first_held(self) -> int:
        """The first slot any row holds (`valid`); `length` when none does."""
        held = self.valid[:, :self.length].any(dim=0).nonzero()
        return int(held[0]) if len(held) else self.length

    def shift(self, delta: int) -> None:
        """Move every row's filled slots by `delta` (negative: towards slot 0), e.g. to drop
        slots that only padding holds or to make room on the left for a longer prompt.

        The span moved is [first_held(), length); positions (RoPE) are the rows' own and do
        not change. Costs one copy of the span. Slots below the new length that no write has
        reached (a move right past the old length) are zeroed: attention reads every slot
        below `length` under its mask, and SDPA turns a masked NaN (fresh memory) into NaN
        output.
        """
        first = self.first_held()
        lo, hi = first + delta, self.length + delta
        if lo < 0 or hi > self.max_len:
            raise ValueError(f"cannot shift slots [{first}, {self.length}) by {delta} within "
                             f"0..{self.max_len}")
        if delta == 0:
            return
        for t in self.keys + self.values:  # through a copy: source and target overlap
            t[:, :, lo:hi] = t[:, :, first:self.length].clone()
            if lo > self.length:  # never written: [old length, lo)
                t[:, :, self.length:lo].zero_()
        moved = self.valid[:, first:self.length].clone()
        self.valid.fill_(False)
        self.valid[:, lo:hi] = moved
        self.length = hi

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
