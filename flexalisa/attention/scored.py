"""Methods that select by attention scores: H2O and SWA (ALISA); see ``methods.py``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flexalisa.attention.base import MethodState, SparsityMethod
from flexalisa.attention.budget import half_budget
from flexalisa.attention.query_aware import approx_scores
from flexalisa.attention.scores import (
    CumulativeScores,
    Device,
    WindowScores,
    head_sum,
    prefill_rows,
    top_entries,
)
from flexalisa.attention.selection import Selection, StepBudget, mask_to_selection

ScoreRecord = WindowScores | CumulativeScores  # one layer's score bookkeeping


@dataclass(frozen=True)
class _ScoredMethod(SparsityMethod):
    """Local window + the top-scoring older tokens; subclasses define the score record."""

    @property
    def needs_scores(self) -> bool:
        return self.sparsity > 0  # at s = 0 the budget covers every token

    def _groups(self, num_kv_heads: int) -> int:
        return num_kv_heads if self.per_kv_head else 1

    def _scores(self, record: ScoreRecord, step: StepBudget, num_slots: int) -> Tensor:
        """(B, Hsel, S) scores for choosing the global tokens."""
        raise NotImplementedError

    def select(
        self,
        state: MethodState,
        layer_idx: int,
        valid: Tensor,
        q: Tensor | None = None,
        keys: Tensor | None = None,
    ) -> Selection | None:
        step = state.step_budget(valid, self.ratio)  # shared by every layer of the step
        record = state.layers[layer_idx]
        if record is None:  # no scores kept: the budget covers everything (s = 0)
            return mask_to_selection(step.local | valid[:, None])
        query_aware = q is not None and keys is not None and self._reads_query
        if not query_aware:
            made = state.ahead.pop(layer_idx, None)
            if made is not None:  # made with an earlier layer's, for this step
                return made
            if state.stack is not None and layer_idx in state.fresh:
                return self._select_run(state, layer_idx, step, valid.shape[-1])
        state.fresh.discard(layer_idx)
        scores = self._scores(record, step, valid.shape[-1])  # (B, Hsel, S)
        if query_aware:
            scores = self._query_scores(q, keys, valid, state.num_groups, scores)
        return step.select_top(scores)

    def _select_run(self, state: MethodState, layer_idx: int, step: StepBudget,
                    num_slots: int) -> Selection:
        """Layer ``layer_idx``'s selection, made together with those of the layers after it
        that are in the same position: observed since their last selection, with the same row
        counts (every layer pushes and trims the same rows, so after one step's observations
        they agree). Their windows are trimmed and scored as one record with a layer axis,
        which runs the same sums as one layer at a time; their selections wait in
        ``state.ahead``. A caller that selects layer by layer right after each observation
        (the offloading runner's first layer) gets runs of one."""
        first = state.layers[layer_idx]
        stop = layer_idx + 1
        while (stop < len(state.layers) and stop in state.fresh
               and state.layers[stop].num_rows == first.num_rows
               and state.layers[stop].window_rows == first.window_rows):
            stop += 1
        run = state.stack.view(layer_idx, stop, first.window_rows, first.num_rows)
        sel = step.select_top(self._scores(run, step, num_slots))  # (N, B, Hsel, K) tensors
        for j in range(layer_idx, stop):
            record = state.layers[j]
            record.window_rows, record.num_rows = list(run.window_rows), run.num_rows
            state.fresh.discard(j)
            if j > layer_idx:
                state.ahead[j] = Selection(indices=sel.indices[j - layer_idx],
                                           mask=sel.mask[j - layer_idx])
        return Selection(indices=sel.indices[0], mask=sel.mask[0])

    @property
    def _reads_query(self) -> bool:
        """Whether ``select`` uses the step's q and keys when given them."""
        return False

    def _query_scores(
        self, q: Tensor, keys: Tensor, valid: Tensor, num_groups: int, history: Tensor
    ) -> Tensor:
        """Scores when the step's query and keys are given; the history's by default."""
        return history

    def observe(
        self, state: MethodState, layer_idx: int, probs: Tensor, sel: Selection | None
    ) -> None:
        record = state.layers[layer_idx]
        if record is None or sel is None:
            return
        if probs.shape[2] != 1 or probs.shape[-1] != sel.indices.shape[-1]:
            raise ValueError(
                f"probs must be (B, Hq, 1, K={sel.indices.shape[-1]}), got {tuple(probs.shape)}"
            )
        weights = head_sum(probs.float(), state.num_groups)[:, :, 0]  # (B, Hsel, K)
        slots = sel.indices.expand(-1, state.num_groups, -1)  # (B, Hsel, K)
        entry = sel.mask.expand(-1, state.num_groups, -1)
        self._record(record, slots, weights, entry)
        state.fresh.add(layer_idx)

    def _record(self, record: ScoreRecord, slots: Tensor, weights: Tensor, entry: Tensor) -> None:
        """Add one decode row, slots/weights/entry (B, Hsel, K)."""
        raise NotImplementedError


class H2O(_ScoredMethod):
    """Heavy hitters: attention summed over the whole history, plus the newest tokens."""

    name = "h2o"

    def init_state(
        self, batch: int, num_layers: int, num_kv_heads: int, max_len: int, device: Device = None
    ) -> MethodState:
        groups = self._groups(num_kv_heads)
        if not self.needs_scores:
            return MethodState(layers=[None] * num_layers, num_groups=groups)
        layers = [
            CumulativeScores.create(batch, groups, max_len, device) for _ in range(num_layers)
        ]
        return MethodState(layers=layers, num_groups=groups)

    def observe_prefill(
        self, state: MethodState, layer_idx: int, probs: Tensor, valid: Tensor
    ) -> None:
        record = state.layers[layer_idx]
        if record is not None:
            rows = prefill_rows(probs, valid, state.num_groups)  # (B, Hsel, T, S)
            record.totals[..., : valid.shape[-1]] += rows.double().sum(dim=2)

    def _scores(self, record: ScoreRecord, step: StepBudget, num_slots: int) -> Tensor:
        return record.scores(num_slots)

    def _record(self, record: ScoreRecord, slots: Tensor, weights: Tensor, entry: Tensor) -> None:
        record.add(slots, weights, entry)


@dataclass(frozen=True)
class SWA(_ScoredMethod):
    """ALISA's Sparse Window Attention (Algorithm 1), see ``methods.py``.

    ``query_channels = r > 0`` switches on the query-aware global selection (``query_aware.py``,
    SparQ, Ribar et al., ICML 2024): when ``select`` is given the step's ``q`` and ``keys``, the
    global tokens are the top-k by SparQ's r-channel estimate of *this* step's attention instead
    of the windowed history. The local window is unchanged. Without q/keys (a caller that does
    not pass them) it falls back to the paper's windowed history, which it keeps up to date, so
    either call is valid at every step. r = 0 (the default) is the paper's form.
    """

    query_channels: int = 0  # r: query channels for the SparQ estimate; 0 = paper's form

    name = "swa"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.query_channels < 0:
            raise ValueError(f"query_channels {self.query_channels!r} must be >= 0 (0 = off)")

    @property
    def _reads_query(self) -> bool:
        return self.query_channels > 0

    def _query_scores(
        self, q: Tensor, keys: Tensor, valid: Tensor, num_groups: int, history: Tensor
    ) -> Tensor:
        if self.query_channels == 0:
            return history
        return approx_scores(q, keys, valid, self.query_channels, num_groups)  # (B, Hsel, S)

    def init_state(
        self, batch: int, num_layers: int, num_kv_heads: int, max_len: int, device: Device = None
    ) -> MethodState:
        groups = self._groups(num_kv_heads)
        if not self.needs_scores:
            return MethodState(layers=[None] * num_layers, num_groups=groups)
        longest = torch.tensor([max_len])
        capacity = int(half_budget(longest, self.ratio)) + 1  # the window plus the row pushed
        width = int(sum(self.budget(longest)))  # the largest per-step selection
        stack = WindowScores.create(batch, groups, max_len, capacity, width, device,
                                    num_layers=num_layers)
        layers: list[WindowScores | None] = [stack.view(j) for j in range(num_layers)]
        return MethodState(layers=layers, num_groups=groups, stack=stack)

    def prefill_query_rows(self, state: MethodState, num_queries: int) -> int:
        """Only the last window's rows seed the scores: at most capacity - 1 of them."""
        record = state.layers[0] if state.layers else None
        if record is None:
            return num_queries
        return max(1, min(num_queries, record.capacity - 1))

    def observe_prefill(
        self, state: MethodState, layer_idx: int, probs: Tensor, valid: Tensor
    ) -> None:
        record = state.layers[layer_idx]
        if record is None:
            return
        state.fresh.add(layer_idx)
        rows = prefill_rows(probs, valid, state.num_groups)  # (B, Hsel, T, S)
        num_q = rows.shape[2]
        num_seed = min(num_q, record.capacity - 1)  # never more than the longest window
        keyed = rows.masked_fill(~valid[:, None, None, :], -1.0)  # padding keys sort last
        width = record.ring_slots.shape[-1]
        if record.max_window_rows + num_seed <= record.capacity - 1:  # room: no trim between
            first = num_q - num_seed
            slots, weights = top_entries(keyed[:, :, first:], width)  # (B, Hsel, n, <=Kr)
            query_valid = valid[:, valid.shape[-1] - num_seed:][:, None, :, None]  # (B,1,n,1)
            record.push_rows(slots, weights, (weights >= 0) & query_valid)
            return
        keep = [max(record.capacity - 2, 0)] * len(record.window_rows)
        for row_idx in range(num_q - num_seed, num_q):  # oldest first
            if record.max_window_rows >= record.capacity - 1:  # a repeated (chunked) prefill
                record.trim(keep)
            slots, weights = top_entries(keyed[:, :, row_idx], width)  # (B, Hsel, <=Kr)
            query_valid = valid[:, -num_q + row_idx][:, None, None]  # (B, 1, 1)
            record.push(slots, weights, (weights >= 0) & query_valid)

    def _scores(self, record: ScoreRecord, step: StepBudget, num_slots: int) -> Tensor:
        record.trim(step.half_rows)  # the last k rows
        return record.scores(num_slots)

    def _record(self, record: ScoreRecord, slots: Tensor, weights: Tensor, entry: Tensor) -> None:
        record.push(slots, weights, entry)
