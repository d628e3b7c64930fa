"""The offloading runtime on CUDA (skipped without it).

* Dense parity on CUDA (fp32, tiny models): copy streams + events give the Engine's tokens.
* The Engine's refilling of finished rows (continuous batching, on by default on CUDA) gives
  the tokens of fixed batches.
* OPT-1.3B / OPT-6.7B shapes with dummy fp16 weights, a 16 GB device budget, prompt 128,
  gen 512, batch 64: ALISA (the cost model's best SWA policy at sparsity 0.8 that the runtime's
  plan fits, on the H100 preset, the nearest to the H200 this is run on) vs a FlexGen-style
  policy (dense, half the weights and all KV on the CPU, CPU attention, no recompute);
  compute/transfer overlap from CUDA events. Throughputs are printed as JSON lines
  (``pytest tests/gpu -s``) for the README. ``tests/unit/test_gpu_plans.py`` checks on any
  machine, with meta tensors, that both policies' plans fit the budget.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from cost_model import HardwareProfile, parse_bytes
from cost_model.spec import ModelSpec
from flexalisa.engine import Engine
from flexalisa.models import load_model
from flexalisa.models.weights import ModelWeights
from flexalisa.placement import fitting_policy
from flexalisa.runtime import OffloadRunner
from policy import SearchSpace
from policy.policy import Policy
from tests.conftest import make_prompts
from tests.parity.test_runtime_dense import make_policy

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

OPT_SHAPES = {  # name: (hidden, layers, heads, ffn)
    "opt-1.3b": (2048, 24, 32, 8192),
    "opt-6.7b": (4096, 32, 32, 16384),
}
BUDGET = "16GB"
HOST_BUDGET = "100GB"  # the lent machine has 128 GiB
HARDWARE = "h100-80g"  # the cost model's preset nearest the lent H200; the budget caps memory
# the workload; FLEXALISA_GPU_GEN_LEN shortens a first timing pass (the JSON says so)
PROMPT_LEN, BATCH = 128, 64
GEN_LEN = int(os.environ.get("FLEXALISA_GPU_GEN_LEN", "512"))


@pytest.mark.parametrize("placement", ["kv_30_50_20", "weights_half_cpu", "kv_all_cpu"])
@pytest.mark.parametrize("cpu_attention", [False, True])
def test_cuda_dense_parity_tiny(tiny_models, placement, cpu_attention):
    weights, _ = load_model(tiny_models["llama"][0])
    prompts = make_prompts(6, 16, seed=1)
    want = Engine(weights, device="cuda", dtype=torch.float32).generate(prompts, 32,
                                                                       ignore_eos=True)
    policy = make_policy(placement, 3, True, cpu_attention)
    runner = OffloadRunner(weights, policy, device="cuda", dtype=torch.float32,
                           check_integrity=True)
    got = runner.generate(prompts, 32, ignore_eos=True)
    runner.close()
    assert got.tokens == want.tokens


def test_cuda_engine_refills_rows_as_fixed_batches_generate(tiny_models):
    """Jobs refill finished rows on CUDA (``LLM.refilling``): the same tokens as fixed batches."""
    engine = Engine(load_model(tiny_models["llama"][0])[0], device="cuda", dtype=torch.float32)
    prompts, limits = make_prompts(9, 16, seed=4), [12, 3, 1, 9, 12, 5, 2, 12, 7]
    want = [t for s in range(0, 9, 3)
            for t in engine.generate(prompts[s:s + 3], limits[s:s + 3], ignore_eos=True).tokens]
    got = engine.generate(prompts, limits, ignore_eos=True, max_batch=3)
    assert got.tokens == want


def dummy_opt(name: str, device: str = "cpu") -> ModelWeights:
    """OPT-shaped fp16 host weights filled with small random values (FlexGen's dummy weights);
    on the ``meta`` device, shapes only (for planning)."""
    hidden, layers, heads, ffn = OPT_SHAPES[name]
    spec = ModelSpec(family="opt", vocab_size=50272, hidden_size=hidden, num_layers=layers,
                     num_heads=heads, num_kv_heads=heads, ffn_size=ffn, max_seq_len=2048,
                     name=name, eos_token_ids=(2,), pad_token_id=1)
    gen = torch.Generator().manual_seed(0)

    def t(*shape: int) -> torch.Tensor:
        if device == "meta":
            return torch.empty(*shape, dtype=torch.half, device="meta")
        return (torch.rand(*shape, generator=gen, dtype=torch.float32) * 0.04 - 0.02).half()

    def const(value: float) -> torch.Tensor:
        return torch.full((hidden,), value, dtype=torch.half, device=device)

    embed = t(spec.vocab_size, hidden)
    globals_ = {"embed": embed, "lm_head": embed, "pos_embed": t(spec.max_seq_len + 2, hidden),
                "final_norm_w": const(1.0), "final_norm_b": const(0.0)}
    layer_list = [{"attn_norm_w": const(1.0), "attn_norm_b": const(0.0),
                   "wqkv": t(3 * hidden, hidden), "bqkv": t(3 * hidden),
                   "wo": t(hidden, hidden), "bo": t(hidden),
                   "mlp_norm_w": const(1.0), "mlp_norm_b": const(0.0),
                   "fc1": t(ffn, hidden), "fc1_b": t(ffn), "fc2": t(hidden, ffn),
                   "fc2_b": t(hidden)} for _ in range(layers)]
    return ModelWeights(spec, globals_, layer_list)


def workload() -> tuple[list[list[int]], list[int]]:
    """The prompts' shape (every row PROMPT_LEN tokens) and limits, for planning."""
    return [[5] * PROMPT_LEN] * BATCH, [GEN_LEN] * BATCH


def alisa_policy(weights: ModelWeights) -> Policy:
    """The cost model's best SWA@0.8 policy for batch 64 whose runtime plan fits the budgets
    (``fitting_policy``): weights, KV tiers, phase starts and delegation as the search picks."""
    hw = HardwareProfile.load(HARDWARE).with_memory(parse_bytes(BUDGET), parse_bytes(HOST_BUDGET))
    space = SearchSpace(style="alisa", sparsity_methods=("swa",), sparsities=(0.8,),
                        batch_sizes=(BATCH,))
    result, _ = fitting_policy(weights, hw, *workload(), space, "cuda", torch.float16,
                               parse_bytes(BUDGET), parse_bytes(HOST_BUDGET))
    return result.policy


def flexgen_policy() -> Policy:
    return Policy(gpu_batch_size=BATCH // 2, num_gpu_batches=2, weights_gpu_share=0.5,
                  weights_cpu_share=0.5, kv_gpu_share=0.0, kv_cpu_share=1.0,
                  kv_recompute_share=0.0, phase2_start_step=0, phase3_start_step=0,
                  act_gpu_share=1.0, act_cpu_share=0.0, cpu_attention=True)


@pytest.mark.parametrize("model", list(OPT_SHAPES))
def test_alisa_vs_flexgen_on_opt_shapes(model):
    weights = dummy_opt(model)
    prompts = make_prompts(BATCH, PROMPT_LEN, vocab=weights.spec.vocab_size, ragged=False)
    rows = {}
    for name, policy in (("alisa", alisa_policy(weights)), ("flexgen", flexgen_policy())):
        runner = OffloadRunner(weights, policy, device="cuda", dtype=torch.float16,
                               gpu_mem_bytes=BUDGET, cpu_mem_bytes=HOST_BUDGET)
        result = runner.generate(prompts, GEN_LEN, ignore_eos=True)
        runner.close()
        extras = result.extras
        total_s = result.prefill_s + result.decode_s
        rows[name] = {"model": model, "policy": name, "describe": policy.describe(),
                      "batch": BATCH, "prompt_len": PROMPT_LEN, "gen_len": GEN_LEN,
                      "gpu": torch.cuda.get_device_name(), "wall_s": total_s,
                      "prefill_tok_s": BATCH * PROMPT_LEN / result.prefill_s,
                      "decode_tok_s": BATCH * (GEN_LEN - 1) / result.decode_s,
                      "total_tok_s": BATCH * GEN_LEN / total_s,
                      "transfer_busy_s": extras["transfer_busy_s"],
                      "transfer_wait_s": extras["op_s"]["transfer_wait"],
                      "transfer_hidden_share": extras["transfer_hidden_share"],
                      "phase_crossed_at_step": extras["phase_crossed_at_step"],
                      "h2d_bytes": extras["h2d_bytes"], "peak_bytes": extras["peak_bytes"]}
        print(json.dumps(rows[name]))
        assert all(len(t) == GEN_LEN for t in result.tokens)
        assert extras["peak_bytes"]["gpu"] <= 16e9
        assert extras["transfer_busy_s"] > 0  # measured from events on the copy streams
        assert torch.cuda.max_memory_allocated() <= 16e9 * 1.1
        torch.cuda.reset_peak_memory_stats()
        if policy.kv_recompute_share > 0:
            assert extras["tokens_recomputed"] > 0
