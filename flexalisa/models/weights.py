"""`ModelWeights`: a spec plus plain tensor dicts, one per decoder layer, so a runner can stream
weights layer by layer.

Key names (all weights stored (out_features, in_features), as `F.linear` expects)::

    globals  embed (V, E)  lm_head (V, E)  [OPT] pos_embed (P+2, H), project_in (H, E),
             project_out (E, H), final_norm_w/_b   [LLaMA] final_norm_w
    OPT layer    attn_norm_w/_b  wqkv (Q+2K, H) bqkv  wo (H, Q) bo  mlp_norm_w/_b
                 fc1 (F, H) fc1_b  fc2 (H, F) fc2_b
    LLaMA layer  attn_norm_w  wqkv (Q+2K, H)  wo (H, Q)  mlp_norm_w  w_gate_up (2F, H)
                 w_down (H, F)

Q, K, V are fused into one matrix and LLaMA's gate/up into another: one GEMM instead of three
(or two) per token batch, which matters at decode batch sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from cost_model.spec import ModelSpec

LayerWeights = dict[str, Tensor]


@dataclass
class ModelWeights:
    spec: ModelSpec  # the shapes these tensors follow
    globals: dict[str, Tensor]  # embeddings, final norm, lm_head (see module docstring)
    layers: list[LayerWeights] = field(default_factory=list)  # one dict per decoder layer

    def __post_init__(self) -> None:
        if len(self.layers) != self.spec.num_layers:
            raise ValueError(f"{len(self.layers)} layer dicts for {self.spec.num_layers} layers")

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ModelWeights:
        """A copy on `device` (and floating tensors in `dtype`); tied tensors stay tied."""
        seen: dict[int, Tensor] = {}

        def move(t: Tensor) -> Tensor:
            if id(t) not in seen:
                seen[id(t)] = t.to(device=device, dtype=dtype if t.is_floating_point() else None)
            return seen[id(t)]

        return ModelWeights(
            spec=self.spec,
            globals={k: move(v) for k, v in self.globals.items()},
            layers=[{k: move(v) for k, v in layer.items()} for layer in self.layers],
        )

    def layer_bytes(self, layer_idx: int) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers[layer_idx].values())
