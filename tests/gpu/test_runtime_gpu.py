"""The offloading runtime on CUDA (skipped without it).

* Dense parity on CUDA (fp32, tiny models): copy streams + events give the Engine's tokens.
* OPT-1.3B / OPT-6.7B shapes with dummy fp16 weights, a 16 GB device budget, prompt 128,
  gen 512, batch 64: ALISA (SWA at sparsity 0.8, three phases from capacity) vs a FlexGen-style
  policy (dense, KV on the CPU, no recompute); compute/transfer overlap from CUDA events.
  Throughputs are printed as JSON lines (``pytest tests/gpu -s``) for the README.
"""

from __future__ import annotations

import json

import pytest
import torch

from cost_model.spec import ModelSpec
from flexalisa.engine import Engine
from flexalisa.models import load_model
from flexalisa.models.weights import ModelWeights
from flexalisa.runtime import OffloadRunner
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
PROMPT_LEN, GEN_LEN, BATCH = 128, 512, 64


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


def dummy_opt(name: str) -> ModelWeights:
    """OPT-shaped fp16 host weights filled with small random values (FlexGen's dummy weights)."""
    hidden, layers, heads, ffn = OPT_SHAPES[name]
    spec = ModelSpec(family="opt", vocab_size=50272, hidden_size=hidden, num_layers=layers,
                     num_heads=heads, num_kv_heads=heads, ffn_size=ffn, max_seq_len=2048,
                     name=name, eos_token_ids=(2,), pad_token_id=1)
    gen = torch.Generator().manual_seed(0)

    def t(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=gen, dtype=torch.float32) * 0.04 - 0.02).half()

    embed = t(spec.vocab_size, hidden)
    globals_ = {"embed": embed, "lm_head": embed, "pos_embed": t(spec.max_seq_len + 2, hidden),
                "final_norm_w": torch.ones(hidden, dtype=torch.half),
                "final_norm_b": torch.zeros(hidden, dtype=torch.half)}
    layer_list = [{"attn_norm_w": torch.ones(hidden, dtype=torch.half),
                   "attn_norm_b": torch.zeros(hidden, dtype=torch.half),
                   "wqkv": t(3 * hidden, hidden), "bqkv": t(3 * hidden),
                   "wo": t(hidden, hidden), "bo": t(hidden),
                   "mlp_norm_w": torch.ones(hidden, dtype=torch.half),
                   "mlp_norm_b": torch.zeros(hidden, dtype=torch.half),
                   "fc1": t(ffn, hidden), "fc1_b": t(ffn), "fc2": t(hidden, ffn),
                   "fc2_b": t(hidden)} for _ in range(layers)]
    return ModelWeights(spec, globals_, layer_list)


def alisa_policy() -> Policy:
    return Policy(gpu_batch_size=BATCH // 2, num_gpu_batches=2, weights_gpu_share=0.5,
                  weights_cpu_share=0.5, kv_gpu_share=0.4, kv_cpu_share=0.4,
                  kv_recompute_share=0.2, phase2_start_step=None, phase3_start_step=None,
                  act_gpu_share=1.0, act_cpu_share=0.0, sparsity_method="swa", sparsity=0.8)


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
    for name, policy in (("alisa", alisa_policy()), ("flexgen", flexgen_policy())):
        runner = OffloadRunner(weights, policy, device="cuda", dtype=torch.float16,
                               gpu_mem_bytes=BUDGET)
        result = runner.generate(prompts, GEN_LEN, ignore_eos=True)
        runner.close()
        extras = result.extras
        total_s = result.prefill_s + result.decode_s
        rows[name] = {"model": model, "policy": name, "describe": policy.describe(),
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
    crossed = rows["alisa"]["phase_crossed_at_step"]
    assert crossed["phase2"] is not None  # the budget forces KV off the device mid-run
