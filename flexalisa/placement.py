"""From CLI flags to a `Policy` for the offloading runner: a policy file, or the cost model's
search (`--auto-policy`) for this model, workload, hardware profile and memory budget.

The runtime itself only reads a Policy; the search is imported here, at the CLI boundary.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from cost_model import HardwareProfile, format_bytes, parse_bytes
from cost_model.costs import layer_weight_bytes
from cost_model.spec import ModelSpec
from flexalisa.batch_size import batch_candidates
from flexalisa.errors import BudgetError, FlexalisaError
from policy import Policy, Prediction, predict


@dataclass(frozen=True)
class PlacementRequest:
    policy_path: Path | None = None  # a policy.json (Policy or search result)
    auto_policy: bool = False  # search the best policy with the cost model
    hardware: str = "local"  # preset name, hw.json, or "local" (measure this machine, ~15 s)
    gpu_mem: str | None = None  # GPU budget with units ("512MiB"); on CPU it is enforced too
    cpu_mem: str | None = None  # host budget with units

    def __post_init__(self) -> None:
        if self.policy_path is not None and self.auto_policy:
            raise FlexalisaError("--policy and --auto-policy are mutually exclusive")

    @property
    def offload(self) -> bool:
        """Whether the offloading runner is wanted (else the all-on-device engine)."""
        return bool(self.policy_path or self.auto_policy or self.gpu_mem or self.cpu_mem)

    def budget_bytes(self) -> tuple[int | None, int | None]:
        try:
            return (parse_bytes(self.gpu_mem) if self.gpu_mem else None,
                    parse_bytes(self.cpu_mem) if self.cpu_mem else None)
        except ValueError as exc:
            raise FlexalisaError(str(exc)) from None


@dataclass(frozen=True)
class Workload:
    batch: int  # prompts per block; with auto_batch, the most the search may choose
    prompt_len: int  # longest prompt (tokens)
    gen_len: int  # tokens generated per prompt
    sparsity_method: str = "dense"  # attention method to plan for
    sparsity: float = 0.0  # its KV sparsity
    auto_batch: bool = False  # the search picks the batch (``batch_candidates(batch)``)


def hardware_profile(req: PlacementRequest) -> HardwareProfile:
    gpu, cpu = req.budget_bytes()
    if req.hardware == "local":
        print("measuring this machine for the cost model (~15 s)...", file=sys.stderr)
        return HardwareProfile.measure(gpu_mem_bytes=gpu, cpu_mem_bytes=cpu)
    try:
        return HardwareProfile.load(req.hardware).with_memory(gpu, cpu)
    except (ValueError, OSError) as exc:
        raise FlexalisaError(f"--hardware {req.hardware!r}: {exc}") from None


def policy_from_file(req: PlacementRequest, spec: ModelSpec, work: Workload,
                     hw: HardwareProfile | None = None) -> tuple[Policy, Prediction | None]:
    """``--policy``'s Policy and, when ``--hardware`` names a preset or profile file (or ``hw``
    is that profile, loaded), the cost model's prediction for it (measuring this machine just
    to price it is not worth 15 s)."""
    assert req.policy_path is not None
    try:
        policy = Policy.load(req.policy_path)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise FlexalisaError(f"--policy {req.policy_path}: {exc}") from None
    if req.hardware == "local":
        return policy, None
    return policy, predict(spec, hw or hardware_profile(req), policy, work.prompt_len,
                           work.gen_len)


def make_generator(req: PlacementRequest, weights, device: str, method, work: Workload,
                   hw: HardwareProfile | None = None):
    """(generator, policy, prediction): the Engine, or an OffloadRunner when a policy or budget
    is requested, unless the searched policy puts everything on the device (then the Engine).
    A policy file always runs on the OffloadRunner. The policy's own sparsity wins; conflicting
    flags are refused. ``hw``: ``hardware_profile(req)`` when the caller already has it."""
    from flexalisa.engine import Engine

    if not req.offload:
        return Engine(weights, device=device, method=method), None, None
    if method is not None and (method.per_kv_head or getattr(method, "query_channels", 0)):
        raise FlexalisaError("--per-kv-head / --query-channels run on the all-on-device engine "
                             "only; the offloading runtime uses the paper's per-layer SWA")
    gpu, cpu = req.budget_bytes()
    # the runtime's memory plan is checked at the job's longest prompt and generation
    prompts, limits = [[0] * work.prompt_len] * work.batch, [work.gen_len] * work.batch
    if req.policy_path is not None:
        policy, prediction = policy_from_file(req, weights.spec, work, hw)
        _check_sparsity(method, policy)
        runner = _runner(weights, device, policy, gpu, cpu)
        try:
            runner.plan(prompts, limits)
        except BudgetError:
            runner.close()
            raise
        return runner, policy, prediction
    # --auto-policy, or budgets alone: the cost model places weights, KV and activations to fit
    from policy import SearchSpace

    sizes = batch_candidates(work.batch) if work.auto_batch else (work.batch,)
    space = SearchSpace(batch_sizes=sizes, sparsity_methods=(work.sparsity_method,),
                        sparsities=(work.sparsity,) if work.sparsity else (0.0,))
    result, runner, searched_bytes = fitting_search(weights, hw or hardware_profile(req), prompts,
                                                    limits, space, device, gpu, cpu)
    note = (f" (searched as if the device had {format_bytes(searched_bytes)}, so that the "
            f"runtime's own plan fits)" if gpu is not None and searched_bytes < gpu else "")
    print(f"auto-policy: {result.policy.describe()}{note}", file=sys.stderr)
    # Nothing to offload: the engine does the runner's work without its bookkeeping (the runner
    # was 21% slower at SmolLM2 batch 32 on the project's Intel CPU box). The memory plan has been
    # checked; the Engine prefills in chunks of the runtime's ~1024 tokens, so its prefill
    # scratch is about the planned one (its chunks may span GPU batches).
    if result.policy.all_on_device:
        runner.close()
        print("auto-policy: everything fits on the device; running the all-on-device engine",
              file=sys.stderr)
        return Engine(weights, device=device, method=method), result.policy, result.prediction
    return runner, result.policy, result.prediction


def _check_sparsity(method, policy: Policy) -> None:
    if method is not None and (policy.sparsity_method, policy.sparsity) != (
            method.name, method.sparsity):
        raise FlexalisaError(f"--sparsity-method {method.name} --sparsity {method.sparsity} "
                             f"conflicts with the policy's {policy.sparsity_method} "
                             f"{policy.sparsity}; drop the flags or edit the policy")


def _runner(weights, device: str, policy: Policy, gpu: int | None, cpu: int | None):
    from flexalisa.runtime import OffloadRunner

    try:
        return OffloadRunner(weights, policy, device=device, gpu_mem_bytes=gpu,
                             cpu_mem_bytes=cpu)
    except ValueError as exc:
        raise FlexalisaError(str(exc)) from None


SEARCH_RETRIES = 5  # searches after the first, each with less device memory
SEARCH_SHRINK = 0.75  # device memory of the next search when the misfit is not the device's


def fitting_search(weights, hw: HardwareProfile, prompts: list[list[int]], limits: list[int],
                   space, device: str = "cpu", gpu_mem_bytes: int | None = None,
                   cpu_mem_bytes: int | None = None):
    """(search result, planned runner, device bytes of the last search): ``fitting_policy``'s
    policy with the OffloadRunner that runs it on ``device``."""
    from flexalisa.engine import default_dtype, resolve_device
    from flexalisa.runtime.runner import device_budget

    torch_device = resolve_device(device)
    result, searched = fitting_policy(weights, hw, prompts, limits, space, torch_device.type,
                                      default_dtype(torch_device),
                                      device_budget(torch_device, gpu_mem_bytes), cpu_mem_bytes)
    return result, _runner(weights, device, result.policy, gpu_mem_bytes, cpu_mem_bytes), searched


def fitting_policy(weights, hw: HardwareProfile, prompts: list[list[int]], limits: list[int],
                   space, device_type: str, dtype, gpu_mem_bytes: int | None,
                   cpu_mem_bytes: int | None):
    """(search result, device bytes of the last search): the cost model's best policy whose
    runtime memory plan (``flexalisa.runtime.runner.plan_blocks`` on a ``device_type``
    device, in ``dtype``) fits the budgets. Needs no device, only shapes.

    The cost model's memory terms relax the runtime's (its weight share is continuous, the
    runtime places whole layers and needs both working buffers once any layer streams). When
    the runtime's plan does not fit, search again as if the device had less memory: less by
    the overshoot the runtime reports plus one layer's weights (the runtime's unit), or by
    ``SEARCH_SHRINK`` when the misfit is elsewhere. The budgets given are never exceeded.
    """
    from flexalisa.runtime.runner import plan_blocks
    from policy import InfeasibleError, search

    prompt_len, gen_len = max(map(len, prompts)), max(limits)
    misfit: BudgetError | None = None
    for retry in range(SEARCH_RETRIES + 1):
        try:
            result = search(weights.spec, hw, prompt_len, gen_len, space)
        except InfeasibleError as exc:  # after a refit, the runtime's message says more
            raise misfit or FlexalisaError(str(exc)) from None
        try:
            plan_blocks(weights, result.policy, prompts, limits, dtype, gpu_mem_bytes,
                        cpu_mem_bytes, device_type)
            return result, hw.gpu_mem_bytes
        except BudgetError as exc:
            misfit = exc
            if retry == SEARCH_RETRIES:
                raise  # the runtime's message: what the last policy needs, and what would fit
            if exc.device_over:  # the runtime places whole layers: give up one more
                layer = layer_weight_bytes(weights.spec, result.policy.weight_compression,
                                           hw.compute_dtype_bytes)
                less = hw.gpu_mem_bytes - exc.device_over - int(layer)
            else:
                less = int(hw.gpu_mem_bytes * SEARCH_SHRINK)
            if less <= 0:
                raise
            hw = hw.with_memory(less)
    raise AssertionError("unreachable")
