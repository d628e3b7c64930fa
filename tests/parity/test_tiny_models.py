"""Our layer functions and engine vs HF transformers on tiny random-init checkpoints (fp32)."""

from __future__ import annotations

import pytest
import torch

from flexalisa.engine import Engine, left_pad
from flexalisa.models import load_model
from tests.conftest import TINY_CONFIGS, make_prompts

KINDS = list(TINY_CONFIGS)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_hf_with_left_padding(tiny_models, kind):
    path, hf = tiny_models[kind]
    weights, _ = load_model(path)
    prompts = [make_prompts(1, 16, ragged=False, seed=1)[0], make_prompts(1, 10, seed=2,
                                                                           ragged=False)[0]]
    ids, valid = left_pad(prompts, pad_id=1)
    ours = Engine(weights).forward_logits(ids, valid)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=valid.long()).logits
    diff = (ours - ref).abs()[valid]  # padding rows are undefined in both
    assert diff.max().item() <= 1e-4, diff.max().item()


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_32_tokens_match_hf_generate(tiny_models, kind):
    path, hf = tiny_models[kind]
    weights, _ = load_model(path)
    prompts = make_prompts(2, 16, seed=3)
    ids, valid = left_pad(prompts, pad_id=1)
    ours = Engine(weights).generate(prompts, 32, ignore_eos=True)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=valid.long(), max_new_tokens=32,
                          do_sample=False, eos_token_id=None, pad_token_id=1)
    assert ours.tokens == ref[:, ids.shape[1]:].tolist()
    assert ours.finish_reasons == ["length", "length"]


def test_spec_reads_the_350m_variant(tiny_models):
    weights, _ = load_model(tiny_models["opt350"][0])
    assert not weights.spec.pre_layer_norm and weights.spec.word_embed_proj_dim == 32
    assert "final_norm_w" not in weights.globals and "project_in" in weights.globals


def assert_same_weights_in(weights, reference, dtype) -> None:
    """``weights`` hold ``reference``'s tensors cast to ``dtype``, with tied tensors tied."""
    want = reference.to("cpu", dtype)
    for got_group, want_group in [(weights.globals, want.globals),
                                  *zip(weights.layers, want.layers)]:
        assert got_group.keys() == want_group.keys()
        for name, tensor in got_group.items():
            assert tensor.dtype == dtype and torch.equal(tensor, want_group[name]), name
    tied = reference.globals["lm_head"] is reference.globals["embed"]
    assert (weights.globals["lm_head"] is weights.globals["embed"]) == tied


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_loading_in_a_half_dtype_is_the_fp32_load_cast(tiny_models, kind):
    """A GPU run loads its host weights in its compute dtype (no fp32 copy on the host)."""
    path, _ = tiny_models[kind]
    reference, _ = load_model(path)
    for dtype in (torch.float16, torch.bfloat16):
        assert_same_weights_in(load_model(path, dtype)[0], reference, dtype)
