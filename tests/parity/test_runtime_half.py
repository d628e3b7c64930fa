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

from flexalisa.attention import attention_with_probs, dense_attention, partial_attention_probs
from flexalisa.engine import Engine
from flexalisa.models import load_model
from flexalisa.runtime import OffloadRunner, compute
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


@pytest.mark.parametrize("fn", [dense_attention, attention_with_probs, partial_attention_probs])
def test_host_attention_in_row_chunks_equals_one_float32_call(monkeypatch, fn):
    """Half K, V attended a few rows at a time through the reused buffer give what one call
    over float32 copies of the whole batch gives (the dense kernel's sums may differ in the
    last bits with the batch size); a mask broadcast over the batch is used as it is."""
    monkeypatch.setattr(compute, "HOST_CHUNK_BYTES", 3 * 2 * 4 * 16 * 8 * 4)  # 3 rows a chunk
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(8, 4, 1, 8, generator=gen)
    k, v = (torch.randn(8, 4, 16, 8, generator=gen).to(HALF) for _ in range(2))
    for mask in (torch.rand(8, 4, 1, 16, generator=gen) > 0.3, torch.ones(1, 4, 1, 16).bool()):
        mask[..., -1] = True
        if fn is dense_attention:
            mask = mask[:, 0]
        want = fn(q, k.float(), v.float(), mask)
        got = compute.host_attention(fn, q, k, v, mask)
        want, got = (want,) if isinstance(want, torch.Tensor) else want, (
            (got,) if isinstance(got, torch.Tensor) else got)
        for w, g in zip(want, got, strict=True):
            assert g.shape == w.shape and torch.allclose(g, w, atol=1e-6, rtol=0)


@pytest.mark.parametrize("placement", ["kv_all_cpu", "kv_30_50_20"])
def test_half_delegation_in_row_chunks_gives_the_half_engines_tokens(half_weights, placement,
                                                                     monkeypatch):
    monkeypatch.setattr(compute, "HOST_CHUNK_BYTES", 1)  # one row per chunk
    weights, prompts = half_weights["llama"], make_prompts(6, 16, seed=1)
    want = Engine(weights, dtype=HALF).generate(prompts, NEW_TOKENS, ignore_eos=True).tokens
    got = run(weights, make_policy(placement, 1, True, True, gpu_batch_size=6), prompts)
    assert got.tokens == want
