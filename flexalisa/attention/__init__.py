"""Attention kernels and KV sparsity methods (which past tokens each step attends to)."""

from flexalisa.attention.kernel import attention_probs, merge, partial_attention

__all__ = ["attention_probs", "merge", "partial_attention"]
