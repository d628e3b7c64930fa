"""oneDNN-packed fp32 weights: same products as F.linear, row-count invariant, used by the
Engine and the runner's weight store, and counted in the device budget."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flexalisa.engine import Engine
from flexalisa.models import load_model
from flexalisa.models.linear import (
    PACKED_KEYS,
    can_pack,
    kv_rows,
    linear,
    pack_tensor,
    pack_weights,
    qkv_rows,
    split_qkv,
)
from flexalisa.models.weights import ModelWeights
from flexalisa.runtime import BlockShapeInfo, OffloadRunner, plan_block
from tests.conftest import make_prompts
from tests.parity.test_runtime_dense import make_policy

needs_pack = pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.float32),
                                reason="this torch build has no oneDNN linear")


@needs_pack
def test_packed_linear_matches_f_linear_and_does_not_depend_on_row_count():
    torch.manual_seed(0)
    w, b = torch.randn(96, 40), torch.randn(96)
    x = torch.randn(3, 7, 40)
    packed = pack_weights_dict({"wqkv": w})["wqkv"]
    assert packed.is_mkldnn
    out = linear(x, packed, b)
    assert out.shape == (3, 7, 96)
    torch.testing.assert_close(out, F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    rows = x.reshape(21, 40)
    whole = linear(rows, packed)
    assert all(torch.equal(linear(rows[:m], packed), whole[:m]) for m in (1, 2, 5, 20))


@needs_pack
def test_kv_rows_and_qkv_rows_agree_over_the_three_layouts():
    """Plain wqkv (rows sliced), packed wqkv (product cut) and split packed wq / wkv give the
    same projections; the split layout's K, V come from wkv alone."""
    torch.manual_seed(1)
    w, b, x = torch.randn(48, 16), torch.randn(48), torch.randn(2, 5, 16)
    plain = {"wqkv": w}
    packed = pack_weights_dict(plain)
    split = pack_weights_dict(split_qkv(plain, 16))
    assert set(split) == {"wq", "wkv"} and split["wkv"].is_mkldnn
    want_kv, want_qkv = F.linear(x, w[16:], b[16:]), F.linear(x, w, b)
    for layer in (plain, packed, split):
        torch.testing.assert_close(kv_rows(x, layer, b, 16), want_kv, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(qkv_rows(x, layer, b, 16), want_qkv, atol=1e-5, rtol=1e-5)
    assert kv_rows(x, plain, None, 16).shape == (2, 5, 32)
    split_only_kv = {"wkv": split["wkv"]}  # recomputation never touches wq
    torch.testing.assert_close(kv_rows(x, split_only_kv, None, 16), F.linear(x, w[16:]),
                               atol=1e-5, rtol=1e-5)


@needs_pack
def test_a_runner_with_a_recompute_tier_splits_qkv_in_the_same_bytes(tiny_models):
    weights, _ = load_model(tiny_models["llama"][0])
    stores = {}
    for name in ("all_on_device", "kv_30_50_20"):
        runner = OffloadRunner(weights, make_policy(name, 1, False, False, gpu_batch_size=2))
        try:
            stores[name] = runner.weights
        finally:
            runner.close()
    dense, recompute = stores["all_on_device"].layers[0], stores["kv_30_50_20"].layers[0]
    assert "wqkv" in dense and "wq" not in dense
    assert "wqkv" not in recompute and recompute["wq"].is_mkldnn and recompute["wkv"].is_mkldnn
    assert stores["kv_30_50_20"].resident_bytes() == stores["all_on_device"].resident_bytes()


def pack_weights_dict(layer: dict) -> dict:
    return {k: pack_tensor(k, v) for k, v in layer.items()}


@needs_pack
def test_engine_packs_matrices_only_and_keeps_greedy_tokens(tiny_models):
    weights, _ = load_model(tiny_models["opt350"][0])
    packed = pack_weights(weights)
    for layer in packed.layers:
        assert all(t.is_mkldnn == (k in PACKED_KEYS) for k, t in layer.items())
    assert packed.globals["lm_head"].is_mkldnn and not packed.globals["embed"].is_mkldnn
    prompts = make_prompts(3, 12, seed=5)
    plain = Engine(weights, pack=False).generate(prompts, 16, ignore_eos=True)
    fast = Engine(weights).generate(prompts, 16, ignore_eos=True)
    assert Engine(weights).weights.layers[0]["fc1"].is_mkldnn
    assert fast.tokens == plain.tokens


@needs_pack
def test_budget_counts_the_packed_copy_of_a_tied_lm_head(tiny_models):
    untied, _ = load_model(tiny_models["llama"][0])
    g = {**untied.globals, "lm_head": untied.globals["embed"]}  # tied, as in SmolLM2
    weights = ModelWeights(untied.spec, g, untied.layers)
    policy = make_policy("all_on_device", 1, False, False, gpu_batch_size=2)
    shape = BlockShapeInfo(2, 1, 8, 4)
    cpu = plan_block(weights, policy, shape, torch.float32, None, None, "cpu")
    cuda = plan_block(weights, policy, shape, torch.float32, None, None, "cuda")
    assert cpu.gpu_fixed_bytes - cuda.gpu_fixed_bytes == g["embed"].numel() * 4
    runner = OffloadRunner(weights, policy)
    try:
        assert runner.weights.globals["lm_head"].is_mkldnn
        assert not runner.weights.globals["embed"].is_mkldnn
        assert runner.weights.layers[0]["wqkv"].is_mkldnn  # resident layers are packed once
    finally:
        runner.close()


def test_nothing_is_packed_off_the_cpu_or_below_fp32():
    assert not can_pack(torch.device("cuda"), torch.float32)
    assert not can_pack(torch.device("cpu"), torch.float16)


@needs_pack
def test_an_engine_built_from_another_engines_weights_shares_them(tiny_models):
    weights, _ = load_model(tiny_models["llama"][0])
    first = Engine(weights)
    second = Engine(first.weights)
    assert second.weights.layers[0]["w_gate_up"] is first.weights.layers[0]["w_gate_up"]
    assert second.weights.globals["lm_head"] is first.weights.globals["lm_head"]
