"""Evaluate one candidate at a fixed placement: times, bytes moved and memory per phase."""

from __future__ import annotations

from dataclasses import dataclass

from cost_model.hardware import HardwareProfile
from cost_model.memory import memory_at, memory_constraints, phase_peaks
from cost_model.spec import ModelSpec
from cost_model.timing import (
    Knobs,
    Workload,
    decode_chunks,
    decode_step_cost,
    prefill_cost,
    step_time,
)

MEMORY_TOLERANCE = 1e-6  # relative slack on memory limits (LP solutions sit on the boundary)


@dataclass(frozen=True)
class PhaseEstimate:
    """Totals of one phase of one block (the prefill counts as its own row, phase 0)."""

    phase: int  # 0: prefill; 1, 2, 3: decode phases I, II, III
    num_steps: int  # decode steps in the phase (1 for the prefill)
    time_s: float  # seconds the phase takes
    h2d_bytes: float  # host -> device bytes moved
    d2h_bytes: float  # device -> host bytes moved
    recomputed_tokens: float  # K,V rows recomputed (sequences x layers x tokens)
    peak_gpu_bytes: float  # GPU memory at the phase's peak context length
    peak_cpu_bytes: float  # CPU memory at the phase's peak context length


@dataclass(frozen=True)
class Estimate:
    """Prediction for one block of ``batch`` sequences."""

    batch: int  # sequences per block
    prefill_s: float  # seconds of the prefill
    decode_s: float  # seconds of all decode steps
    phases: tuple[PhaseEstimate, ...]  # prefill row then decode phases that occur
    violations: tuple[str, ...]  # memory limits exceeded, empty when the candidate fits


def _phase_row(spec: ModelSpec, hw: HardwareProfile, knobs: Knobs, workload: Workload,
               phase: int, rows: list[tuple[float, int]], assignment: dict[str, float]
               ) -> PhaseEstimate:
    time_s = h2d = d2h = recomputed = 0.0
    for num_tokens, count in rows:
        cost = (prefill_cost(spec, hw, knobs, workload.prompt_len) if phase == 0
                else decode_step_cost(spec, hw, knobs, num_tokens, phase))
        time_s += count * step_time(cost, hw, knobs.overlap, assignment)
        h2d += count * cost.total_h2d_bytes().value(assignment)
        d2h += count * cost.total_d2h_bytes().value(assignment)
        recomputed += count * cost.total_recomputed_tokens().value(assignment)
    peaks = phase_peaks(workload, knobs)
    mem_phase = phase if phase else min(peaks)
    num_tokens = workload.prompt_len if phase == 0 else peaks[phase]
    gpu, cpu = memory_at(spec, hw, knobs, workload, mem_phase, num_tokens)
    return PhaseEstimate(phase, sum(c for _, c in rows), time_s, h2d, d2h, recomputed,
                         gpu.value(assignment), cpu.value(assignment))


def estimate(spec: ModelSpec, hw: HardwareProfile, knobs: Knobs, workload: Workload,
             assignment: dict[str, float]) -> Estimate:
    """Times, traffic and memory of ``knobs`` at placement ``assignment`` (wg, hg, alpha, beta)."""
    rows = [_phase_row(spec, hw, knobs, workload, 0, [(workload.prompt_len, 1)], assignment)]
    by_phase: dict[int, list[tuple[float, int]]] = {}
    for phase, mean_len, count in decode_chunks(workload, knobs):
        by_phase.setdefault(phase, []).append((mean_len, count))
    for phase, chunk_rows in sorted(by_phase.items()):
        rows.append(_phase_row(spec, hw, knobs, workload, phase, chunk_rows, assignment))
    violations = tuple(
        f"{label}: needs {used.value(assignment) / 2**30:.2f} GiB > limit {limit / 2**30:.2f} GiB"
        for label, used, limit in memory_constraints(spec, hw, knobs, workload)
        if used.value(assignment) > limit * (1 + MEMORY_TOLERANCE))
    return Estimate(knobs.batch, rows[0].time_s, sum(r.time_s for r in rows[1:]), tuple(rows),
                    violations)
