"""The offloading runner in fp16 on the CPU: the dtype a GPU run uses, through the same code
paths (tiers, delegation, compression, sparsity), on a machine without one.

On a CUDA machine the runner computes in fp16 (``tests/gpu``); no GPU has been lent to this
project yet, so these tests are where a dtype mismatch in the runner's fp16 paths would show
first. Dense placements must give the fp16 Engine's greedy tokens (the same kernels on the same
host, as in fp32); INT8/INT4 and SWA runs change the arithmetic, so there the check is that
every row gets its tokens and the tier bookkeeping (``check_integrity``) holds.
"""

from __future__ import annotations

import pytest
import torch

from flexalisa.engine import Engine
from flexalisa.models import load_model
from flexalisa.runtime import OffloadRunner
from tests.conftest import make_prompts
from tests.parity.test_runtime_dense import make_policy

NEW_TOKENS = 24
HALF = torch.float16


@pytest.fixture(scope="module")
def half_weights(tiny_models):
    return {kind: load_model(tiny_models[kind][0], HALF)[0] for kind in ("opt", "llama")}


def run(weights, policy, prompts):
    runner = OffloadRunner(weights, policy, device="cpu", dtype=HALF, check_integrity=True)
    try:
        return runner.generate(prompts, NEW_TOKENS, ignore_eos=True)
    finally:
        runner.close()


@pytest.mark.parametrize("kind", ["opt", "llama"])
@pytest.mark.parametrize("placement", ["weights_half_cpu", "kv_all_cpu", "kv_30_50_20"])
@pytest.mark.parametrize("cpu_attention", [False, True])
def test_half_dense_placements_give_the_half_engines_tokens(half_weights, kind, placement,
                                                            cpu_attention):
    weights, prompts = half_weights[kind], make_prompts(6, 16, seed=1)
    want = Engine(weights, dtype=HALF).generate(prompts, NEW_TOKENS, ignore_eos=True).tokens
    got = run(weights, make_policy(placement, 3, True, cpu_attention), prompts)
    assert got.tokens == want


@pytest.mark.parametrize("kind", ["opt", "llama"])
@pytest.mark.parametrize("extra", [{"kv_compression": "int8"}, {"kv_compression": "int4"},
                                   {"weight_compression": "int4"},
                                   {"sparsity_method": "swa", "sparsity": 0.5}],
                         ids=["kv_int8", "kv_int4", "weights_int4", "swa"])
@pytest.mark.parametrize("cpu_attention", [False, True])
def test_half_compressed_and_sparse_runs_complete(half_weights, kind, extra, cpu_attention):
    weights, prompts = half_weights[kind], make_prompts(6, 16, seed=1)
    got = run(weights, make_policy("kv_30_50_20", 3, True, cpu_attention, **extra), prompts)
    assert [len(t) for t in got.tokens] == [NEW_TOKENS] * len(prompts)
    vocab = weights.spec.vocab_size
    assert all(0 <= t < vocab for row in got.tokens for t in row)
    assert got.extras["tokens_recomputed"] > 0  # phase III ran: recomputation in fp16 too
