"""SWA selects for runs of layers at once (``MethodState.stack``): bit for bit what one layer at
a time selects, whatever order a caller interleaves its select and observe calls in."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexalisa.attention import make_method
from flexalisa.attention.base import MethodState
from flexalisa.attention.scores import WindowScores

HEADS, KV_HEADS = 4, 2


def one_layer_at_a_time(state: MethodState) -> MethodState:
    """The same records, each with tensors of its own and no stack: every select runs alone."""
    layers = [WindowScores(ring_slots=rec.ring_slots.clone(), ring_weights=rec.ring_weights.clone(),
                           totals=rec.totals.clone(), live=rec.live.clone(),
                           window_rows=list(rec.window_rows), num_rows=rec.num_rows)
              for rec in state.layers]
    return MethodState(layers=layers, num_groups=state.num_groups)


def call_order(order: str, num_layers: int, num_steps: int) -> list[tuple[str, int, int]]:
    """(op, layer, step) calls: 'select' for a decode step, 'observe' of that step's row.

    engine   each step: select, then observe, layer by layer (runs of every layer)
    eager    each layer selects its next step right after observing (runs of one)
    runner   the offloading runner with one GPU batch: a step's selection is made when its KV is
             loaded, one layer ahead, so layer 0 selects before the last layer has observed
    """
    calls: list[tuple[str, int, int]] = []
    if order == "engine":
        for t in range(num_steps):
            for j in range(num_layers):
                calls += [("select", j, t), ("observe", j, t)]
    elif order == "eager":
        calls += [("select", j, 0) for j in range(num_layers)]
        for t in range(num_steps):
            for j in range(num_layers):
                calls.append(("observe", j, t))
                if t + 1 < num_steps:
                    calls.append(("select", j, t + 1))
    else:  # runner: the next position's load (select) is issued before this compute
        # (observe), unless it needs this compute's observation (one layer: the same layer)
        positions = [(t, j) for t in range(num_steps) for j in range(num_layers)]
        calls.append(("select", 0, 0))
        for pos, (t, j) in enumerate(positions):
            after = []
            if pos + 1 < len(positions):
                t_next, j_next = positions[pos + 1]
                load = [("select", j_next, t_next)]
                calls, after = (calls + load, []) if j_next != j else (calls, load)
            calls += [("observe", j, t), *after]
    return calls


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.booleans(), st.sampled_from([0.5, 0.8]),
       st.integers(1, 12), st.sampled_from(["engine", "eager", "runner"]), st.data())
def test_runs_of_layers_select_like_one_layer_at_a_time(batch, num_layers, per_kv_head, sparsity,
                                                        num_steps, order, data) -> None:
    prompt = data.draw(st.integers(2, 10))
    pads = data.draw(st.lists(st.integers(0, prompt - 1), min_size=batch, max_size=batch))
    seed = data.draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    max_len = prompt + num_steps
    method = make_method("swa", sparsity, per_kv_head)
    stacked = method.init_state(batch, num_layers, KV_HEADS, max_len)
    assert stacked.stack is not None
    alone = one_layer_at_a_time(stacked)
    valid = torch.arange(max_len)[None] >= torch.tensor(pads)[:, None]  # (B, L) left padding
    for j in range(num_layers):
        probs = torch.rand(batch, HEADS, prompt, prompt, generator=generator).softmax(-1)
        for state in (stacked, alone):
            method.observe_prefill(state, j, probs, valid[:, :prompt])
    made: dict[tuple[int, int], object] = {}
    for op, j, t in call_order(order, num_layers, num_steps):
        step_valid = valid[:, :prompt + t + 1]
        if op == "select":
            sel = method.select(stacked, j, step_valid)
            ref = method.select(alone, j, step_valid)
            assert torch.equal(sel.indices, ref.indices) and torch.equal(sel.mask, ref.mask)
            made[(j, t)] = sel
            continue
        sel = made[(j, t)]
        probs = torch.rand(batch, HEADS, 1, sel.indices.shape[-1], generator=generator)
        probs = probs.softmax(-1)
        for state in (stacked, alone):
            method.observe(state, j, probs, sel)
    for j in range(num_layers):
        assert torch.equal(stacked.layers[j].totals, alone.layers[j].totals)
        assert torch.equal(stacked.layers[j].live, alone.layers[j].live)
        assert stacked.layers[j].window_rows == alone.layers[j].window_rows
        assert stacked.layers[j].totals.data_ptr() != alone.layers[j].totals.data_ptr()


def test_a_run_covers_the_layers_observed_since_their_last_selection() -> None:
    """The engine's order makes one run per step (every layer); the runner's, one run of every
    layer but the last (not yet observed when layer 0 loads) and one of the last; a new step
    drops selections made ahead for the old one."""
    method = make_method("swa", 0.8)
    state = method.init_state(2, 4, KV_HEADS, 40)
    valid = torch.ones(2, 40, dtype=torch.bool)
    for j in range(4):
        method.observe_prefill(state, j, torch.rand(2, HEADS, 20, 20).softmax(-1), valid[:, :20])
    assert state.fresh == {0, 1, 2, 3}
    sel = method.select(state, 0, valid[:, :21])
    assert sorted(state.ahead) == [1, 2, 3] and not state.fresh
    for j in range(3):  # layer 3 has not observed this step yet
        method.observe(state, j, torch.rand(2, HEADS, 1, sel.indices.shape[-1]).softmax(-1),
                       state.ahead.pop(j, sel))
    method.select(state, 0, valid[:, :22])
    assert sorted(state.ahead) == [1, 2] and state.ahead[1].indices.shape[-1] > 0
    method.select(state, 3, valid[:, :21])  # the old step, its own run
    assert not state.ahead  # the budget changed: selections made for step 22 are dropped
