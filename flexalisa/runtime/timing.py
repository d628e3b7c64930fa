"""Timing hooks: seconds per op kind and per phase, collected into ``extras``.

Op kinds: ``linear`` (QKV, output projection and MLP, logits), ``attention`` (the kernels,
CPU-delegated partials included), ``selection`` (sparsity select/observe), ``recompute``
(K,V rebuilt from hidden states), ``transfer_wait`` (compute waiting on copy jobs at a sync),
``kv_gather`` (reading the selection out of the tiers on the device; it *includes* the
``recompute`` time, which happens inside it).

Marks come from the device (``perf_counter`` on CPU; CUDA events on the compute stream under
CUDA, resolved once per block so the loop never blocks on them). Disabled timing costs one
attribute check per section.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flexalisa.runtime.device import Device

OP_KINDS = ("linear", "attention", "selection", "recompute", "kv_gather", "transfer_wait")


class OpTimes:
    """Accumulates (start, end) marks per op kind; ``totals()`` resolves them to seconds."""

    def __init__(self, device: Device, enabled: bool = True) -> None:
        self.device, self.enabled = device, enabled
        self.marks: dict[str, list[tuple[Any, Any]]] = defaultdict(list)
        self.resolved: dict[str, float] = dict.fromkeys(OP_KINDS, 0.0)

    @contextmanager
    def section(self, kind: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = self.device.stamp()
        try:
            yield
        finally:
            self.marks[kind].append((start, self.device.stamp()))

    def add_s(self, kind: str, seconds: float) -> None:
        """Host-measured time (e.g. waiting on copy threads)."""
        self.resolved[kind] = self.resolved.get(kind, 0.0) + seconds

    def flush(self) -> None:
        """Resolve the marks so far (under CUDA: waits for the last event of the block)."""
        for kind, pairs in self.marks.items():
            self.resolved[kind] = self.resolved.get(kind, 0.0) + sum(
                self.device.elapsed_s(start, end) for start, end in pairs)
        self.marks.clear()

    def totals(self) -> dict[str, float]:
        self.flush()
        return dict(self.resolved)
