"""Partial attention that returns ``(out, lse)``, and the exact merge of partials.

Attention over a token set S split into disjoint parts S1..Sm can be computed part by part
and merged exactly (the associative online-softmax rule, as in FlashAttention / LeanAttention):

    lse_i = log sum_{s in S_i} exp(q.k_s * scale)
    out_i = sum_{s in S_i} softmax_i(s) v_s
    lse   = logsumexp_i lse_i
    out   = sum_i exp(lse_i - lse) out_i

The runtime uses this to merge the GPU-tier partial with a partial computed on the CPU over
CPU-tier tokens (FlexGen's CPU delegation, made exact). A part with no valid key for a row has
``lse = -inf`` and ``out = 0`` and drops out of the merge.

Grouped-query attention is handled without repeating K/V: the ``G = Hq / Hkv`` query heads that
share one KV head are folded into the row dimension of one matmul.

One query per head (a decode step, T = 1) in fp32 on the CPU goes to the compiled kernel of
`flexalisa.attention.native` where it is built, for every function here but `attention_probs`:
the same folding, out, lse and weights in one pass, other last bits than torch's ops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from flexalisa.attention import native


def _fold_mask(mask: Tensor, batch: int, num_kv_heads: int) -> Tensor:
    """Bring a boolean mask to (B, Hkv|1, 1, T, S) so it broadcasts over grouped scores."""
    if mask.dim() == 3:  # (B, T, S): shared by all heads
        return mask[:, None, None]
    if mask.dim() == 4:  # (B, Hkv|1, T, S): per KV head
        return mask[:, :, None]
    raise ValueError(f"attention mask must be (B, T, S) or (B, Hkv, T, S), got {tuple(mask.shape)}")


def partial_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Softmax attention of ``q`` over the keys given, plus the log-sum-exp of the scores.

    q: (B, Hq, T, D); k, v: (B, Hkv, S, D) with Hq % Hkv == 0;
    mask: bool, True = may attend, (B, T, S) or (B, Hkv|1, T, S); None = all keys.
    Returns out (B, Hq, T, D) in q's dtype and lse (B, Hq, T) in float32.
    """
    fast = _one_query_native(q, k, v, mask, scale, with_probs=False)
    if fast is not None:
        return fast[0], fast[1]
    out, lse, _ = partial_attention_probs(q, k, v, mask, scale)
    return out, lse


def partial_attention_probs(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, scale: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``partial_attention`` that also returns its softmax weights, (B, Hq, T, S) float32.

    Sparsity methods score tokens from these weights; returning them here saves a second QK
    matmul per decode step. A row with no valid key has all-zero weights.
    """
    batch, num_heads, num_q, head_dim = q.shape
    num_kv_heads, num_keys = k.shape[1], k.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    if num_keys == 0:
        out = q.new_zeros(q.shape)
        lse = torch.full((batch, num_heads, num_q), -math.inf, device=q.device)
        return out, lse, torch.zeros(batch, num_heads, num_q, 0, device=q.device)
    fast = _one_query_native(q, k, v, mask, scale, with_probs=True)
    if fast is not None:
        return fast

    qg = q.reshape(batch, num_kv_heads, group * num_q, head_dim)  # (B, Hkv, G*T, D)
    scores = _scaled_scores(qg, k, scale)  # (B, Hkv, G*T, S), a new tensor
    scores = scores.view(batch, num_kv_heads, group, num_q, num_keys)  # (B, Hkv, G, T, S)
    if mask is not None:
        scores.masked_fill_(~_fold_mask(mask, batch, num_kv_heads), -math.inf)
    row_max = scores.amax(dim=-1, keepdim=True)  # (B, Hkv, G, T, 1)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    probs = scores.sub_(row_max).exp_()  # in place: the scores are not needed again
    denom = probs.sum(dim=-1, keepdim=True)  # (B, Hkv, G, T, 1)
    lse = (row_max + torch.log(denom)).squeeze(-1)  # -inf where a row had no key
    probs.div_(denom.clamp_min(torch.finfo(probs.dtype).tiny))
    probs = probs.view(batch, num_kv_heads, group * num_q, num_keys)  # (B, Hkv, G*T, S)
    out = torch.matmul(probs.to(v.dtype), v)  # (B, Hkv, G*T, D)
    out = out.view(batch, num_heads, num_q, head_dim)  # (B, Hq, T, D)
    probs = probs.view(batch, num_heads, num_q, num_keys)  # (B, Hq, T, S)
    return out, lse.reshape(batch, num_heads, num_q), probs


def attention_with_probs(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Softmax attention and its weights (B, Hq, T, S) float32, for callers with nothing to
    merge: one softmax (``attention_probs``) and one matmul, about half the time of
    ``partial_attention_probs``'s explicit max / exp / sum / log for one decode query here.
    Shapes and masks as ``partial_attention``; a row with no valid key gets zero output."""
    fast = _one_query_native(q, k, v, mask, scale, with_lse=False, with_probs=True)
    if fast is not None:
        return fast[0], fast[2]
    batch, num_heads, num_q, head_dim = q.shape
    num_kv_heads, num_keys = k.shape[1], k.shape[2]
    probs = attention_probs(q, k, mask, scale)  # (B, Hq, T, S)
    grouped = probs.view(batch, num_kv_heads, num_heads // num_kv_heads * num_q, num_keys)
    out = torch.matmul(grouped.to(v.dtype), v)  # (B, Hkv, G*T, D)
    return out.view(batch, num_heads, num_q, head_dim), probs


def selected_attention(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, mask: Tensor,
                       with_lse: bool = False
                       ) -> tuple[Tensor, Tensor | None, Tensor]:
    """Attention of one query per head (T = 1) over the slots ``indices`` of k, v, with the
    softmax weights a sparsity method observes, and where asked the log-sum-exp.

    q (B, Hq, 1, D); k, v (B, Hkv, S, D); indices long (B, Hsel, K), Hsel in {1, Hkv}, slots
    in [0, S) (``Selection.indices``); mask bool (B, Hsel, K), True = a real entry. Returns
    out (B, Hq, 1, D), lse (B, Hq, 1) or None, probs (B, Hq, 1, K): what ``gather_kv`` then
    ``attention_with_probs`` (or ``partial_attention_probs`` with ``with_lse``) give. In fp32
    on the CPU the compiled kernel reads the selected rows where they lie, with the same sums
    as over the gathered copy, and no copy: for SWA at 0.8 that copy took longer than the
    attention over it. Elsewhere it gathers and calls those functions.
    """
    fast = _one_query_native(q, k, v, mask[:, :, None], None, with_lse=with_lse,
                             with_probs=True, indices=indices)
    if fast is not None:
        return fast[0], fast[1], fast[2]
    k_sel, v_sel = gather_kv(k, v, indices)  # (B, Hkv, K, D)
    if with_lse:
        return partial_attention_probs(q, k_sel, v_sel, mask[:, :, None])
    out, probs = attention_with_probs(q, k_sel, v_sel, mask[:, :, None])
    return out, None, probs


def _one_query_native(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                      scale: float | None, with_lse: bool = True, with_probs: bool = True,
                      indices: Tensor | None = None
                      ) -> tuple[Tensor, Tensor | None, Tensor | None] | None:
    """One query per head (T = 1) through `native.decode_attention`, in this module's shapes:
    out (B, Hq, 1, D), lse (B, Hq, 1) and probs (B, Hq, 1, S) where asked; masks as
    ``partial_attention`` takes them; ``indices`` (B, Hsel, S) the slots of k, v attended
    (``selected_attention``), or None for all of them. None where the kernel does not apply
    (the caller then computes the same attention with torch)."""
    batch, num_heads, num_q, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_q != 1 or num_heads % num_kv_heads or (mask is not None and mask.dim() not in (3, 4)):
        return None
    if mask is not None:  # (B, 1, S), or (B, Hkv|1, S) from (B, Hkv|1, 1, S)
        mask = mask[:, 0] if mask.dim() == 3 else mask[:, :, 0]
    folded = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    res = native.decode_attention(folded, k, v, mask, scale, with_lse, with_probs, indices)
    if res is None:
        return None
    out, lse, probs = res
    return (out.view(batch, num_heads, 1, head_dim),
            None if lse is None else lse.view(batch, num_heads, 1),
            None if probs is None else probs.view(batch, num_heads, 1, probs.shape[-1]))


def dense_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Exact attention through torch's fused SDPA (no scores materialised), GQA included.

    q (B, Hq, T, D), k/v (B, Hkv, S, D), mask (B, T, S) bool with no fully masked row.
    Used where no attention weights or log-sum-exp are needed (dense prefill and decode).

    A one-query step (T = 1) folds the G = Hq / Hkv query heads that share a KV head into
    SDPA's query-row dimension, q (B, Hkv, G, D), under the one mask they share: each KV head's
    keys are then read once per sequence rather than once per query head. SmolLM2's 30 decode
    attentions at batch 32 took ~20 ms instead of ~25 ms here. In fp32 on the CPU that step
    goes to the compiled kernel of `flexalisa.attention.native` where it is built (the same
    folding, without SDPA's per-head overhead), and to SDPA otherwise.
    """
    batch, num_heads, num_q, head_dim = q.shape
    num_kv_heads = k.shape[1]
    fast = _one_query_native(q, k, v, mask, None, with_lse=False, with_probs=False)
    if fast is not None:  # fp32 on the CPU: the compiled kernel, where built
        return fast[0]
    if num_q == 1 and num_heads != num_kv_heads:
        folded = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
        out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask[:, None])
        return out.view(batch, num_heads, 1, head_dim)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None],
                                          enable_gqa=num_heads != num_kv_heads)


def take_rows(t: Tensor, batch_idx: Tensor, head_idx: Tensor, slot_idx: Tensor) -> Tensor:
    """``t[batch_idx, head_idx, slot_idx]`` for t (B, H, S, X) and broadcastable index tensors.

    Done as one ``index_select`` over t's (·, X) rows where t's strides allow (every row
    starts at a multiple of the slot stride, as in any slice of a contiguous buffer): that
    copies whole rows and ran 2-3x faster here than advanced indexing, which it falls back to.
    """
    flat = _flat_rows(t, batch_idx, head_idx, slot_idx)
    if flat is None:
        b, h, s = torch.broadcast_tensors(batch_idx, head_idx, slot_idx)
        return t[b, h, s]
    return _read_rows(t, *flat)


def _flat_rows(t: Tensor, batch_idx: Tensor, head_idx: Tensor, slot_idx: Tensor
               ) -> tuple[Tensor, tuple[int, ...]] | None:
    """For ``take_rows``: the index of each selected (b, h, s) row among the (·, X) rows of
    t's storage, flat, and the broadcast index shape; None where t's strides do not allow it
    (or there is nothing to read)."""
    if t.dim() != 4 or t.numel() == 0 or t.stride(3) != 1:
        return None
    sb, sh, ss = t.stride(0), t.stride(1), t.stride(2)
    if ss < t.shape[3] or sb % ss or sh % ss:
        return None
    flat = batch_idx * (sb // ss) + head_idx * (sh // ss) + slot_idx  # the broadcast shape
    if flat.numel() == 0:
        return None
    return flat.reshape(-1), tuple(flat.shape)


def _read_rows(t: Tensor, rows: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The (·, X) rows ``rows`` of t's storage (from ``_flat_rows``), as (*shape, X)."""
    sb, sh, ss = t.stride(0), t.stride(1), t.stride(2)
    num_rows = ((t.shape[0] - 1) * sb + (t.shape[1] - 1) * sh) // ss + t.shape[2]
    every = t.as_strided((num_rows, t.shape[3]), (ss, 1))  # every (b, h, s) row of t's storage
    return every.index_select(0, rows).view(*shape, t.shape[3])


def gather_kv(k: Tensor, v: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Gather the selected token slots of K and V.

    k, v: (B, Hkv, S, D); indices: long (B, K) per sequence, or (B, Hsel, K) with Hsel in
    {1, Hkv} (one selection shared by the KV heads, or one per KV head).
    Returns k_sel, v_sel: (B, Hkv, K, D). Reads only the selected rows (no expanded index).
    K and V of one cache share their layout, so the flat row index is built once for both
    (for SmolLM2's shapes at batch 16, 95-100 instead of 132 us per layer here).
    """
    batch, num_kv_heads = k.shape[0], k.shape[1]
    if indices.dim() == 2:
        indices = indices[:, None]  # (B, 1, K)
    if indices.dim() != 3 or indices.shape[1] not in (1, num_kv_heads):
        raise ValueError(
            f"indices must be (B, K) or (B, 1|{num_kv_heads}, K), got {tuple(indices.shape)}"
        )
    batch_idx = torch.arange(batch, device=k.device)[:, None, None]  # (B, 1, 1)
    head_idx = torch.arange(num_kv_heads, device=k.device)[None, :, None]  # (1, Hkv, 1)
    flat = _flat_rows(k, batch_idx, head_idx, indices)
    if flat is None or v.shape != k.shape or v.stride() != k.stride():
        return (take_rows(k, batch_idx, head_idx, indices),
                take_rows(v, batch_idx, head_idx, indices))  # (B, Hkv, K, D)
    rows, shape = flat
    return _read_rows(k, rows, shape), _read_rows(v, rows, shape)


def attention_probs(
    q: Tensor, k: Tensor, mask: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """The softmax weights ``partial_attention`` uses, (B, Hq, T, S) float32.

    Sparsity methods read these to score tokens; a fully masked row is all zeros.
    """
    batch, num_heads, num_q, head_dim = q.shape
    num_kv_heads, num_keys = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    qg = q.reshape(batch, num_kv_heads, group * num_q, head_dim)  # (B, Hkv, G*T, D)
    scores = _scaled_scores(qg, k, scale)
    scores = scores.view(batch, num_kv_heads, group, num_q, num_keys)  # (B, Hkv, G, T, S)
    if mask is not None:
        scores.masked_fill_(~_fold_mask(mask, batch, num_kv_heads), -math.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
    return probs.view(batch, num_heads, num_q, num_keys)


def _scaled_scores(qg: Tensor, k: Tensor, scale: float) -> Tensor:
    """float32 qg @ k^T * scale as a new tensor, scaled in place: the same values as an
    out-of-place product, without a second buffer of the scores' size (for the prefill's
    score rows, tens of MB whose fresh pages cost as much to fault in as the multiply)."""
    scores = torch.matmul(qg, k.transpose(-1, -2))
    scores = scores.float() if scores.dtype != torch.float32 else scores
    return scores.mul_(scale)


def merge(partials: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Combine ``(out, lse)`` partials over disjoint key sets into attention over their union."""
    if not partials:
        raise ValueError("merge needs at least one partial")
    if len(partials) == 1:
        return partials[0]
    lses = torch.stack([lse for _, lse in partials])  # (P, B, H, T)
    total = torch.logsumexp(lses, dim=0)  # (B, H, T)
    safe_total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    weights = torch.exp(lses - safe_total)  # (P, B, H, T); 0 for empty parts
    out = sum(w.unsqueeze(-1).to(o.dtype) * o for w, (o, _) in zip(weights, partials, strict=True))
    return out, total
