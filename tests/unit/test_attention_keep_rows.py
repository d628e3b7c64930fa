"""MethodState.keep_rows: a compacted batch selects exactly as the full one does for kept rows."""

from __future__ import annotations

import copy

import pytest
import torch

from flexalisa.attention import gather_kv, make_method, partial_attention_probs
from flexalisa.engine import Engine
from flexalisa.models.hf_loader import load_hf_dir
from tests.conftest import make_prompts

HEADS, KV_HEADS, DIM, PROMPT, MAX_LEN = 4, 2, 8, 6, 30


def step(method, state, layer_idx, q, keys, values, valid):
    sel = method.select(state, layer_idx, valid, q=q, keys=keys)
    if sel is None:
        return None
    k_sel, v_sel = gather_kv(keys, values, sel.indices)
    _, _, probs = partial_attention_probs(q, k_sel, v_sel, sel.attention_mask)
    method.observe(state, layer_idx, probs, sel)
    return sel


@pytest.mark.parametrize("name,per_kv_head,channels", [
    ("swa", False, 0), ("swa", True, 0), ("swa", True, 3), ("h2o", True, 0), ("sinks", False, 0)])
def test_compacted_state_selects_like_the_full_one(name, per_kv_head, channels) -> None:
    torch.manual_seed(0)
    batch, layers = 3, 2
    method = make_method(name, 0.6, per_kv_head, query_channels=channels)
    state = method.init_state(batch, layers, KV_HEADS, MAX_LEN)
    keys = torch.randn(batch, KV_HEADS, MAX_LEN, DIM)
    values = torch.randn(batch, KV_HEADS, MAX_LEN, DIM)
    valid = torch.arange(MAX_LEN)[None] >= torch.tensor([0, 2, 1])[:, None]  # ragged padding
    prompt = torch.softmax(torch.randn(batch, HEADS, PROMPT, PROMPT), -1)
    prompt = prompt * torch.ones(PROMPT, PROMPT).tril()
    for layer_idx in range(layers):
        method.observe_prefill(state, layer_idx, prompt, valid[:, :PROMPT])
    queries = torch.randn(MAX_LEN, batch, HEADS, 1, DIM)
    rows = torch.tensor([2, 0])  # drop row 1 and reorder
    full, compact = state, None
    for slot in range(PROMPT, MAX_LEN):
        if slot == 15:
            compact = copy.deepcopy(full)
            compact.keep_rows(rows)
        for layer_idx in range(layers):
            n = slot + 1
            args = (queries[slot], keys[:, :, :n], values[:, :, :n], valid[:, :n])
            sel_full = step(method, full, layer_idx, *args)
            if compact is None:
                continue
            sel = step(method, compact, layer_idx, *(a[rows] for a in args))
            assert torch.equal(sel.indices, sel_full.indices[rows])
            assert torch.equal(sel.mask, sel_full.mask[rows])


def test_generate_compacts_the_batch_with_a_method(tiny_models) -> None:
    """Rows finishing early leave the batch; the others generate as if nothing happened."""
    weights, _ = load_hf_dir(tiny_models["llama"][0])
    engine = Engine(weights, method=make_method("swa", 0.7))
    prompts = make_prompts(3, 20, seed=3)
    ragged = engine.generate(prompts, [3, 12, 6], ignore_eos=True)
    whole = engine.generate(prompts, 12, ignore_eos=True)
    assert [len(t) for t in ragged.tokens] == [3, 12, 6]
    assert ragged.tokens == [t[:n] for t, n in zip(whole.tokens, [3, 12, 6])]
