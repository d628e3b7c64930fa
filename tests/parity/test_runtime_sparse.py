"""Sparse parity and KV compression through the tiered store.

* SWA with phases I -> II -> III crossed during generation gives the in-memory SWA Engine's
  tokens (same method, same sparsity), with and without CPU delegation.
* INT8 (and INT4) KV: the output is reported, not asserted equal; INT8's logit error vs fp32 is
  measured on the steps before the first differing token and bounded.
"""

from __future__ import annotations

import pytest
import torch

from flexalisa import engine as engine_module
from flexalisa.attention import make_method
from flexalisa.engine import Engine
from flexalisa.kv import TieredKVStore
from flexalisa.models import load_model
from flexalisa.runtime import OffloadRunner
from tests.conftest import make_prompts
from tests.parity.test_runtime_dense import engine_logits, make_policy, runner_logits

NEW_TOKENS = 48
PHASE2, PHASE3 = 8, 24  # decode steps: phase II from generation step 9, III from step 25
INT8_LOGIT_TOL = 0.01  # measured ~1e-3 on the tiny models (INT4: ~1e-2); broken is O(1)


@pytest.fixture(scope="module")
def tiny_weights(tiny_models):
    return {kind: load_model(tiny_models[kind][0])[0] for kind in ("opt", "llama")}


@pytest.mark.parametrize("kind", ["opt", "llama"])
@pytest.mark.parametrize("cpu_attention,num_gpu_batches", [(False, 1), (True, 3)])
@pytest.mark.parametrize("method_name,sparsity", [("swa", 0.5), ("swa", 0.8), ("h2o", 0.6)])
def test_sparse_three_phase_matches_in_memory_engine(tiny_weights, kind, cpu_attention,
                                                     num_gpu_batches, method_name, sparsity):
    weights = tiny_weights[kind]
    prompts = make_prompts(6, 24, seed=5)
    engine = Engine(weights, method=make_method(method_name, sparsity))
    want = engine.generate(prompts, NEW_TOKENS, ignore_eos=True)
    policy = make_policy("kv_30_50_20", num_gpu_batches, True, cpu_attention,
                         sparsity_method=method_name, sparsity=sparsity,
                         phase2_start_step=PHASE2, phase3_start_step=PHASE3)
    runner = OffloadRunner(weights, policy, check_integrity=True)
    got = runner.generate(prompts, NEW_TOKENS, ignore_eos=True)
    runner.close()
    assert got.tokens == want.tokens
    extras = got.extras
    assert extras["phase_crossed_at_step"] == {"phase2": PHASE2 + 1, "phase3": PHASE3 + 1}
    assert all(extras["phase_s"][name] > 0 for name in ("phase1", "phase2", "phase3"))
    assert extras["tokens_recomputed"] > 0
    assert (extras["tokens_fetched"] > 0) != cpu_attention  # delegated entries stay on the host


@pytest.mark.parametrize("kind", ["opt", "llama"])
@pytest.mark.parametrize("num_gpu_batches", [1, 2])
def test_sparse_with_all_kv_delegated_to_the_host_matches_the_engine(tiny_weights, kind,
                                                                     num_gpu_batches):
    """ALISA's usual searched placement: every stored token in the CPU tier, attended there.
    Each step is then one host partial (the selected CPU-tier slots plus the step's own token)
    with no device partial to merge."""
    weights = tiny_weights[kind]
    prompts = make_prompts(4, 20, seed=9)
    want = Engine(weights, method=make_method("swa", 0.8)).generate(prompts, NEW_TOKENS,
                                                                     ignore_eos=True)
    policy = make_policy("kv_all_cpu", num_gpu_batches, True, True, sparsity_method="swa",
                         sparsity=0.8)
    runner = OffloadRunner(weights, policy, check_integrity=True)
    got = runner.generate(prompts, NEW_TOKENS, ignore_eos=True)
    runner.close()
    assert got.tokens == want.tokens
    assert got.extras["tokens_fetched"] == 0 and got.extras["tokens_recomputed"] == 0


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_in_place_host_read_equals_the_generic_host_read(tiny_weights, kind, monkeypatch):
    """With every stored slot in the CPU tier, sparse delegated steps attend the selection in
    the float32 CPU ring's views (``store.host_dense_views``, ``selected_attention``); their
    logits equal, bit for bit, those of the generic skip_cpu fetch (tier masks, a host read
    ahead, the new token scattered in) that the store falls back to when ``host_ready`` says
    no."""
    weights = tiny_weights[kind]
    prompts = make_prompts(4, 20, seed=9)
    policy = make_policy("kv_all_cpu", 1, True, True, sparsity_method="swa", sparsity=0.8)
    calls = {"in_place": 0}
    host_views = TieredKVStore.host_dense_views

    def counting(store, *args):
        calls["in_place"] += 1
        return host_views(store, *args)

    monkeypatch.setattr(TieredKVStore, "host_dense_views", counting)
    runner = OffloadRunner(weights, policy, check_integrity=True)
    in_place, in_place_logits = runner_logits(runner, prompts, NEW_TOKENS)
    runner.close()
    every_step = weights.spec.num_layers * (NEW_TOKENS - 1) * len(prompts) // 2  # 2 per block
    assert calls["in_place"] == every_step
    monkeypatch.setattr(TieredKVStore, "host_ready", lambda store: False)
    runner = OffloadRunner(weights, policy, check_integrity=True)
    generic, generic_logits = runner_logits(runner, prompts, NEW_TOKENS)
    runner.close()
    assert calls["in_place"] == every_step  # not used by the second run
    assert in_place.tokens == generic.tokens
    assert torch.equal(in_place_logits, generic_logits)


def _first_divergence(got: list[int], want: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_int8_kv_logit_error_is_measured_and_bounded(tiny_weights, kind, capsys):
    weights = tiny_weights[kind]
    prompts = make_prompts(4, 16, seed=7)
    ref_tokens, ref_logits = engine_logits(weights, prompts, NEW_TOKENS)
    report = {}
    for compression in ("int8", "int4"):
        policy = make_policy("kv_all_cpu", 1, True, False, gpu_batch_size=4,
                             kv_compression=compression)
        runner = OffloadRunner(weights, policy, check_integrity=True)
        result, logits = runner_logits(runner, prompts, NEW_TOKENS)
        runner.close()
        errors, agree = [], 0
        for row in range(len(prompts)):
            upto = _first_divergence(result.tokens[row], ref_tokens[row])
            agree += upto
            # logits of step s depend on tokens < s only: comparable up to the divergence
            errors.append((logits[row, :upto + 1] - ref_logits[row, :upto + 1]).abs().max())
        report[compression] = (max(errors).item(), agree / (len(prompts) * NEW_TOKENS))
        assert result.extras["bytes"]["kv_d2h"] > 0
    with capsys.disabled():
        print(f"\n{kind} KV compression: (max logit error vs fp32, agreeing tokens) {report}")
    int8_err = report["int8"][0]
    assert 0 < int8_err <= INT8_LOGIT_TOL  # lossy, but only slightly
    assert report["int8"][0] <= report["int4"][0] + 1e-6  # more bits, no more error


@pytest.mark.parametrize("kind", ["opt", "llama"])
@pytest.mark.parametrize("method_name,sparsity", [("swa", 0.5), ("h2o", 0.6)])
def test_sparse_chunked_prefill_matches_the_one_pass_engine(tiny_weights, kind, method_name,
                                                            sparsity, monkeypatch):
    """The runner prefills its 6-row GPU batch four rows at a time (four and two) and seeds
    the method's scores once per layer from the chunks' attention weights; the Engine seeds
    from every row at once. The same tokens, through all three phases."""
    weights = tiny_weights[kind]
    prompts = make_prompts(6, 24, seed=5)
    length = max(len(p) for p in prompts)
    want = Engine(weights, method=make_method(method_name, sparsity)).generate(
        prompts, NEW_TOKENS, ignore_eos=True)
    monkeypatch.setattr("cost_model.costs.PREFILL_CHUNK_TOKENS", 4 * length)
    policy = make_policy("kv_30_50_20", 1, True, False, gpu_batch_size=6,
                         sparsity_method=method_name, sparsity=sparsity,
                         phase2_start_step=PHASE2, phase3_start_step=PHASE3)
    runner = OffloadRunner(weights, policy, check_integrity=True)
    got = runner.generate(prompts, NEW_TOKENS, ignore_eos=True)
    runner.close()
    assert got.tokens == want.tokens
    assert got.extras["tokens_recomputed"] > 0


@pytest.mark.parametrize("kind", ["opt", "llama"])
@pytest.mark.parametrize("method_name,sparsity", [("swa", 0.5), ("h2o", 0.6)])
def test_engine_chunked_sparse_prefill_equals_one_pass(tiny_weights, kind, method_name,
                                                       sparsity, monkeypatch):
    """The Engine's prefill under a method runs layer by layer in the runtime's row chunks:
    chunks of two rows give the tokens and scores of one pass over all six."""
    weights = tiny_weights[kind]
    prompts = make_prompts(6, 24, seed=5)
    length = max(len(p) for p in prompts)
    engine = Engine(weights, method=make_method(method_name, sparsity))
    one_pass = engine.generate(prompts, NEW_TOKENS, ignore_eos=True)
    calls = []
    real_layer = engine_module.prefill_layer
    monkeypatch.setattr(engine_module, "prefill_layer",
                        lambda *a, **k: calls.append(len(a[5])) or real_layer(*a, **k))
    monkeypatch.setattr("cost_model.costs.PREFILL_CHUNK_TOKENS", 2 * length)
    chunked = engine.generate(prompts, NEW_TOKENS, ignore_eos=True)
    assert calls == [3] * weights.spec.num_layers  # three chunks in every layer
    assert chunked.tokens == one_pass.tokens
