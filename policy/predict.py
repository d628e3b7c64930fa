"""`predict`: the cost model's throughput prediction for a fixed `Policy` (torch-free).

Throughput uses FlexGen's definitions, for ``batch_size`` prompts per block::

    prefill tok/s = prompts * prompt_len / prefill_s
    decode tok/s  = prompts * (gen_len - 1) / decode_s
    total tok/s   = prompts * gen_len / (prefill_s + decode_s)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from cost_model.estimate import Estimate, PhaseEstimate, estimate
from cost_model.hardware import HardwareProfile
from cost_model.memory import memory_at, phase_peaks
from cost_model.spec import ModelSpec
from cost_model.timing import Knobs, Workload
from policy.policy import Policy

PHASE_NAMES = {0: "prefill", 1: "phase I", 2: "phase II", 3: "phase III"}


@dataclass(frozen=True)
class Prediction:
    """Predicted times and throughput of one block of ``batch_size`` sequences."""

    batch_size: int  # prompts per block
    prompt_len: int  # tokens per prompt
    gen_len: int  # tokens generated per prompt
    phase2_start_step: int  # resolved p1 (a None in the policy is derived from memory)
    phase3_start_step: int  # resolved p2
    prefill_s: float  # seconds of the prefill
    decode_s: float  # seconds of the decode steps
    prefill_tok_per_s: float  # FlexGen's prefill throughput
    decode_tok_per_s: float  # FlexGen's decode throughput (0 when gen_len == 1)
    total_tok_per_s: float  # FlexGen's generation throughput
    peak_gpu_bytes: float  # largest GPU memory over the phases
    peak_cpu_bytes: float  # largest CPU memory over the phases
    phases: tuple[PhaseEstimate, ...]  # prefill row, then each decode phase that occurs
    violations: tuple[str, ...]  # memory limits the policy exceeds; empty when it fits

    @property
    def fits(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["phases"] = [dict(asdict(p), name=PHASE_NAMES[p.phase]) for p in self.phases]
        d["fits"] = self.fits
        return d


def policy_assignment(policy: Policy) -> dict[str, float]:
    """The cost model's placement variables for ``policy``."""
    return {"wg": policy.weights_gpu_share, "hg": policy.act_gpu_share,
            "alpha": policy.kv_cpu_share, "beta": policy.kv_recompute_share}


def policy_knobs(policy: Policy, p1: int, p2: int) -> Knobs:
    return Knobs(policy.gpu_batch_size, policy.num_gpu_batches, policy.sparsity_method,
                 policy.sparsity, policy.kv_compression, policy.weight_compression,
                 policy.cpu_attention, policy.overlap, p1, p2)


def _fits(spec: ModelSpec, hw: HardwareProfile, knobs: Knobs, workload: Workload,
          assignment: dict[str, float], phase: int) -> bool:
    peak = phase_peaks(workload, knobs).get(phase, workload.prompt_len)
    gpu, cpu = memory_at(spec, hw, knobs, workload, phase, peak)
    return gpu.value(assignment) <= hw.gpu_mem_bytes and cpu.value(assignment) <= hw.cpu_mem_bytes


def resolve_phase_starts(spec: ModelSpec, hw: HardwareProfile, policy: Policy,
                         workload: Workload) -> tuple[int, int]:
    """(p1, p2) with a ``None`` replaced by the last step at which the earlier phase still fits.

    With no CPU share, phase II never begins; with no recompute share, phase III never begins
    (a given start included: it would only relabel phase II's steps).
    """
    steps, assignment = workload.num_decode_steps, policy_assignment(policy)
    p1, p2 = policy.phase2_start_step, policy.phase3_start_step
    if p1 is None:
        p1 = steps if policy.kv_cpu_share + policy.kv_recompute_share == 0 else 0
        while p1 < steps and _fits(spec, hw, policy_knobs(policy, p1 + 1, steps + 1), workload,
                                   assignment, 1):
            p1 += 1
    if policy.kv_recompute_share == 0:  # phase III would be phase II again: it never begins
        p2 = steps
    elif p2 is None:
        p2 = p1
        while p2 < steps and _fits(spec, hw, policy_knobs(policy, p1, p2 + 1), workload,
                                   assignment, 2):
            p2 += 1
    return p1, max(p1, p2)


def to_prediction(est: Estimate, workload: Workload, p1: int, p2: int) -> Prediction:
    b, prompt_len, gen_len = est.batch, workload.prompt_len, workload.gen_len
    decode_tps = b * (gen_len - 1) / est.decode_s if est.decode_s > 0 else 0.0
    return Prediction(
        batch_size=b, prompt_len=prompt_len, gen_len=gen_len, phase2_start_step=p1,
        phase3_start_step=p2, prefill_s=est.prefill_s, decode_s=est.decode_s,
        prefill_tok_per_s=b * prompt_len / est.prefill_s, decode_tok_per_s=decode_tps,
        total_tok_per_s=b * gen_len / (est.prefill_s + est.decode_s),
        peak_gpu_bytes=max(p.peak_gpu_bytes for p in est.phases),
        peak_cpu_bytes=max(p.peak_cpu_bytes for p in est.phases),
        phases=est.phases, violations=est.violations)


def check_workload(spec: ModelSpec, prompt_len: int, gen_len: int) -> Workload:
    if prompt_len < 1 or gen_len < 1:
        raise ValueError(f"prompt_len and gen_len must be >= 1, got {prompt_len}, {gen_len}")
    if prompt_len + gen_len > spec.max_seq_len:
        raise ValueError(f"prompt_len + gen_len = {prompt_len + gen_len} exceeds the model's "
                         f"max_seq_len {spec.max_seq_len}")
    return Workload(prompt_len, gen_len)


def predict(spec: ModelSpec, hw: HardwareProfile, policy: Policy, prompt_len: int,
            gen_len: int, runner: str = "offload") -> Prediction:
    """Predicted throughput of ``policy``; ``Prediction.violations`` lists memory overruns.

    ``runner``: what runs it, the offloading runtime ("offload", as for a policy file) or the
    all-on-device engine ("engine"; only for a policy that offloads nothing), each with its own
    per-layer cost (``HardwareProfile.for_runner``).
    """
    if runner == "engine" and not policy.all_on_device:
        raise ValueError("only a policy that keeps everything on the device runs on the engine")
    hw = hw.for_runner(runner)
    workload = check_workload(spec, prompt_len, gen_len)
    p1, p2 = resolve_phase_starts(spec, hw, policy, workload)
    est = estimate(spec, hw, policy_knobs(policy, p1, p2), workload, policy_assignment(policy))
    return to_prediction(est, workload, p1, p2)
