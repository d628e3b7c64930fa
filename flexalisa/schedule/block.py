"""FlexGen's block schedule for one block: the op stream of the zig-zag loop, torch-free.

A block runs ``num_steps`` generation steps (step 0 = prefill) over ``num_layers`` layers and
``num_gpu_batches`` GPU batches, in the order token → layer → GPU batch. Position ``p`` is the
p-th (step, layer, batch) in that order. With overlap on, iteration p reads like the paper::

    [late loads of p, sync]                     <- the prologue at p = 0
    load_weight(next layer)      (when batch 0: one layer ahead, double-buffered)
    load_kv(p+1) | load_hidden(p+1)             <- prefetch, when their inputs are stored
    compute(p)
    store_kv(p-1) | store_hidden(p-1)           <- deferred stores
    sync
    ... after the last position: store_kv(last) | store_hidden(last) | sync  <- the epilogue

Overlap timeline for one iteration (copy streams/threads vs the compute stream)::

    copy-in  : |== w(j+1) ==|== kv(k+1) ==|== h(k+1) ==|
    compute  : |============ compute(j, k) ============|
    copy-out :                                          |== kv(k-1) ==|== h(k-1) ==| sync

Wraparound (after the last batch of the last layer comes layer 0 of the next step) is part of
the position order, so the runner never special-cases it. With overlap off the same ops come
sequentially: ``loads(p) | sync | compute(p) | stores(p) | sync``.

Dependencies the stream honours (a ``sync`` means: wait for every op issued since the last one):
  * ``compute(p)`` needs its ``load_weight``, ``load_hidden`` and (decode steps) ``load_kv``
    finished, i.e. a ``sync`` between them;
  * ``load_hidden(i, j, k)`` needs ``store_hidden`` of its input — ``(i, j-1, k)``, or
    ``(i-1, last layer, k)`` for layer 0 (the sampled token) — finished;
  * ``load_kv(i, j, k)`` needs ``store_kv(i-1, j, k)`` finished; the prefill loads no KV.
A load whose input is not yet stored when it would be prefetched is issued *late*, at the start
of its own iteration followed by a ``sync`` (e.g. ``load_hidden`` with one GPU batch); a store
that the next position's late load needs is issued *eagerly*, right after its compute.
Recomputing dropped K,V needs the layer's weights, so it belongs to ``compute``, not ``load_kv``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum


class OpKind(Enum):
    LOAD_WEIGHT = "load_weight"  # bring layer j's weights to the device (a no-op if resident)
    LOAD_KV = "load_kv"  # fetch the selected CPU-tier K,V (and hidden to recompute) of (j, k)
    LOAD_HIDDEN = "load_hidden"  # bring the layer input of (j, k) to the device
    COMPUTE = "compute"  # run layer j on batch k (recompute, attention, MLP)
    STORE_KV = "store_kv"  # store the new tokens' K,V (and hidden) and apply this step's moves
    STORE_HIDDEN = "store_hidden"  # store the layer output of (j, k) (the next layer's input)
    SYNC = "sync"  # wait for every op issued since the previous sync


@dataclass(frozen=True)
class BlockOp:
    """One op of the block schedule."""

    kind: OpKind  # what to do
    step_idx: int  # generation step (0 = prefill)
    layer_idx: int  # layer
    batch_idx: int | None  # GPU batch; None for load_weight (one load serves every batch)


@dataclass(frozen=True)
class BlockShape:
    """The loop bounds of one block."""

    num_steps: int  # generation steps including the prefill (gen_len)
    num_layers: int  # transformer layers
    num_gpu_batches: int  # GPU batches per block

    def __post_init__(self) -> None:
        for name in ("num_steps", "num_layers", "num_gpu_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def num_positions(self) -> int:
        return self.num_steps * self.num_layers * self.num_gpu_batches

    def position(self, index: int) -> tuple[int, int, int]:
        """(step_idx, layer_idx, batch_idx) of the index-th position in zig-zag order."""
        step_idx, rest = divmod(index, self.num_layers * self.num_gpu_batches)
        layer_idx, batch_idx = divmod(rest, self.num_gpu_batches)
        return step_idx, layer_idx, batch_idx


def loads_of(shape: BlockShape, step_idx: int, layer_idx: int, batch_idx: int) -> list[BlockOp]:
    """The loads ``compute(step_idx, layer_idx, batch_idx)`` waits for."""
    ops = [BlockOp(OpKind.LOAD_WEIGHT, step_idx, layer_idx, None)] if batch_idx == 0 else []
    if step_idx > 0:
        ops.append(BlockOp(OpKind.LOAD_KV, step_idx, layer_idx, batch_idx))
    ops.append(BlockOp(OpKind.LOAD_HIDDEN, step_idx, layer_idx, batch_idx))
    return ops


def stores_of(step_idx: int, layer_idx: int, batch_idx: int) -> list[BlockOp]:
    """The stores that follow ``compute(step_idx, layer_idx, batch_idx)``."""
    return [BlockOp(OpKind.STORE_KV, step_idx, layer_idx, batch_idx),
            BlockOp(OpKind.STORE_HIDDEN, step_idx, layer_idx, batch_idx)]


def dependencies(shape: BlockShape, op: BlockOp) -> list[BlockOp]:
    """The ops that must be finished (loads, for compute) or issued (compute, for stores)."""
    step_idx, layer_idx, batch_idx = op.step_idx, op.layer_idx, op.batch_idx
    if op.kind is OpKind.LOAD_HIDDEN:
        assert batch_idx is not None
        if layer_idx > 0:
            return [BlockOp(OpKind.STORE_HIDDEN, step_idx, layer_idx - 1, batch_idx)]
        if step_idx > 0:
            last_layer = shape.num_layers - 1
            return [BlockOp(OpKind.STORE_HIDDEN, step_idx - 1, last_layer, batch_idx)]
        return []
    if op.kind is OpKind.LOAD_KV:
        return [BlockOp(OpKind.STORE_KV, step_idx - 1, layer_idx, batch_idx)]
    if op.kind is OpKind.COMPUTE:
        assert batch_idx is not None
        return loads_of(shape, step_idx, layer_idx, batch_idx)
    if op.kind in (OpKind.STORE_KV, OpKind.STORE_HIDDEN):
        return [BlockOp(OpKind.COMPUTE, step_idx, layer_idx, batch_idx)]
    return []


class _Stream:
    """Emits ops, tracking which are issued and which a sync has finished.

    Dependencies reach back at most one step (``num_layers * num_gpu_batches`` positions), so
    older ops are forgotten at each sync to keep memory flat over long generations.
    """

    def __init__(self, shape: BlockShape) -> None:
        self.shape = shape
        self.unfinished: set[BlockOp] = set()  # issued since the last sync
        self.finished: set[BlockOp] = set()
        self.by_age: deque[tuple[int, BlockOp]] = deque()  # (position index, op), issue order
        self.ops: list[BlockOp] = []
        self.window = shape.num_layers * shape.num_gpu_batches + 2

    def ready(self, op: BlockOp) -> bool:
        return all(dep in self.finished for dep in dependencies(self.shape, op))

    def issued(self, op: BlockOp) -> bool:
        return op in self.unfinished or op in self.finished

    def emit(self, op: BlockOp) -> None:
        self.ops.append(op)
        self.unfinished.add(op)
        self.by_age.append((_index(self.shape, *_key(op)), op))

    def sync(self, position: tuple[int, int, int]) -> None:
        self.ops.append(BlockOp(OpKind.SYNC, *position))
        self.finished |= self.unfinished
        self.unfinished.clear()
        oldest = _index(self.shape, *position) - self.window
        while self.by_age and self.by_age[0][0] < oldest:
            self.finished.discard(self.by_age.popleft()[1])

    def drain(self) -> list[BlockOp]:
        ops, self.ops = self.ops, []
        return ops


def _key(op: BlockOp) -> tuple[int, int, int]:
    return op.step_idx, op.layer_idx, op.batch_idx or 0


def _index(shape: BlockShape, step_idx: int, layer_idx: int, batch_idx: int) -> int:
    return (step_idx * shape.num_layers + layer_idx) * shape.num_gpu_batches + batch_idx


def _next_layer(shape: BlockShape, step_idx: int, layer_idx: int) -> tuple[int, int] | None:
    if layer_idx + 1 < shape.num_layers:
        return step_idx, layer_idx + 1
    return (step_idx + 1, 0) if step_idx + 1 < shape.num_steps else None


def _prefetches(shape: BlockShape, index: int) -> list[BlockOp]:
    """Loads iteration ``index`` may issue ahead: next layer weights, next position KV/hidden."""
    step_idx, layer_idx, batch_idx = shape.position(index)
    ops: list[BlockOp] = []
    next_layer = _next_layer(shape, step_idx, layer_idx)
    if batch_idx == 0 and next_layer is not None:
        ops.append(BlockOp(OpKind.LOAD_WEIGHT, *next_layer, None))
    if index + 1 < shape.num_positions:
        after = shape.position(index + 1)
        ops += [op for op in loads_of(shape, *after) if op.kind is not OpKind.LOAD_WEIGHT]
    return ops


def _needed_by_next(shape: BlockShape, index: int) -> set[BlockOp]:
    if index + 1 >= shape.num_positions:
        return set()
    after = shape.position(index + 1)
    return {dep for op in loads_of(shape, *after) for dep in dependencies(shape, op)}


def block_schedule(shape: BlockShape, overlap: bool) -> Iterator[BlockOp]:
    """The op stream of one block; ``overlap`` changes only the order and the waits."""
    stream = _Stream(shape)
    deferred: list[BlockOp] = []
    for index in range(shape.num_positions):
        position = shape.position(index)
        late = [op for op in loads_of(shape, *position) if not stream.issued(op)]
        for op in late:  # the prologue at index 0; every load when overlap is off
            if not stream.ready(op):
                stream.sync(position)
            stream.emit(op)
        if late:
            stream.sync(position)
        if overlap:
            for op in _prefetches(shape, index):
                if not stream.issued(op) and stream.ready(op):
                    stream.emit(op)
        compute = BlockOp(OpKind.COMPUTE, *position)
        assert stream.ready(compute), compute
        stream.emit(compute)
        stores = stores_of(*position)
        if overlap:  # defer stores one iteration, unless the next position's load needs them
            needed = _needed_by_next(shape, index)
            now = deferred + [op for op in stores if op in needed]
            deferred = [op for op in stores if op not in needed]
        else:
            now = stores
        for op in now:
            stream.emit(op)
        stream.sync(position)
        yield from stream.drain()
    for op in deferred:  # the epilogue: the last position's deferred stores
        stream.emit(op)
    if deferred:
        stream.sync(shape.position(shape.num_positions - 1))
    yield from stream.drain()
