"""The ``Selection`` a sparsity method hands the attention, and the masks that build it.

Position-only methods build a boolean mask over cache slots, (B, Hsel, S), then turn it into
padded index lists. Score-based methods (local + global) share the step's ``StepBudget`` across
layers and pick their globals from it. Hsel is 1 (one set per sequence, shared by all heads) or
Hkv (one set per KV head).

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


@dataclass(frozen=True)
class StepBudget:
    """What every layer's local + global selection shares within one decode step: it depends
    on ``valid`` only, so it is built once per step (``MethodState.step_budget``), not once per
    layer. Per layer only the global choice is left (``select_top``)."""

    valid: Tensor  # (B, S) bool, a copy: the key the state compares the next call's with
    num_global: Tensor  # (B,) long: global tokens per row
    local: Tensor  # (B, 1, S) bool: the num_local newest valid tokens
    candidates: Tensor  # (B, 1, S) bool: valid and not local, older than every local token
    half: Tensor  # (B,) long: k = round(n r / 2), SWA's window length
    local_slots: Tensor  # (B, 1, Lmax) long: each row's local slots ascending, padded
    is_global: Tensor  # (B, 1, Gmax) bool: entry g < num_global
    take: Tensor  # (B, 1, K) long: entry p's column in [globals (Gmax) | local slots (Lmax)]
    entry: Tensor  # (B, 1, K) bool: real entries; K = the largest row count

    @classmethod
    def build(cls, valid: Tensor, num_valid: Tensor, num_local: Tensor, num_global: Tensor,
              local: Tensor, half: Tensor) -> StepBudget:
        """From the budget of every row; reads the widths to the host (one sync)."""
        num_slots, device = valid.shape[-1], valid.device
        counts = torch.stack([num_local.max(), num_global.max(), (num_local + num_global).max()])
        max_local, max_global, width = (counts.tolist() if num_valid.numel() else (0, 0, 0))
        local_slots = _compact(local, max_local, num_slots)  # (B, 1, Lmax)
        entries = torch.arange(width, device=device)  # (K,)
        globals_first = entries < num_global[:, None]  # (B, K)
        take = torch.where(globals_first, entries, max_global + entries - num_global[:, None])
        take = take.clamp(0, max(max_global + max_local - 1, 0))
        return cls(valid=valid.clone(), num_global=num_global, local=local,
                   candidates=valid[:, None] & ~local, half=half, local_slots=local_slots,
                   is_global=(torch.arange(max_global, device=device)
                              < num_global[:, None])[:, None],
                   take=take[:, None], entry=(entries < (num_local + num_global)[:, None])[:, None])

    def select_top(self, scores: Tensor) -> Selection:
        """The local tokens plus the ``num_global`` top-scoring candidates of each row, scores
        (B, Hsel, S); ties go to the lower slot. The same Selection as marking both in a
        (B, Hsel, S) mask for ``mask_to_selection`` (tests/unit/test_attention_step_budget.py
        checks it), with one sort of the scores instead of two: the globals are all older
        than the local tokens, so each row's ascending selection is its globals in slot order,
        then its local slots."""
        batch, heads, num_slots = scores.shape
        max_global = self.is_global.shape[-1]
        keyed = scores.masked_fill(~self.candidates, -math.inf)  # (B, Hsel, S)
        order = torch.sort(keyed, dim=-1, descending=True, stable=True).indices[..., :max_global]
        glob = torch.where(self.is_global, order, num_slots).sort(dim=-1).values  # (B,Hsel,G)
        both = torch.cat([glob, self.local_slots.expand(batch, heads, -1)], dim=-1)
        picked = both.gather(-1, self.take.expand(batch, heads, -1))  # (B, Hsel, K)
        entry = self.entry.expand(batch, heads, -1)
        return Selection(indices=torch.where(entry, picked, num_slots - 1), mask=entry)


def _compact(mask: Tensor, width: int, num_slots: int) -> Tensor:
    """(B, H, S) bool -> (B, H, width) the True slots of each row ascending, then S-1."""
    rank = mask.long().cumsum(dim=-1) - 1  # (B, H, S): a True slot's entry
    column = torch.where(mask, rank, width)  # False slots go to a spare last column
    out = torch.full((*mask.shape[:-1], width + 1), num_slots - 1, dtype=torch.long,
                     device=mask.device)
    slots = torch.arange(num_slots, device=mask.device).expand_as(mask)
    return out.scatter_(-1, column, slots)[..., :width]

