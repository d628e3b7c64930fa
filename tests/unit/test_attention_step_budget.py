"""The per-step budget (``StepBudget``) against the per-layer mask construction it replaced.

``StepBudget.select_top`` must equal ``mask_to_selection(local | top_scoring(...))`` exactly:
the same slots in the same ascending order, the same padding, the same tie rule (lower slot
wins), for any valid pattern (padding anywhere, not only on the left) and per-KV-head scores.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from flexalisa.attention import make_method
from flexalisa.attention.budget import caching_ratio, split_budget, valid_positions
from flexalisa.attention.selection import mask_to_selection, recent_mask

FAST = settings(max_examples=150, deadline=None)


def top_scoring(scores: Tensor, candidates: Tensor, count: Tensor) -> Tensor:
    """(B, H, S) bool: per row, the ``count`` (B,) candidates with the highest score (the
    library's per-layer construction before ``StepBudget``, kept here as the reference).

    scores: (B, H, S) float; candidates: (B, H|1, S) bool. Ties go to the lower slot (stable
    sort). Callers guarantee count <= number of candidates.
    """
    keyed = scores.masked_fill(~candidates, -math.inf)  # (B, H, S)
    order = torch.sort(keyed, dim=-1, descending=True, stable=True).indices  # (B, H, S)
    take = torch.arange(scores.shape[-1], device=scores.device) < count[:, None, None]
    return torch.zeros_like(keyed, dtype=torch.bool).scatter(-1, order, take.expand_as(order))


def reference(valid: torch.Tensor, scores: torch.Tensor, sparsity: float):
    """The selection built per layer from masks: two sorts, as before StepBudget."""
    pos, num_valid = valid_positions(valid)
    num_local, num_global = split_budget(num_valid, caching_ratio(sparsity))
    local = recent_mask(pos, num_valid, num_local, valid)[:, None]
    glob = top_scoring(scores, valid[:, None] & ~local, num_global)
    return mask_to_selection(local | glob)


@st.composite
def cases(draw):
    batch, heads = draw(st.integers(1, 4)), draw(st.sampled_from([1, 3]))
    num_slots = draw(st.integers(1, 40))
    valid = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=num_slots,
                                                max_size=num_slots),
                                       min_size=batch, max_size=batch)))
    valid[:, -1] = True  # the step's own token
    # few distinct values, so ties at the cut are common
    levels = draw(st.lists(st.integers(0, 3), min_size=batch * heads * num_slots,
                           max_size=batch * heads * num_slots))
    scores = torch.tensor(levels, dtype=torch.float64).view(batch, heads, num_slots) / 4
    sparsity = draw(st.sampled_from([0.3, 0.5, 0.8, 0.9]))
    return valid, scores, sparsity


@FAST
@given(cases())
def test_select_top_equals_the_mask_construction(case) -> None:
    valid, scores, sparsity = case
    method = make_method("swa", sparsity)
    state = method.init_state(valid.shape[0], 1, scores.shape[1], valid.shape[1])
    got = state.step_budget(valid, method.ratio).select_top(scores)
    want = reference(valid, scores, sparsity)
    assert torch.equal(got.mask, want.mask.expand_as(got.mask))
    assert torch.equal(got.indices, want.indices.expand_as(got.indices))


def test_the_budget_is_rebuilt_when_valid_changes_in_place() -> None:
    """The state keys its budget by valid's values: a caller that edits one tensor in place
    (or reuses its memory) between steps still gets its new valid's budget."""
    method = make_method("swa", 0.5)
    state = method.init_state(2, 1, 1, 12)
    valid = torch.ones(2, 12, dtype=torch.bool)
    first = state.step_budget(valid, method.ratio)
    assert state.step_budget(valid.clone(), method.ratio) is first  # equal values: reused
    valid[0, :6] = False  # in place: same storage, new values
    again = state.step_budget(valid, method.ratio)
    assert again is not first
    fresh = method.init_state(2, 1, 1, 12).step_budget(valid, method.ratio)
    assert torch.equal(again.entry, fresh.entry) and torch.equal(again.local, fresh.local)
    assert again.entry[0].sum() < again.entry[1].sum()  # the padded row attends fewer
