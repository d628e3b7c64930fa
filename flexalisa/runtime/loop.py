"""The one generation loop: a block's ``block_schedule`` ops, executed in zig-zag order.

Each op maps to one method below and reads like FlexGen's loop::

    load_weight(j+1) | load_kv(j, k+1) | load_hidden(j, k+1) | compute(j, k)
                     | store_kv(j, k-1) | store_hidden(j, k-1) | sync

Loads go to the device's ``h2d`` lane, stores to ``d2h`` (CUDA streams or copy threads, see
``device.py``); ``sync`` makes compute wait for every job issued since the previous sync. With
``overlap`` off the schedule itself orders loads, compute and stores one after another; this loop
does not know which it runs. Per-position state lives in dicts keyed by (layer, batch) — the
schedule guarantees an op's inputs are produced (and synced) before it reads them.

Activations: the layer outputs of GPU batch k stay on the device when k < round(act_gpu_share
· num_gpu_batches), else ``store_hidden`` copies them to the host and ``load_hidden`` back.
Layer 0's input is the token embedding, computed at compute time from the sampled ids.
Weights of (step, layer) are dropped after the layer's last batch: two are live at most.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from flexalisa.kv import TieredKVStore
from flexalisa.prefill import prefill_chunks, prefill_mask
from flexalisa.runtime.batch import BatchState, take_tokens
from flexalisa.runtime.budget import BlockMemory
from flexalisa.runtime.compute import (
    FetchedSelection,
    LayerContext,
    clamp_to_stored,
    decode_layer,
    prefill_layer,
    select_next,
)
from flexalisa.runtime.device import Device, Handle
from flexalisa.runtime.weights import WeightStore
from flexalisa.sampling import SamplingParams
from flexalisa.schedule import BlockOp, OpKind, phase_of
from flexalisa.stops import StopWhen

LogitsHook = Callable[[int, list[int | None], Tensor], None]  # (step_idx, rows, logits (B, V))


@dataclass(frozen=True)
class Sampler:
    """How the last layer's logits become tokens."""

    params: list[SamplingParams]  # each prompt's (greedy or sampled), by prompt index
    eos_ids: Tensor  # ids that end a row (on the device)
    ignore_eos: bool  # generate to the limit regardless of EOS
    on_tokens: Callable[[int], None] | None  # progress: tokens just produced
    on_logits: LogitsHook | None  # per-step logits (tests, analysis)
    stop_when: StopWhen | None = None  # (prompt index, tokens so far) -> the row ends ("stop")


@dataclass
class BlockStats:
    """What one block measured; the runner sums blocks into ``extras``."""

    step_marks: list[Any] = field(default_factory=list)  # device.stamp() at each step start
    end_mark: Any = None  # device.stamp() after the block finished
    weight_h2d_bytes: int = 0  # streamed (possibly compressed) weights copied in
    act_h2d_bytes: int = 0  # host-placed activations loaded
    act_d2h_bytes: int = 0  # activations stored to the host
    max_live_streamed_layers: int = 0  # working weight buffers in use at once
    handles: list[Handle] = field(default_factory=list)  # every copy job, for busy time


class BlockLoop:
    """Executes one block's op list over its GPU batches and tiered stores."""

    def __init__(self, ctx: LayerContext, device: Device, weights: WeightStore,
                 memory: BlockMemory, batches: list[BatchState], act_on_device: list[bool],
                 sampler: Sampler, check_integrity: bool = False) -> None:
        self.ctx, self.device, self.weights, self.memory = ctx, device, weights, memory
        self.batches, self.act_on_device, self.sampler = batches, act_on_device, sampler
        self.check_integrity = check_integrity
        self.num_layers = ctx.spec.num_layers
        self.stores = {(j, k): TieredKVStore(memory.store_config, device.torch_device)
                       for j in range(self.num_layers) for k in range(len(batches))}
        self.live_weights: dict[tuple[int, int], Any] = {}  # (step, layer) -> layer dict
        self.prepared: dict[tuple[int, int], FetchedSelection] = {}  # load_kv results
        self.inputs: dict[tuple[int, int], Tensor | None] = {}  # layer inputs (None = embed)
        self.outputs: dict[tuple[int, int], Tensor] = {}  # computed, awaiting store_hidden
        self.acts: dict[tuple[int, int], Tensor] = {}  # stored layer outputs
        self.new_kv: dict[tuple[int, int], tuple[Tensor, Tensor, Tensor]] = {}
        self.pending: list[Handle] = []
        self.stats = BlockStats()

    # ---- the loop -------------------------------------------------------------------------
    def run(self, ops: list[BlockOp]) -> BlockStats:
        handlers = {OpKind.LOAD_WEIGHT: self.load_weight, OpKind.LOAD_KV: self.load_kv,
                    OpKind.LOAD_HIDDEN: self.load_hidden, OpKind.COMPUTE: self.compute,
                    OpKind.STORE_KV: self.store_kv, OpKind.STORE_HIDDEN: self.store_hidden,
                    OpKind.SYNC: self.sync}
        step_idx = -1
        try:
            for op in ops:
                if op.kind is OpKind.COMPUTE and op.step_idx != step_idx:
                    if all(batch.done for batch in self.batches):
                        break  # every row finished early: the rest of the block is moot
                    step_idx = op.step_idx
                    self.stats.step_marks.append(self.device.stamp())
                handlers[op.kind](op)
        finally:
            self.sync(None)  # never leave a copy job running past the block
            self.device.finish()
            for layer in self.live_weights.values():  # a block ended early: free its buffers
                self.weights.release(layer)
            self.live_weights.clear()
        self.stats.end_mark = self.device.stamp()
        return self.stats

    def _submit(self, lane: str, fn: Callable[[], Any], inputs: Any = None,
                bulk: bool = False) -> None:
        handle = self.device.submit(lane, fn, inputs, bulk=bulk)
        self.pending.append(handle)
        self.stats.handles.append(handle)

    def sync(self, op: BlockOp | None) -> None:
        start = time.perf_counter()
        self.device.wait(self.pending)
        self.ctx.times.add_s("transfer_wait", time.perf_counter() - start)
        self.pending = []

    # ---- loads ----------------------------------------------------------------------------
    def load_weight(self, op: BlockOp) -> None:
        key = (op.step_idx, op.layer_idx)

        def job() -> Any:
            layer, moved = self.weights.load(op.layer_idx)
            self.live_weights[key] = layer
            self.stats.weight_h2d_bytes += moved  # one h2d worker: no concurrent writer
            return layer  # jobs return what they made: CUDA marks it used by compute

        self._submit("h2d", job, bulk=True)
        live = set(list(self.live_weights)) | {key}  # list(): one atomic snapshot
        streamed = sum(1 for (_, j) in live if self.weights.is_streamed(j))
        self.stats.max_live_streamed_layers = max(self.stats.max_live_streamed_layers, streamed)

    def load_kv(self, op: BlockOp) -> None:
        key = (op.layer_idx, op.batch_idx)
        batch = self.batches[op.batch_idx]
        # made here, when the schedule first needs it, rather than right after the layer's
        # previous compute: by now the layers after it have mostly observed the previous step
        # too, and the method selects for a run of them at once (``state.ahead``)
        sel = select_next(self.ctx, batch.method_state, op.layer_idx,
                          batch.valid[:, :batch.prompt_len + op.step_idx])
        store = self.stores[key]

        def job() -> Any:
            old = clamp_to_stored(sel, store.num_tokens)
            fetched = store.fetch(old, skip_cpu=self.ctx.cpu_attention, dense=sel.dense)
            self.prepared[key] = FetchedSelection(sel, old, fetched)
            return self.prepared[key]

        self._submit("h2d", job, inputs=sel)

    def load_hidden(self, op: BlockOp) -> None:
        j, k = op.layer_idx, op.batch_idx
        if j == 0:
            self.inputs[(j, k)] = None  # the embedding of the sampled ids, at compute time
            return
        act = self.acts.pop((j - 1, k))
        if self.act_on_device[k]:
            self.inputs[(j, k)] = act
            return

        def job() -> Any:
            self.inputs[(j, k)] = self.device.to_compute(act)
            return self.inputs[(j, k)]

        self.stats.act_h2d_bytes += act.numel() * act.element_size()
        self._submit("h2d", job)

    # ---- compute --------------------------------------------------------------------------
    def compute(self, op: BlockOp) -> None:
        i, j, k = op.step_idx, op.layer_idx, op.batch_idx
        ctx, batch, spec = self.ctx, self.batches[k], self.ctx.spec
        weights = self.live_weights[(i, j)]
        x, pos = self._layer_input(i, j, k)
        state, length = batch.method_state, batch.prompt_len
        if i == 0:
            out, k_new, v_new = prefill_layer(ctx, weights, x, pos, batch.cache["mask"],
                                              batch.valid[:, :length], state, j)
        else:
            out, k_new, v_new = decode_layer(ctx, weights, x, pos, self.stores[(j, k)],
                                             self.prepared.pop((j, k)), batch.pad, state, j)
        self.new_kv[(j, k)] = (k_new, v_new, x)
        self.outputs[(j, k)] = out
        if k == len(self.batches) - 1:
            self.weights.release(self.live_weights.pop((i, j)))
        if j == spec.num_layers - 1:
            self._sample(i, batch, out)

    def _layer_input(self, step_idx: int, layer_idx: int, batch_idx: int
                     ) -> tuple[Tensor, Any]:
        """The layer input (B, T|1, H) and the step's prepared positions: for the prefill,
        the row chunks it runs in, each with its own (``flexalisa.prefill``)."""
        spec, fam = self.ctx.spec, self.ctx.fam
        batch = self.batches[batch_idx]
        x = self.inputs.pop((layer_idx, batch_idx))
        if layer_idx > 0:
            assert x is not None
            return x, batch.cache["pos"]
        if step_idx == 0:  # embed and prepare positions once per step, for all layers
            length = batch.prompt_len
            valid = batch.valid[:, :length]
            positions = valid.long().cumsum(1) - 1  # (B, T), -1 on left padding
            batch.cache["mask"] = prefill_mask(valid)  # (B, T, T)
            ids = batch.prompt_ids
            pos: Any = prefill_chunks(spec, fam, positions, self.ctx.dtype)
        else:
            positions, ids = batch.positions[:, None], batch.ids[:, None]  # (B, 1)
            pos = fam.prepare_positions(spec, positions, self.ctx.dtype)
        with self.ctx.times.section("linear"):
            x = fam.embed(spec, self.weights.globals, ids, positions)
        batch.cache["pos"] = pos
        return x, pos

    def _sample(self, step_idx: int, batch: BatchState, out: Tensor) -> None:
        spec, s = self.ctx.spec, self.sampler
        with self.ctx.times.section("linear"):
            logits = self.ctx.fam.logits(spec, self.weights.globals, out[:, -1:])[:, -1]
        if s.on_logits is not None:
            s.on_logits(step_idx, batch.rows, logits)
        produced = take_tokens(batch, step_idx, logits, s.eos_ids, s.ignore_eos,
                               spec.max_seq_len - 1, s.stop_when)
        if s.on_tokens is not None and produced:
            s.on_tokens(produced)

    # ---- stores ---------------------------------------------------------------------------
    def store_kv(self, op: BlockOp) -> None:
        key = (op.layer_idx, op.batch_idx)
        store, step = self.stores[key], self.memory.plan.steps[op.step_idx]
        k_new, v_new, hidden = self.new_kv.pop(key)
        keep_hidden = self.memory.store_config.hidden_capacity_tokens > 0

        def job() -> None:
            store.commit(step, k_new, v_new, hidden if keep_hidden else None)
            if self.check_integrity:
                store.check_integrity()

        self._submit("d2h", job, inputs=(k_new, v_new, hidden))

    def store_hidden(self, op: BlockOp) -> None:
        j, k = op.layer_idx, op.batch_idx
        out = self.outputs.pop((j, k))
        if j == self.num_layers - 1:
            return  # the next step starts from the sampled ids
        if self.act_on_device[k]:
            self.acts[(j, k)] = out
            return

        def job() -> None:
            self.acts[(j, k)] = self.device.to_host(out)

        self.stats.act_d2h_bytes += out.numel() * out.element_size()
        self._submit("d2h", job, inputs=out)


def phase_seconds(stats: BlockStats, device: Device, phase2: int,
                  phase3: int) -> dict[str, float]:
    """Seconds of the prefill and of the decode steps in each phase (device marks)."""
    marks = stats.step_marks + [stats.end_mark]
    out = {"prefill": 0.0, "phase1": 0.0, "phase2": 0.0, "phase3": 0.0}
    for step_idx in range(len(stats.step_marks)):
        name = "prefill" if step_idx == 0 else f"phase{phase_of(step_idx, phase2, phase3)}"
        out[name] += device.elapsed_s(marks[step_idx], marks[step_idx + 1])
    return out
