"""Attention kernels and KV sparsity methods (which past tokens each step attends to)."""

from flexalisa.attention.kernel import (
    attention_probs,
    attention_with_probs,
    dense_attention,
    gather_kv,
    merge,
    partial_attention,
    partial_attention_probs,
    selected_attention,
)
from flexalisa.attention.methods import METHODS, MethodState, SparsityMethod, make_method
from flexalisa.attention.selection import Selection

__all__ = [
    "METHODS",
    "MethodState",
    "Selection",
    "SparsityMethod",
    "attention_probs",
    "attention_with_probs",
    "dense_attention",
    "gather_kv",
    "make_method",
    "merge",
    "partial_attention",
    "partial_attention_probs",
    "selected_attention",
]
