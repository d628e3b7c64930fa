"""Exact behaviour of each sparsity method on hand-made inputs."""

from __future__ import annotations

import pytest
import torch

from flexalisa.attention import (
    METHODS,
    Selection,
    gather_kv,
    make_method,
    partial_attention,
    partial_attention_probs,
)


def valid_mask(num_slots: int, pads: list[int]) -> torch.Tensor:
    """(B, S) with row b left-padded by pads[b] slots."""
    return torch.arange(num_slots)[None, :] >= torch.tensor(pads)[:, None]


def selected(sel: Selection) -> list[list[list[int]]]:
    """The real entries of a selection as nested lists [batch][head]."""
    return [
        [row[mask].tolist() for row, mask in zip(rows, masks, strict=True)]
        for rows, masks in zip(sel.indices, sel.mask, strict=True)
    ]


def select_once(name: str, sparsity: float, valid: torch.Tensor) -> Selection:
    method = make_method(name, sparsity)
    state = method.init_state(valid.shape[0], 1, 1, valid.shape[1])
    return method.select(state, 0, valid)


def test_dense_selects_none() -> None:
    assert select_once("dense", 0.9, valid_mask(8, [0])) is None


def test_local_is_the_newest_tokens_with_padding() -> None:
    sel = select_once("local", 0.5, valid_mask(8, [0, 3]))
    # row 0: n = 8, k = 2 -> 4 tokens; row 1: n = 5, k = round(1.25) = 1 -> 2 tokens
    assert selected(sel) == [[[4, 5, 6, 7]], [[6, 7]]]
    assert sel.indices.tolist() == [[[4, 5, 6, 7]], [[6, 7, 7, 7]]]  # padding repeats S-1
    assert sel.mask.tolist() == [[[True] * 4], [[True, True, False, False]]]


def test_sinks_keeps_four_first_tokens_plus_recent() -> None:
    sel = select_once("sinks", 0.5, valid_mask(16, [0, 3]))
    # row 0: total 8 = sinks 0..3 + newest 4; row 1: n = 13, total 6 = 4 sinks (slots 3..6) + 2
    assert selected(sel) == [[[0, 1, 2, 3, 12, 13, 14, 15]], [[3, 4, 5, 6, 14, 15]]]
    tiny = select_once("sinks", 0.8, valid_mask(10, [0]))  # total 2: one sink, the newest
    assert selected(tiny) == [[[0, 9]]]


def test_strided_spreads_the_global_budget_at_a_fixed_stride() -> None:
    sel = select_once("strided", 0.5, valid_mask(16, [0, 3]))
    # row 0: local 12..15, m = 12, g = 4 -> 0, 3, 6, 9
    # row 1: n = 13, local 3 (slots 13..15), m = 10, g = 3 -> positions 0, 3, 6 = slots 3, 6, 9
    assert selected(sel) == [[[0, 3, 6, 9, 12, 13, 14, 15]], [[3, 6, 9, 13, 14, 15]]]


def prefill_probs(rows: dict[tuple[int, int], dict[int, float]], heads: int, length: int):
    """(1, heads, length, length) with probs[0, h, t, s] = rows[(h, t)][s]; the rest 0."""
    probs = torch.zeros(1, heads, length, length)
    for (head, query), weights in rows.items():
        for slot, weight in weights.items():
            probs[0, head, query, slot] = weight
    return probs


# prompt of 7 tokens, 2 query heads, 1 KV head; the first decode step has n = 8, and at s = 0.5
# k = round(8 / 4) = 2: local = slots 6, 7 and 2 global tokens among slots 0..5
PROMPT_ROWS = {
    (0, 1): {0: 0.9, 1: 0.1},
    (1, 2): {0: 0.8, 5: 0.2},
    (0, 4): {0: 0.7, 3: 0.3},
    (0, 5): {2: 0.5, 4: 0.5},  # the last k = 2 rows: what SWA sees
    (1, 5): {4: 0.6, 5: 0.4},
    (1, 6): {2: 0.6, 6: 0.4},
}


def run_prefill(name: str, per_kv_head: bool = False, heads: int = 2, kv_heads: int = 1):
    method = make_method(name, 0.5, per_kv_head)
    state = method.init_state(1, 1, kv_heads, 12)
    probs = prefill_probs(PROMPT_ROWS, heads, 7)
    method.observe_prefill(state, 0, probs, valid_mask(7, [0]))
    return method, state


def test_swa_globals_come_from_the_last_k_rows_only() -> None:
    method, state = run_prefill("swa")
    sel = method.select(state, 0, valid_mask(8, [0]))
    # window sums: slot 2 = 0.5 + 0.6, slot 4 = 0.5 + 0.6, slot 5 = 0.4; slot 0 (heavy in the
    # older rows) is outside the window
    assert selected(sel) == [[[2, 4, 6, 7]]]
    scores = state.layers[0].scores(8)[0, 0]
    torch.testing.assert_close(scores[:6].float(), torch.tensor([0, 0, 1.1, 0, 1.1, 0.4]))


def test_swa_window_slides_and_new_rows_count() -> None:
    method, state = run_prefill("swa")
    sel = method.select(state, 0, valid_mask(8, [0]))  # slots 2, 4, 6, 7
    step = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.1, 0.0, 0.0, 0.9]])[None, :, None]
    method.observe(state, 0, step, sel)  # (1, Hq=2, 1, K=4): slot 2 +0.1, 6 +0.5, 7 +1.4
    sel = method.select(state, 0, valid_mask(9, [0]))
    # n = 9, k = round(2.25) = 2: window = prompt row 6 + the decode row; prompt row 5 expired
    scores = state.layers[0].scores(9)[0, 0].float()
    torch.testing.assert_close(scores, torch.tensor([0, 0, 0.7, 0, 0, 0, 0.9, 1.4, 0]))
    assert selected(sel) == [[[2, 6, 7, 8]]]  # local 7, 8; global: 6 (0.9), then 2 (0.7)


def test_h2o_uses_the_whole_history() -> None:
    method, state = run_prefill("h2o")
    sel = method.select(state, 0, valid_mask(8, [0]))
    # totals over all rows: slot 0 = 2.4, 2 = 1.1, 4 = 1.1, 5 = 0.6, 3 = 0.3, 1 = 0.1
    assert selected(sel) == [[[0, 2, 6, 7]]]  # 2 and 4 tie at 1.1: the lower slot wins


def test_ties_go_to_the_lower_slot() -> None:
    method = make_method("swa", 0.5)
    state = method.init_state(1, 1, 1, 12)
    flat = {(0, t): {s: 0.25 for s in range(4)} for t in range(7)}
    method.observe_prefill(state, 0, prefill_probs(flat, 1, 7), valid_mask(7, [0]))
    assert selected(method.select(state, 0, valid_mask(8, [0]))) == [[[0, 1, 6, 7]]]


def test_per_kv_head_scores_each_group_separately() -> None:
    # 4 query heads over 2 KV heads: heads 0, 1 -> KV 0; heads 2, 3 -> KV 1. Prompt of 3, the
    # decode step has n = 4: k = 1, local = slot 3, window = prompt row 2.
    rows = {(0, 2): {0: 0.3}, (1, 2): {0: 0.3}, (2, 2): {1: 0.4}, (3, 2): {1: 0.4}}
    for per_kv_head, expected in [(False, [[[1, 3]]]), (True, [[[0, 3], [1, 3]]])]:
        method = make_method("swa", 0.5, per_kv_head)
        state = method.init_state(1, 1, 2, 6)
        method.observe_prefill(state, 0, prefill_probs(rows, 4, 3), valid_mask(3, [0]))
        sel = method.select(state, 0, valid_mask(4, [0]))
        assert selected(sel) == expected
    # a per-KV-head step: each head's probs are over its own KV head's selection
    step = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.0, 1.0]])[None, :, None]
    method.observe(state, 0, step, sel)
    sums = state.layers[0].scores(4)[0].float()  # (Hkv, S)
    torch.testing.assert_close(sums[0], torch.tensor([0.6 + 1.4, 0, 0, 0.6]))
    torch.testing.assert_close(sums[1], torch.tensor([0, 0.8 + 0.2, 0, 1.8]))


@pytest.mark.parametrize("name", ["swa", "h2o"])
def test_scored_methods_skip_padding(name: str) -> None:
    method = make_method(name, 0.5)
    state = method.init_state(2, 1, 1, 12)
    probs = prefill_probs({(0, 6): {0: 0.5, 1: 0.2, 2: 0.1, 3: 0.2}}, 1, 7).repeat(2, 1, 1, 1)
    valid = valid_mask(7, [0, 2])  # row 1: slots 0, 1 are padding, its weights there are junk
    method.observe_prefill(state, 0, probs, valid)
    sel = method.select(state, 0, valid_mask(8, [0, 2]))
    # row 0: n = 8 -> local 6, 7 + global 0, 1 (0.2 ties 0.2 at 3: lower wins)
    # row 1: n = 6 -> k = round(1.5) = 2: local 6, 7 + global 3, 2 (never padding)
    assert selected(sel) == [[[0, 1, 6, 7]], [[2, 3, 6, 7]]]


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.95])
def test_budget_newest_and_validity(name: str, sparsity: float) -> None:
    method = make_method(name, sparsity, per_kv_head=True)
    valid = valid_mask(30, [0, 11, 29])
    state = method.init_state(3, 1, 2, 30)
    sel = method.select(state, 0, valid)
    if name == "dense":
        assert sel is None
        return
    local, glob = method.budget(valid.sum(-1))
    assert sel.counts.tolist() == [[c] * sel.num_heads for c in (local + glob).tolist()]
    for b, rows in enumerate(selected(sel)):
        for row in rows:
            assert row == sorted(set(row)) and 29 in row and valid[b, row].all()


@pytest.mark.parametrize("name", ["swa", "h2o"])
def test_zero_sparsity_attends_everything_and_equals_dense(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, dim, prompt, steps = 2, 4, 2, 8, 5, 6
    k = torch.randn(batch, kv_heads, prompt + steps, dim, generator=gen)
    v = torch.randn(batch, kv_heads, prompt + steps, dim, generator=gen)
    method = make_method(name, 0.0, per_kv_head=True)
    state = method.init_state(batch, 1, kv_heads, prompt + steps)
    assert not method.needs_scores
    for length in range(prompt + 1, prompt + steps + 1):
        valid = valid_mask(length, [0, 3])
        sel = method.select(state, 0, valid)
        q = torch.randn(batch, heads, 1, dim, generator=gen)
        k_sel, v_sel = gather_kv(k[:, :, :length], v[:, :, :length], sel.indices)
        out, _, probs = partial_attention_probs(q, k_sel, v_sel, sel.attention_mask)
        method.observe(state, 0, probs, sel)
        dense, _ = partial_attention(q, k[:, :, :length], v[:, :, :length], valid[:, None])
        torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
        assert selected(sel) == [[list(range(length))], [list(range(3, length))]]  # Hsel = 1


def test_observe_rejects_probs_of_the_wrong_width() -> None:
    method, state = run_prefill("swa")
    sel = method.select(state, 0, valid_mask(8, [0]))
    with pytest.raises(ValueError, match="probs must be"):
        method.observe(state, 0, torch.zeros(1, 2, 1, 3), sel)


@pytest.mark.parametrize("name,sparsity,expect_fewer", [("swa", 0.8, True), ("swa", 0.5, True),
                                                        ("h2o", 0.8, False)])
def test_prefill_rows_read_seed_what_every_row_seeds(name: str, sparsity: float,
                                                     expect_fewer: bool) -> None:
    """Callers pass only the last `prefill_query_rows` query rows of the prompt's softmax;
    the method must end up with the same scores and selections as when given every row."""
    torch.manual_seed(0)
    batch, heads, length, max_len = 2, 4, 40, 43  # max_len: the window is as long as it gets
    valid = valid_mask(length, [0, 9])
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = causal[None] & valid[:, None, :] & valid[:, :, None]
    scores = torch.randn(batch, heads, length, length).masked_fill(~mask[:, None], -torch.inf)
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    method = make_method(name, sparsity)
    full, part = (method.init_state(batch, 1, 2, max_len) for _ in range(2))
    rows = method.prefill_query_rows(part, length)
    assert 1 <= rows <= length and (rows < length) == expect_fewer
    method.observe_prefill(full, 0, probs, valid)
    method.observe_prefill(part, 0, probs[:, :, -rows:].contiguous(), valid)
    for step in range(3):
        grown = valid_mask(length + 1 + step, [0, 9])
        sel_full, sel_part = (method.select(s, 0, grown) for s in (full, part))
        assert selected(sel_full) == selected(sel_part)
        for state, sel in ((full, sel_full), (part, sel_part)):
            width = sel.indices.shape[-1]
            method.observe(state, 0, torch.full((batch, heads, 1, width), 1.0 / width), sel)
