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

from flexalisa.attention import native


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
    num_global: Tensor  # (B, 1, 1) long: global tokens per row
    local: Tensor  # (B, 1, S) bool: the num_local newest valid tokens
    candidates: Tensor  # (B, 1, S) bool: valid and not local
    half_rows: list[int]  # k = round(n r / 2) per row, SWA's window length, on the host
    max_global: int  # the most global tokens of any row
    width: int  # K: the most selected tokens of any row
    entry: Tensor  # (B, 1, K) bool: real entries

    @classmethod
    def build(cls, valid: Tensor, num_local: Tensor, num_global: Tensor, local: Tensor,
              half: Tensor) -> StepBudget:
        """From the budget of every row; reads the widths and ``half`` to the host (one sync)."""
        if valid.shape[0]:
            widths = torch.stack([num_global.max(), (num_local + num_global).max()])
            max_global, width, *half_rows = torch.cat([widths, half]).tolist()
        else:
            max_global, width, half_rows = 0, 0, []
        entries = torch.arange(width, device=valid.device)
        return cls(valid=valid.clone(), num_global=num_global[:, None, None], local=local,
                   candidates=valid[:, None] & ~local, half_rows=half_rows,
                   max_global=max_global, width=width,
                   entry=(entries < (num_local + num_global)[:, None])[:, None])

    def select_top(self, scores: Tensor) -> Selection:
        """The local tokens plus the ``num_global`` top-scoring candidates of each row, scores
        (..., B, Hsel, S), e.g. with a leading layer axis for several layers at once; ties go
        to the lower slot. The same Selection as a stable sort of the scores
        (tests/unit/test_attention_step_budget.py checks it), from a top-k instead: every
        score above the row's num_global-th largest is taken, and of the scores equal to it
        the lowest slots fill the rest. The Selection's tensors keep the leading axes. Float64
        scores on the CPU go through `native.select_top` where it is built: the same
        selection in one pass instead of a dozen ops."""
        lead = scores.shape[:-1]  # (..., B, Hsel)
        entry = self.entry.expand(*lead, -1)
        if self.max_global:  # the compiled pass, where built: the same slots, one op
            indices = native.select_top(scores, self.local, self.candidates, self.num_global,
                                        self.width)
            if indices is not None:
                return Selection(indices=indices, mask=entry)
        selected = self.local.expand(*lead, -1)
        if self.max_global:
            keyed = scores.masked_fill(~self.candidates, -math.inf)  # (..., B, Hsel, S)
            top = keyed.topk(self.max_global, dim=-1).values  # (..., B, Hsel, G) descending
            cut = top.gather(-1, (self.num_global - 1).clamp_min(0).expand(*lead, 1))
            above = keyed > cut  # (..., B, Hsel, S); none in a row with num_global = 0
            tied = keyed == cut
            missing = self.num_global - above.sum(dim=-1, keepdim=True)  # (..., B, Hsel, 1)
            selected = selected | above | (tied & (tied.cumsum(dim=-1) <= missing))
        return Selection(indices=compact(selected, self.width, scores.shape[-1]), mask=entry)


def compact(mask: Tensor, width: int, num_slots: int) -> Tensor:
    """(..., H, S) bool -> (..., H, width) the True slots of each row ascending, then S-1."""
    rank = mask.long().cumsum(dim=-1) - 1  # (B, H, S): a True slot's entry
    column = torch.where(mask, rank, width)  # False slots go to a spare last column
    out = torch.full((*mask.shape[:-1], width + 1), num_slots - 1, dtype=torch.long,
                     device=mask.device)
    slots = torch.arange(num_slots, device=mask.device).expand_as(mask)
    return out.scatter_(-1, column, slots)[..., :width]

