"""The placement LP of one candidate (FlexGen's, extended with ALISA's phases), pulp + CBC.

Given the discrete ``Knobs`` (batch split, sparsity, compression, delegation, overlap, p1, p2),
choose wg, hg, α, β (see ``cost_model.timing``) to minimise the block's total time::

    min  T_prefill + sum_c count_c * T_c          (c: runs of decode steps, per phase)
    s.t. T_step = L * (T_first + (nb - 1) * T_other) + T_head       (see cost_model.timing)
         T_iter >= each lane: h2d, d2h, compute, host memory    [overlap]
         T_iter >= h2d + d2h + gpu + cpu                         [no overlap]
         GPU(phase) <= gpu_mem, CPU(phase) <= cpu_mem   at each phase's peak length
         0 <= wg, hg, α, β <= 1,  α + β <= 1,  α = 0 if phase II never runs, β = 0 if III never

All terms are linear in the variables, so the optimum is exact for the model ``estimate`` uses.
"""

from __future__ import annotations

import warnings

import pulp

from cost_model.affine import VARIABLES, Affine
from cost_model.hardware import HardwareProfile
from cost_model.memory import memory_constraints, phase_peaks
from cost_model.spec import ModelSpec
from cost_model.timing import (
    Knobs,
    StepCost,
    Workload,
    decode_chunks,
    decode_step_cost,
    prefill_cost,
)

GIB = 2**30
TIE_BREAK_S = 1e-7  # per unit share moved off the GPU: prefer the GPU among equal-time optima


def _epigraph(problem: pulp.LpProblem, name: str, lanes: list, variables: dict
              ) -> pulp.LpVariable:
    t = pulp.LpVariable(name, lowBound=0)
    for i, lane in enumerate(lanes):
        problem += t >= lane.to_pulp(variables), f"{name}_lane{i}"
    return t


def _step_time(problem: pulp.LpProblem, name: str, cost: StepCost, hw: HardwareProfile,
               overlap: bool, variables: dict) -> pulp.LpAffineExpression:
    """Epigraph variables for one step's iterations; returns the step-time expression."""
    first = _epigraph(problem, f"{name}_first", cost.iteration_lanes(hw, overlap, True), variables)
    other = _epigraph(problem, f"{name}_other", cost.iteration_lanes(hw, overlap, False),
                      variables)
    head = _epigraph(problem, f"{name}_head", cost.head_lanes(), variables)
    return cost.num_layers * (first + (cost.num_gpu_batches - 1) * other) + head


def solve_placement(spec: ModelSpec, hw: HardwareProfile, knobs: Knobs, workload: Workload,
                    allow_recompute: bool = True) -> dict[str, float] | None:
    """The optimal placement {wg, hg, alpha, beta} for ``knobs``, or None when nothing fits."""
    with warnings.catch_warnings():  # pulp 3.x warns about its own 4.0 API changes
        warnings.simplefilter("ignore", DeprecationWarning)
        return _solve(spec, hw, knobs, workload, allow_recompute)


def _solve(spec: ModelSpec, hw: HardwareProfile, knobs: Knobs, workload: Workload,
           allow_recompute: bool) -> dict[str, float] | None:
    peaks = phase_peaks(workload, knobs)
    problem = pulp.LpProblem("placement", pulp.LpMinimize)
    upper = {"wg": 1.0, "hg": 1.0, "alpha": 1.0 if (2 in peaks or 3 in peaks) else 0.0,
             "beta": 1.0 if (3 in peaks and allow_recompute) else 0.0}
    variables = {v: pulp.LpVariable(v, lowBound=0, upBound=upper[v]) for v in VARIABLES}
    problem += variables["alpha"] + variables["beta"] <= 1, "kv_shares"
    total = [_step_time(problem, "t_prefill", prefill_cost(spec, hw, knobs, workload.prompt_len),
                        hw, knobs.overlap, variables)]
    for i, (phase, mean_len, count) in enumerate(decode_chunks(workload, knobs)):
        cost = decode_step_cost(spec, hw, knobs, mean_len, phase)
        total.append(count * _step_time(problem, f"t_run{i}", cost, hw, knobs.overlap, variables))
    for label, used, limit in memory_constraints(spec, hw, knobs, workload):
        problem += (used / GIB).to_pulp(variables) <= limit / GIB, label  # GiB: well scaled
    tie_break = TIE_BREAK_S * (4 - variables["wg"] - variables["hg"] + variables["alpha"]
                               + variables["beta"])
    problem += pulp.lpSum(total) + tie_break
    status = problem.solve(pulp.PULP_CBC_CMD(msg=False))
    if pulp.LpStatus[status] != "Optimal":
        return None
    return {v: min(upper[v], max(0.0, float(variables[v].value() or 0.0))) for v in VARIABLES}


def _box_min(expr: Affine) -> float:
    """Minimum of an affine expression over 0 <= wg, hg <= 1, alpha, beta >= 0, alpha+beta <= 1.

    Ignores the per-candidate upper bounds that fix α or β to 0, so it is a lower bound.
    """
    c = expr.coefs
    kv = min(0.0, c.get("alpha", 0.0), c.get("beta", 0.0))
    return expr.const + min(0.0, c.get("wg", 0.0)) + min(0.0, c.get("hg", 0.0)) + kv


def _step_lower_bound(cost: StepCost, hw: HardwareProfile, overlap: bool) -> float:
    def worst(lanes: list[Affine]) -> float:
        return max(_box_min(lane) for lane in lanes)

    first = worst(cost.iteration_lanes(hw, overlap, True))
    other = worst(cost.iteration_lanes(hw, overlap, False))
    return cost.num_layers * (first + (cost.num_gpu_batches - 1) * other) + worst(
        cost.head_lanes())


def time_lower_bound(spec: ModelSpec, hw: HardwareProfile, knobs: Knobs,
                     workload: Workload) -> float:
    """A lower bound on the block's time over every placement (memory ignored); cheap, no LP."""
    total = _step_lower_bound(prefill_cost(spec, hw, knobs, workload.prompt_len), hw,
                              knobs.overlap)
    for phase, mean_len, count in decode_chunks(workload, knobs):
        total += count * _step_lower_bound(decode_step_cost(spec, hw, knobs, mean_len, phase),
                                           hw, knobs.overlap)
    return total


def memory_lower_bounds(spec: ModelSpec, hw: HardwareProfile, knobs: Knobs,
                        workload: Workload) -> tuple[float, float]:
    """(least GPU bytes, least GPU + CPU bytes) any placement needs at the worst phase peak."""
    by_phase: dict[str, Affine] = {}
    gpu_need = 0.0
    for label, used, _ in memory_constraints(spec, hw, knobs, workload):
        phase = label.split("_")[1]
        by_phase[phase] = by_phase.get(phase, Affine()) + used
        if label.startswith("gpu"):
            gpu_need = max(gpu_need, _box_min(used))
    return gpu_need, max(_box_min(total) for total in by_phase.values())
