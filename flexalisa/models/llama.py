"""LLaMA-family decoder layers as pure tensor functions: RoPE, RMSNorm, SwiGLU, GQA/MQA.

Matches `transformers.LlamaForCausalLM` (rotate-half RoPE convention, default rope type).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cost_model.spec import ModelSpec
from flexalisa.models.linear import kv_rows, linear, qkv_rows
from flexalisa.models.weights import LayerWeights


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_cos_sin(spec: ModelSpec, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """positions (B, T) -> cos and signed sin (B, T, 1, D) for the rotate-half convention.

    The signed sin is (-sin, sin) over the two halves, so that `rotate_half(t) * sin` equals
    `cat(t2, t1) * signed_sin` exactly (a sign flip is exact in IEEE arithmetic).
    """
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (
        torch.arange(0, dim, 2, device=positions.device, dtype=torch.int64).float() / dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None]  # (B, T, 1, D)
    sin = emb.sin()
    sin[..., :dim // 2].neg_()
    return emb.cos().to(dtype), sin.to(dtype)


@dataclass(frozen=True)
class Rope:
    cos: Tensor  # (B, T, 1, D)
    sin: Tensor  # (B, T, 1, D), signed: -sin on the first half


def prepare_positions(spec: ModelSpec, positions: Tensor, dtype: torch.dtype) -> Rope:
    """Computed once per forward pass and shared by every layer."""
    return Rope(*rope_cos_sin(spec, positions, dtype))


def apply_rope(t: Tensor, rope: Rope) -> Tensor:
    """t (B, T, heads, D) -> t * cos + rotate_half(t) * sin, as HF computes it (no FMA)."""
    half = t.shape[-1] // 2
    rotated = torch.cat([t[..., half:], t[..., :half]], dim=-1).mul_(rope.sin)
    return (t * rope.cos).add_(rotated)


def embed(spec: ModelSpec, g: dict[str, Tensor], ids: Tensor, positions: Tensor) -> Tensor:
    return F.embedding(ids, g["embed"])  # (B, T, H)


def _split_heads(t: Tensor, num_heads: int, head_dim: int) -> Tensor:
    batch, length, _ = t.shape
    return t.view(batch, length, num_heads, head_dim).transpose(1, 2)  # (B, nh, T, hd)


def qkv(spec: ModelSpec, w: LayerWeights, x: Tensor, rope: Rope
        ) -> tuple[Tensor, Tensor, Tensor]:
    """Layer input (B, T, H) -> q (B, Hq, T, D), k and v (B, Hkv, T, D), RoPE applied."""
    batch, length, _ = x.shape
    h = rms_norm(x, w["attn_norm_w"], spec.norm_eps)
    fused = qkv_rows(h, w, None, spec.q_dim)  # (B, T, Q + 2K)
    qk_heads = spec.num_heads + spec.num_kv_heads
    # q and k share head_dim and positions: one RoPE over both
    qk = apply_rope(fused[..., :spec.q_dim + spec.kv_dim].view(
        batch, length, qk_heads, spec.head_dim), rope).transpose(1, 2)  # (B, Hq + Hkv, T, D)
    v = fused[..., spec.q_dim + spec.kv_dim:]
    return (qk[:, :spec.num_heads], qk[:, spec.num_heads:],
            _split_heads(v, spec.num_kv_heads, spec.head_dim))


def kv_from_hidden(spec: ModelSpec, w: LayerWeights, x: Tensor, rope: Rope
                   ) -> tuple[Tensor, Tensor]:
    """Recompute K (RoPE'd at the tokens' positions), V (B, Hkv, T, D) from layer inputs."""
    batch, length, _ = x.shape
    h = rms_norm(x, w["attn_norm_w"], spec.norm_eps)
    k, v = kv_rows(h, w, None, spec.q_dim).split([spec.kv_dim, spec.kv_dim], dim=-1)
    k = apply_rope(k.view(batch, length, spec.num_kv_heads, spec.head_dim), rope)
    return k.transpose(1, 2), _split_heads(v, spec.num_kv_heads, spec.head_dim)


def finish_layer(spec: ModelSpec, w: LayerWeights, x: Tensor, attn: Tensor) -> Tensor:
    """Residual x (B, T, H) and attention output (B, Hq, T, D) -> layer output (B, T, H).

    `x` is not modified (the runner keeps layer inputs for recomputation); the in-place ops
    act on fresh GEMM outputs only.
    """
    batch, _, length, _ = attn.shape
    attn = attn.transpose(1, 2).reshape(batch, length, spec.q_dim)  # (B, T, Q)
    x = linear(attn, w["wo"]).add_(x)
    h = rms_norm(x, w["mlp_norm_w"], spec.norm_eps)
    gate, up = linear(h, w["w_gate_up"]).chunk(2, dim=-1)  # (B, T, F) each
    return linear(F.silu(gate).mul_(up), w["w_down"]).add_(x)


def logits(spec: ModelSpec, g: dict[str, Tensor], x: Tensor) -> Tensor:
    """Final hidden (B, T, H) -> logits (B, T, V) in float32."""
    return linear(rms_norm(x, g["final_norm_w"], spec.norm_eps), g["lm_head"]).float()
