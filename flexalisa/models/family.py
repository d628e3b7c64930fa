"""Pick the layer functions for a spec's family; every family module has the same five functions:

    embed(spec, globals, ids, positions)        -> x (B, T, H)
    prepare_positions(spec, positions, dtype)   -> pos: what qkv needs (LLaMA: RoPE cos/sin),
                                                   computed once per forward for all layers
    qkv(spec, layer, x, pos)                    -> q (B, Hq, T, D), k, v (B, Hkv, T, D)
    kv_from_hidden(spec, layer, x, pos)         -> k, v            (recompute tier)
    finish_layer(spec, layer, x, attn)          -> x (B, T, H)     (o-proj, residual, MLP)
    logits(spec, globals, x)                    -> (B, T, V) float32
"""

from __future__ import annotations

from types import ModuleType

from cost_model.spec import ModelSpec
from flexalisa.models import llama, opt

_FAMILIES: dict[str, ModuleType] = {"opt": opt, "llama": llama}


def family_of(spec: ModelSpec) -> ModuleType:
    return _FAMILIES[spec.family]
