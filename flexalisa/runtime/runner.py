"""`OffloadRunner`: the Engine's ``generate`` contract, run block by block under a ``Policy``.

Prompts are cut into blocks of ``gpu_batch_size × num_gpu_batches`` rows (in order); a short
last block uses ``ceil(rows / num_gpu_batches)`` rows per GPU batch and fills the remainder with
copies of its first prompt, whose outputs are dropped. Each block is left-padded to its own
longest prompt and runs ``max(row limits)`` generation steps with fixed shapes: a row that
finishes keeps being computed (rows are independent) but its tokens are no longer recorded, and
the block stops early once every row has finished.

Every block is planned (``budget.plan_block``) before the first one runs, so a policy that does
not fit is refused up front. Under CUDA an out-of-memory error inside a block drops that block's
partial results and reruns its rows with half the gpu batch (down to 1); samplers are re-seeded
per row, so the rerun produces what an uninterrupted run would (``on_tokens`` / ``on_logits``
hooks do see the dropped attempt's steps too).

Budgets: ``gpu_mem_bytes`` / ``cpu_mem_bytes`` take bytes or sizes ("512MiB", "16GB"). None
means unchecked, except on CUDA where the device budget defaults to its free memory. Policy
phase starts left None are derived from the device budget's KV capacity; with no device budget
they are never reached (all KV stays in the GPU tier).

On the CPU device, copy jobs run on worker threads where compute leaves a CPU free and inline
otherwise; ``copy_threads`` forces one or the other (see ``flexalisa.runtime.device``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cost_model.units import parse_bytes
from flexalisa.attention import make_method
from flexalisa.engine import GenerationResult, default_dtype, row_limits
from flexalisa.models.family import family_of
from flexalisa.models.weights import ModelWeights
from flexalisa.runtime.batch import BatchState, make_batch
from flexalisa.runtime.budget import BlockMemory, BlockShapeInfo, plan_block
from flexalisa.runtime.compute import LayerContext
from flexalisa.runtime.device import make_device
from flexalisa.runtime.extras import RunTotals
from flexalisa.runtime.loop import BlockLoop, LogitsHook, Sampler
from flexalisa.runtime.timing import OpTimes
from flexalisa.runtime.weights import WeightLayout, WeightStore
from flexalisa.sampling import GREEDY, Sampling, per_row
from flexalisa.schedule import BlockOp, BlockShape, block_schedule
from flexalisa.stops import StopWhen
from policy.policy import Policy

Rows = list[int]  # indices into the prompt list


@dataclass(frozen=True)
class Request:
    """One ``generate`` call, as the blocks need it."""

    prompts: list[list[int]]  # token ids per prompt
    limits: list[int]  # tokens each prompt may generate (clamped to the context)
    keys: list[str]  # per-row sampler seeds (``row_keys``)
    sampler: Sampler  # sampling, EOS handling and the progress/logits hooks


def _bytes(value: int | str | None) -> int | None:
    return parse_bytes(value) if isinstance(value, str) else value


def device_budget(device: torch.device, gpu_mem_bytes: int | None) -> int | None:
    """The device budget a runner plans with: the given one, or on CUDA the free memory."""
    if gpu_mem_bytes is None and device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return gpu_mem_bytes


def block_shape(policy: Policy, prompts: list[list[int]], rows: Rows, limits: list[int],
                gpu_batch_size: int) -> BlockShapeInfo:
    """The memory shape of the block of ``rows``: a short last block has fewer rows per GPU
    batch, and every block is padded to its longest prompt and runs to its longest limit."""
    num_batches = policy.num_gpu_batches
    batch = min(gpu_batch_size, math.ceil(len(rows) / num_batches))
    return BlockShapeInfo(batch, num_batches, max(len(prompts[r]) for r in rows),
                          max(limits[r] for r in rows))


def plan_blocks(weights: ModelWeights, policy: Policy, prompts: list[list[int]],
                limits: list[int], dtype: torch.dtype, gpu_mem_bytes: int | None,
                cpu_mem_bytes: int | None, device_type: str,
                gpu_batch_size: int | None = None) -> list[tuple[Rows, BlockMemory]]:
    """Every block's rows and memory plan for ``policy`` on a ``device_type`` device; raises
    ``BudgetError`` if any does not fit. Needs no device: shapes and byte counts only."""
    batch = gpu_batch_size or policy.gpu_batch_size
    per_block = batch * policy.num_gpu_batches
    out = []
    for start in range(0, len(prompts), per_block):
        rows = list(range(start, min(start + per_block, len(prompts))))
        shape = block_shape(policy, prompts, rows, limits, batch)
        out.append((rows, plan_block(weights, policy, shape, dtype, gpu_mem_bytes,
                                     cpu_mem_bytes, device_type)))
    return out


class OffloadRunner:
    """Generation with weights, KV and activations placed between device and host by a Policy."""

    def __init__(self, weights: ModelWeights, policy: Policy, device: str = "cpu",
                 gpu_mem_bytes: int | str | None = None, cpu_mem_bytes: int | str | None = None,
                 dtype: torch.dtype | None = None, timing: bool = True,
                 check_integrity: bool = False, copy_threads: bool | None = None) -> None:
        self.device = make_device(device, copy_threads)
        self.dtype = dtype or default_dtype(self.device.torch_device)
        self.policy, self.spec = policy, weights.spec
        self.weights_in = weights
        self.gpu_mem_bytes = device_budget(self.device.torch_device, _bytes(gpu_mem_bytes))
        self.cpu_mem_bytes = _bytes(cpu_mem_bytes)
        self.method = make_method(policy.sparsity_method, policy.sparsity)
        self.timing, self.check_integrity = timing, check_integrity
        self._ops: dict[tuple[BlockShape, bool], list[BlockOp]] = {}

    @functools.cached_property
    def weights(self) -> WeightStore:
        """The weights placed by the policy, built at first use: a runner that only ``plan``s
        (a search's candidate) packs and copies nothing."""
        layout = WeightLayout.from_share(self.policy.weights_gpu_share, self.spec.num_layers,
                                         self.policy.weight_compression == "int4")
        return WeightStore(self.weights_in, layout, self.device, self.dtype,
                           recompute=self.policy.kv_recompute_share > 0)

    def close(self) -> None:
        self.device.close()

    # ---- planning -------------------------------------------------------------------------
    def plan(self, prompts: list[list[int]], limits: list[int],
             gpu_batch_size: int | None = None) -> list[tuple[Rows, BlockMemory]]:
        """Every block's rows and memory plan; raises ``BudgetError`` if any does not fit."""
        return plan_blocks(self.weights_in, self.policy, prompts, limits, self.dtype,
                           self.gpu_mem_bytes, self.cpu_mem_bytes,
                           self.device.torch_device.type, gpu_batch_size)

    def _block_ops(self, num_steps: int) -> list[BlockOp]:
        shape = BlockShape(num_steps, self.spec.num_layers, self.policy.num_gpu_batches)
        key = (shape, self.policy.overlap)
        if key not in self._ops:  # ~70 us per position to build: once per shape
            self._ops[key] = list(block_schedule(shape, self.policy.overlap))
        return self._ops[key]

    # ---- generation -----------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], max_new_tokens: int | list[int],
                 sampling: Sampling | None = None, ignore_eos: bool = False,
                 row_keys: list[str] | None = None,
                 on_tokens: Callable[[int], None] | None = None,
                 on_logits: LogitsHook | None = None,
                 stop_when: StopWhen | None = None) -> GenerationResult:
        """As ``Engine.generate``; ``on_logits(step_idx, rows, logits (b, V))`` sees each
        step's float32 logits per GPU batch (``rows``: prompt index per row, None = filler)."""
        limits = row_limits(max_new_tokens, prompts, self.spec.max_seq_len)
        eos = torch.tensor(self.spec.eos_token_ids or [-1], device=self.device.torch_device)
        request = Request(prompts, limits, row_keys or [str(i) for i in range(len(prompts))],
                          Sampler(per_row(sampling, len(prompts)), eos, ignore_eos, on_tokens,
                                  on_logits, stop_when))
        blocks = self.plan(prompts, limits)  # refuses a misfit before anything runs
        totals = RunTotals(self.policy)
        out: list[list[int]] = [[] for _ in prompts]
        reasons = ["length"] * len(prompts)
        for rows, memory in blocks:
            for batch in self._run_rows(rows, memory, self.policy.gpu_batch_size, request,
                                        totals):
                for r, row in enumerate(batch.rows):
                    if row is not None:
                        out[row], reasons[row] = batch.tokens[r], batch.reasons[r]
        return GenerationResult(out, reasons, totals.prefill_s, totals.decode_s,
                                sum(len(p) for p in prompts), max(len(p) for p in prompts),
                                extras=totals.extras(self.device))

    def _run_rows(self, rows: Rows, memory: BlockMemory | None, gpu_batch_size: int,
                  request: Request, totals: RunTotals) -> list[BatchState]:
        """Run ``rows`` as one block; on an out-of-memory error, as blocks of half the batch."""
        if memory is None:
            shape = block_shape(self.policy, request.prompts, rows, request.limits,
                                gpu_batch_size)
            memory = plan_block(self.weights_in, self.policy, shape, self.dtype,
                                self.gpu_mem_bytes, self.cpu_mem_bytes,
                                self.device.torch_device.type)
        try:
            return self._run_block(rows, memory, request, totals)
        except Exception as exc:  # only an out-of-memory error is retried; the rest re-raises
            if not self.device.is_out_of_memory(exc) or gpu_batch_size == 1:
                raise
        totals.oom_retries += 1  # the failed block's partial results are simply dropped
        if self.device.kind == "cuda":
            torch.cuda.empty_cache()
        smaller = gpu_batch_size // 2
        per_block = smaller * self.policy.num_gpu_batches
        return [batch for start in range(0, len(rows), per_block)
                for batch in self._run_rows(rows[start:start + per_block], None, smaller,
                                            request, totals)]

    def _run_block(self, rows: Rows, memory: BlockMemory, request: Request,
                   totals: RunTotals) -> list[BatchState]:
        batches = self._make_batches(rows, memory, request)
        times = OpTimes(self.device, enabled=self.timing)
        ctx = LayerContext(self.spec, family_of(self.spec), self.method,
                           self.policy.cpu_attention, self.dtype, times)
        num_batches = self.policy.num_gpu_batches
        on_device = int(round(self.policy.act_gpu_share * num_batches))
        loop = BlockLoop(ctx, self.device, self.weights, memory, batches,
                         [k < on_device for k in range(num_batches)], request.sampler,
                         self.check_integrity)
        stats = loop.run(self._block_ops(len(memory.plan.steps)))
        totals.add_block(memory, stats, loop.stores.values(), times.totals(), self.device)
        return batches

    def _make_batches(self, rows: Rows, memory: BlockMemory,
                      request: Request) -> list[BatchState]:
        batch = memory.store_config.batch_size
        num_steps = len(memory.plan.steps)
        width = memory.plan.steps[0].num_tokens  # the block's padded prompt length
        padded: list[int | None] = list(rows) + [None] * (batch * self.policy.num_gpu_batches
                                                          - len(rows))
        out = []
        for k in range(self.policy.num_gpu_batches):
            part = padded[k * batch:(k + 1) * batch]
            # filler rows (None) copy the block's first prompt; their tokens are dropped
            texts = [request.prompts[r if r is not None else rows[0]] for r in part]
            out.append(make_batch(
                texts, part, [request.limits[r] if r is not None else 0 for r in part],
                num_steps, self.spec.pad_token_id or 0, self.method, self.spec.num_layers,
                self.spec.num_kv_heads,
                [request.sampler.params[r] if r is not None else GREEDY for r in part],
                [request.keys[r] if r is not None else f"__filler{i}"
                 for i, r in enumerate(part)],
                self.device.torch_device, prompt_len=width))
        return out
