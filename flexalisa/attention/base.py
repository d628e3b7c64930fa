"""The sparsity-method interface and its per-run state; the contract is in ``methods.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from typing import ClassVar

import torch
from torch import Tensor

from flexalisa.attention.budget import caching_ratio, half_budget, split_budget, valid_positions
from flexalisa.attention.scores import CumulativeScores, Device, WindowScores
from flexalisa.attention.selection import Selection, StepBudget, mask_to_selection, recent_mask


@dataclass
class MethodState:
    """Per-run method state: one score record per layer (None for methods without scores).

    With ``stack`` (SWA), every layer's record is a view of one record with a layer axis, so
    a selection can be made for a run of layers at once: ``fresh`` holds the layers that
    observed a row since their last selection, and ``ahead`` the selections made for
    ``step`` ahead of their layer's ``select`` call (dropped when the step changes).
    """

    layers: list[WindowScores | CumulativeScores | None]  # indexed by layer_idx
    num_groups: int  # Hsel: 1, or Hkv with per_kv_head
    step: StepBudget | None = None  # the last step's shared budget, reused while valid is equal
    stack: WindowScores | None = None  # every layer's record (layer axis first); layers view it
    fresh: set[int] = field(default_factory=set)  # layers observed since their last selection
    ahead: dict[int, Selection] = field(default_factory=dict)  # layer -> selection for step

    def keep_rows(self, rows: Tensor) -> None:
        """Keep only the sequences ``rows`` (1-D long, in the new order) in every layer's record.

        For compacting a batch when sequences finish; selections of the kept rows are unchanged.
        """
        if self.stack is not None:  # new tensors: view them again, with each layer's counts
            self.stack.keep_rows(rows)
            kept = rows.tolist()
            self.layers = [self.stack.view(j, window_rows=[rec.window_rows[r] for r in kept],
                                           num_rows=rec.num_rows)
                           for j, rec in enumerate(self.layers)]
        else:
            for record in self.layers:
                if record is not None:
                    record.keep_rows(rows)
        self.step = None
        self.ahead.clear()

    def step_budget(self, valid: Tensor, ratio: Fraction) -> StepBudget:
        """The budget every layer of this step shares: rebuilt only when ``valid`` differs
        from the last call's (compared by value, so any caller gets its own valid's)."""
        last = self.step
        if last is not None and last.valid.shape == valid.shape and torch.equal(last.valid,
                                                                                 valid):
            return last
        self.ahead.clear()  # made for another step
        pos, num_valid = valid_positions(valid)
        num_local, num_global = split_budget(num_valid, ratio)
        local = recent_mask(pos, num_valid, num_local, valid)[:, None]  # (B, 1, S)
        self.step = StepBudget.build(valid, num_local, num_global, local,
                                     half_budget(num_valid, ratio))
        return self.step


@dataclass(frozen=True)
class SparsityMethod:
    """Base class: the budget, validation and the no-score defaults."""

    sparsity: float  # KV sparsity s in [0, 1): share of cached tokens a step does not read
    per_kv_head: bool = False  # score and select per KV head (score-based methods only)
    name: ClassVar[str] = ""  # registry name used by ``make_method``

    def __post_init__(self) -> None:
        caching_ratio(self.sparsity)  # raises ValueError outside [0, 1)

    @cached_property
    def ratio(self) -> Fraction:
        """Caching ratio r = 1 - s, exact."""
        return caching_ratio(self.sparsity)

    @property
    def needs_scores(self) -> bool:
        """Whether ``observe_prefill`` / ``observe`` read the attention weights."""
        return False

    def budget(self, num_valid: Tensor) -> tuple[Tensor, Tensor]:
        """(num_local, num_global), each (B,) long, for rows with ``num_valid`` tokens."""
        return split_budget(num_valid, self.ratio)

    def init_state(
        self, batch: int, num_layers: int, num_kv_heads: int, max_len: int, device: Device = None
    ) -> MethodState:
        """Fresh state for ``batch`` sequences of up to ``max_len`` cached tokens."""
        return MethodState(layers=[None] * num_layers, num_groups=1)

    def prefill_query_rows(self, state: MethodState, num_queries: int) -> int:
        """How many of the prompt's last query rows ``observe_prefill`` reads (1..num_queries).

        Callers compute the prefill's attention weights for those rows only and pass them as
        probs (B, Hq, n, S); every row by default.
        """
        return num_queries

    def observe_prefill(
        self, state: MethodState, layer_idx: int, probs: Tensor, valid: Tensor
    ) -> None:
        """Seed the scores from the prefill's softmax, probs (B, Hq, T, S): the weights of the
        last T query rows (T = ``prefill_query_rows``) over all S slots."""

    def observe(
        self, state: MethodState, layer_idx: int, probs: Tensor, sel: Selection | None
    ) -> None:
        """Record one decode step's softmax over the selection, probs (B, Hq, 1, K)."""

    def select(
        self,
        state: MethodState,
        layer_idx: int,
        valid: Tensor,
        q: Tensor | None = None,
        keys: Tensor | None = None,
    ) -> Selection | None:
        """The slots this decode step attends to; valid (B, S) bool.

        q (B, Hq, 1, D) and keys (B, Hkv, S, D), the step's queries and every cached key, are
        optional; only query-aware methods read them (others ignore them).
        """
        pos, num_valid = valid_positions(valid)
        return mask_to_selection(self._mask(pos, num_valid, valid)[:, None])  # (B, 1, S)

    def _mask(self, pos: Tensor, num_valid: Tensor, valid: Tensor) -> Tensor:
        """(B, S) bool selection for a position-only method."""
        raise NotImplementedError
