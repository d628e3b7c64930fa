"""Random weights for any ModelSpec (throughput runs on shapes we have no checkpoint for).

Values are small Gaussians (std 0.02, norms at 1) so activations stay finite over many layers;
the tokens they produce are meaningless. Shapes and key names match the real loaders exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cost_model.spec import ModelSpec
from flexalisa.models.weights import ModelWeights


def dummy_weights(spec: ModelSpec, seed: int = 0, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> ModelWeights:
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype, device=device) * 0.02

    def ones(n: int) -> Tensor:
        return torch.ones(n, dtype=dtype, device=device)

    def zeros(n: int) -> Tensor:
        return torch.zeros(n, dtype=dtype, device=device)

    h, f, q, kv = spec.hidden_size, spec.ffn_size, spec.q_dim, spec.kv_dim
    g: dict[str, Tensor] = {"embed": rand(spec.vocab_size, spec.embed_dim)}
    layers = []
    if spec.family == "opt":
        g["pos_embed"] = rand(spec.max_seq_len + 2, h)
        if spec.word_embed_proj_dim:
            g["project_in"] = rand(h, spec.embed_dim)
            g["project_out"] = rand(spec.embed_dim, h)
        if spec.pre_layer_norm:
            g["final_norm_w"], g["final_norm_b"] = ones(h), zeros(h)
        for _ in range(spec.num_layers):
            layers.append({"attn_norm_w": ones(h), "attn_norm_b": zeros(h),
                           "wqkv": rand(q + 2 * kv, h), "bqkv": zeros(q + 2 * kv),
                           "wo": rand(h, q), "bo": zeros(h), "mlp_norm_w": ones(h),
                           "mlp_norm_b": zeros(h), "fc1": rand(f, h), "fc1_b": zeros(f),
                           "fc2": rand(h, f), "fc2_b": zeros(h)})
        g["lm_head"] = g["embed"]
    else:
        g["final_norm_w"] = ones(h)
        for _ in range(spec.num_layers):
            layers.append({"attn_norm_w": ones(h), "wqkv": rand(q + 2 * kv, h), "wo": rand(h, q),
                           "mlp_norm_w": ones(h), "w_gate_up": rand(2 * f, h),
                           "w_down": rand(h, f)})
        g["lm_head"] = g["embed"] if spec.tie_word_embeddings else rand(spec.vocab_size, h)
    return ModelWeights(spec, g, layers)
