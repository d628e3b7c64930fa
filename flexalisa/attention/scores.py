"""Score bookkeeping for the score-based methods: SWA's windowed sum and H2O's running sum.

A *row* is one query's attention over the cache (a decode step, or a prefill position that
seeds the scores), summed over the query heads of each selection group (all heads, or the G
heads of one KV head). A decode row is non-zero only on the K slots the step attended to.

SWA needs, per slot, the sum of the last ``k`` rows, with k = round(n r / 2) growing slowly as
n grows. Keeping those rows densely costs O(n k) per layer per sequence. ``WindowScores``
instead keeps

    ring     the last W rows as sparse (slot, weight) lists of width Kr   O(W Kr)
    totals   the exact window sum per slot (float64)                      O(n)
    live     how many in-window entries touch each slot (int32)           O(n)

with W = k(max_len) + 1 and Kr = the largest per-step budget, so the ring holds the selected
entries only (O(r^2 n^2 / 2) instead of O(r n^2 / 2): r times smaller, 5x at s = 0.8). A new
row is scatter-added into ``totals``; rows leaving the window are scatter-subtracted (at most
one per step, since k grows by at most 1 per token). A slot with no live entry is reset to
exactly 0, so rounding residue from add/subtract never breaks the lower-slot-wins tie rule.
Cost per step: O(Kr) scatters plus an O(n) reset. Padding entries point at a dummy slot
``max_len`` that nothing reads.

Seed rows are dense over the prompt; each is stored as its Kr largest weights (ties: lower slot),
which is exact whenever the prompt has at most Kr valid tokens.

Layers: SWA keeps one ``WindowScores`` for all layers of a run, its tensors with a leading layer
axis (``create(..., num_layers=L)``), and hands each layer a view of its slice (``view(j)``) with
the layer's own row counts. Every method works on any number of leading layer axes, so the
same code updates one layer or a range of layers in lockstep (``view(a, b)``) as one run of
tensor ops: SWA's selection for many layers at once (``scored.py``).

H2O's score is the plain sum over the whole history: ``CumulativeScores``, O(n).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flexalisa.attention import native
from flexalisa.attention.selection import compact

Device = torch.device | str | None  # where the score tensors live (None = torch's default)


def head_sum(probs: Tensor, num_groups: int) -> Tensor:
    """(B, Hq, T, S) -> (B, num_groups, T, S): sum over the query heads of each group.

    Query head h belongs to KV head h // (Hq / Hkv), as in the kernel; num_groups = 1 sums all.
    """
    batch, num_heads, num_q, num_keys = probs.shape
    grouped = probs.view(batch, num_groups, num_heads // num_groups, num_q, num_keys)
    return grouped.sum(dim=2)  # (B, Hsel, T, S)


def prefill_rows(probs: Tensor, valid: Tensor, num_groups: int) -> Tensor:
    """Head-summed prefill rows (B, Hsel, T, S) float32, zero on padded queries and keys.

    probs: (B, Hq, T, S) with the T queries at the last T slots; valid: (B, S) bool.
    """
    num_q = probs.shape[2]
    rows = head_sum(probs.float(), num_groups)  # (B, Hsel, T, S)
    keep = valid[:, None, -num_q:, None] & valid[:, None, None, :]  # (B, 1, T, S)
    return rows * keep


@dataclass
class WindowScores:
    """Exact sum of the last ``target`` rows per sequence, for one layer (see module doc)."""

    # shapes for one layer; a record of several layers has a leading layer axis on each
    ring_slots: Tensor  # (B, W, Hsel, Kr) long: cache slot of each stored entry (dummy = L)
    ring_weights: Tensor  # (B, W, Hsel, Kr) float32: the entry's head-summed weight
    totals: Tensor  # (B, Hsel, L + 1) float64: sum of the in-window rows per slot
    live: Tensor  # (B, Hsel, L + 1) int32: in-window entries per slot
    window_rows: list[int]  # per sequence: rows currently summed into totals (kept on the host)
    num_rows: int  # rows pushed so far (the same for every sequence)

    @classmethod
    def create(
        cls, batch: int, num_groups: int, max_len: int, capacity: int, width: int, device: Device,
        num_layers: int | None = None,
    ) -> WindowScores:
        """Empty bookkeeping holding up to ``capacity`` rows of ``width`` entries; with
        ``num_layers``, for that many layers (a leading layer axis; see ``view``)."""
        lead = () if num_layers is None else (num_layers,)
        ring_shape = (*lead, batch, capacity, num_groups, width)
        score_shape = (*lead, batch, num_groups, max_len + 1)
        return cls(
            ring_slots=torch.full(ring_shape, max_len, dtype=torch.long, device=device),
            ring_weights=torch.zeros(ring_shape, device=device),
            totals=torch.zeros(score_shape, dtype=torch.float64, device=device),
            live=torch.zeros(score_shape, dtype=torch.int32, device=device),
            window_rows=[0] * batch,
            num_rows=0,
        )

    def view(self, start: int, stop: int | None = None, window_rows: list[int] | None = None,
             num_rows: int | None = None) -> WindowScores:
        """Layer ``start`` (no layer axis) or layers [start, stop) of a record with a layer
        axis, as a record whose tensors are views of this one's (updates go through), with
        the given row counts (default: this record's)."""
        part = slice(start, stop) if stop is not None else start
        return WindowScores(
            ring_slots=self.ring_slots[part], ring_weights=self.ring_weights[part],
            totals=self.totals[part], live=self.live[part],
            window_rows=list(self.window_rows if window_rows is None else window_rows),
            num_rows=self.num_rows if num_rows is None else num_rows,
        )

    @property
    def capacity(self) -> int:
        """W, the most rows the ring holds."""
        return self.ring_slots.shape[-3]

    @property
    def max_window_rows(self) -> int:
        """The most rows any sequence sums now."""
        return max(self.window_rows, default=0)

    @property
    def max_len(self) -> int:
        """L, the most cache slots."""
        return self.totals.shape[-1] - 1

    def push(self, slots: Tensor, weights: Tensor, entry: Tensor) -> None:
        """Add one row: slots, weights, entry (..., B, Hsel, K<=Kr), one per layer of the
        record; entry False = padding. A decode row of a one-layer record on the CPU goes
        through `native.window_push` where it is built (float32 weights, contiguous), with
        the same ring row and sums as the torch ops."""
        if self.max_window_rows >= self.capacity:
            raise ValueError(f"ring of {self.capacity} rows is full: call trim (select) first")
        width = self.ring_slots.shape[-1]
        if slots.shape[-1] > width:
            raise ValueError(f"row has {slots.shape[-1]} entries, more than the ring's {width}")
        ring_idx = self.num_rows % self.capacity
        row_slots = self.ring_slots.select(-3, ring_idx)  # (..., B, Hsel, Kr) view
        row_weights = self.ring_weights.select(-3, ring_idx)
        if not native.window_push(weights, slots, entry, row_slots, row_weights, self.totals,
                                  self.live):  # the same ring row and sums, one pass
            row_slots.fill_(self.max_len)
            row_weights.zero_()
            row_slots[..., : slots.shape[-1]] = torch.where(entry, slots, self.max_len)
            row_weights[..., : slots.shape[-1]] = torch.where(entry, weights.float(), 0.0)
            self.totals.scatter_add_(-1, row_slots, row_weights.double())
            self.live.scatter_add_(-1, row_slots,
                                   torch.ones_like(row_slots, dtype=torch.int32))
        self.window_rows = [rows + 1 for rows in self.window_rows]
        self.num_rows += 1

    def push_rows(self, slots: Tensor, weights: Tensor, entry: Tensor) -> None:
        """``push`` of n rows at once, slots, weights, entry (B, Hsel, n, K<=Kr), oldest first,
        into a record of one layer: the same ring rows and the same sums, added in the same
        order (row by row, entry by entry along each sequence's and group's slots)."""
        batch, groups, num_new, num_entries = slots.shape
        if self.max_window_rows + num_new > self.capacity:
            raise ValueError(f"{num_new} rows do not fit a ring of {self.capacity} rows holding "
                             f"{self.max_window_rows}: call trim (select) first")
        width = self.ring_slots.shape[-1]
        if num_entries > width:
            raise ValueError(f"rows have {num_entries} entries, more than the ring's {width}")
        rows_slots = slots.new_full((batch, groups, num_new, width), self.max_len)
        rows_weights = torch.zeros(rows_slots.shape, device=rows_slots.device)
        rows_slots[..., :num_entries] = torch.where(entry, slots, self.max_len)
        rows_weights[..., :num_entries] = torch.where(entry, weights.float(), 0.0)
        ring_idx = (self.num_rows + torch.arange(num_new, device=slots.device)) % self.capacity
        self.ring_slots[:, ring_idx] = rows_slots.transpose(1, 2)  # (B, n, Hsel, Kr)
        self.ring_weights[:, ring_idx] = rows_weights.transpose(1, 2)
        flat_slots = rows_slots.view(batch, groups, num_new * width)  # row-major: push order
        self.totals.scatter_add_(-1, flat_slots,
                                 rows_weights.view(batch, groups, -1).double())
        self.live.scatter_add_(-1, flat_slots, torch.ones_like(flat_slots, dtype=torch.int32))
        self.window_rows = [rows + num_new for rows in self.window_rows]
        self.num_rows += num_new

    def trim(self, target: Tensor | list[int]) -> None:
        """Drop the oldest rows until each sequence sums at most ``target`` (B,) rows (in every
        layer of the record).

        Row counts live on the host, so a trim that drops nothing runs no tensor op; a list
        target (``StepBudget.half_rows``) needs no device sync either.
        """
        target = target.tolist() if isinstance(target, Tensor) else target
        leaving = [max(rows - keep, 0) for rows, keep in zip(self.window_rows, target,
                                                             strict=True)]
        zeroed = True
        for round_idx in range(max(leaving, default=0)):
            zeroed &= self._drop_oldest([count > round_idx for count in leaving])
        if any(leaving) and not zeroed:  # only a subtraction leaves residue; adds land on
            self.totals.masked_fill_(self.live == 0, 0.0)  # live slots

    def _drop_oldest(self, rows: list[bool]) -> bool:
        """Subtract each flagged sequence's oldest in-window row from ``totals`` and ``live``.
        True where `native.window_drop` did it, which also sets the totals of slots left with
        no live entry to 0 (the torch ops leave that to ``trim``)."""
        ring = [(self.num_rows - count) % self.capacity for count in self.window_rows]
        zeroed = native.window_drop(self.ring_slots, self.ring_weights, self.totals, self.live,
                                    [r if row else -1 for r, row in zip(ring, rows,
                                                                        strict=True)])
        if not zeroed:
            self._subtract_rows(ring, rows)
        self.window_rows = [count - flag for count, flag in zip(self.window_rows, rows,
                                                                strict=True)]
        return zeroed

    def _subtract_rows(self, ring: list[int], rows: list[bool]) -> None:
        """``_drop_oldest`` with torch's ops: ring row ``ring[b]`` of each flagged sequence."""
        if all(rows) and len(set(ring)) == 1:  # every sequence, one ring row: read views
            slots = self.ring_slots.select(-3, ring[0])  # (..., B, Hsel, Kr)
            weights = self.ring_weights.select(-3, ring[0])
            counts = torch.ones_like(slots, dtype=torch.int32)
        else:  # non-leaving sequences subtract zero weights and counts
            device = self.totals.device
            batch_idx = torch.arange(len(rows), device=device)
            ring_idx = torch.tensor(ring, device=device)
            flags = torch.tensor(rows, device=device)[:, None, None]  # (B, 1, 1)
            slots = self.ring_slots[..., batch_idx, ring_idx, :, :]  # (..., B, Hsel, Kr)
            weights = self.ring_weights[..., batch_idx, ring_idx, :, :] * flags
            counts = flags.int().expand_as(slots)
        self.totals.scatter_add_(-1, slots, -weights.double())
        self.live.scatter_add_(-1, slots, -counts)

    def scores(self, num_slots: int) -> Tensor:
        """(..., B, Hsel, S) float64 window sums of the first S slots."""
        return self.totals[..., :num_slots]

    def keep_rows(self, rows: Tensor) -> None:
        """Keep only the sequences ``rows`` (1-D long); every per-sequence tensor follows (as
        new tensors: views made by ``view`` before this no longer alias them)."""
        self.ring_slots = self.ring_slots.index_select(-4, rows)
        self.ring_weights = self.ring_weights.index_select(-4, rows)
        self.totals = self.totals.index_select(-3, rows)
        self.live = self.live.index_select(-3, rows)
        self.window_rows = [self.window_rows[row] for row in rows.tolist()]
        # num_rows is shared by every sequence


def top_entries(rows: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """A dense row's ``width`` largest weights as (slots, weights), each (..., min(S, width)),
    in slot order. Ties go to the lower slot. Used to store the dense prefill seed rows in the
    sparse ring, where a row's entries go to distinct slots, so their order changes no sum.

    The entries the first ``width`` of a stable descending sort would give, found without
    sorting: the row's width-th largest weight (an unsorted top-k), every weight above it,
    and the lowest slots among those equal to it (``StepBudget.select_top``'s rule), which
    took about three quarters of the stable sort's time on SWA's seed rows of a 1024-token
    prompt.
    """
    count = min(rows.shape[-1], width)
    cut = rows.topk(count, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)  # (..., 1)
    above, tied = rows > cut, rows == cut
    missing = count - above.sum(dim=-1, keepdim=True)
    chosen = above | (tied & (tied.cumsum(dim=-1) <= missing))  # exactly count per row
    slots = compact(chosen, count, rows.shape[-1])
    return slots, rows.gather(-1, slots)


@dataclass
class CumulativeScores:
    """H2O's score: attention summed over every row so far, for one layer."""

    totals: Tensor  # (B, Hsel, L + 1) float64: sum per slot; slot L absorbs padding entries

    @classmethod
    def create(cls, batch: int, num_groups: int, max_len: int, device: Device) -> CumulativeScores:
        """All-zero scores."""
        return cls(torch.zeros(batch, num_groups, max_len + 1, dtype=torch.float64, device=device))

    def add(self, slots: Tensor, weights: Tensor, entry: Tensor) -> None:
        """Add one sparse row: slots, weights, entry (B, Hsel, K)."""
        dummy = self.totals.shape[-1] - 1
        self.totals.scatter_add_(
            -1, torch.where(entry, slots, dummy), torch.where(entry, weights, 0.0).double()
        )

    def scores(self, num_slots: int) -> Tensor:
        """(B, Hsel, S) float64 sums of the first S slots."""
        return self.totals[..., :num_slots]

    def keep_rows(self, rows: Tensor) -> None:
        """Keep only the sequences ``rows`` (1-D long)."""
        self.totals = self.totals.index_select(0, rows)
