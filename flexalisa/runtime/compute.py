"""The ``compute`` op: one layer over one GPU batch, prefill or decode, as pure tensor work on
the tensors the loop hands it (weights, layer input, the fetched selection of its KV store).

Decode attention reads only the selected slots. The step's own token is always selected (the
sparsity contract puts it at slot S-1) but is not in the store yet (its ``store_kv`` follows),
so selected entries at S-1 take the fresh k, v and every other entry is read from the tiers::

    selection (B, Hsel, K) ─┬─ slot < S-1 → store.gather: GPU tier in place, CPU tier fetched
                            │               (or attended on the host), recompute tier rebuilt
                            └─ slot = S-1 → this step's k, v

With CPU delegation the CPU-tier entries are attended on the host and merged by log-sum-exp
(``attention.merge``): exact, and the probabilities the sparsity method observes are the
partials' probabilities rescaled by ``exp(lse_part - lse)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from cost_model.spec import ModelSpec
from flexalisa.attention import (
    SparsityMethod,
    attention_probs,
    merge,
    partial_attention_probs,
)
from flexalisa.attention.base import MethodState
from flexalisa.attention.selection import Selection, dense_selection
from flexalisa.engine import dense_attention
from flexalisa.kv import FetchedKV, TieredKVStore
from flexalisa.models.weights import LayerWeights
from flexalisa.runtime.timing import OpTimes


@dataclass(frozen=True)
class LayerContext:
    """What every compute op shares within a run."""

    spec: ModelSpec  # model shapes
    fam: ModuleType  # the family's layer functions (``family_of(spec)``)
    method: SparsityMethod  # selects the slots each decode step attends to
    cpu_attention: bool  # attend CPU-tier entries on the host and LSE-merge
    dtype: torch.dtype  # compute dtype
    times: OpTimes  # timing hooks


@dataclass
class FetchedSelection:
    """What ``load_kv`` prepared for one decode compute."""

    selection: Selection  # the step's selection, the new token's slot included
    old_indices: Tensor  # (B, Hsel, K) the selection with slot S-1 clamped to S-2 (stored)
    fetched: FetchedKV  # the store's fetch of ``old_indices``


def prefill_layer(ctx: LayerContext, w: LayerWeights, x: Tensor, pos: Any, mask: Tensor,
                  valid: Tensor, state: MethodState, layer_idx: int
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """x (B, T, H) -> (layer output, k, v (B, Hkv, T, D)); seeds the method's scores.

    The last layer's output is computed for the last position only (B, 1, H), as the Engine
    does: only it feeds the logits, and its K, V are computed for every position.
    """
    spec, fam = ctx.spec, ctx.fam
    with ctx.times.section("linear"):
        q, k, v = fam.qkv(spec, w, x, pos)
    if ctx.method.needs_scores:  # the scores the Engine seeds from, computed as it does
        with ctx.times.section("selection"):
            rows_read = ctx.method.prefill_query_rows(state, q.shape[2])
            probs = attention_probs(q[:, :, -rows_read:], k, mask[:, -rows_read:])  # (B,Hq,n,T)
            ctx.method.observe_prefill(state, layer_idx, probs, valid)
    if layer_idx == spec.num_layers - 1:
        q, x, mask = q[:, :, -1:], x[:, -1:], mask[:, -1:]
    with ctx.times.section("attention"):
        attn = dense_attention(q, k, v, mask)
    with ctx.times.section("linear"):
        out = fam.finish_layer(spec, w, x, attn)
    return out, k, v


def decode_layer(ctx: LayerContext, w: LayerWeights, x: Tensor, pos: Any,
                 store: TieredKVStore, prepared: FetchedSelection, pad: Tensor,
                 state: MethodState, layer_idx: int) -> tuple[Tensor, Tensor, Tensor]:
    """x (B, 1, H) -> (layer output, k, v (B, Hkv, 1, D)) attending the selected slots."""
    spec, fam = ctx.spec, ctx.fam
    with ctx.times.section("linear"):
        q, k_new, v_new = fam.qkv(spec, w, x, pos)
    sel = prepared.selection

    def recompute_kv(hidden: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
        with ctx.times.section("recompute"):  # slot -> RoPE position: minus the left padding
            positions = (slots - pad[:, None]).clamp_min(0)  # (B, R)
            return fam.kv_from_hidden(spec, w, hidden, fam.prepare_positions(
                spec, positions, ctx.dtype))

    with ctx.times.section("kv_gather"):
        k_sel, v_sel = store.gather(prepared.old_indices, recompute_kv, prepared.fetched,
                                    skip_cpu=ctx.cpu_attention)  # (B, Hkv, K, D)
        is_new = sel.indices == store.num_tokens  # (B, Hsel, K)
        # gather returns new tensors: the step's own k, v go in at its entries, in place
        new_entries = is_new.expand(k_sel.shape[:3])  # (B, Hkv, K)
        k_sel[new_entries] = k_new.expand(k_sel.shape)[new_entries]
        v_sel[new_entries] = v_new.expand(v_sel.shape)[new_entries]
    with ctx.times.section("attention"):
        # CPU delegation: the selected CPU-tier entries (the new token is not stored yet)
        on_cpu = prepared.fetched.masks.cpu & ~is_new & sel.mask if ctx.cpu_attention else None
        if on_cpu is not None and bool(on_cpu.any()):
            attn, probs = _delegated_attention(q, k_sel, v_sel, store, prepared, on_cpu)
        elif sel.dense:  # the Engine's fused kernel on the Engine's slot layout
            attn, probs = dense_attention(q, k_sel, v_sel, sel.mask), None
        else:
            attn, _, probs = partial_attention_probs(q, k_sel, v_sel, sel.attention_mask)
    if ctx.method.needs_scores and not sel.dense:  # as the Engine: no scores from dense steps
        with ctx.times.section("selection"):
            ctx.method.observe(state, layer_idx, probs, sel)
    with ctx.times.section("linear"):
        out = fam.finish_layer(spec, w, x, attn)
    return out, k_new, v_new


def _delegated_attention(q: Tensor, k_sel: Tensor, v_sel: Tensor, store: TieredKVStore,
                         prepared: FetchedSelection, on_cpu: Tensor) -> tuple[Tensor, Tensor]:
    """Device partial over GPU/recompute/new entries + host partial over the CPU-tier entries
    ``on_cpu`` (B, Hkv, K), at least one."""
    device_mask = prepared.selection.mask & ~on_cpu  # (B, Hkv, K)
    out_dev, lse_dev, p_dev = partial_attention_probs(q, k_sel, v_sel, device_mask[:, :, None])
    k_host, v_host, _ = store.cpu_selected(prepared.old_indices)  # (B, Hkv, K, D) on the host
    host_mask = on_cpu.cpu()[:, :, None]  # (B, Hkv, 1, K)
    # the host computes in float32 (half-precision matmuls are slow on CPUs), as FlexGen does
    out_host, lse_host, p_host = partial_attention_probs(q.cpu().float(), k_host.float(),
                                                         v_host.float(), host_mask)
    device = q.device
    out_host = out_host.to(device, q.dtype)
    lse_host, p_host = lse_host.to(device), p_host.to(device)
    out, lse = merge([(out_dev, lse_dev), (out_host, lse_host)])
    probs = (p_dev * torch.exp(lse_dev - lse)[..., None]
             + p_host * torch.exp(lse_host - lse)[..., None])  # (B, Hq, 1, K)
    return out, probs


def select_next(ctx: LayerContext, state: MethodState, layer_idx: int,
                valid: Tensor) -> Selection:
    """The slots the next decode step of this layer attends; valid (B, S) includes its token."""
    with ctx.times.section("selection"):
        sel = ctx.method.select(state, layer_idx, valid)
        return sel if sel is not None else dense_selection(valid)


def clamp_to_stored(sel: Selection, num_stored: int) -> Tensor:
    """Selection indices with the not-yet-stored slot ``num_stored`` (and padding) clamped."""
    return sel.indices.clamp(max=num_stored - 1)
