"""Property tests of the policy search: memory limits, monotonicity, shares, clear errors."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cost_model.hardware import HardwareProfile
from cost_model.spec import ModelSpec
from policy import InfeasibleError, SearchSpace, predict, search
from policy.policy import SHARE_TOLERANCE

MIB = 2**20
SPEC = ModelSpec(family="llama", name="tiny-gqa", vocab_size=512, hidden_size=256, num_layers=4,
                 num_heads=8, num_kv_heads=2, ffn_size=512, max_seq_len=512)
HW = HardwareProfile(name="small", device_kind="cuda", gpu_name="g", cpu_name="c",
                     link_name="PCIe", gpu_mem_bytes=64 * MIB, cpu_mem_bytes=256 * MIB,
                     h2d_bytes_per_s=1e9, d2h_bytes_per_s=1e9, gpu_gemm_flops_per_s=1e12,
                     gpu_skinny_flops_per_s=2e11, gpu_mem_bytes_per_s=1e11, cpu_flops_per_s=1e10,
                     cpu_mem_bytes_per_s=2e10, layer_overhead_s=1e-5)
SETTINGS = dict(max_examples=12, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

spaces = st.builds(
    SearchSpace,
    gpu_batch_sizes=st.just((1, 4, 16)),
    num_gpu_batches=st.just((1, 2)),
    sparsity_methods=st.sampled_from([("dense",), ("swa",)]),
    sparsities=st.just((0.5,)),
    cpu_attention=st.sampled_from([(False,), (False, True)]),
    style=st.sampled_from(["alisa", "flexgen"]),
)
workloads = st.tuples(st.integers(8, 96), st.integers(2, 24))
memories = st.tuples(st.integers(1, 40), st.integers(1, 80))  # MiB


def _search_or_none(hw, workload, space):
    try:
        return search(SPEC, hw, workload[0], workload[1], space)
    except InfeasibleError:
        return None


@settings(**SETTINGS)
@given(space=spaces, workload=workloads, mem=memories)
def test_result_fits_and_shares_sum_to_one(space, workload, mem):
    hw = HW.with_memory(mem[0] * MIB, mem[1] * MIB)
    result = _search_or_none(hw, workload, space)
    if result is None:
        return
    p, pred = result.policy, result.prediction
    assert pred.fits, pred.violations
    assert pred.peak_gpu_bytes <= hw.gpu_mem_bytes * (1 + 1e-6)
    assert pred.peak_cpu_bytes <= hw.cpu_mem_bytes * (1 + 1e-6)
    for group in ((p.weights_gpu_share, p.weights_cpu_share),
                  (p.kv_gpu_share, p.kv_cpu_share, p.kv_recompute_share),
                  (p.act_gpu_share, p.act_cpu_share)):
        assert all(0 <= x <= 1 for x in group)
        assert abs(sum(group) - 1) <= SHARE_TOLERANCE
    # predict() of the returned policy reproduces the search's prediction
    again = predict(SPEC, hw, p, workload[0], workload[1])
    assert again.total_tok_per_s == pytest.approx(pred.total_tok_per_s, rel=1e-9)
    if space.style == "flexgen":
        never = workload[1] - 1  # the decode steps: phase III never begins
        assert p.kv_recompute_share == 0 and p.phase3_start_step == never
        assert p.phase2_start_step in (0, never)


@settings(**SETTINGS)
@given(space=spaces, workload=workloads, mem=memories,
       extra=st.tuples(st.integers(0, 40), st.integers(0, 80)))
def test_more_memory_never_lowers_throughput(space, workload, mem, extra):
    small = _search_or_none(HW.with_memory(mem[0] * MIB, mem[1] * MIB), workload, space)
    big = _search_or_none(HW.with_memory((mem[0] + extra[0]) * MIB, (mem[1] + extra[1]) * MIB),
                          workload, space)
    if small is None:
        return
    assert big is not None
    assert big.prediction.total_tok_per_s >= small.prediction.total_tok_per_s * (1 - 1e-6)


@settings(**SETTINGS)
@given(workload=workloads, gpu_kib=st.integers(1, 512), cpu_kib=st.integers(1, 2048))
def test_infeasible_requests_raise_a_clear_error(workload, gpu_kib, cpu_kib):
    hw = HW.with_memory(gpu_kib * 1024, cpu_kib * 1024)  # far too small for the weights
    with pytest.raises(InfeasibleError, match=r"no policy fits: GPU .* GiB.*needs >="):
        search(SPEC, hw, workload[0], workload[1], SearchSpace(gpu_batch_sizes=(1, 2),
                                                               num_gpu_batches=(1,)))


def test_infeasible_error_is_a_value_error():
    assert issubclass(InfeasibleError, ValueError)


def test_workload_beyond_context_is_rejected():
    with pytest.raises(ValueError, match="max_seq_len 512"):
        search(SPEC, HW, 500, 100)


def test_a_searched_policy_that_offloads_nothing_is_priced_as_the_engine_runs_it():
    """flexalisa runs a searched policy that keeps everything on the device on the engine, so
    the search prices it with the engine's per-layer cost; a policy file that offloads nothing
    runs on the runtime and keeps the runtime's."""
    from dataclasses import replace

    roomy = HW.replace(gpu_mem_bytes=4 * 2**30, layer_overhead_s=5e-4,
                       engine_layer_overhead_s=2e-6)
    result = search(SPEC, roomy, 32, 8, SearchSpace(gpu_batch_sizes=(4,), num_gpu_batches=(1,)))
    assert result.policy.all_on_device
    engine = predict(SPEC, roomy, result.policy, 32, 8, runner="engine")
    assert result.prediction == engine
    assert engine == predict(SPEC, roomy.replace(layer_overhead_s=2e-6), result.policy, 32, 8)
    assert engine.total_tok_per_s > predict(SPEC, roomy, result.policy, 32, 8).total_tok_per_s
    offloading = replace(result.policy, weights_gpu_share=0.5, weights_cpu_share=0.5)
    assert not offloading.all_on_device
    with pytest.raises(ValueError, match="engine"):
        predict(SPEC, roomy, offloading, 32, 8, runner="engine")
