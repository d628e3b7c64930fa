"""Calibration against FlexGen's published OPT-30B run on a T4 (FlexGen README / paper).

FlexGen measured 7.32 tok/s (prompt 512, gen 32) with policy 48x3, weights 20% GPU / 80% CPU,
KV 100% CPU, activations 100% CPU, CPU attention, on a GCP T4 with 208 GB of CPU memory.
The hardware preset is built from spec sheets (see cost_model.hardware_presets), not fitted.
"""

from __future__ import annotations

import pytest

from cost_model import costs
from cost_model.hardware import HardwareProfile
from cost_model.memory import globals_device_bytes
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
    # and prefills a GPU batch's 48 x 512 tokens in one pass, reserving every projection output
    # and the scores at once (FlexGen's loop is leaner), so under our memory model the published
    # placement overshoots the T4's 16 GB, by no more than those two terms
    over = pred.peak_gpu_bytes - hw.gpu_mem_bytes
    print(f"... and needs {pred.peak_gpu_bytes / 2**30:.2f} GiB of the GPU's 16 in our runtime")
    working = costs.working_set_bytes(spec, 48, 512, 512 + 32, hw.compute_dtype_bytes)
    assert over <= 0.8 * globals_device_bytes(spec, hw) + working, pred.violations
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
