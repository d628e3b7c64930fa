"""Query-aware approximate attention scores (SparQ), for SWA's optional global selection.

SparQ (Ribar et al., "SparQ Attention: Bandwidth-Efficient LLM Inference", ICML 2024) estimates
the current step's attention from the ``r`` largest-magnitude channels of the query:

    C     = the r channels with the largest |q| (per KV head: |q| summed over its G query heads)
    s_hat = softmax(q[C] . K[:, C] / sqrt(D * ||q[C]||_1 / ||q||_1))   over every valid token

The temperature ``sqrt(D * ||q[C]||_1 / ||q||_1)`` is SparQ's correction for the dot product
being partial. SWA's query-aware form then takes the global tokens as the top-k of s_hat summed
over the query heads of each selection group (all heads, or one KV head's G heads), excluding the
local window, exactly where the paper's form uses the windowed history.

Cost (honest): each step reads r/D of K for **every** valid token (r = 16, D = 64: a quarter of
K, an eighth of the K+V bytes), on top of the selected K, V. For CPU-tier tokens the offloading
runtime would compute these approximate scores on the CPU and move only the chosen indices; an
efficient layout stores K a second time channel-major so the r-channel read is contiguous (SparQ
does this). With r >= D the scores are exact (the "oracle" of the current step's attention).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flexalisa.attention.scores import head_sum


def top_channels(q_abs: Tensor, num_channels: int) -> Tensor:
    """Indices (..., r) of the r largest entries of q_abs (..., D); ties: lower channel wins."""
    order = torch.sort(q_abs, dim=-1, descending=True, stable=True).indices
    return order[..., : min(num_channels, q_abs.shape[-1])]


def approx_scores(
    q: Tensor, keys: Tensor, valid: Tensor, num_channels: int, num_groups: int
) -> Tensor:
    """SparQ's estimate of this step's attention, summed per selection group.

    q: (B, Hq, 1, D) the step's (post-RoPE) queries; keys: (B, Hkv, S, D) every cached key;
    valid: (B, S) bool; num_groups: 1 (sum all heads) or Hkv (per KV head).
    Returns (B, num_groups, S) float64, 0 on invalid slots.
    """
    batch, num_heads, num_q, head_dim = q.shape
    num_kv_heads, num_slots = keys.shape[1], keys.shape[2]
    if num_q != 1:
        raise ValueError(f"query-aware selection needs one query per row, got {num_q}")
    group = num_heads // num_kv_heads
    qg = q[:, :, 0].float().view(batch, num_kv_heads, group, head_dim)  # (B, Hkv, G, D)
    chans = top_channels(qg.abs().sum(dim=2), num_channels)  # (B, Hkv, r)
    q_r = qg.gather(-1, chans[:, :, None].expand(-1, -1, group, -1))  # (B, Hkv, G, r)
    k_r = keys.gather(-1, chans[:, :, None].expand(-1, -1, num_slots, -1)).float()  # (B,Hkv,S,r)
    share = q_r.abs().sum(-1, keepdim=True) / qg.abs().sum(-1, keepdim=True)  # (B, Hkv, G, 1)
    temperature = torch.sqrt(head_dim * share.clamp_min(torch.finfo(share.dtype).tiny))
    logits = torch.matmul(q_r, k_r.transpose(-1, -2)) / temperature  # (B, Hkv, G, S)
    logits = logits.masked_fill(~valid[:, None, None], -math.inf)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # (B, Hkv, G, S)
    probs = probs.reshape(batch, num_heads, 1, num_slots)  # (B, Hq, 1, S), head h -> KV h // G
    return head_sum(probs, num_groups)[:, :, 0].double()  # (B, Hsel, S)
