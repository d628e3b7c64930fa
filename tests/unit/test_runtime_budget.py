"""Budgets: misfits refused before running with what would fit; phases derived from capacity;
a small device budget crosses all three phases with bytes moved and tokens recomputed."""

from __future__ import annotations

import pytest
import torch

from flexalisa.errors import BudgetError, FlexalisaError
from flexalisa.models import load_model
from flexalisa.runtime import BlockShapeInfo, OffloadRunner, gpu_budget_for, plan_block
from flexalisa.runtime.loop import BlockLoop
from tests.conftest import make_prompts
from tests.parity.test_runtime_dense import make_policy


@pytest.fixture(scope="module")
def llama(tiny_models):
    return load_model(tiny_models["llama"][0])[0]


def test_misfit_is_refused_before_running_and_says_what_fits(llama, monkeypatch):
    policy = make_policy("kv_all_cpu", 1, True, False, gpu_batch_size=8)
    ran = []
    monkeypatch.setattr(BlockLoop, "run", lambda self, ops: ran.append(1))
    runner = OffloadRunner(llama, policy, gpu_mem_bytes="64KiB")
    with pytest.raises(BudgetError) as info:
        runner.generate(make_prompts(8, 16), 8)
    runner.close()
    message = str(info.value)
    assert isinstance(info.value, FlexalisaError) and not ran
    assert "on the device, more than its budget of 64.00 KiB" in message
    assert "Without budgets this policy reserves" in message
    assert "gpu_batch_size=" in message or "stream every layer" in message or (
        "no smaller gpu batch fits" in message)


def test_misfit_suggests_a_gpu_batch_that_fits(llama):
    policy = make_policy("all_on_device", 1, True, False, gpu_batch_size=8)
    shape = BlockShapeInfo(8, 1, 16, 64)
    need = plan_block(llama, policy, shape, torch.float32, None, None).gpu_bytes
    with pytest.raises(BudgetError, match=r"gpu_batch_size=(4|2|1) fits these budgets"):
        plan_block(llama, policy, shape, torch.float32, need - 1, None)


def test_host_budget_misfit_names_the_host(llama):
    policy = make_policy("kv_all_cpu", 1, True, False, gpu_batch_size=4)
    shape = BlockShapeInfo(4, 1, 16, 32)
    with pytest.raises(BudgetError, match="host|cpu-tier"):
        plan_block(llama, policy, shape, torch.float32, None, 2048)


def test_unlimited_budget_with_derived_phases_keeps_all_kv_on_device(llama):
    policy = make_policy("kv_30_50_20", 1, True, False, phase2_start_step=None,
                         phase3_start_step=None)
    memory = plan_block(llama, policy, BlockShapeInfo(2, 1, 16, 20), torch.float32, None, None)
    assert memory.plan.phase2_start_step >= 19 and memory.plan.max_cpu_tokens == 0


def test_small_device_budget_crosses_three_phases(llama):
    """The reduced version of scripts/small_budget_run.py: phases come from capacity."""
    policy = make_policy("kv_30_50_20", 2, True, False, gpu_batch_size=2,
                         phase2_start_step=None, phase3_start_step=None,
                         weights_gpu_share=0.5, weights_cpu_share=0.5)
    prompts, gen_len = make_prompts(4, 24, ragged=False, seed=2), 40
    shape = BlockShapeInfo(2, 2, 24, gen_len)
    # all-GPU overflows after 30 slots (phase II); the 0.3 GPU share overflows at 100 > 63
    budget = gpu_budget_for(llama, policy, shape, torch.float32, gpu_capacity_tokens=30)
    runner = OffloadRunner(llama, policy, gpu_mem_bytes=budget, check_integrity=True)
    result = runner.generate(prompts, gen_len, ignore_eos=True)
    runner.close()
    extras = result.extras
    crossed = extras["phase_crossed_at_step"]
    assert 0 < crossed["phase2"] < crossed["phase3"] < gen_len, crossed
    assert extras["h2d_bytes"] > 0 and extras["d2h_bytes"] > 0
    assert extras["tokens_fetched"] > 0 and extras["tokens_recomputed"] > 0
    assert extras["reserved_bytes"]["gpu"] <= budget
    assert extras["peak_bytes"]["gpu"] <= budget
    want = OffloadRunner(llama, make_policy("all_on_device", 1, False, False, gpu_batch_size=4))
    assert result.tokens == want.generate(prompts, gen_len, ignore_eos=True).tokens
    want.close()
