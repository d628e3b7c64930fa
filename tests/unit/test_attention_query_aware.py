"""SWA's query-aware (SparQ) global selection, pinned on hand-made queries and keys."""

from __future__ import annotations

import math

import pytest
import torch

from flexalisa.attention import Selection, attention_probs, make_method
from flexalisa.attention.query_aware import approx_scores, top_channels


def selected(sel: Selection) -> list[list[list[int]]]:
    """The real entries of a selection as nested lists [batch][head]."""
    return [[row[m].tolist() for row, m in zip(rows, ms)]
            for rows, ms in zip(sel.indices, sel.mask)]


# One KV head, one query head, D = 4. The query's largest channel is 2 (|5|); channel 3 is
# small (0.1) but K's channel 3 is huge on slot 0, so the *exact* attention favours slot 0 while
# the r = 1 estimate ranks by channel 2 alone: slot 3 (2.0) > slot 1 (1.0) > slot 5 ... .
Q = torch.tensor([0.0, 0.0, 5.0, 0.1]).view(1, 1, 1, 4)  # (B, Hq, 1, D)
K_CH2 = [0.0, 1.0, -1.0, 2.0, -2.0, 0.5, 0.0, 0.0]  # channel 2 of slots 0..7
K = torch.zeros(1, 1, 8, 4)
K[0, 0, :, 2] = torch.tensor(K_CH2)
K[0, 0, 0, 3] = 100.0  # exact score of slot 0: 0.1 * 100 = 10 > 5 * 2


def test_top_channels_breaks_ties_toward_lower_channel() -> None:
    assert top_channels(torch.tensor([1.0, 3.0, 3.0, 0.5]), 2).tolist() == [1, 2]
    assert top_channels(torch.tensor([1.0, 2.0]), 5).tolist() == [1, 0]  # r > D: all of them


def test_approx_scores_use_only_the_top_channels_with_sparq_temperature() -> None:
    valid = torch.ones(1, 8, dtype=torch.bool)
    scores = approx_scores(Q, K, valid, num_channels=1, num_groups=1)  # (1, 1, 8)
    share = 5.0 / 5.1  # ||q[C]||_1 / ||q||_1
    logits = torch.tensor(K_CH2, dtype=torch.float64) * 5.0 / math.sqrt(4 * share)
    assert torch.allclose(scores[0, 0], torch.softmax(logits, -1), atol=1e-6)
    exact = approx_scores(Q, K, valid, num_channels=4, num_groups=1)  # r = D: exact softmax
    assert torch.allclose(exact[0, 0].float(), attention_probs(Q, K)[0, 0, 0], atol=1e-6)


def test_approx_scores_ignore_invalid_slots() -> None:
    valid = torch.ones(1, 8, dtype=torch.bool)
    valid[0, 3] = False
    scores = approx_scores(Q, K, valid, num_channels=1, num_groups=1)
    assert scores[0, 0, 3] == 0.0 and math.isclose(float(scores.sum()), 1.0, rel_tol=1e-6)


def fresh_swa(sparsity: float, query_channels: int, per_kv_head: bool = False, kv_heads=1):
    method = make_method("swa", sparsity, per_kv_head, query_channels=query_channels)
    state = method.init_state(1, 1, kv_heads, 8)
    # seed the history so that the paper's form prefers slots 0 and 2
    probs = torch.zeros(1, kv_heads, 4, 4)
    probs[0, :, 3, 0], probs[0, :, 3, 2] = 0.6, 0.4
    method.observe_prefill(state, 0, probs, torch.ones(1, 4, dtype=torch.bool))
    return method, state


def test_swa_query_aware_picks_global_tokens_by_the_estimate() -> None:
    # n = 8, s = 0.5: k = 2 -> local = slots 6, 7; global = 2 of slots 0..5
    valid = torch.ones(1, 8, dtype=torch.bool)
    method, state = fresh_swa(0.5, query_channels=1)
    sel = method.select(state, 0, valid, q=Q, keys=K)
    assert selected(sel) == [[[1, 3, 6, 7]]]  # channel 2: slot 3 (2.0), slot 1 (1.0)
    exact_method, exact_state = fresh_swa(0.5, query_channels=4)
    exact = exact_method.select(exact_state, 0, valid, q=Q, keys=K)
    assert selected(exact) == [[[0, 3, 6, 7]]]  # all channels: slot 0's 0.1 * 100 wins


def test_swa_query_aware_without_query_falls_back_to_the_paper_form() -> None:
    valid = torch.ones(1, 8, dtype=torch.bool)
    method, state = fresh_swa(0.5, query_channels=1)
    paper, paper_state = fresh_swa(0.5, query_channels=0)
    assert selected(method.select(state, 0, valid)) == [[[0, 2, 6, 7]]]  # history: 0, 2
    assert selected(paper.select(paper_state, 0, valid, q=Q, keys=K)) == [[[0, 2, 6, 7]]]


def test_swa_query_aware_per_kv_head_selects_per_head() -> None:
    # two KV heads, one query head each; head 1's keys are head 0's reversed on slots 0..5
    keys = torch.cat([K, K.clone()], dim=1)  # (1, 2, 8, 4)
    keys[0, 1, :6, 2] = torch.tensor(K_CH2[:6]).flip(0)  # channel 2: 0.5,-2,2,-1,1,0
    q = torch.cat([Q, Q], dim=1)  # (1, 2, 1, 4)
    valid = torch.ones(1, 8, dtype=torch.bool)
    method, state = fresh_swa(0.5, query_channels=1, per_kv_head=True, kv_heads=2)
    sel = method.select(state, 0, valid, q=q, keys=keys)
    assert selected(sel) == [[[1, 3, 6, 7], [2, 4, 6, 7]]]
    shared, shared_state = fresh_swa(0.5, query_channels=1, per_kv_head=False, kv_heads=2)
    scores = approx_scores(q, keys, valid, 1, 1)
    per_head = approx_scores(q, keys, valid, 1, 2)
    assert torch.allclose(scores, per_head.sum(dim=1, keepdim=True))
    assert shared.select(shared_state, 0, valid, q=q, keys=keys).num_heads == 1


def test_grouped_query_heads_share_their_kv_heads_channels() -> None:
    # 4 query heads over 2 KV heads: channel choice sums |q| over each group's 2 heads
    q = torch.zeros(1, 4, 1, 4)
    q[0, 0, 0, 0], q[0, 1, 0, 1] = 3.0, 2.0  # group 0: channel 0 (3) beats channel 1 (2)
    q[0, 1, 0, 0] = 0.5  # group 0 channel 0 total 3.5
    keys = torch.randn(1, 2, 6, 4)
    valid = torch.ones(1, 6, dtype=torch.bool)
    scores = approx_scores(q, keys, valid, num_channels=1, num_groups=2)  # (1, 2, 6)
    qg = q.view(1, 2, 2, 4)[0, 0, :, :1]  # group 0's heads on channel 0: (2, 1)
    share = qg.abs().sum(-1, keepdim=True) / q.view(1, 2, 2, 4)[0, 0].abs().sum(-1, keepdim=True)
    logits = qg @ keys[0, 0, :, :1].T / torch.sqrt(4 * share)  # (2, 6)
    assert torch.allclose(scores[0, 0].float(), torch.softmax(logits, -1).sum(0), atol=1e-6)


def test_query_channels_are_validated() -> None:
    with pytest.raises(ValueError, match="query_channels -1"):
        make_method("swa", 0.5, query_channels=-1)
    with pytest.raises(ValueError, match="swa only"):
        make_method("h2o", 0.5, query_channels=8)
    assert make_method("local", 0.5, query_channels=0).name == "local"
