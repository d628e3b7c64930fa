"""Sampling: top-k and top-p restrict the draw as HF's warpers do; rows with their own params
draw as they would in a batch of their own."""

from __future__ import annotations

import pytest
import torch

from flexalisa.sampling import GREEDY, RowSampler, SamplingParams, per_row, sample


def draws(logits: torch.Tensor, params: SamplingParams, times: int) -> torch.Tensor:
    """(times, B) tokens drawn from logits (B, V), each draw with fresh per-row generators."""
    rows = logits.shape[0]
    return torch.stack([RowSampler([params] * rows, [f"{t}:{r}" for r in range(rows)])
                        .sample(logits) for t in range(times)])


def test_top_k_draws_only_among_the_k_most_likely():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    picks = draws(logits, SamplingParams(temperature=2.0, top_k=3), 60)
    allowed = logits.topk(3, dim=-1).indices  # (B, 3)
    for row in range(logits.shape[0]):
        assert set(picks[:, row].tolist()) <= set(allowed[row].tolist())
    # without top-k, the same hot temperature strays well outside the top 3
    free = draws(logits, SamplingParams(temperature=2.0), 60)
    assert any(t not in allowed[r].tolist() for r in range(6) for t in free[:, r].tolist())


def test_top_k_one_is_greedy_and_ties_at_the_kth_stay():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(1))
    assert torch.equal(draws(logits, SamplingParams(temperature=1.0, top_k=1), 5)[0],
                       logits.argmax(dim=-1))
    tied = torch.tensor([[3.0, 1.0, 1.0, 1.0, -5.0]])  # k = 2 keeps every token tied with the 2nd
    picks = draws(tied, SamplingParams(temperature=1.0, top_k=2, seed=3), 200)
    assert set(picks.flatten().tolist()) == {0, 1, 2, 3}


def test_top_p_keeps_the_smallest_set_with_that_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    picks = draws(logits, SamplingParams(temperature=1.0, top_p=0.75), 200)
    assert set(picks.flatten().tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.75


def test_mixed_rows_draw_as_in_batches_of_their_own():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(2))
    hot, warm = SamplingParams(1.5, 0.9, 7), SamplingParams(0.8, 1.0, 1, top_k=5)
    params, keys = [hot, GREEDY, warm, hot], ["a", "b", "c", "d"]
    mixed = RowSampler(params, keys).sample(logits)
    assert mixed[1] == logits[1].argmax()
    for p in (hot, warm):
        rows = [i for i, q in enumerate(params) if q == p]
        alone = RowSampler([p] * len(rows), [keys[i] for i in rows]).sample(logits[rows])
        assert mixed[rows].tolist() == alone.tolist()
    # a subset of rows, in the engine's order of still-active rows
    subset = RowSampler(params, keys).sample(logits[[2, 3]], [2, 3])
    assert subset.tolist() == mixed[[2, 3]].tolist()


def test_params_are_checked():
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-1)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=2.5)
    with pytest.raises(ValueError, match=r"one per prompt \(3\), got 2"):
        per_row([GREEDY, GREEDY], 3)
    with pytest.raises(ValueError, match="items must be SamplingParams"):
        per_row([GREEDY, {"temperature": 1.0}], 2)
    assert per_row(None, 2) == [GREEDY, GREEDY]
    assert torch.equal(sample(torch.tensor([[0.0, 2.0, 1.0]]), GREEDY, None), torch.tensor([1]))
