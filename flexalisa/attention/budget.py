"""How many past tokens a decode step attends to: the exact, shared budget rule.

Every sparse method uses the same budget so that methods compare at equal KV reads. For a row
with ``n`` valid (non-padding) cached tokens, the new token included, and caching ratio
``r = 1 - sparsity``:

    k          = round(n * r / 2)              half-up, in exact rational arithmetic
    num_local  = min(max(k, 1), n)             the newest token is always attended
    num_global = min(k, n - num_local)
    total      = num_local + num_global        <= n; equals n when sparsity = 0

``sparsity`` is read as the closest fraction with denominator <= 10**6 (0.8 -> 4/5), so the
rounding of exact halves is exact: n = 5, s = 0.8 gives n * r / 2 = 0.5 -> k = 1 (a float
computation would give 0.49999... -> 0). With r = 1, k = ceil(n / 2) and total = n.
"""

from __future__ import annotations

from fractions import Fraction

import torch
from torch import Tensor

MAX_DENOMINATOR = 10**6  # sparsity is rounded to a fraction with at most this denominator


def caching_ratio(sparsity: float) -> Fraction:
    """r = 1 - s as an exact fraction; ValueError unless 0 <= s < 1."""
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity {sparsity!r} must be in [0, 1)")
    return 1 - Fraction(repr(float(sparsity))).limit_denominator(MAX_DENOMINATOR)


def half_budget(num_valid: Tensor, ratio: Fraction) -> Tensor:
    """k = round(n * r / 2), half up, per row. num_valid: (B,) long -> (B,) long."""
    num, den = ratio.numerator, ratio.denominator
    return (num_valid * num + den) // (2 * den)


def split_budget(num_valid: Tensor, ratio: Fraction) -> tuple[Tensor, Tensor]:
    """(num_local, num_global) per row, each (B,) long, for rows with ``num_valid`` tokens."""
    k = half_budget(num_valid, ratio)
    num_local = torch.minimum(k.clamp_min(1), num_valid)
    num_global = torch.minimum(k, num_valid - num_local)
    return num_local, num_global


def valid_positions(valid: Tensor) -> tuple[Tensor, Tensor]:
    """Rank of each slot among its row's valid slots, and the number of valid slots.

    valid: (B, S) bool. Returns pos (B, S) long (0 = oldest valid token; meaningless on padding)
    and num_valid (B,) long. No assumption that padding is contiguous.
    """
    pos = valid.long().cumsum(dim=-1) - 1  # (B, S)
    return pos, valid.sum(dim=-1)
