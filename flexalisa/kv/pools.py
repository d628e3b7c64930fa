"""Slot pools behind the KV tiers: a ring of K,V slots (plain or quantized) and a hidden pool.

A tier holds a contiguous slot range that grows at its new end and shrinks at its old end, so
its storage is a ring: slot ``p`` lives at ring index ``p % capacity``. Every buffer keeps the
slot dimension third — (B, Hkv, capacity, ·) — so one index serves K, V and the quantization
scales alike.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flexalisa.attention.kernel import take_rows
from flexalisa.kv.quant import QTensor, dequantize, quantize


def host_empty(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> Tensor:
    """A host tensor, page-locked when ``pin`` (CUDA present) so copies can be asynchronous."""
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


class KVRing:
    """K,V of up to ``capacity`` slots, each (B, Hkv, D), optionally INT8/INT4 quantized."""

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device, bits: int | None, group_size: int,
                 pin: bool = False) -> None:
        self.capacity, self.dtype, self.device = capacity, dtype, device
        self.bits, self.group_size = bits, group_size
        lead = (batch_size, num_kv_heads, capacity)
        if bits is None:
            shapes = [(lead + (head_dim,), dtype)]
        else:
            num_groups = head_dim // group_size
            code_dim = head_dim if bits == 8 else head_dim // 2
            shapes = [(lead + (code_dim,), torch.uint8), (lead + (num_groups,), torch.float32),
                      (lead + (num_groups,), torch.float32)]

        def alloc(shape: tuple[int, ...], buf_dtype: torch.dtype) -> Tensor:
            if device.type == "cpu":
                return host_empty(shape, buf_dtype, pin)
            return torch.empty(shape, dtype=buf_dtype, device=device)

        self.k_parts = [alloc(shape, buf_dtype) for shape, buf_dtype in shapes]
        self.v_parts = [alloc(shape, buf_dtype) for shape, buf_dtype in shapes]
        one_slot = sum(p[:, :, :1].numel() * p.element_size() for p in self.k_parts)
        self.bytes_per_slot = 2 * one_slot  # K and V of one slot, all rows and heads

    @property
    def reserved_bytes(self) -> int:
        return self.bytes_per_slot * self.capacity

    def encode(self, x: Tensor) -> list[Tensor]:
        """The stored parts of x (B, Hkv, m, D), on x's device (quantized there if compressed)."""
        if self.bits is None:
            return [x.to(self.dtype)]
        q = quantize(x, self.bits, self.group_size)
        return [q.codes, q.scale, q.minimum]

    def decode(self, parts: list[Tensor]) -> Tensor:
        """Inverse of ``encode`` on the parts' device, in ``self.dtype``."""
        if self.bits is None:
            return parts[0].to(self.dtype)
        return dequantize(QTensor(parts[0], parts[1], parts[2], self.bits, self.group_size,
                                  self.dtype))

    def write(self, first_slot: int, k: Tensor, v: Tensor) -> int:
        """Store k, v (B, Hkv, m, D) at slots [first_slot, first_slot + m); return bytes copied."""
        num_new = k.shape[2]
        if num_new == 0:
            return 0
        if num_new > self.capacity:
            raise ValueError(f"{num_new} slots do not fit a ring of {self.capacity}")
        first = first_slot % self.capacity
        wraps = first + num_new > self.capacity  # else one slice of the ring: a plain copy
        ring_idx = torch.arange(first_slot, first_slot + num_new) % self.capacity if wraps else None
        moved = 0
        for parts, x in ((self.k_parts, k), (self.v_parts, v)):
            for buf, part in zip(parts, self.encode(x), strict=True):
                moved += part.numel() * part.element_size()
                if ring_idx is None:
                    buf[:, :, first:first + num_new].copy_(part)
                else:
                    buf.index_copy_(2, ring_idx.to(buf.device), part.to(buf.device, buf.dtype))
        return moved

    def read_range(self, start: int, end: int) -> tuple[list[Tensor], list[Tensor]]:
        """The stored parts of slots [start, end), each (B, Hkv, end - start, ·)."""
        ring_idx = (torch.arange(start, end) % max(self.capacity, 1)).to(self.device)
        return ([p.index_select(2, ring_idx) for p in self.k_parts],
                [p.index_select(2, ring_idx) for p in self.v_parts])

    def range_views(self, start: int, end: int) -> tuple[list[Tensor], list[Tensor]]:
        """Views of K and V at slots [start, end) of an uncompressed ring, in slot order: one
        (B, Hkv, ·, D) piece each, or two where the range wraps around the ring's end."""
        if self.bits is not None:
            raise ValueError("range_views reads an uncompressed ring; decode read_range instead")
        if end <= start:
            return [], []
        first, last = start % self.capacity, (end - 1) % self.capacity + 1
        spans = [(first, last)] if first < last else [(first, self.capacity), (0, last)]
        return ([self.k_parts[0][:, :, a:b] for a, b in spans],
                [self.v_parts[0][:, :, a:b] for a, b in spans])

    def gather_slots(self, slots: Tensor) -> tuple[Tensor, Tensor]:
        """Dequantized K, V at ``slots`` (B, Hkv, K) — any slot stored here — as (B, Hkv, K, D)."""
        if self.capacity == 0:
            zeros = torch.zeros(*slots.shape, self.k_parts[0].shape[-1], dtype=self.dtype,
                                device=self.device)
            return zeros, zeros.clone()
        # every part is a contiguous (B, Hkv, capacity, ·) buffer, so one flat row index
        # (b * Hkv + h) * capacity + ring index serves K, V and their scales alike, and one
        # index_select per part reads only the selected rows (take_rows' general strided
        # path and torch.gather with an index expanded over the last dim were 4x and 8x
        # slower here)
        batch, heads, num_sel = slots.shape
        first_row = torch.arange(0, batch * heads * self.capacity, self.capacity,
                                 device=self.device).view(batch, heads, 1)
        rows = (first_row + slots.to(self.device) % self.capacity).view(-1)

        def take(parts: list[Tensor]) -> Tensor:
            return self.decode([p.view(-1, p.shape[-1]).index_select(0, rows)
                                .view(batch, heads, num_sel, p.shape[-1]) for p in parts])

        return take(self.k_parts), take(self.v_parts)

    def gather_entries(self, batch_idx: Tensor, head_idx: Tensor,
                       slots: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Stored parts of the m entries (batch_idx, head_idx, slot), each (m, ·), not decoded."""
        ring_idx = slots % max(self.capacity, 1)
        return ([take_rows(p, batch_idx, head_idx, ring_idx) for p in self.k_parts],
                [take_rows(p, batch_idx, head_idx, ring_idx) for p in self.v_parts])


class HiddenPool:
    """Layer-input hidden states (B, hidden) of slots [0, capacity) in host memory."""

    def __init__(self, batch_size: int, hidden_size: int, capacity: int, dtype: torch.dtype,
                 pin: bool = False) -> None:
        self.capacity = capacity
        self.hidden = host_empty((batch_size, capacity, hidden_size), dtype, pin)  # (B, R, H)
        self.num_kept = 0  # hidden states of slots [0, num_kept) are stored
        self.bytes_per_slot = batch_size * hidden_size * self.hidden.element_size()

    def keep(self, first_slot: int, hidden: Tensor) -> int:
        """Store hidden (B, m, hidden) of slots [first_slot, ...) below capacity; return bytes."""
        if first_slot != self.num_kept:
            raise ValueError(f"hidden states arrive in slot order: expected slot {self.num_kept}, "
                             f"got {first_slot}")
        num_keep = min(hidden.shape[1], self.capacity - first_slot)
        if num_keep <= 0:
            return 0
        part = hidden[:, :num_keep]  # (B, m', hidden)
        self.hidden[:, first_slot:first_slot + num_keep].copy_(part)
        self.num_kept += num_keep
        return part.numel() * part.element_size()
