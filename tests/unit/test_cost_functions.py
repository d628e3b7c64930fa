"""Per-layer FLOP/byte counts on a tiny GQA spec, computed by hand, and step-cost behaviour."""

from __future__ import annotations

import itertools

import pytest

from cost_model import costs
from cost_model.estimate import estimate
from cost_model.hardware import HardwareProfile
from cost_model.lp import solve_placement, time_lower_bound
from cost_model.memory import memory_at
from cost_model.spec import ModelSpec
from cost_model.timing import Knobs, Workload, decode_chunks, decode_step_cost

ALL_GPU = {"wg": 1.0, "hg": 1.0, "alpha": 0.0, "beta": 0.0}


def make_spec(**overrides) -> ModelSpec:
    # head_dim 16, q_dim 64, kv_dim 16 (GQA 4:1)
    fields = dict(family="llama", vocab_size=100, hidden_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=1, ffn_size=128, max_seq_len=256, name="tiny")
    fields.update(overrides)
    return ModelSpec(**fields)


def make_hw(**overrides) -> HardwareProfile:
    fields = dict(name="round", device_kind="cuda", gpu_name="g", cpu_name="c", link_name="l",
                  gpu_mem_bytes=2**30, cpu_mem_bytes=2**32, h2d_bytes_per_s=1e9,
                  d2h_bytes_per_s=1e9, gpu_gemm_flops_per_s=1e12, gpu_skinny_flops_per_s=1e12,
                  gpu_mem_bytes_per_s=1e11, cpu_flops_per_s=1e10, cpu_mem_bytes_per_s=1e10,
                  compute_dtype_bytes=2, cpu_compute_dtype_bytes=4, layer_overhead_s=0.0)
    fields.update(overrides)
    return HardwareProfile(**fields)


def make_knobs(**overrides) -> Knobs:
    fields = dict(gpu_batch_size=2, num_gpu_batches=3, sparsity_method="dense", sparsity=0.0,
                  kv_compression="none", weight_compression="none", cpu_attention=False,
                  overlap=True, p1=0, p2=0)
    fields.update(overrides)
    return Knobs(**fields)


def test_hand_computed_counts():
    spec = make_spec()
    assert costs.linear_numel(spec) == 64 * 64 + 2 * 64 * 16 + 64 * 64 + 3 * 64 * 128 == 34816
    assert costs.gemm_flops(spec, 3) == 2 * 3 * 34816
    assert costs.kv_bytes_per_token(spec, "none", 2) == 64
    assert costs.kv_bytes_per_token(spec, "int8", 2) == pytest.approx(32 * (1 + 4 / 64))
    assert costs.kv_bytes_per_token(spec, "int4", 2) == pytest.approx(32 * (0.5 + 4 / 64))
    assert costs.hidden_bytes_per_token(spec, 2) == 128  # GQA: the layer input exceeds K+V
    assert costs.decode_attention_flops(spec, 2, 10) == 4 * 2 * 10 * 64
    assert costs.prefill_attention_flops(spec, 2, 8) == 2 * 2 * 8 * 8 * 64
    assert costs.recompute_flops(spec, 5) == 2 * 5 * 64 * 2 * 16
    assert costs.head_flops(spec, 2) == 2 * 2 * 100 * 64
    assert costs.layer_weight_bytes(spec, "int4", 2) == pytest.approx(spec.layer_numel * 0.5625)
    assert costs.activation_traffic_numel(spec) == 10 * 64 + 3 * (64 + 32) + 5 * 128
    assert costs.layer_gemm_shapes(spec) == [(64, 64), (64, 16), (64, 16), (64, 64), (64, 128),
                                             (64, 128), (128, 64)]
    assert sum(k * n for k, n in costs.layer_gemm_shapes(spec)) == costs.linear_numel(spec)


def test_working_set_by_hand_one_chunk_and_several():
    spec = make_spec()  # q 64, kv 16, ffn 128, hidden 64, 4 heads
    width = 64 + 2 * 16 + 2 * 128 + 3 * 64  # per token of a chunk: 544 elements
    logits = 2 * 100 * 4
    # 2 sequences of 8 tokens: one chunk, the whole batch at once (no batch-wide buffers)
    assert costs.prefill_chunk_rows(2, 8) == 2
    one = 2 * (8 * width * 2 + 4 * 8 * 8 * 4)
    assert costs.working_set_bytes(spec, 2, 8, 0, 2) == one + logits
    # 3 sequences of 512 tokens: chunks of 2 rows, plus the batch's K, V, input and output
    assert costs.prefill_chunk_rows(3, 512) == 2
    chunk = 2 * (512 * width * 2 + 4 * 512 * 512 * 4)
    whole = 3 * 512 * (2 * 16 + 2 * 64) * 2
    assert costs.working_set_bytes(spec, 3, 512, 0, 2) == chunk + whole + 3 * 100 * 4
    # a scoring method keeps every sequence's prefill attention weights (bounded by all rows)
    assert costs.working_set_bytes(spec, 3, 512, 0, 2, scored=True) == (
        chunk + whole + 3 * 4 * 512 * 512 * 4 + 3 * 100 * 4)
    assert costs.seeds_from_prefill("swa", 0.5) and costs.seeds_from_prefill("h2o", 0.1)
    assert not costs.seeds_from_prefill("swa", 0.0) and not costs.seeds_from_prefill("local", 0.5)
    # a long decode selection outweighs the prefill
    gathered = 2 * 3 * 100_000 * 32 * 2
    assert costs.working_set_bytes(spec, 3, 512, 100_000, 2) == gathered + 3 * 100 * 4
    # prompts longer than a chunk run one row at a time
    assert costs.prefill_chunk_rows(5, 4096) == 1


def test_selected_tokens_budget():
    assert costs.selected_tokens(100, "dense", 0.0) == 100
    assert costs.selected_tokens(100, "swa", 0.8) == pytest.approx(20)
    assert costs.selected_tokens(100, "h2o", 0.5) == pytest.approx(50)
    assert costs.selected_tokens(2, "swa", 0.99) == 1.0  # at least one token
    with pytest.raises(ValueError, match="int3"):
        costs.bytes_per_element("int3", 2)


def test_step_traffic_by_hand():
    spec, hw, k = make_spec(), make_hw(), make_knobs()
    layer_w = costs.layer_weight_bytes(spec, "none", 2)
    cost = decode_step_cost(spec, hw, k, 50, phase=3)
    assert cost.total_h2d_bytes().value(ALL_GPU) == 0
    assert cost.total_d2h_bytes().value(ALL_GPU) == 0
    # all layers on the CPU: each is loaded once per step; the globals stay on the device
    streamed = dict(ALL_GPU, wg=0.0)
    assert cost.total_h2d_bytes().value(streamed) == pytest.approx(2 * layer_w)
    # all KV on the CPU, fetched: 2 layers x 3 GPU batches x 2 seqs x 50 tokens x 64 B,
    # and each new token's K,V (64 B) stored
    kv_cpu = dict(ALL_GPU, alpha=1.0)
    assert cost.total_h2d_bytes().value(kv_cpu) == pytest.approx(2 * 3 * 2 * 50 * 64)
    assert cost.total_d2h_bytes().value(kv_cpu) == pytest.approx(2 * 3 * 2 * 64)
    # recompute tier: the selected tokens' layer inputs (128 B each) come back and are recomputed
    rec = dict(ALL_GPU, beta=1.0)
    assert cost.total_h2d_bytes().value(rec) == pytest.approx(2 * 3 * 2 * 50 * 128)
    assert cost.total_recomputed_tokens().value(rec) == pytest.approx(2 * 3 * 2 * 50)


def test_cpu_attention_moves_work_off_the_link():
    spec, hw = make_spec(), make_hw()
    kv_cpu = dict(ALL_GPU, alpha=1.0)
    fetch = decode_step_cost(spec, hw, make_knobs(), 50, 3)
    delegate = decode_step_cost(spec, hw, make_knobs(cpu_attention=True), 50, 3)
    assert delegate.total_h2d_bytes().value(kv_cpu) < fetch.total_h2d_bytes().value(kv_cpu)
    assert delegate.cpu_s.value(kv_cpu) > 0 == fetch.cpu_s.value(kv_cpu)


def test_sparsity_and_compression_shrink_transfer():
    spec, hw = make_spec(), make_hw()
    kv_cpu = dict(ALL_GPU, alpha=1.0, wg=0.0)
    dense = decode_step_cost(spec, hw, make_knobs(), 100, 3).total_h2d_bytes().value(kv_cpu)
    sparse = decode_step_cost(spec, hw, make_knobs(sparsity_method="swa", sparsity=0.8), 100, 3)
    int4 = decode_step_cost(spec, hw, make_knobs(kv_compression="int4",
                                                 weight_compression="int4"), 100, 3)
    assert sparse.total_h2d_bytes().value(kv_cpu) < dense
    assert int4.total_h2d_bytes().value(kv_cpu) < dense


def test_gqa_recompute_tier_costs_more_memory_than_cpu_tier():
    spec, hw, k = make_spec(), make_hw(), make_knobs()
    w = Workload(64, 8)
    _, cpu_kv = memory_at(spec, hw, k, w, 3, 72)
    on_cpu = cpu_kv.value(dict(ALL_GPU, alpha=1.0))
    recomputed = cpu_kv.value(dict(ALL_GPU, beta=1.0))
    assert recomputed - on_cpu == pytest.approx(6 * 72 * 2 * (128 - 64))
    mha = make_spec(num_kv_heads=4)  # K+V = 2 x 64 = 128 elements, the hidden state 64
    _, cpu_mha = memory_at(mha, hw, k, w, 3, 72)
    saved = cpu_mha.value(dict(ALL_GPU, alpha=1.0)) - cpu_mha.value(dict(ALL_GPU, beta=1.0))
    assert saved == pytest.approx(6 * 72 * 2 * (256 - 128))


def test_copy_overlap_interpolates_between_overlapped_and_serial_lanes():
    """One iteration streaming half the weights: full overlap is the slowest lane, none the
    sum of compute and copies (as no overlap at all), and o in between is a + c - o min(a, c)."""
    spec, k = make_spec(), make_knobs(num_gpu_batches=1)
    at = dict(ALL_GPU, wg=0.5, alpha=0.5)
    lanes = {}
    for o in (1.0, 0.5, 0.0):
        hw = make_hw(copy_overlap=o)
        cost = decode_step_cost(spec, hw, k, 50, phase=2)
        lanes[o] = max(lane.value(at) for lane in cost.iteration_lanes(hw, True, first=True))
    hw = make_hw()
    cost = decode_step_cost(spec, hw, k, 50, phase=2)
    h2d = (cost.h2d_bytes + cost.weight_h2d_bytes).value(at) / hw.h2d_bytes_per_s
    d2h = cost.d2h_bytes.value(at) / hw.d2h_bytes_per_s
    compute = (cost.gpu_s + cost.cpu_s).value(at)
    assert h2d > compute > d2h > 0  # the copy is the longer lane: min(a, c) is the compute
    assert lanes[1.0] == pytest.approx(max(h2d, compute, d2h))
    assert lanes[0.0] == pytest.approx(
        cost.iteration_lanes(hw, False, first=True)[0].value(at))
    assert lanes[0.5] == pytest.approx(h2d + 0.5 * compute)


@pytest.mark.parametrize("copy_overlap", [1.0, 0.3, 0.0])
def test_lp_is_optimal_for_any_copy_overlap(copy_overlap):
    spec, w = make_spec(num_layers=4), Workload(32, 16)
    hw = make_hw(gpu_mem_bytes=600_000, cpu_mem_bytes=2**30, copy_overlap=copy_overlap)
    k = make_knobs(p1=4, p2=8)
    placement = solve_placement(spec, hw, k, w)
    assert placement is not None
    lp_time = sum_time(estimate(spec, hw, k, w, placement))
    assert time_lower_bound(spec, hw, k, w) <= lp_time * (1 + 1e-9)
    for wg, alpha in itertools.product([0.0, 0.25, 0.5, 0.75, 1.0], repeat=2):
        est = estimate(spec, hw, k, w, dict(wg=wg, hg=1.0, alpha=alpha, beta=0.0))
        if not est.violations:
            assert sum_time(est) >= lp_time * (1 - 1e-6)


def sum_time(est) -> float:
    return est.prefill_s + est.decode_s


def test_decode_chunks_cover_every_step_once():
    w = Workload(10, 40)
    chunks = decode_chunks(w, make_knobs(p1=5, p2=20))
    assert sum(c for _, _, c in chunks) == 39
    assert [p for p, _, _ in chunks] == sorted(p for p, _, _ in chunks)
    assert {p for p, _, _ in chunks} == {1, 2, 3}
    assert sum(c for p, _, c in chunks if p == 1) == 5


def test_lp_is_optimal_against_a_grid_and_bound():
    spec, w = make_spec(num_layers=4), Workload(32, 16)
    hw = make_hw(gpu_mem_bytes=600_000, cpu_mem_bytes=2**30)
    k = make_knobs(p1=4, p2=8)
    placement = solve_placement(spec, hw, k, w)
    assert placement is not None
    best = estimate(spec, hw, k, w, placement)
    assert not best.violations
    lp_time = best.prefill_s + best.decode_s
    assert time_lower_bound(spec, hw, k, w) <= lp_time * (1 + 1e-9)
    grid = [0.0, 0.25, 0.5, 0.75, 1.0]
    for wg, hg, alpha, beta in itertools.product(grid, grid, grid, grid):
        if alpha + beta > 1:
            continue
        est = estimate(spec, hw, k, w, dict(wg=wg, hg=hg, alpha=alpha, beta=beta))
        if not est.violations:
            assert est.prefill_s + est.decode_s >= lp_time * (1 - 1e-6)


def test_sparse_steps_pay_the_profiled_selection_cost():
    """A sparse step's compute grows by exactly the profile's fixed selection cost plus its
    per-token part times the GPU batch's sequences and the context; a dense step's does not."""
    spec = make_spec()
    free, priced = make_hw(), make_hw(selection_overhead_s=3e-5, selection_s_per_token=2e-8)
    placement = {"wg": 0.5, "hg": 1.0, "alpha": 0.5, "beta": 0.0}
    sparse = make_knobs(sparsity_method="swa", sparsity=0.8, gpu_batch_size=4)
    for context in (17.0, 200.0):
        extra = (decode_step_cost(spec, priced, sparse, context, 2).gpu_s.value(placement)
                 - decode_step_cost(spec, free, sparse, context, 2).gpu_s.value(placement))
        assert extra == pytest.approx(3e-5 + 4 * context * 2e-8)
    for dense in (make_knobs(gpu_batch_size=4), make_knobs(sparsity_method="swa", sparsity=0.0)):
        assert (decode_step_cost(spec, priced, dense, 200.0, 2).gpu_s.value(placement)
                == decode_step_cost(spec, free, dense, 200.0, 2).gpu_s.value(placement))
    with pytest.raises(ValueError, match="selection_s_per_token"):
        make_hw(selection_s_per_token=-1e-9)
