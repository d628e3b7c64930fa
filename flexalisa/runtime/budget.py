"""Memory budgets: what a block needs on the device and on the host, checked before running.

For one block shape (``gpu_batch_size`` rows per GPU batch, ``num_gpu_batches``, padded prompt
length ``T``, ``N`` generation steps), over ``L`` layers::

    device = globals + resident layers + 2 working layers (if any is streamed/compressed)
             + device-placed activations + the compute working set (the chunked prefill's
               scratch or the gathered selection, plus logits)
             + GPU-tier KV: gpu_capacity_tokens x (L x num_gpu_batches) stores
    host   = streamed layers + host-placed activations
             + CPU-tier KV (cpu_capacity_tokens per store) + kept hidden states (recompute tier)

The KV capacities are what the budget has left after the fixed part; the tier planner turns
them into phase starts (when the policy leaves them None) or reports that the policy's layout
does not fit. A misfit raises ``BudgetError`` before anything is allocated, saying what would
fit: the smallest device/host budget for this policy, and the largest gpu batch that fits the
given budgets. The method's score state (SWA/H2O) is not counted: it is O(n) per row.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from cost_model.costs import seeds_from_prefill, working_set_bytes
from cost_model.units import format_bytes
from flexalisa.errors import BudgetError
from flexalisa.kv import KVStoreConfig
from flexalisa.models.weights import ModelWeights
from flexalisa.runtime.weights import WeightLayout, compressed_layer_bytes, globals_bytes
from flexalisa.schedule import DoesNotFit, Tier, TierPlan, TierPlanConfig, plan_tiers
from policy.policy import Policy

UNLIMITED = None  # a budget of None is not checked


@dataclass(frozen=True)
class BlockShapeInfo:
    """The shape of one block, as far as memory goes."""

    gpu_batch_size: int  # rows per GPU batch
    num_gpu_batches: int  # GPU batches in the block
    prompt_len: int  # padded prompt slots T
    num_steps: int  # generation steps N (prefill included)


@dataclass(frozen=True)
class BlockMemory:
    """A resolved block: its tier plan, store config and the bytes it reserves per tier."""

    plan: TierPlan  # phases and per-step tier layout
    store_config: KVStoreConfig  # shared by every (layer, GPU batch) store
    gpu_fixed_bytes: int  # device bytes other than the KV stores
    cpu_fixed_bytes: int  # host bytes other than the KV stores
    gpu_bytes: int  # total device bytes reserved
    cpu_bytes: int  # total host bytes reserved


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _layer_bytes(weights: ModelWeights, j: int, compressed: bool, dtype: torch.dtype) -> int:
    if compressed:
        return compressed_layer_bytes(weights.layers[j], dtype)
    return sum(t.numel() for t in weights.layers[j].values()) * _elt(dtype)


def fixed_bytes(weights: ModelWeights, policy: Policy, shape: BlockShapeInfo,
                dtype: torch.dtype, device_type: str = "cpu") -> tuple[int, int]:
    """(device, host) bytes of a block other than its KV stores."""
    spec, elt = weights.spec, _elt(dtype)
    layout = WeightLayout.from_share(policy.weights_gpu_share, spec.num_layers,
                                     policy.weight_compression == "int4")
    gpu = globals_bytes(weights.globals, torch.device(device_type), dtype)
    layer_bytes = [_layer_bytes(weights, j, layout.compressed, dtype)
                   for j in range(spec.num_layers)]
    gpu += sum(layer_bytes[:layout.num_resident_layers])
    cpu = sum(layer_bytes[layout.num_resident_layers:])
    if layout.needs_working_buffers:
        full = max(sum(t.numel() for t in layer.values()) for layer in weights.layers)
        gpu += 2 * full * elt
    batch, length = shape.gpu_batch_size, shape.prompt_len
    act = batch * length * spec.hidden_size * elt  # one GPU batch's prefill hidden states
    act_gpu = int(round(policy.act_gpu_share * shape.num_gpu_batches))
    gpu += act_gpu * act
    cpu += (shape.num_gpu_batches - act_gpu) * act
    gpu += int(working_set_bytes(spec, batch, length, length + shape.num_steps, elt,
                                 scored=seeds_from_prefill(policy.sparsity_method,
                                                           policy.sparsity)))
    return gpu, cpu


def store_config(weights: ModelWeights, policy: Policy, batch: int, plan: TierPlan,
                 dtype: torch.dtype) -> KVStoreConfig:
    spec = weights.spec
    group = 64 if spec.head_dim % 64 == 0 else spec.head_dim
    return KVStoreConfig.for_plan(plan, batch_size=batch, num_kv_heads=spec.num_kv_heads,
                                  head_dim=spec.head_dim, hidden_size=spec.hidden_size,
                                  dtype=dtype, compression=policy.kv_compression,
                                  group_size=group)


def _per_token(weights: ModelWeights, policy: Policy, shape: BlockShapeInfo,
               dtype: torch.dtype) -> dict[Tier, int]:
    """Bytes one slot takes in each tier over all stores of the block."""
    spec = weights.spec
    probe = KVStoreConfig(batch_size=shape.gpu_batch_size, num_kv_heads=spec.num_kv_heads,
                          head_dim=spec.head_dim, hidden_size=spec.hidden_size,
                          gpu_capacity_tokens=0, cpu_capacity_tokens=0,
                          hidden_capacity_tokens=0, dtype=dtype,
                          compression=policy.kv_compression,
                          group_size=64 if spec.head_dim % 64 == 0 else spec.head_dim)
    stores = spec.num_layers * shape.num_gpu_batches
    return {tier: stores * probe.bytes_per_token(tier) for tier in Tier}


def _capacity(budget: int | None, fixed: int, per_token: int) -> int | None:
    return None if budget is None else max(0, budget - fixed) // max(per_token, 1)


def _plan(policy: Policy, shape: BlockShapeInfo, gpu_cap: int | None,
          cpu_cap: int | None) -> TierPlan | DoesNotFit:
    phase2, phase3 = policy.phase2_start_step, policy.phase3_start_step
    if gpu_cap is None:  # no device budget: a None start is never reached
        never = shape.num_steps
        phase3 = never if phase3 is None else phase3
        phase2 = min(phase3, never) if phase2 is None else phase2
    config = TierPlanConfig(prompt_len=shape.prompt_len, gen_len=shape.num_steps,
                            kv_gpu_share=policy.kv_gpu_share, kv_cpu_share=policy.kv_cpu_share,
                            kv_recompute_share=policy.kv_recompute_share,
                            phase2_start_step=phase2, phase3_start_step=phase3,
                            gpu_capacity_tokens=gpu_cap, cpu_capacity_tokens=cpu_cap)
    return plan_tiers(config)


@dataclass(frozen=True)
class Misfit:
    """Why a block does not fit: a one-line reason, and the bytes by which its fixed device
    part exceeds the device budget (0 when that is not what misfits)."""

    reason: str
    device_over: int = 0


def try_block(weights: ModelWeights, policy: Policy, shape: BlockShapeInfo, dtype: torch.dtype,
              gpu_mem_bytes: int | None, cpu_mem_bytes: int | None,
              device_type: str = "cpu") -> BlockMemory | Misfit:
    """The block's memory plan, or why it does not fit."""
    gpu_fixed, cpu_fixed = fixed_bytes(weights, policy, shape, dtype, device_type)
    per_token = _per_token(weights, policy, shape, dtype)
    for name, budget, fixed in (("device", gpu_mem_bytes, gpu_fixed),
                                ("host", cpu_mem_bytes, cpu_fixed)):
        if budget is not None and fixed > budget:
            return Misfit(f"weights, activations and working buffers need {format_bytes(fixed)} "
                          f"on the {name}, more than its budget of {format_bytes(budget)}",
                          fixed - budget if name == "device" else 0)
    plan = _plan(policy, shape, _capacity(gpu_mem_bytes, gpu_fixed, per_token[Tier.GPU]),
                 _capacity(cpu_mem_bytes, cpu_fixed, per_token[Tier.CPU]))
    if isinstance(plan, DoesNotFit):
        return Misfit(plan.message)
    config = store_config(weights, policy, shape.gpu_batch_size, plan, dtype)
    stores = weights.spec.num_layers * shape.num_gpu_batches
    gpu = gpu_fixed + stores * config.reserved_bytes(Tier.GPU)
    cpu = cpu_fixed + stores * (config.reserved_bytes(Tier.CPU)
                                + config.reserved_bytes(Tier.RECOMPUTE))
    if cpu_mem_bytes is not None and cpu > cpu_mem_bytes:
        return Misfit(f"the CPU tier plus kept hidden states need {format_bytes(cpu)} on the "
                      f"host, more than its budget of {format_bytes(cpu_mem_bytes)}")
    return BlockMemory(plan, config, gpu_fixed, cpu_fixed, gpu, cpu)


def plan_block(weights: ModelWeights, policy: Policy, shape: BlockShapeInfo, dtype: torch.dtype,
               gpu_mem_bytes: int | None, cpu_mem_bytes: int | None,
               device_type: str = "cpu") -> BlockMemory:
    """``try_block``, raising ``BudgetError`` with what would fit when it does not."""
    result = try_block(weights, policy, shape, dtype, gpu_mem_bytes, cpu_mem_bytes, device_type)
    if isinstance(result, BlockMemory):
        return result
    hint = _what_fits(weights, policy, shape, dtype, gpu_mem_bytes, cpu_mem_bytes, device_type)
    raise BudgetError(f"policy does not fit: {result.reason}. {hint}", result.device_over)


def _what_fits(weights: ModelWeights, policy: Policy, shape: BlockShapeInfo, dtype: torch.dtype,
               gpu_mem_bytes: int | None, cpu_mem_bytes: int | None, device_type: str) -> str:
    """Hints: the unbudgeted need, a smaller gpu batch, or streaming every layer."""
    unlimited = try_block(weights, policy, shape, dtype, None, None, device_type)
    assert isinstance(unlimited, BlockMemory)
    hints = [f"Without budgets this policy reserves {format_bytes(unlimited.gpu_bytes)} on the "
             f"device and {format_bytes(unlimited.cpu_bytes)} on the host"]
    batch = shape.gpu_batch_size // 2
    while batch >= 1:
        smaller = BlockShapeInfo(batch, shape.num_gpu_batches, shape.prompt_len, shape.num_steps)
        if isinstance(try_block(weights, policy, smaller, dtype, gpu_mem_bytes, cpu_mem_bytes,
                                device_type), BlockMemory):
            hints.append(f"gpu_batch_size={batch} fits these budgets")
            return "; ".join(hints) + "."
        batch //= 2
    streamed = replace(policy, weights_gpu_share=0.0, weights_cpu_share=1.0, act_gpu_share=0.0,
                       act_cpu_share=1.0)
    if isinstance(try_block(weights, streamed, shape, dtype, gpu_mem_bytes, cpu_mem_bytes,
                            device_type), BlockMemory):
        hints.append("weights_gpu_share=0 and act_gpu_share=0 (stream every layer) fit")
    else:
        hints.append("no smaller gpu batch fits; move KV to the CPU tier or recompute, or raise "
                     "the budgets")
    return "; ".join(hints) + "."


def gpu_budget_for(weights: ModelWeights, policy: Policy, shape: BlockShapeInfo,
                   dtype: torch.dtype, gpu_capacity_tokens: int, device_type: str = "cpu") -> int:
    """The device budget that leaves exactly ``gpu_capacity_tokens`` GPU-tier slots per store."""
    gpu_fixed, _ = fixed_bytes(weights, policy, shape, dtype, device_type)
    return gpu_fixed + gpu_capacity_tokens * _per_token(weights, policy, shape, dtype)[Tier.GPU]
