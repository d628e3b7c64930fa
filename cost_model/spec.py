"""`ModelSpec`: the shape of a decoder-only transformer, with no weights and no torch.

Decision (DESIGN.md puts ModelSpec under ``flexalisa/models``): the dependency arrow runs
``cost_model`` <- ``policy`` <- ``flexalisa``, and the cost model must reason about shapes, so the
spec lives at the bottom of that chain, here, and ``flexalisa.models`` re-exports it. It is pure
Python so that the LP search never imports torch.

Two families are supported:

* ``opt``   -- learned absolute positions (offset 2), LayerNorm (pre- or post-LN), ReLU MLP,
               biases everywhere, optional ``word_embed_proj_dim`` in/out projections (OPT-350m).
* ``llama`` -- RoPE, RMSNorm, SwiGLU MLP, GQA/MQA, tied or untied embeddings, no biases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cost_model.jsonio import dataclass_from_dict, dataclass_to_dict

FAMILIES = ("opt", "llama")


@dataclass(frozen=True)
class ModelSpec:
    family: str  # "opt" or "llama"
    vocab_size: int  # rows of the token embedding
    hidden_size: int  # residual stream width
    num_layers: int  # decoder layers
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (== num_heads without GQA; 1 for MQA)
    ffn_size: int  # MLP inner width (OPT ffn_dim, LLaMA intermediate_size)
    max_seq_len: int  # context length: prompt + generated tokens must not exceed it
    name: str = "model"  # human label, e.g. "opt-30b" or a checkpoint path
    head_dim_override: int = 0  # 0: hidden_size // num_heads
    # --- OPT only ---
    pre_layer_norm: bool = True  # OPT do_layer_norm_before (False for OPT-350m: post-LN)
    word_embed_proj_dim: int = 0  # 0: embeddings are hidden_size wide; else project in/out
    # --- LLaMA only ---
    rope_theta: float = 10000.0  # RoPE base frequency
    norm_eps: float = 1e-5  # RMSNorm / LayerNorm epsilon
    tie_word_embeddings: bool = False  # lm_head shares the token embedding
    # --- tokens ---
    bos_token_id: int | None = None  # prepended by the tokenizer when the model expects it
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)  # any of these ends a sequence
    pad_token_id: int | None = None  # used only to fill finished/padded rows

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unsupported model family {self.family!r}; supported: {FAMILIES}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "ffn_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelSpec.{name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if not self.head_dim_override and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        if self.family == "llama" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")

    # ---- derived shapes -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_heads

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of K (and of V) for one token in one layer."""
        return self.num_kv_heads * self.head_dim

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding table (OPT-350m: word_embed_proj_dim)."""
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def layer_numel(self) -> int:
        """Parameters in one decoder layer (norms and biases included)."""
        h, f = self.hidden_size, self.ffn_size
        attn = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
        if self.family == "opt":
            return attn + self.q_dim + 2 * self.kv_dim + h + 2 * h * f + f + h + 4 * h
        return attn + 3 * h * f + 2 * h

    @property
    def embed_numel(self) -> int:
        """Parameters outside the layers: embeddings, projections, final norm, lm_head."""
        n = self.vocab_size * self.embed_dim
        if self.family == "opt":
            n += (self.max_seq_len + 2) * self.hidden_size + 2 * self.hidden_size
            if self.word_embed_proj_dim:
                n += 2 * self.hidden_size * self.word_embed_proj_dim
        else:
            n += self.hidden_size
            if not self.tie_word_embeddings:
                n += self.vocab_size * self.hidden_size
        return n

    @property
    def num_params(self) -> int:
        return self.num_layers * self.layer_numel + self.embed_numel

    @property
    def kv_numel_per_token(self) -> int:
        """K plus V elements one token stores in one layer."""
        return 2 * self.kv_dim

    @property
    def hidden_numel_per_token(self) -> int:
        """Layer-input elements one token stores per layer in the recompute tier.

        With GQA this can exceed ``kv_numel_per_token`` (SmolLM2: 576 > 2 * 192), so dropping
        K, V for the hidden state then costs memory instead of saving it.
        """
        return self.hidden_size

    # ---- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclass_to_dict(self, convert={"eos_token_ids": list})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return dataclass_from_dict(cls, d, convert={"eos_token_ids": tuple})
