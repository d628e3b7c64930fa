"""From CLI flags to a `Policy` for the offloading runner: a policy file, or the cost model's
search (`--auto-policy`) for this model, workload, hardware profile and memory budget.

The runtime itself only reads a Policy; the search is imported here, at the CLI boundary.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from cost_model import HardwareProfile, parse_bytes
from cost_model.spec import ModelSpec
from flexalisa.errors import FlexalisaError
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
    batch: int  # prompts per block the search may use
    prompt_len: int  # longest prompt (tokens)
    gen_len: int  # tokens generated per prompt
    sparsity_method: str = "dense"  # attention method to plan for
    sparsity: float = 0.0  # its KV sparsity


def hardware_profile(req: PlacementRequest) -> HardwareProfile:
    gpu, cpu = req.budget_bytes()
    if req.hardware == "local":
        print("measuring this machine for the cost model (~15 s)...", file=sys.stderr)
        return HardwareProfile.measure(gpu_mem_bytes=gpu, cpu_mem_bytes=cpu)
    try:
        return HardwareProfile.load(req.hardware).with_memory(gpu, cpu)
    except (ValueError, OSError) as exc:
        raise FlexalisaError(f"--hardware {req.hardware!r}: {exc}") from None


def resolve_policy(req: PlacementRequest, spec: ModelSpec, work: Workload,
                   hw: HardwareProfile | None = None) -> tuple[Policy | None, Prediction | None]:
    """The policy to run and, when the cost model chose it, its prediction."""
    if req.policy_path is not None:
        try:
            return Policy.load(req.policy_path), None
        except (ValueError, OSError, KeyError, TypeError) as exc:
            raise FlexalisaError(f"--policy {req.policy_path}: {exc}") from None
    if not req.offload:
        return None, None
    # --auto-policy, or budgets alone: the cost model places weights, KV and activations to fit
    from policy import InfeasibleError, SearchSpace, search

    hw = hw or hardware_profile(req)
    space = SearchSpace(batch_sizes=(work.batch,), sparsity_methods=(work.sparsity_method,),
                        sparsities=(work.sparsity,) if work.sparsity else (0.0,))
    try:
        result = search(spec, hw, work.prompt_len, work.gen_len, space)
    except InfeasibleError as exc:
        raise FlexalisaError(f"no policy fits: {exc}") from None
    print(f"auto-policy: {result.policy.describe()}", file=sys.stderr)
    return result.policy, result.prediction


def prediction_for(req: PlacementRequest, spec: ModelSpec, policy: Policy,
                   work: Workload) -> Prediction | None:
    """The cost model's prediction for a given policy when a hardware profile was named."""
    if req.hardware == "local":
        return None
    return predict(spec, hardware_profile(req), policy, work.prompt_len, work.gen_len)


def make_generator(req: PlacementRequest, weights, device: str, method, work: Workload):
    """(generator, policy, prediction): the Engine, or an OffloadRunner when a policy or budget
    is requested. The policy's own sparsity wins; conflicting flags are refused."""
    from flexalisa.engine import Engine

    if not req.offload:
        return Engine(weights, device=device, method=method), None, None
    if method is not None and (method.per_kv_head or getattr(method, "query_channels", 0)):
        raise FlexalisaError("--per-kv-head / --query-channels run on the all-on-device engine "
                             "only; the offloading runtime uses the paper's per-layer SWA")
    policy, prediction = _fitting_policy(req, weights, device, work)
    if method is not None and (policy.sparsity_method, policy.sparsity) != (
            method.name, method.sparsity):
        raise FlexalisaError(f"--sparsity-method {method.name} --sparsity {method.sparsity} "
                             f"conflicts with the policy's {policy.sparsity_method} "
                             f"{policy.sparsity}; drop the flags or edit the policy")
    return _runner(req, weights, device, policy), policy, prediction


def _runner(req: PlacementRequest, weights, device: str, policy: Policy):
    from flexalisa.runtime import OffloadRunner

    gpu, cpu = req.budget_bytes()
    try:
        return OffloadRunner(weights, policy, device=device, gpu_mem_bytes=gpu,
                             cpu_mem_bytes=cpu)
    except ValueError as exc:
        raise FlexalisaError(str(exc)) from None


SEARCH_RETRIES = 5  # searches with a shrinking device budget before giving up
SEARCH_SHRINK = 0.75  # device memory the search may plan with, relative to the last try


def _fitting_policy(req: PlacementRequest, weights, device: str, work: Workload
                    ) -> tuple[Policy, Prediction | None]:
    """A policy whose runtime memory plan fits the budgets.

    The cost model's memory terms are estimates; the runtime's plan counts real buffers. When
    the searched policy does not fit the runtime's plan, search again as if the device had less
    memory, so the budget the user gave is never exceeded.
    """
    from flexalisa.errors import BudgetError

    policy, prediction = resolve_policy(req, weights.spec, work)
    prompts, limits = [[0] * work.prompt_len] * work.batch, [work.gen_len] * work.batch
    if req.policy_path is not None:  # a given policy is checked, at the job's longest prompt
        _runner(req, weights, device, policy).plan(prompts, limits)
        return policy, prediction
    hw = hardware_profile(req) if req.hardware != "local" else None
    for _ in range(SEARCH_RETRIES):
        runner = _runner(req, weights, device, policy)
        try:
            runner.plan(prompts, limits)
            return policy, prediction
        except BudgetError:
            hw = hw or hardware_profile(req)
            hw = hw.with_memory(int(hw.gpu_mem_bytes * SEARCH_SHRINK))
            policy, prediction = resolve_policy(req, weights.spec, work, hw)
        finally:
            runner.close()
    _runner(req, weights, device, policy).plan(prompts, limits)  # raises the runtime's message
    return policy, prediction
