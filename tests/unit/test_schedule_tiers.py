"""Property and example tests for the torch-free tier planner."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexalisa.schedule import (
    DoesNotFit,
    Tier,
    TierPlan,
    TierPlanConfig,
    TokenRange,
    boundaries,
    plan_tiers,
)

FAST = settings(max_examples=60, deadline=None)


@st.composite
def shares(draw: st.DrawFn) -> tuple[float, float, float]:
    cpu = draw(st.floats(0.0, 1.0))
    recompute = draw(st.floats(0.0, 1.0 - cpu))
    return max(0.0, 1.0 - cpu - recompute), cpu, recompute


@st.composite
def configs(draw: st.DrawFn) -> TierPlanConfig:
    gpu_share, cpu_share, recompute_share = draw(shares())
    prompt_len, gen_len = draw(st.integers(1, 48)), draw(st.integers(1, 40))
    if draw(st.booleans()):  # explicit phase starts
        phase2 = draw(st.integers(0, gen_len + 2))
        phase3 = draw(st.integers(phase2, gen_len + 4))
        return TierPlanConfig(prompt_len, gen_len, gpu_share, cpu_share, recompute_share,
                              phase2_start_step=phase2, phase3_start_step=phase3)
    gpu_capacity = draw(st.integers(0, prompt_len + gen_len))
    cpu_capacity = draw(st.none() | st.integers(0, prompt_len + gen_len))
    return TierPlanConfig(prompt_len, gen_len, gpu_share, cpu_share, recompute_share,
                          gpu_capacity_tokens=gpu_capacity, cpu_capacity_tokens=cpu_capacity)


def _replay(plan: TierPlan) -> None:
    """Apply each step's moves and placements to a slot → tier map; it must match the layout."""
    home: dict[int, Tier] = {}
    hidden_kept: set[int] = set()
    for step in plan.steps:
        for move in step.moves:
            for slot in range(move.tokens.start, move.tokens.end):
                assert home[slot] is move.src, (step.step_idx, slot, move)
                assert move.dst.age > move.src.age
                home[slot] = move.dst
        for placement in step.new_tokens:
            for slot in range(placement.tokens.start, placement.tokens.end):
                assert slot not in home
                home[slot] = placement.tier
        hidden_kept |= set(range(step.keep_hidden.start, step.keep_hidden.end))
        assert sorted(home) == list(range(step.num_tokens))
        assert all(home[slot] is step.tier_of(slot) for slot in home)
        recomputed = set(range(step.recompute.end))
        assert recomputed <= hidden_kept, "a dropped slot lost its hidden state"


@FAST
@given(configs())
def test_tiers_partition_respect_shares_and_only_move_older(config: TierPlanConfig) -> None:
    plan = plan_tiers(config)
    if isinstance(plan, DoesNotFit):
        return
    assert len(plan.steps) == config.gen_len
    previous_phase, previous_age = 1, {}
    for step in plan.steps:
        n = config.prompt_len + step.step_idx
        assert step.num_tokens == n
        # partition of [0, n): contiguous, no gap, no overlap
        assert (step.recompute.start, step.recompute.end) == (0, step.cpu.start)
        assert (step.cpu.end, step.gpu.start, step.gpu.end) == (step.gpu.start, step.cpu.end, n)
        assert len(step.recompute) + len(step.cpu) + len(step.gpu) == n
        # phase order I → II → III at the resolved starts
        assert step.phase >= previous_phase
        previous_phase = step.phase
        decode_step = max(step.step_idx - 1, 0)  # the prefill runs in decode step 0's phase
        expected_phase = (3 if decode_step >= plan.phase3_start_step
                          else 2 if decode_step >= plan.phase2_start_step else 1)
        assert step.phase == expected_phase
        # shares within one token
        wanted = {1: (n, 0, 0),
                  2: ((1 - config.kv_cpu_share) * n, config.kv_cpu_share * n, 0),
                  3: (config.kv_gpu_share * n, config.kv_cpu_share * n,
                      config.kv_recompute_share * n)}[step.phase]
        got = (len(step.gpu), len(step.cpu), len(step.recompute))
        assert all(abs(g - w) < 1 + 1e-6 for g, w in zip(got, wanted, strict=True)), (got, wanted)
        # a slot's tier only ages
        for slot in range(n):
            age = step.tier_of(slot).age
            assert age >= previous_age.get(slot, 0)
            previous_age[slot] = age
    _replay(plan)


@FAST
@given(configs())
def test_derived_phase_starts_respect_capacities(config: TierPlanConfig) -> None:
    plan = plan_tiers(config)
    gpu_cap, cpu_cap = config.gpu_capacity_tokens, config.cpu_capacity_tokens
    if isinstance(plan, DoesNotFit):
        assert plan.needed_tokens > plan.capacity_tokens
        assert plan.tier.value in plan.message and str(plan.capacity_tokens) in plan.message
        if config.phase2_start_step is None:  # derived starts keep phases I and II fitting,
            # unless phase III never begins (no recompute share): then phase II is the last
            assert plan.phase == (3 if config.kv_recompute_share > 0 else 2)
        return
    for step in plan.steps:
        if gpu_cap is not None:
            assert len(step.gpu) <= gpu_cap
        if cpu_cap is not None:
            assert len(step.cpu) <= cpu_cap
    if config.phase2_start_step is not None:
        return
    assert gpu_cap is not None
    phase2, phase3, last = plan.phase2_start_step, plan.phase3_start_step, config.gen_len - 1
    # phase II starts exactly when the all-GPU layout stops fitting: every generation step
    # before it fits, and the one it starts at (decode step d = generation step d + 1) does not
    for step in plan.steps[: 0 if phase2 == 0 else phase2 + 1]:
        assert step.num_tokens <= gpu_cap
    if phase2 < config.gen_len:
        assert config.num_tokens_at(min(phase2 + 1, last)) > gpu_cap
    # phase III starts exactly when the phase-II layout stops fitting
    if phase3 < config.gen_len:
        n = config.num_tokens_at(min(phase3 + 1, last))
        _, cpu_end = boundaries(config, 2, n)
        assert n - cpu_end > gpu_cap or (cpu_cap is not None and cpu_end > cpu_cap)


def test_static_split_places_the_prefill_split() -> None:
    plan = plan_tiers(TierPlanConfig(10, 4, 0.3, 0.5, 0.2,
                                     phase2_start_step=0, phase3_start_step=0))
    assert isinstance(plan, TierPlan)
    first = plan.steps[0]
    assert first.moves == ()
    assert [(p.tokens, p.tier) for p in first.new_tokens] == [
        (TokenRange(0, 2), Tier.RECOMPUTE), (TokenRange(2, 7), Tier.CPU), (TokenRange(7, 10),
                                                                           Tier.GPU)]
    assert first.keep_hidden == TokenRange(0, 2)
    last = plan.steps[-1]  # n = 13: r = ⌊0.2·13⌋ = 2, c = ⌊0.7·13⌋ = 9
    assert (last.recompute.end, last.cpu.end, last.num_tokens) == (2, 9, 13)
    assert plan.hidden_tokens == 2


def test_phase_transitions_move_old_tokens() -> None:
    plan = plan_tiers(TierPlanConfig(8, 5, 0.25, 0.5, 0.25,  # decode steps 0..3
                                     phase2_start_step=1, phase3_start_step=3))
    assert isinstance(plan, TierPlan)
    assert [s.phase for s in plan.steps] == [1, 1, 2, 2, 3]
    entering_2 = plan.steps[2]  # n = 10, c = 5
    assert [(m.tokens, m.src, m.dst) for m in entering_2.moves] == [
        (TokenRange(0, 5), Tier.GPU, Tier.CPU)]
    assert [(p.tokens, p.tier) for p in entering_2.new_tokens] == [(TokenRange(9, 10), Tier.GPU)]
    entering_3 = plan.steps[4]  # n = 12: r = 3, c = 9; before: cpu [0, 5), gpu [5, 11)
    assert [(m.tokens, m.src, m.dst) for m in entering_3.moves] == [
        (TokenRange(0, 3), Tier.CPU, Tier.RECOMPUTE), (TokenRange(5, 9), Tier.GPU, Tier.CPU)]


def test_all_kv_on_cpu_sends_each_new_token_to_cpu() -> None:
    plan = plan_tiers(TierPlanConfig(4, 3, 0.0, 1.0, 0.0,
                                     phase2_start_step=0, phase3_start_step=0))
    assert isinstance(plan, TierPlan)
    assert all(len(step.gpu) == 0 and step.moves == () for step in plan.steps)
    assert plan.steps[2].new_tokens[0].tier is Tier.CPU


def test_capacity_derivation_example_and_misfit() -> None:
    config = TierPlanConfig(6, 10, 0.5, 0.25, 0.25, gpu_capacity_tokens=8, cpu_capacity_tokens=4)
    plan = plan_tiers(config)
    assert isinstance(plan, TierPlan)
    # all-GPU overflows at n = 9 (generation step 3 = decode step 2); the phase-II layout
    # (GPU n - ⌊n/4⌋) at n = 11 (generation step 5 = decode step 4)
    assert (plan.phase2_start_step, plan.phase3_start_step) == (2, 4)
    assert [s.phase for s in plan.steps] == [1, 1, 1, 2, 2, 3, 3, 3, 3, 3]
    tight = TierPlanConfig(6, 10, 0.5, 0.25, 0.25, gpu_capacity_tokens=3, cpu_capacity_tokens=4)
    misfit = plan_tiers(tight)
    assert isinstance(misfit, DoesNotFit)
    # phase III from step 0, but at n = 7 the GPU share is 7 - ⌊3.5⌋ = 4 > 3
    assert (misfit.step_idx, misfit.tier, misfit.phase) == (1, Tier.GPU, 3)
    assert "3 fit" in misfit.message


@pytest.mark.parametrize("kwargs", [
    dict(kv_gpu_share=0.5, kv_cpu_share=0.6, kv_recompute_share=0.0),  # sum != 1
    dict(kv_gpu_share=1.2, kv_cpu_share=-0.2, kv_recompute_share=0.0),  # out of [0, 1]
    dict(phase2_start_step=3, phase3_start_step=2),
    dict(phase2_start_step=None, phase3_start_step=2),  # nothing to derive it from
])
def test_misuse_raises_value_error(kwargs: dict) -> None:
    base = dict(prompt_len=4, gen_len=4, kv_gpu_share=1.0, kv_cpu_share=0.0,
                kv_recompute_share=0.0, phase2_start_step=0, phase3_start_step=0)
    with pytest.raises(ValueError):
        TierPlanConfig(**{**base, **kwargs})


def test_phase_starts_are_decode_steps_and_the_prefill_joins_decode_step_0() -> None:
    def phases(phase2: int, phase3: int, recompute: float = 0.25) -> list[int]:
        plan = plan_tiers(TierPlanConfig(4, 4, 0.5, 0.5 - recompute, recompute,
                                         phase2_start_step=phase2, phase3_start_step=phase3))
        assert isinstance(plan, TierPlan)
        return [step.phase for step in plan.steps]  # prefill, decode steps 0, 1, 2

    assert phases(0, 0) == [3, 3, 3, 3]
    assert phases(0, 0, recompute=0.0) == [2, 2, 2, 2]  # no recompute share: no phase III
    assert phases(1, 2, recompute=0.0) == [1, 1, 2, 2]
    assert phases(1, 2) == [1, 1, 2, 3]
    assert phases(0, 3) == [2, 2, 2, 2]  # decode step 3 does not exist: never
    assert phases(2, 2) == [1, 1, 1, 3]


def test_schedule_does_not_import_torch() -> None:
    code = ("import sys; import flexalisa.schedule; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
