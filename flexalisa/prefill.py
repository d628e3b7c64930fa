"""One decoder layer's prefill over a batch in row chunks: shared by the offloading runtime and
by the Engine when a sparsity method seeds its scores from the prompt.

The rows run ``cost_model.costs.prefill_chunk_rows`` sequences at a time, so a chunk's
projection outputs and attention scores are all that is held at once (the working set the cost
model counts); the chunks' K, V and outputs are written into tensors for the whole batch, and
the attention weights the method seeds from are collected over the chunks and observed once per
layer, for every row together. Every op is row-wise, so the values are those of one pass.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from cost_model.costs import prefill_chunk_rows
from cost_model.spec import ModelSpec
from flexalisa.attention import SparsityMethod, attention_probs, dense_attention
from flexalisa.attention.base import MethodState
from flexalisa.models.weights import LayerWeights

PrefillChunks = list[tuple[slice, Any]]  # (rows of the batch, their prepared positions)
Section = Callable[[str], AbstractContextManager[Any]]  # timing hook: section(op kind)


def _untimed(kind: str) -> AbstractContextManager[Any]:
    return nullcontext()


def prefill_mask(valid: Tensor) -> Tensor:
    """The causal mask (B, T, T) bool of left-padded prompts, valid (B, T): a padding query
    sees only itself, so no row is fully masked (its output is never used)."""
    length = valid.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=valid.device)
    return (causal[None] & valid[:, None, :]) | eye[None]


def prefill_chunks(spec: ModelSpec, fam: ModuleType, positions: Tensor,
                   dtype: torch.dtype) -> PrefillChunks:
    """The batch's row chunks, positions (B, T), each with its prepared positions."""
    batch, length = positions.shape
    rows = prefill_chunk_rows(batch, length)
    return [(slice(r, r + rows), fam.prepare_positions(spec, positions[r:r + rows], dtype))
            for r in range(0, batch, rows)]


def prefill_layer(spec: ModelSpec, fam: ModuleType, method: SparsityMethod | None,
                  w: LayerWeights, x: Tensor, chunks: PrefillChunks, mask: Tensor,
                  valid: Tensor, state: MethodState | None, layer_idx: int,
                  section: Section = _untimed) -> tuple[Tensor, Tensor, Tensor]:
    """x (B, T, H) -> (layer output, k, v (B, Hkv, T, D)); seeds ``method``'s scores.

    mask (B, T, T) bool, valid (B, T) bool. The last layer's output is computed for the last
    position only (B, 1, H): only it feeds the logits; its K, V are computed for every position.
    """
    last = layer_idx == spec.num_layers - 1
    seeding = method if method is not None and method.needs_scores else None
    if len(chunks) == 1:
        out, k, v, probs = prefill_rows(spec, fam, seeding, w, x, chunks[0][1], mask, state,
                                        last, section)
    else:
        batch, length, _ = x.shape
        k = x.new_empty(batch, spec.num_kv_heads, length, spec.head_dim)
        v = torch.empty_like(k)
        out = x.new_empty(batch, 1 if last else length, spec.hidden_size)
        parts = []
        for rows, pos in chunks:
            out[rows], k[rows], v[rows], chunk_probs = prefill_rows(
                spec, fam, seeding, w, x[rows], pos, mask[rows], state, last, section)
            parts.append(chunk_probs)
        probs = torch.cat(parts) if seeding is not None else None
    if probs is not None:
        assert seeding is not None and state is not None
        with section("selection"):
            seeding.observe_prefill(state, layer_idx, probs, valid)
    return out, k, v


def prefill_rows(spec: ModelSpec, fam: ModuleType, method: SparsityMethod | None,
                 w: LayerWeights, x: Tensor, pos: Any, mask: Tensor,
                 state: MethodState | None, last: bool, section: Section = _untimed
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """One layer over rows x (b, T, H): (output, k, v, the attention weights ``method`` seeds
    from, or None when it is None). ``last``: the output for the last position only. One chunk
    of ``prefill_layer``, and each layer of the Engine's dense prefill."""
    with section("linear"):
        q, k, v = fam.qkv(spec, w, x, pos)
    probs = None
    if method is not None:  # the last query rows the method seeds from
        with section("selection"):
            rows_read = method.prefill_query_rows(state, q.shape[2])
            probs = attention_probs(q[:, :, -rows_read:], k, mask[:, -rows_read:])  # (b,Hq,n,T)
    if last:
        q, x, mask = q[:, :, -1:], x[:, -1:], mask[:, -1:]
    with section("attention"):
        attn = dense_attention(q, k, v, mask)
    with section("linear"):
        out = fam.finish_layer(spec, w, x, attn)
    return out, k, v, probs
