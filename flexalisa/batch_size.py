"""The default batch size, ``auto``: as many prompts per batch as the memory the batch will run in
holds, up to a cap per device.

Larger batches amortise each decode step's weight reads over more rows. On the project's 2-core
AMD CPU box, ``flexalisa bench --model <SmolLM2 gguf> --prompt-len 64 --gen-len 64 --batch B
--repeat 3`` gave 236.5, 271.2, 291.8 and 293.1 tok/s total for B = 16, 32, 64 and 128: past 64
the gain is nil while a batch's memory, its latency and the work a killed job redoes (output is
written per finished batch) keep doubling, so the CPU cap is 64. On CUDA the cap is vLLM's
default ``max_num_seqs``, 256 (not measured here).

The choice is a function of the job (its prompt count, longest prompt and longest generation),
the model and the machine's total memory, never of the memory free at the moment: a resumed job
cuts the same batches as the run it resumes, so its greedy completions are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from cost_model.costs import (
    kv_bytes_per_token,
    seeds_from_prefill,
    selected_tokens,
    working_set_bytes,
)
from cost_model.spec import ModelSpec
from cost_model.units import format_bytes

AUTO_BATCH_CAP = {"cpu": 64, "cuda": 256}  # prompts per batch at most, by device type
HOST_MEMORY_SHARE = 0.5  # of the host's total memory, for weights, KV and scratch (CPU device)
DEVICE_MEMORY_SHARE = 0.9  # of the GPU's total memory (vLLM's gpu_memory_utilization default)
CGROUP_LIMIT = Path("/sys/fs/cgroup/memory.max")  # a container's limit, when it has one


@dataclass(frozen=True)
class BatchChoice:
    size: int  # prompts per batch
    reason: str  # why, for the job's stderr line and report

    def describe(self) -> str:
        return f"batch size {self.size} ({self.reason})"


def host_memory_bytes() -> int:
    """The host's total memory, or the container's cgroup limit when that is lower."""
    total = psutil.virtual_memory().total
    try:
        limit = CGROUP_LIMIT.read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def device_memory_bytes(device: torch.device) -> int:
    """Memory an all-on-device batch may use on ``device``, before the weights take theirs."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return int(total * DEVICE_MEMORY_SHARE)
    return int(host_memory_bytes() * HOST_MEMORY_SHARE)


def batch_bytes(spec: ModelSpec, batch: int, prompt_len: int, gen_len: int, dtype_bytes: int,
                method: str = "dense", sparsity: float = 0.0) -> float:
    """The engine's memory for one batch besides the weights: its KV cache, allocated for the
    longest prompt plus the longest generation, and the scratch the runtime's memory plan
    counts for a batch of this shape (``cost_model.costs.working_set_bytes``)."""
    length = prompt_len + gen_len
    kv = batch * length * spec.num_layers * kv_bytes_per_token(spec, "none", dtype_bytes)
    gathered = 0.0 if method == "dense" else selected_tokens(length, method, sparsity)
    scratch = working_set_bytes(spec, batch, prompt_len, gathered, dtype_bytes,
                                scored=seeds_from_prefill(method, sparsity))
    return kv + scratch


def engine_weight_bytes(weights, device: torch.device, dtype: torch.dtype) -> int:
    """What the engine's weights take of ``device_memory_bytes``: the layers in ``dtype``, and
    the globals as the runtime's budget counts them (``runtime.weights.globals_bytes``: tied
    tensors once, plus a tied lm_head's packed copy in fp32 on a CPU). ``LLM`` keeps the
    engine's packed weights, not the loaded ones, so this is one copy."""
    from flexalisa.runtime.weights import globals_bytes

    elt = torch.empty((), dtype=dtype).element_size()
    layers = sum(t.numel() for layer in weights.layers for t in layer.values())
    return globals_bytes(weights.globals, device, dtype) + layers * elt


def engine_batch_size(spec: ModelSpec, device: torch.device, dtype: torch.dtype,
                      weights_bytes: int, num_prompts: int, prompt_len: int, gen_len: int,
                      method: str = "dense", sparsity: float = 0.0,
                      refill: bool = False) -> BatchChoice:
    """The largest batch, at most the device's cap and the job's prompt count, whose
    ``batch_bytes`` fit ``device_memory_bytes`` less ``weights_bytes`` (what the engine's
    weights take there). One prompt when none fits: running it is then the engine's
    out-of-memory handling's business, as with any batch size."""
    cap = AUTO_BATCH_CAP[device.type]
    room = device_memory_bytes(device) - weights_bytes
    dtype_bytes = torch.finfo(dtype).bits // 8

    def cached(size: int) -> int:  # generated slots per row
        return cache_gen_len(gen_len, size, num_prompts, refill)

    size = min(cap, num_prompts)
    while size > 1 and batch_bytes(spec, size, prompt_len, cached(size), dtype_bytes, method,
                                   sparsity) > room:
        size -= 1
    if size == min(cap, num_prompts):
        why = ("every prompt of the job" if size == num_prompts and size < cap
               else f"the {device.type} cap")
    else:
        why = (f"what {format_bytes(max(room, 0))} of {device.type} memory holds at "
               f"{prompt_len + cached(size)} cached tokens per sequence")
    return BatchChoice(size, f"auto: {why}")


def cache_gen_len(gen_len: int, batch: int, num_prompts: int, refill: bool) -> int:
    """Generated slots the engine's KV cache holds per row: twice the generation where rows
    are refilled (``refill``, see ``LLM.refilling``) and more prompts than the batch wait
    (``Engine.generate``'s ``max_batch`` sizes its cache so that a prompt can be put in at any
    step), else the generation."""
    return 2 * gen_len if refill and num_prompts > batch else gen_len


def offload_batch_limit(device: torch.device, num_prompts: int) -> int:
    """The largest batch the cost model's search may choose for the offloading runtime."""
    return max(1, min(AUTO_BATCH_CAP[device.type], num_prompts))


def batch_candidates(limit: int) -> tuple[int, ...]:
    """Effective batches the search tries under ``auto``: the powers of two below ``limit``,
    and ``limit``."""
    sizes = {limit}
    size = 1
    while size < limit:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))
