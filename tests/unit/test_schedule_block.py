"""Property tests for the block (zig-zag) schedule: replay the op stream and check its order."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexalisa.schedule import BlockOp, BlockShape, OpKind, block_schedule, loads_of

FAST = settings(max_examples=80, deadline=None)
LOADS = (OpKind.LOAD_WEIGHT, OpKind.LOAD_KV, OpKind.LOAD_HIDDEN)
STORES = (OpKind.STORE_KV, OpKind.STORE_HIDDEN)

shapes = st.builds(BlockShape, st.integers(1, 4), st.integers(1, 4), st.integers(1, 4))


def _replay(shape: BlockShape, ops: list[BlockOp]) -> None:
    """Walk the stream like a runner: a sync finishes everything issued before it."""
    issued: dict[BlockOp, int] = {}
    finished: set[BlockOp] = set()
    computed: list[tuple[int, int, int]] = []
    weights_live: dict[tuple[int, int], int] = {}  # layer -> computes still to run on it
    for index, op in enumerate(ops):
        if op.kind is OpKind.SYNC:
            finished |= set(issued)
            continue
        assert op not in issued, f"{op} issued twice"
        issued[op] = index
        key = (op.step_idx, op.layer_idx, op.batch_idx)
        if op.kind is OpKind.COMPUTE:
            for load in loads_of(shape, *key):
                assert load in finished, f"{op} before its {load} finished"
            computed.append(key)
            weights_live[key[:2]] -= 1
            if weights_live[key[:2]] == 0:
                del weights_live[key[:2]]
        elif op.kind in STORES:
            assert BlockOp(OpKind.COMPUTE, *key) in issued, f"{op} before its compute"
        elif op.kind is OpKind.LOAD_WEIGHT:
            assert len(weights_live) <= 1, f"{op}: more than two layers of weights in flight"
            weights_live[key[:2]] = shape.num_gpu_batches
        elif op.kind is OpKind.LOAD_KV:
            assert op.step_idx > 0, "the prefill loads no KV"
            assert BlockOp(OpKind.STORE_KV, op.step_idx - 1, *key[1:]) in finished
        elif op.kind is OpKind.LOAD_HIDDEN:
            step_idx, layer_idx, batch_idx = key
            source = ((step_idx, layer_idx - 1) if layer_idx else
                      (step_idx - 1, shape.num_layers - 1) if step_idx else None)
            if source is not None:
                assert BlockOp(OpKind.STORE_HIDDEN, *source, batch_idx) in finished
        if op.kind in (OpKind.LOAD_KV, OpKind.LOAD_HIDDEN):  # at most one position ahead
            assert len(computed) >= _index(shape, key) - 1
    expected = [shape.position(i) for i in range(shape.num_positions)]
    assert computed == expected, "computes must run once each, in zig-zag order"
    assert ops[-1].kind is OpKind.SYNC and set(issued) <= finished
    counts = Counter(op.kind for op in issued)
    num_positions, num_kv = shape.num_positions, (shape.num_steps - 1) * (
        shape.num_layers * shape.num_gpu_batches)
    assert counts[OpKind.LOAD_WEIGHT] == shape.num_steps * shape.num_layers
    assert counts[OpKind.LOAD_KV] == num_kv
    assert counts[OpKind.LOAD_HIDDEN] == counts[OpKind.STORE_KV] == num_positions
    assert counts[OpKind.STORE_HIDDEN] == num_positions


def _index(shape: BlockShape, key: tuple) -> int:
    step_idx, layer_idx, batch_idx = key
    return (step_idx * shape.num_layers + layer_idx) * shape.num_gpu_batches + batch_idx


@FAST
@given(shapes, st.booleans())
def test_stream_computes_once_and_loads_precede_compute(shape: BlockShape, overlap: bool) -> None:
    _replay(shape, list(block_schedule(shape, overlap)))


@FAST
@given(shapes)
def test_overlap_changes_only_order(shape: BlockShape) -> None:
    def work(ops: list[BlockOp]) -> Counter:
        return Counter(op for op in ops if op.kind is not OpKind.SYNC)

    assert work(list(block_schedule(shape, True))) == work(list(block_schedule(shape, False)))


@FAST
@given(st.integers(1, 4), st.integers(1, 4), st.integers(3, 5))
def test_overlap_prefetches_everything_after_the_prologue(
    num_steps: int, num_layers: int, num_gpu_batches: int
) -> None:
    shape = BlockShape(num_steps, num_layers, num_gpu_batches)
    ops = list(block_schedule(shape, True))
    # one sync per iteration, plus the prologue's and the epilogue's
    assert sum(op.kind is OpKind.SYNC for op in ops) == shape.num_positions + 2
    computes = [i for i, op in enumerate(ops) if op.kind is OpKind.COMPUTE]
    for first, second in zip(computes, computes[1:], strict=False):
        between = [op.kind for op in ops[first + 1: second]]
        assert OpKind.SYNC in between and between.count(OpKind.SYNC) == 1


def test_sequential_order_reads_load_sync_compute_store_sync() -> None:
    ops = list(block_schedule(BlockShape(2, 1, 1), overlap=False))
    kinds = [op.kind.value for op in ops]
    assert kinds == ["load_weight", "load_hidden", "sync", "compute", "store_kv", "store_hidden",
                     "sync", "load_weight", "load_kv", "load_hidden", "sync", "compute",
                     "store_kv", "store_hidden", "sync"]


def test_overlap_wraps_weights_to_the_next_step() -> None:
    ops = list(block_schedule(BlockShape(2, 2, 3), overlap=True))
    last_layer_first_batch = ops.index(BlockOp(OpKind.COMPUTE, 0, 1, 0))
    assert BlockOp(OpKind.LOAD_WEIGHT, 1, 0, None) in ops[last_layer_first_batch - 4:
                                                        last_layer_first_batch]


def test_bad_shape_raises() -> None:
    with pytest.raises(ValueError):
        BlockShape(0, 1, 1)
