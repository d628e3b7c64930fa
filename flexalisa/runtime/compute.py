"""The ``compute`` op: one layer over one GPU batch, prefill or decode, as pure tensor work on
the tensors the loop hands it (weights, layer input, the fetched selection of its KV store).

Decode attention reads only the selected slots. The step's own token is always selected (the
sparsity contract puts it at slot S-1) but is not in the store yet (its ``store_kv`` follows),
so selected entries at S-1 take the fresh k, v and every other entry is read from the tiers::

    selection (B, Hsel, K) ─┬─ slot < S-1 → store.gather: GPU tier in place, CPU tier fetched
                            │               (or attended on the host), recompute tier rebuilt
                            └─ slot = S-1 → this step's k, v

With CPU delegation the CPU-tier entries and the step's own token are attended on the host and
merged by log-sum-exp (``attention.merge``) with a device partial over the GPU- and
recompute-tier entries, when there are any: exact, and the probabilities the sparsity method
observes are the partials' probabilities rescaled by ``exp(lse_part - lse)``. A step over a
store whose slots are all in the CPU tier (FlexGen's KV-on-CPU policy, ALISA's usual searched
placement) is one host attention over the tier read in place, with nothing to merge: dense,
the Engine's kernel over views of the ring (``store.host_dense_views``); sparse, the selection
attended in those views (``selected_attention``), or over one gather of it from the ring
(``store.host_gather``) where the ring is in half precision.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from cost_model.spec import ModelSpec
from flexalisa.attention import (
    SparsityMethod,
    attention_with_probs,
    dense_attention,
    merge,
    partial_attention_probs,
    selected_attention,
)
from flexalisa.attention.base import MethodState
from flexalisa.attention.selection import Selection, dense_selection
from flexalisa.kv import FetchedKV, TieredKVStore
from flexalisa.kv.selection import RecomputeFn, check_fetched
from flexalisa.models.weights import LayerWeights
from flexalisa.prefill import PrefillChunks
from flexalisa.prefill import prefill_layer as shared_prefill_layer
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


def prefill_layer(ctx: LayerContext, w: LayerWeights, x: Tensor, chunks: PrefillChunks,
                  mask: Tensor, valid: Tensor, state: MethodState, layer_idx: int
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """x (B, T, H) -> (layer output, k, v (B, Hkv, T, D)) in row ``chunks``, seeding the
    method's scores, timed per op kind (``flexalisa.prefill.prefill_layer``)."""
    return shared_prefill_layer(ctx.spec, ctx.fam, ctx.method, w, x, chunks, mask, valid, state,
                                layer_idx, section=ctx.times.section)


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

    is_new = sel.indices == store.num_tokens  # (B, Hsel, K): the step's own token
    if ctx.cpu_attention and prepared.fetched.num_cpu_entries:
        attn, probs = _delegated_attention(ctx, q, k_new, v_new, store, prepared, is_new,
                                           recompute_kv)
    else:
        with ctx.times.section("kv_gather"):
            k_sel, v_sel = _read_kv(store, prepared, recompute_kv, is_new, k_new, v_new,
                                    ctx.cpu_attention)  # (B, Hkv, K, D)
        with ctx.times.section("attention"):
            if sel.dense:  # the Engine's fused kernel on the Engine's slot layout
                attn, probs = dense_attention(q, k_sel, v_sel, sel.mask), None
            else:
                attn, probs = attention_with_probs(q, k_sel, v_sel, sel.attention_mask)
    if ctx.method.needs_scores and not sel.dense:  # as the Engine: no scores from dense steps
        with ctx.times.section("selection"):
            ctx.method.observe(state, layer_idx, probs, sel)
    with ctx.times.section("linear"):
        out = fam.finish_layer(spec, w, x, attn)
    return out, k_new, v_new


def _read_kv(store: TieredKVStore, prepared: FetchedSelection, recompute_kv: RecomputeFn,
             is_new: Tensor, k_new: Tensor, v_new: Tensor,
             skip_cpu: bool) -> tuple[Tensor, Tensor]:
    """K, V of the selection (B, Hkv, K, D) with the step's own k, v at its entries.

    A dense step over a store whose slots are all in the GPU tier reads the ring in place
    (``store.dense_views``: no copy, as the Engine reads its cache); otherwise the store
    gathers new tensors and the new token goes in at its entries: for a dense selection the
    entries past the stored slots (one slice), else the entries whose index is the new slot.
    """
    sel = prepared.selection
    if sel.dense:
        views = store.dense_views(k_new, v_new)
        if views is not None:
            return views
    k_sel, v_sel = store.gather(prepared.old_indices, recompute_kv, prepared.fetched,
                                skip_cpu=skip_cpu)
    if sel.dense:  # entry s is slot s: the new token's entry is the last
        k_sel[:, :, store.num_tokens:] = k_new
        v_sel[:, :, store.num_tokens:] = v_new
        return k_sel, v_sel
    new_entries = is_new.expand(k_sel.shape[:3])  # (B, Hkv, K)
    k_sel[new_entries] = k_new.expand(k_sel.shape)[new_entries]
    v_sel[new_entries] = v_new.expand(v_sel.shape)[new_entries]
    return k_sel, v_sel


def _delegated_attention(ctx: LayerContext, q: Tensor, k_new: Tensor, v_new: Tensor,
                         store: TieredKVStore, prepared: FetchedSelection, is_new: Tensor,
                         recompute_kv: RecomputeFn) -> tuple[Tensor, Tensor]:
    """CPU delegation: attention over the selection and the probabilities the sparsity method
    observes (B, Hq, 1, K), as the exact LSE merge of at most two partials:

        host    the selected CPU-tier slots, read where they are stored, plus the step's own
                token (its q, k, v copied over, as FlexGen does), in float32 (half-precision
                matmuls are slow on CPUs)
        device  the selected GPU- and recompute-tier slots; skipped when the fetch found none
                there (all stored KV on the CPU tier), leaving one partial and no merge
    """
    sel, fetched = prepared.selection, prepared.fetched
    host = torch.device("cpu")
    if fetched.in_place:  # every stored slot in the CPU tier: one host attention, no merge
        return _host_in_place_attention(ctx, q, k_new, v_new, store, prepared)
    stored = sel.mask & ~is_new  # (B, Hsel, K): real entries of stored slots
    device_part = bool(fetched.num_gpu_entries or fetched.num_recompute)
    with ctx.times.section("kv_gather"):
        check_fetched(store, prepared.old_indices, fetched, skip_cpu=True)
        k_host, v_host, on_cpu = fetched.host  # read by load_kv: (B, Hkv, K, D) on the host
        new_entries = is_new.to(host).expand(k_host.shape[:3])  # (B, Hkv, K)
        k_host[new_entries] = k_new.to(host, k_host.dtype).expand(k_host.shape)[new_entries]
        v_host[new_entries] = v_new.to(host, v_host.dtype).expand(v_host.shape)[new_entries]
        if device_part:
            k_dev, v_dev = store.gather(prepared.old_indices, recompute_kv, fetched,
                                        skip_cpu=True)  # CPU-tier entries zero
    with ctx.times.section("attention"):
        host_mask = (on_cpu & stored.to(host)) | (is_new & sel.mask).to(host)  # (B, Hkv, K)
        host_q = q.to(host, torch.float32)
        if not device_part:  # one partial: nothing to merge, no log-sum-exp needed
            out, probs = host_attention(attention_with_probs, host_q, k_host, v_host,
                                        host_mask[:, :, None])
            return out.to(q.device, q.dtype), probs.to(q.device)
        out, lse, probs = host_attention(partial_attention_probs, host_q, k_host, v_host,
                                         host_mask[:, :, None])
        out, lse, probs = out.to(q.device, q.dtype), lse.to(q.device), probs.to(q.device)
        device_mask = stored & ~fetched.masks.cpu  # (B, Hkv, K)
        out_dev, lse_dev, p_dev = partial_attention_probs(q, k_dev, v_dev, device_mask[:, :, None])
        merged, total = merge([(out, lse), (out_dev, lse_dev)])
        probs = (probs * torch.exp(lse - total)[..., None]
                 + p_dev * torch.exp(lse_dev - total)[..., None])
    return merged, probs


def _host_in_place_attention(ctx: LayerContext, q: Tensor, k_new: Tensor, v_new: Tensor,
                             store: TieredKVStore, prepared: FetchedSelection
                             ) -> tuple[Tensor, Tensor | None]:
    """CPU-delegated attention over a store whose slots are all in the CPU tier, read in place
    with the step's own token written at the ring's next index. Dense: the Engine's kernel
    over views of the ring, as the Engine attends its cache (on a CPU device the same fp32
    sums), and no probabilities (a dense step feeds no scores). Sparse: the selection attended
    with the probabilities the method observes, as the Engine does: over a float32 ring (a CPU
    device) where it lies in the ring's views (``selected_attention``), else over one gather
    of it from the ring; the same K, V and mask as the generic host read, so the same sums."""
    host, sel = torch.device("cpu"), prepared.selection
    in_place = sel.dense or store.cpu.dtype == torch.float32
    with ctx.times.section("kv_gather"):
        check_fetched(store, prepared.old_indices, prepared.fetched, skip_cpu=True)
        k_new, v_new = k_new.to(host), v_new.to(host)
        kv = (store.host_dense_views(k_new, v_new) if in_place
              else store.host_gather(sel.indices, k_new, v_new))
        if kv is None:
            raise ValueError("the store's tiers changed since its host fetch")
    with ctx.times.section("attention"):
        host_q = q.to(host, torch.float32)
        if sel.dense:
            out = host_attention(dense_attention, host_q, kv[0], kv[1], sel.mask.to(host))
            return out.to(q.device, q.dtype), None
        if in_place:
            out, _, probs = selected_attention(host_q, kv[0], kv[1], sel.indices.to(host),
                                               sel.mask.to(host))
        else:
            out, probs = host_attention(attention_with_probs, host_q, kv[0], kv[1],
                                        sel.attention_mask.to(host))
    return out.to(q.device, q.dtype), probs.to(q.device)


HOST_CHUNK_BYTES = 8 * 2**20  # float32 K plus V of one chunk of rows in ``host_attention``
_host_scratch = threading.local()  # per thread: the float32 buffer chunks are upcast into


def host_attention(fn, q: Tensor, k: Tensor, v: Tensor, mask: Tensor):
    """``fn(q, k, v, mask)`` on the host in float32, for k, v (B, Hkv, K, D) stored in any
    dtype, and its results (tensors with the batch first) as if over the whole batch.

    Half-precision K, V (a GPU run's CPU tier) are upcast a chunk of batch rows at a time into
    one reused float32 buffer of a few MB (at least one row): a float32 copy of the whole tier,
    allocated afresh each layer-step, spent most of its time in page faults, several times the
    attention's own. Rows are independent, so chunking changes no result beyond the kernel's
    summation order. Float32 K, V (the CPU device) are used as they are, in one call.
    """
    if k.dtype == torch.float32:
        return fn(q, k, v, mask)
    batch, row = k.shape[0], k[0].numel()
    rows = min(batch, max(1, HOST_CHUNK_BYTES // (2 * row * 4)))
    buf = getattr(_host_scratch, "buf", None)
    if buf is None or buf.numel() < 2 * rows * row:
        buf = _host_scratch.buf = torch.empty(2 * rows * row, dtype=torch.float32)
    parts = []
    for r in range(0, batch, rows):
        n = min(rows, batch - r)
        k32 = buf[:n * row].view(n, *k.shape[1:]).copy_(k[r:r + n])
        v32 = buf[rows * row:(rows + n) * row].view(n, *v.shape[1:]).copy_(v[r:r + n])
        parts.append(fn(q[r:r + n], k32, v32, mask if mask.shape[0] == 1 else mask[r:r + n]))
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], Tensor):
        return torch.cat(parts)
    return tuple(torch.cat(part) for part in zip(*parts))


def select_next(ctx: LayerContext, state: MethodState, layer_idx: int,
                valid: Tensor) -> Selection:
    """The slots the next decode step of this layer attends; valid (B, S) includes its token."""
    with ctx.times.section("selection"):
        sel = ctx.method.select(state, layer_idx, valid)
        return sel if sel is not None else dense_selection(valid)


def clamp_to_stored(sel: Selection, num_stored: int) -> Tensor:
    """Selection indices with the not-yet-stored slot ``num_stored`` (and padding) clamped."""
    return sel.indices.clamp(max=num_stored - 1)
