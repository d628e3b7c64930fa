"""The ``Selection`` a sparsity method hands the attention, and the masks that build it.

Methods first build a boolean mask over cache slots, (B, Hsel, S), then turn it into padded
index lists. Hsel is 1 (one set per sequence, shared by all heads) or Hkv (one set per KV head).

Tie rule for every score-based choice: among equal scores the lower slot (older token) wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Selection:
    """The cache slots one decode step attends to, for one layer."""

    indices: Tensor  # (B, Hsel, K) long: selected slots, ascending; padding entries repeat S-1
    mask: Tensor  # (B, Hsel, K) bool: True = real entry, False = padding (row selected fewer)
    # True: built by `dense_selection`, every valid slot with entry s = slot s (padding entries
    # in place, pointing at S-1, so not ascending); attended like a contiguous cache
    dense: bool = False

    @property
    def num_heads(self) -> int:
        """Hsel: 1 (shared by all heads) or Hkv (per KV head)."""
        return self.indices.shape[1]

    @property
    def counts(self) -> Tensor:
        """(B, Hsel) long: number of real entries per row."""
        return self.mask.sum(dim=-1)

    @property
    def attention_mask(self) -> Tensor:
        """(B, Hsel, 1, K) bool, the kernel's mask for one query over the gathered keys."""
        return self.mask[:, :, None, :]


def mask_to_selection(selected: Tensor) -> Selection:
    """Boolean slots (B, Hsel, S) -> Selection with K = the largest row count (one host sync)."""
    num_slots = selected.shape[-1]
    counts = selected.sum(dim=-1)  # (B, Hsel)
    width = int(counts.max()) if counts.numel() else 0
    # a stable sort of "not selected" puts the selected slots first, in ascending slot order
    order = torch.sort((~selected).to(torch.uint8), dim=-1, stable=True).indices[..., :width]
    entry = torch.arange(width, device=selected.device) < counts[..., None]  # (B, Hsel, K)
    indices = torch.where(entry, order, torch.full_like(order, num_slots - 1))
    return Selection(indices=indices, mask=entry)


def dense_selection(valid: Tensor) -> Selection:
    """Every valid slot in slot order: valid (B, S) bool -> Selection (B, 1, S), ``dense``.

    Unlike ``mask_to_selection`` the real entries are not moved to the front: entry s is slot s,
    and an invalid slot (left padding) is a masked entry pointing at slot S-1, as padding does
    elsewhere. K, V gathered with it have the layout of a contiguous cache, so attention over
    them runs the same fp32 sums as the Engine's attention over its cache.
    """
    num_slots = valid.shape[-1]
    slots = torch.arange(num_slots, device=valid.device).expand_as(valid)
    indices = torch.where(valid, slots, num_slots - 1)
    return Selection(indices=indices[:, None], mask=valid[:, None], dense=True)


def recent_mask(pos: Tensor, num_valid: Tensor, count: Tensor, valid: Tensor) -> Tensor:
    """(B, S) bool: the ``count`` (B,) most recent valid tokens of each row."""
    return valid & (pos >= (num_valid - count)[:, None])


def first_mask(pos: Tensor, count: Tensor, valid: Tensor) -> Tensor:
    """(B, S) bool: the ``count`` (B,) oldest valid tokens of each row."""
    return valid & (pos < count[:, None])


def top_scoring(scores: Tensor, candidates: Tensor, count: Tensor) -> Tensor:
    """(B, H, S) bool: per row, the ``count`` (B,) candidates with the highest score.

    scores: (B, H, S) float; candidates: (B, H|1, S) bool. Ties go to the lower slot (stable
    sort). Callers guarantee count <= number of candidates.
    """
    keyed = scores.masked_fill(~candidates, -math.inf)  # (B, H, S)
    order = torch.sort(keyed, dim=-1, descending=True, stable=True).indices  # (B, H, S)
    take = torch.arange(scores.shape[-1], device=scores.device) < count[:, None, None]
    return torch.zeros_like(keyed, dtype=torch.bool).scatter(-1, order, take.expand_as(order))
