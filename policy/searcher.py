"""`search`: the best `Policy` for a model, hardware and workload (LP per candidate and phase).

Candidates are the discrete choices (GPU batch size x number of GPU batches, sparsity method and
ratio, KV / weight compression, CPU attention, phase starts p1, p2 on a grid). For each, the LP in
``cost_model.lp`` places weights, KV and activations. A branch-and-bound skips candidates whose
throughput upper bound (``cost_model.lp.time_lower_bound``) cannot beat the best found so far, and
candidates that cannot fit memory at any placement, so the answer is the exact best over the grid.

Styles: ``"flexgen"`` = static split (p1 = 0) with no recompute tier, FlexGen's space;
``"alisa"`` = three phases with p1, p2 from the grid {0, G/4, G/2, 3G/4, G} x {p1, (p1+G)/2, G}
(G = decode steps; a start at G never begins). Since the grid does not depend on memory and each
LP's feasible set only grows with memory, more memory never lowers the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product

from cost_model.estimate import estimate
from cost_model.hardware import HardwareProfile
from cost_model.lp import memory_lower_bounds, solve_placement, time_lower_bound
from cost_model.spec import ModelSpec
from cost_model.timing import Knobs, Workload
from policy.policy import Policy
from policy.predict import Prediction, check_workload, predict

DEFAULT_GPU_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 512)
DEFAULT_NUM_GPU_BATCHES = (1, 2, 3, 4, 6, 8)
STYLES = ("alisa", "flexgen")


class InfeasibleError(ValueError):
    """No candidate fits the memory limits; the message says what the least demanding needs."""


@dataclass(frozen=True)
class SearchSpace:
    """The discrete choices the search enumerates."""

    gpu_batch_sizes: tuple[int, ...] = DEFAULT_GPU_BATCH_SIZES  # used when batch_sizes is None
    num_gpu_batches: tuple[int, ...] = DEFAULT_NUM_GPU_BATCHES  # used when batch_sizes is None
    batch_sizes: tuple[int, ...] | None = None  # fixed effective batches: all (bs, nb) splits
    sparsity_methods: tuple[str, ...] = ("dense",)  # methods to try
    sparsities: tuple[float, ...] = (0.0,)  # ratios to try with the sparse methods
    kv_compressions: tuple[str, ...] = ("none",)  # KV storage formats to try
    weight_compressions: tuple[str, ...] = ("none",)  # weight storage formats to try
    cpu_attention: tuple[bool, ...] = (False, True)  # delegation options to try
    style: str = "alisa"  # "alisa" (phases + recompute) or "flexgen" (static, no recompute)
    overlap: bool = True  # overlap compute with transfers

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"SearchSpace.style must be one of {STYLES}, got {self.style!r}")
        sizes = (self.batch_sizes or ()) + self.gpu_batch_sizes + self.num_gpu_batches
        if any(int(x) < 1 for x in sizes):
            raise ValueError(f"batch sizes must be >= 1, got {sizes}")
        if not self.sparsity_methods or not self.kv_compressions or not self.cpu_attention:
            raise ValueError("SearchSpace lists must not be empty")

    def splits(self) -> list[tuple[int, int]]:
        if self.batch_sizes is None:
            return list(product(self.gpu_batch_sizes, self.num_gpu_batches))
        return [(n // nb, nb) for n in self.batch_sizes for nb in range(1, min(n, 16) + 1)
                if n % nb == 0]

    def sparsity_options(self) -> list[tuple[str, float]]:
        opts = [(m, 0.0) if m == "dense" else (m, s)
                for m in self.sparsity_methods for s in self.sparsities
                if m == "dense" or s > 0]
        return sorted(set(opts))

    def phase_starts(self, num_steps: int) -> list[tuple[int, int]]:
        if self.style == "flexgen":
            return [(0, 0)]
        g = num_steps
        firsts = sorted({0, g // 4, g // 2, (3 * g) // 4, g})
        return sorted({(p1, p2) for p1 in firsts for p2 in (p1, (p1 + g) // 2, g)})


@dataclass(frozen=True)
class SearchResult:
    """The best policy found and its prediction."""

    policy: Policy  # the chosen policy
    prediction: Prediction  # its predicted times and throughput
    num_candidates: int  # candidates enumerated
    num_solved: int  # LPs solved (the rest were pruned by memory or by bound)
    style: str = field(default="alisa")  # the search space's style


def _candidates(space: SearchSpace, workload: Workload) -> list[Knobs]:
    out = []
    for (bs, nb), (method, sparsity), kvc, wc, cpu_attn, (p1, p2) in product(
            space.splits(), space.sparsity_options(), space.kv_compressions,
            space.weight_compressions, space.cpu_attention,
            space.phase_starts(workload.num_decode_steps)):
        if cpu_attn and p1 >= workload.num_decode_steps and p1 > 0:
            continue  # no CPU tier ever: delegation is moot
        out.append(Knobs(bs, nb, method, sparsity, kvc, wc, cpu_attn, space.overlap, p1, p2))
    return out


def _to_policy(knobs: Knobs, placement: dict[str, float], workload: Workload,
               style: str) -> Policy:
    wg, hg = round(placement["wg"], 9), round(placement["hg"], 9)
    alpha, beta = round(placement["alpha"], 9), round(placement["beta"], 9)
    p1, p2 = knobs.p1, knobs.p2
    never = workload.num_decode_steps  # a phase whose share is 0 is the phase before it: say so
    p2 = never if beta == 0 else p2
    p1 = never if beta == 0 and alpha == 0 and not knobs.cpu_attention else p1
    return Policy(
        gpu_batch_size=knobs.gpu_batch_size, num_gpu_batches=knobs.num_gpu_batches,
        weights_gpu_share=wg, weights_cpu_share=1.0 - wg,
        kv_gpu_share=max(0.0, 1.0 - alpha - beta), kv_cpu_share=alpha, kv_recompute_share=beta,
        phase2_start_step=p1, phase3_start_step=max(p1, p2),
        act_gpu_share=hg, act_cpu_share=1.0 - hg, sparsity_method=knobs.sparsity_method,
        sparsity=knobs.sparsity, kv_compression=knobs.kv_compression,
        weight_compression=knobs.weight_compression, cpu_attention=knobs.cpu_attention,
        overlap=knobs.overlap)


def _infeasible(spec: ModelSpec, hw: HardwareProfile, knobs: list[Knobs],
                workload: Workload) -> InfeasibleError:
    needs = [memory_lower_bounds(spec, hw, k, workload) for k in knobs] or [(0.0, 0.0)]
    gpu_need = min(n[0] for n in needs)
    total_need = min(n[1] for n in needs)
    gib = 2**30
    return InfeasibleError(
        f"no policy fits: GPU {hw.gpu_mem_bytes / gib:.2f} GiB, CPU {hw.cpu_mem_bytes / gib:.2f} "
        f"GiB; the least demanding candidate needs >= {gpu_need / gib:.2f} GiB on the GPU and "
        f">= {total_need / gib:.2f} GiB GPU+CPU (model {spec.name}, {spec.num_params / 1e9:.2f}B "
        f"params, prompt {workload.prompt_len} + gen {workload.gen_len}); lower the batch, "
        f"enable compression or add memory")


def search(spec: ModelSpec, hw: HardwareProfile, prompt_len: int, gen_len: int,
           space: SearchSpace | None = None) -> SearchResult:
    """The best policy over ``space`` (default: dense, no compression, ALISA phases)."""
    space = space or SearchSpace()
    workload = check_workload(spec, prompt_len, gen_len)
    knobs_list = _candidates(space, workload)
    ranked = []
    # a bound for every candidate: any of them may turn out all on device, run by the engine
    bound_hw = min((hw, hw.for_runner("engine")), key=lambda h: h.layer_overhead_s)
    for knobs in knobs_list:
        gpu_need, total_need = memory_lower_bounds(spec, hw, knobs, workload)
        if gpu_need <= hw.gpu_mem_bytes and total_need <= hw.gpu_mem_bytes + hw.cpu_mem_bytes:
            bound = knobs.batch * gen_len / time_lower_bound(spec, bound_hw, knobs, workload)
            ranked.append((-bound, len(ranked), knobs))
    ranked.sort(key=lambda item: (item[0], item[1]))
    best: tuple[float, Knobs, dict[str, float]] | None = None
    num_solved = 0
    for neg_bound, _, knobs in ranked:
        if best is not None and -neg_bound <= best[0]:
            break
        placement = solve_placement(spec, hw, knobs, workload, space.style == "alisa")
        num_solved += 1
        if placement is None:
            continue
        est = estimate(spec, hw.for_runner(_runner(_to_policy(knobs, placement, workload,
                                                             space.style))),
                       knobs, workload, placement)
        throughput = knobs.batch * gen_len / (est.prefill_s + est.decode_s)
        if not est.violations and (best is None or throughput > best[0]):
            best = (throughput, knobs, placement)
    if best is None:
        raise _infeasible(spec, hw, knobs_list, workload)
    policy = _to_policy(best[1], best[2], workload, space.style)
    return SearchResult(policy, predict(spec, hw, policy, prompt_len, gen_len, _runner(policy)),
                        len(knobs_list), num_solved, space.style)


def _runner(policy: Policy) -> str:
    """What flexalisa runs a searched policy on: the engine when it offloads nothing."""
    return "engine" if policy.all_on_device else "offload"
