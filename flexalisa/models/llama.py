"""LLaMA-family decoder layers as pure tensor functions: RoPE, RMSNorm, SwiGLU, GQA/MQA.

Matches `transformers.LlamaForCausalLM` (rotate-half RoPE convention, default rope type).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cost_model.spec import ModelSpec
from flexalisa.models.linear import kv_rows, linear
from flexalisa.models.weights import LayerWeights


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_cos_sin(spec: ModelSpec, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """positions (B, T) -> cos, sin (B, 1, T, D) for the rotate-half convention."""
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (
        torch.arange(0, dim, 2, device=positions.device, dtype=torch.int64).float() / dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@dataclass(frozen=True)
class Rope:
    cos: Tensor  # (B, 1, T, D)
    sin: Tensor  # (B, 1, T, D)


def prepare_positions(spec: ModelSpec, positions: Tensor, dtype: torch.dtype) -> Rope:
    """Computed once per forward pass and shared by every layer."""
    return Rope(*rope_cos_sin(spec, positions, dtype))


def apply_rope(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = t.shape[-1] // 2
    rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
    return t * cos + rotated * sin


def embed(spec: ModelSpec, g: dict[str, Tensor], ids: Tensor, positions: Tensor) -> Tensor:
    return F.embedding(ids, g["embed"])  # (B, T, H)


def _split_heads(t: Tensor, num_heads: int, head_dim: int) -> Tensor:
    batch, length, _ = t.shape
    return t.view(batch, length, num_heads, head_dim).transpose(1, 2)  # (B, nh, T, hd)


def qkv(spec: ModelSpec, w: LayerWeights, x: Tensor, rope: Rope
        ) -> tuple[Tensor, Tensor, Tensor]:
    """Layer input (B, T, H) -> q (B, Hq, T, D), k and v (B, Hkv, T, D), RoPE applied."""
    h = rms_norm(x, w["attn_norm_w"], spec.norm_eps)
    q, k, v = linear(h, w["wqkv"]).split([spec.q_dim, spec.kv_dim, spec.kv_dim], dim=-1)
    q = apply_rope(_split_heads(q, spec.num_heads, spec.head_dim), rope.cos, rope.sin)
    k = apply_rope(_split_heads(k, spec.num_kv_heads, spec.head_dim), rope.cos, rope.sin)
    return q, k, _split_heads(v, spec.num_kv_heads, spec.head_dim)


def kv_from_hidden(spec: ModelSpec, w: LayerWeights, x: Tensor, rope: Rope
                   ) -> tuple[Tensor, Tensor]:
    """Recompute K (RoPE'd at the tokens' positions), V (B, Hkv, T, D) from layer inputs."""
    h = rms_norm(x, w["attn_norm_w"], spec.norm_eps)
    k, v = kv_rows(h, w["wqkv"], None, spec.q_dim).split([spec.kv_dim, spec.kv_dim], dim=-1)
    k = apply_rope(_split_heads(k, spec.num_kv_heads, spec.head_dim), rope.cos, rope.sin)
    return k, _split_heads(v, spec.num_kv_heads, spec.head_dim)


def finish_layer(spec: ModelSpec, w: LayerWeights, x: Tensor, attn: Tensor) -> Tensor:
    """Residual x (B, T, H) and attention output (B, Hq, T, D) -> layer output (B, T, H)."""
    batch, _, length, _ = attn.shape
    attn = attn.transpose(1, 2).reshape(batch, length, spec.q_dim)  # (B, T, Q)
    x = x + linear(attn, w["wo"])
    h = rms_norm(x, w["mlp_norm_w"], spec.norm_eps)
    gate, up = linear(h, w["w_gate_up"]).chunk(2, dim=-1)  # (B, T, F) each
    return x + linear(F.silu(gate) * up, w["w_down"])


def logits(spec: ModelSpec, g: dict[str, Tensor], x: Tensor) -> Tensor:
    """Final hidden (B, T, H) -> logits (B, T, V) in float32."""
    return linear(rms_norm(x, g["final_norm_w"], spec.norm_eps), g["lm_head"]).float()
