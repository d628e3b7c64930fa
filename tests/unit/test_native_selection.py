"""SWA's compiled selection and score bookkeeping (`csrc/swa_select.c`: `native.select_top`,
`window_push`, `window_drop`) against the torch path they replace: the same selections, and
the same ring, totals and live counts bit for bit, on random weights and on ties."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexalisa.attention import make_method, native
from tests.unit import test_attention_scores as score_tests


@contextmanager
def torch_only():
    """Every native entry point declines (as without a compiler) inside the block."""
    saved = native._build
    native._build = lambda: (None, "off for the test")
    try:
        yield
    finally:
        native._build = saved


@pytest.fixture(autouse=True)
def needs_kernel():
    if not native.status().available:
        pytest.skip(native.status().reason)


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_select_top_equals_the_torch_path(data) -> None:
    """Any leading layer axis, one or per-KV-head score rows, padding anywhere, rows of
    every size (num_global 0 included), few distinct scores (ties at the cut) or random."""
    num_layers, batch = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4))
    heads, num_slots = data.draw(st.sampled_from([1, 3])), data.draw(st.integers(1, 60))
    valid = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=num_slots,
                                                     max_size=num_slots),
                                            min_size=batch, max_size=batch)))
    valid[:, -1] = True
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    if data.draw(st.booleans()):
        scores = torch.randint(0, 4, (num_layers, batch, heads, num_slots + 3),
                               generator=gen).double() / 4
    else:
        scores = torch.rand(num_layers, batch, heads, num_slots + 3, generator=gen,
                            dtype=torch.float64)
    scores = scores[..., :num_slots]  # rows evenly spaced, not contiguous
    method = make_method("swa", data.draw(st.sampled_from([0.1, 0.5, 0.8, 0.95])))
    budget = method.init_state(batch, 1, heads, num_slots).step_budget(valid, method.ratio)
    got = budget.select_top(scores)
    with torch_only():
        want = budget.select_top(scores)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.mask, want.mask)
    if budget.max_global:  # the kernel ran: select_top returned its tensor
        assert native.select_top(scores, budget.local, budget.candidates, budget.num_global,
                                 budget.width) is not None


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_swa_bookkeeping_equals_the_torch_path_bit_for_bit(data) -> None:
    """A whole SWA run over several layers (selections for runs of layers, pushes, trims
    dropping rows, padded rows) with the compiled passes and with torch's ops: the same
    selections every step, and the same ring, float64 totals and live counts."""
    batch, kv_heads = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    group, num_layers = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    prompt, steps = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 30))
    method = make_method("swa", data.draw(st.sampled_from([0.3, 0.5, 0.8])),
                         data.draw(st.booleans()))
    pads = [data.draw(st.integers(0, prompt - 1)) for _ in range(batch)]
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    max_len = prompt + steps
    valid = torch.arange(max_len)[None, :] >= torch.tensor(pads)[:, None]
    state = method.init_state(batch, num_layers, kv_heads, max_len)
    prefill = torch.rand(batch, kv_heads * group, prompt, prompt, generator=gen)
    for layer in range(num_layers):
        method.observe_prefill(state, layer, prefill, valid[:, :prompt])
    twin = copy.deepcopy(state)
    for length in range(prompt + 1, max_len + 1):
        for layer in range(num_layers):
            sel = method.select(state, layer, valid[:, :length])
            with torch_only():
                sel_twin = method.select(twin, layer, valid[:, :length])
            assert torch.equal(sel.indices, sel_twin.indices)
            assert torch.equal(sel.mask, sel_twin.mask)
            probs = torch.rand(batch, kv_heads * group, 1, sel.indices.shape[-1], generator=gen)
            method.observe(state, layer, probs, sel)
            with torch_only():
                method.observe(twin, layer, probs, sel_twin)
    for name in ("ring_slots", "ring_weights", "totals", "live"):
        assert torch.equal(getattr(state.stack, name), getattr(twin.stack, name)), name
    assert [r.window_rows for r in state.layers] == [r.window_rows for r in twin.layers]


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_the_torch_path_still_equals_the_naive_reference(data) -> None:
    """tests/unit/test_attention_scores.py checks the compiled path against its naive
    reference; this runs the same check with torch's ops."""
    with torch_only():
        score_tests.run_against_reference(data, quantized=data.draw(st.booleans()))


def test_a_selected_slot_outside_the_window_is_refused() -> None:
    method = make_method("swa", 0.5)
    state = method.init_state(2, 1, 1, 10)
    valid = torch.ones(2, 6, dtype=torch.bool)
    sel = method.select(state, 0, valid)
    record = state.layers[0]
    bad = sel.indices.clone()
    bad[1, 0, 0] = 11  # slots run 0..10 (10 = the dummy)
    weights = torch.rand(2, 1, bad.shape[-1])
    with pytest.raises(IndexError, match="outside"):
        native.window_push(weights, bad, sel.mask, record.ring_slots[:, 0],
                           record.ring_weights[:, 0], record.totals, record.live)
    assert record.live.sum() == 0 and record.totals.abs().sum() == 0  # nothing written


def test_select_top_refuses_more_globals_than_candidates() -> None:
    scores = torch.rand(1, 1, 5, dtype=torch.float64)
    local = torch.zeros(1, 1, 5, dtype=torch.bool)
    candidates = torch.tensor([[[True, True, False, False, False]]])
    with pytest.raises(ValueError, match="more global tokens than"):
        native.select_top(scores, local, candidates, torch.tensor([[[3]]]), 3)


def test_the_torch_trim_also_returns_expired_slots_to_exact_zero() -> None:
    """tests/unit/test_attention_scores.py's exact-zero check runs the compiled trim; this
    runs it with torch's ops."""
    with torch_only():
        score_tests.test_expired_slots_return_to_exact_zero()


@pytest.mark.parametrize("num_slots", [700, 1500, 5000])
@pytest.mark.parametrize("levels", [0, 3, 50])
@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_select_top_on_long_rows_equals_the_torch_path(num_slots: int, levels: int,
                                                       sparsity: float) -> None:
    """Rows of more than 600 candidates take the select's sampling step (the hypothesis test
    above stays below it): random scores (levels 0), or few distinct values, so that the cut
    falls inside a long run of ties."""
    gen = torch.Generator().manual_seed(num_slots + levels)
    shape = (2, 3, 1, num_slots)  # layers, batch, heads, slots
    scores = (torch.rand(*shape, generator=gen, dtype=torch.float64) if not levels else
              torch.randint(0, levels, shape, generator=gen).double())
    valid = torch.ones(3, num_slots, dtype=torch.bool)
    valid[1, :num_slots // 3] = False  # left padding on one row
    method = make_method("swa", sparsity)
    budget = method.init_state(3, 1, 1, num_slots).step_budget(valid, method.ratio)
    got = budget.select_top(scores)
    with torch_only():
        want = budget.select_top(scores)
    assert torch.equal(got.indices, want.indices)
