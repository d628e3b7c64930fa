"""Calibration against FlexGen's published OPT-30B run on a T4 (FlexGen README / paper).

FlexGen measured 7.32 tok/s (prompt 512, gen 32) with policy 48x3, weights 20% GPU / 80% CPU,
KV 100% CPU, activations 100% CPU, CPU attention, on a GCP T4 with 208 GB of CPU memory.
The hardware preset is built from spec sheets (see cost_model.hardware_presets), not fitted.
"""

from __future__ import annotations

import pytest

from cost_model import costs
from cost_model.hardware import HardwareProfile
from cost_model.presets import MODEL_PRESETS
from policy import Policy, SearchSpace, predict, search

FLEXGEN_TOK_PER_S = 7.32
TOLERANCE = 0.25
FLEXGEN_POLICY = Policy(
    gpu_batch_size=48, num_gpu_batches=3, weights_gpu_share=0.2, weights_cpu_share=0.8,
    kv_gpu_share=0.0, kv_cpu_share=1.0, kv_recompute_share=0.0, phase2_start_step=0,
    phase3_start_step=0, act_gpu_share=0.0, act_cpu_share=1.0, sparsity_method="dense",
    sparsity=0.0, cpu_attention=True, overlap=True)


@pytest.fixture(scope="module")
def setup():
    return MODEL_PRESETS["opt-30b"], HardwareProfile.load("t4-16g")


def test_flexgen_policy_prediction(setup):
    spec, hw = setup
    pred = predict(spec, hw, FLEXGEN_POLICY, 512, 32)
    print(f"FlexGen's policy: predicted {pred.total_tok_per_s:.2f} tok/s vs 7.32 measured")
    # Our runtime keeps the embeddings on the GPU (FlexGen splits them 20/80 like the layers)
    # and holds a GPU batch's K, V, layer input and output besides one prefill chunk's scratch;
    # with the prefill in chunks of ~1024 tokens the published placement still fits the T4
    print(f"... and needs {pred.peak_gpu_bytes / 2**30:.2f} GiB of the GPU's 16 in our runtime")
    assert pred.fits, pred.violations
    # in one pass, every projection output and score of 48 x 512 tokens, it would not
    one_pass = 48 * (512 * (3 * 7168 + 2 * 28672 + 3 * 7168) * 2 + 56 * 512**2 * 4)
    chunked = costs.working_set_bytes(spec, 48, 512, 512 + 32, hw.compute_dtype_bytes)
    assert pred.peak_gpu_bytes - chunked + one_pass > hw.gpu_mem_bytes
    assert pred.total_tok_per_s == pytest.approx(FLEXGEN_TOK_PER_S, rel=TOLERANCE)


def test_search_finds_a_policy_near_flexgen(setup):
    spec, hw = setup
    result = search(spec, hw, 512, 32, SearchSpace(style="flexgen"))
    print(f"search: {result.policy.describe()} -> {result.prediction.total_tok_per_s:.2f} tok/s")
    assert result.prediction.fits
    assert result.policy.sparsity_method == "dense"
    assert result.prediction.total_tok_per_s == pytest.approx(FLEXGEN_TOK_PER_S, rel=TOLERANCE)
    # the search never does worse than the published policy under its own model
    published = predict(spec, hw, FLEXGEN_POLICY, 512, 32)
    assert result.prediction.total_tok_per_s >= published.total_tok_per_s
