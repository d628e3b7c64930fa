"""OPT decoder layers as pure tensor functions (pre-LN, and OPT-350m's post-LN + projections).

Matches `transformers.OPTForCausalLM`: learned positions with offset 2, LayerNorm, ReLU MLP,
biases on every linear except the embedding projections and the tied lm_head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cost_model.spec import ModelSpec
from flexalisa.models.linear import kv_rows, linear, qkv_rows
from flexalisa.models.weights import LayerWeights

POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding reserves two rows


def embed(spec: ModelSpec, g: dict[str, Tensor], ids: Tensor, positions: Tensor) -> Tensor:
    """ids, positions (B, T) -> hidden (B, T, H). Padding positions may be -1."""
    x = F.embedding(ids, g["embed"])  # (B, T, E)
    if "project_in" in g:
        x = linear(x, g["project_in"])  # (B, T, H)
    return x + F.embedding(positions.clamp_min(-1) + POSITION_OFFSET, g["pos_embed"])


def prepare_positions(spec: ModelSpec, positions: Tensor, dtype: torch.dtype) -> Tensor:
    """OPT's attention does not use positions; they only enter through `embed`."""
    return positions


def _split_heads(t: Tensor, num_heads: int, head_dim: int) -> Tensor:
    batch, length, _ = t.shape
    return t.view(batch, length, num_heads, head_dim).transpose(1, 2)  # (B, nh, T, hd)


def _attn_input(spec: ModelSpec, w: LayerWeights, x: Tensor) -> Tensor:
    if spec.pre_layer_norm:
        return F.layer_norm(x, (spec.hidden_size,), w["attn_norm_w"], w["attn_norm_b"], 1e-5)
    return x


def qkv(spec: ModelSpec, w: LayerWeights, x: Tensor, positions: Tensor
        ) -> tuple[Tensor, Tensor, Tensor]:
    """Layer input (B, T, H) -> q (B, Hq, T, D), k and v (B, Hkv, T, D)."""
    fused = qkv_rows(_attn_input(spec, w, x), w, w["bqkv"], spec.q_dim)  # (B, T, Q+2K)
    q, k, v = fused.split([spec.q_dim, spec.kv_dim, spec.kv_dim], dim=-1)
    return (_split_heads(q, spec.num_heads, spec.head_dim),
            _split_heads(k, spec.num_kv_heads, spec.head_dim),
            _split_heads(v, spec.num_kv_heads, spec.head_dim))


def kv_from_hidden(spec: ModelSpec, w: LayerWeights, x: Tensor, positions: Tensor
                   ) -> tuple[Tensor, Tensor]:
    """Recompute K, V (B, Hkv, T, D) from stored layer inputs (B, T, H)."""
    q_dim, kv_dim = spec.q_dim, spec.kv_dim
    fused = kv_rows(_attn_input(spec, w, x), w, w["bqkv"], q_dim)
    k, v = fused.split([kv_dim, kv_dim], dim=-1)  # (B, T, K) each
    return (_split_heads(k, spec.num_kv_heads, spec.head_dim),
            _split_heads(v, spec.num_kv_heads, spec.head_dim))


def finish_layer(spec: ModelSpec, w: LayerWeights, x: Tensor, attn: Tensor) -> Tensor:
    """Residual stream x (B, T, H) and attention output (B, Hq, T, D) -> layer output (B, T, H)."""
    hidden = spec.hidden_size
    batch, _, length, _ = attn.shape
    attn = attn.transpose(1, 2).reshape(batch, length, spec.q_dim)  # (B, T, Q)
    x = x + linear(attn, w["wo"], w["bo"])
    if not spec.pre_layer_norm:
        x = F.layer_norm(x, (hidden,), w["attn_norm_w"], w["attn_norm_b"], 1e-5)
    h = x
    if spec.pre_layer_norm:
        h = F.layer_norm(x, (hidden,), w["mlp_norm_w"], w["mlp_norm_b"], 1e-5)
    x = x + linear(F.relu(linear(h, w["fc1"], w["fc1_b"])), w["fc2"], w["fc2_b"])
    if not spec.pre_layer_norm:
        x = F.layer_norm(x, (hidden,), w["mlp_norm_w"], w["mlp_norm_b"], 1e-5)
    return x


def logits(spec: ModelSpec, g: dict[str, Tensor], x: Tensor) -> Tensor:
    """Final hidden (B, T, H) -> logits (B, T, V) in float32."""
    if "final_norm_w" in g:
        x = F.layer_norm(x, (spec.hidden_size,), g["final_norm_w"], g["final_norm_b"], 1e-5)
    if "project_out" in g:
        x = linear(x, g["project_out"])  # (B, T, E)
    return linear(x, g["lm_head"]).float()
