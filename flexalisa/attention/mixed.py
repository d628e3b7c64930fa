"""Several sparsity methods in one batch, each on its own block of rows (for evaluation).

The accuracy harness compares methods on the same text. Running each one as its own batch reads
every weight once per method per step; stacking them as row blocks of one batch reads the weights
once per step, which on a CPU is most of the decode time. Each method sees only its rows (sliced
``valid``, ``probs``, ``q``, ``keys``) and its own state, so a row's selection is exactly the one
its method makes alone. The combined ``Selection`` pads every block to the widest (index S-1,
mask False) and, when some block selects per KV head, repeats the one-set blocks per KV head.

    rows   [0, n)        [n, 2n)       [2n, 3n)   ...
    method parts[0]      parts[1]      parts[2]

For teacher-forced evaluation only: the row blocks are fixed, so a batch using it must not be
compacted (``MixedState`` has no ``keep_rows``; ``Engine.generate`` would fail loudly).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from flexalisa.attention.base import MethodState, SparsityMethod
from flexalisa.attention.scores import Device
from flexalisa.attention.selection import Selection, mask_to_selection


@dataclass
class MixedState:
    """One ``MethodState`` per part, plus each part's last selection per layer."""

    parts: list[MethodState]  # indexed like RowMix.parts
    last: dict[int, list[Selection]] = field(default_factory=dict)  # layer_idx -> per part


@dataclass(frozen=True)
class RowMix:
    """Implements the ``SparsityMethod`` contract over row blocks of ``rows_per_part`` rows."""

    parts: tuple[SparsityMethod, ...]  # one method per block of rows, in row order
    rows_per_part: int  # rows in each block; the batch has len(parts) * rows_per_part rows
    name: str = "mixed"  # never "dense": the engine must call select for every layer

    def __post_init__(self) -> None:
        if not self.parts or self.rows_per_part < 1:
            raise ValueError(f"need >= 1 part and >= 1 row per part, got {len(self.parts)} "
                             f"parts of {self.rows_per_part} rows")

    @property
    def needs_scores(self) -> bool:
        return any(part.needs_scores for part in self.parts)

    def _rows(self, part_idx: int) -> slice:
        return slice(part_idx * self.rows_per_part, (part_idx + 1) * self.rows_per_part)

    def init_state(
        self, batch: int, num_layers: int, num_kv_heads: int, max_len: int, device: Device = None
    ) -> MixedState:
        expected = len(self.parts) * self.rows_per_part
        if batch != expected:
            raise ValueError(f"batch {batch} != {len(self.parts)} parts x {self.rows_per_part}")
        return MixedState([
            part.init_state(self.rows_per_part, num_layers, num_kv_heads, max_len, device)
            for part in self.parts
        ])

    def prefill_query_rows(self, state: MixedState, num_queries: int) -> int:
        return max((part.prefill_query_rows(part_state, num_queries)
                    for part, part_state in zip(self.parts, state.parts) if part.needs_scores),
                   default=1)

    def observe_prefill(
        self, state: MixedState, layer_idx: int, probs: Tensor, valid: Tensor
    ) -> None:
        for part_idx, part in enumerate(self.parts):
            rows = self._rows(part_idx)
            part.observe_prefill(state.parts[part_idx], layer_idx, probs[rows], valid[rows])

    def select(
        self,
        state: MixedState,
        layer_idx: int,
        valid: Tensor,
        q: Tensor | None = None,
        keys: Tensor | None = None,
    ) -> Selection:
        sels = []
        for part_idx, part in enumerate(self.parts):
            rows = self._rows(part_idx)
            sel = part.select(state.parts[part_idx], layer_idx, valid[rows],
                              q=None if q is None else q[rows],
                              keys=None if keys is None else keys[rows])
            sels.append(sel if sel is not None else mask_to_selection(valid[rows][:, None]))
        state.last[layer_idx] = sels
        return _stack(sels, valid.shape[-1])

    def observe(
        self, state: MixedState, layer_idx: int, probs: Tensor, sel: Selection | None
    ) -> None:
        for part_idx, part in enumerate(self.parts):
            own = state.last[layer_idx][part_idx]
            width = own.indices.shape[-1]  # the part's entries come first in each padded row
            part_probs = probs[self._rows(part_idx), :, :, :width]  # (n, Hq, 1, K_part)
            part.observe(state.parts[part_idx], layer_idx, part_probs, own)


def _stack(sels: list[Selection], num_slots: int) -> Selection:
    """Concatenate per-part selections along the batch: pad K, repeat Hsel = 1 when needed."""
    heads = max(sel.num_heads for sel in sels)
    width = max(sel.indices.shape[-1] for sel in sels)
    indices, masks = [], []
    for sel in sels:
        batch, _, own = sel.indices.shape
        pad = width - own
        idx = torch.cat([sel.indices, sel.indices.new_full((batch, sel.num_heads, pad),
                                                           num_slots - 1)], dim=-1)
        mask = torch.cat([sel.mask, sel.mask.new_zeros((batch, sel.num_heads, pad))], dim=-1)
        indices.append(idx.expand(-1, heads, -1))  # (n, Hsel, K)
        masks.append(mask.expand(-1, heads, -1))
    return Selection(indices=torch.cat(indices), mask=torch.cat(masks))
