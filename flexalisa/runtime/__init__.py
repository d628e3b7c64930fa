"""The offloading runtime: device layer (CUDA streams | CPU copy threads), weight placement and
streaming, memory budgets, and the one pipelined zig-zag generation loop over tiered KV stores.

    runner = OffloadRunner(weights, policy, device="cpu", gpu_mem_bytes="512MiB")
    result = runner.generate(prompts, max_new_tokens=64)   # same contract as Engine.generate
    result.extras["phase_crossed_at_step"], result.extras["h2d_bytes"], ...

Files: ``device.py`` (the only CUDA/thread code), ``weights.py`` (placement, INT4),
``budget.py`` (what fits), ``compute.py`` (one layer over one GPU batch), ``loop.py`` (the op
loop), ``batch.py`` (per-GPU-batch rows and sampling), ``extras.py`` (reported counters),
``timing.py`` (per-op timers), ``runner.py`` (blocks, OOM retry, the public API).
"""

from flexalisa.runtime.budget import BlockMemory, BlockShapeInfo, gpu_budget_for, plan_block
from flexalisa.runtime.device import CpuDevice, CudaDevice, Device, make_device
from flexalisa.runtime.extras import EXTRAS_KEYS
from flexalisa.runtime.runner import OffloadRunner

__all__ = ["EXTRAS_KEYS", "BlockMemory", "BlockShapeInfo", "CpuDevice", "CudaDevice", "Device",
           "OffloadRunner", "gpu_budget_for", "make_device", "plan_block"]
