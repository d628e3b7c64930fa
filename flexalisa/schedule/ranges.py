"""Token ranges, tiers and moves: the vocabulary shared by the tier planner and the KV store.

Torch-free. A ``TokenRange`` is a half-open range of slot indices ``[start, end)`` of one
sequence batch (all rows share slot indices; left padding is the rows' business).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Tier(Enum):
    """Where a token's K,V live. Ordered newest → oldest: tokens only move to a larger ``age``."""

    GPU = "gpu"  # K,V in device memory (or a budgeted host pool on a CPU-only machine)
    CPU = "cpu"  # K,V in host memory, optionally INT8/INT4 compressed
    RECOMPUTE = "recompute"  # K,V dropped; the layer-input hidden state is kept in host memory

    @property
    def age(self) -> int:
        """0 for GPU, 1 for CPU, 2 for recompute: a move must strictly increase it."""
        return _TIER_AGE[self]


_TIER_AGE = {Tier.GPU: 0, Tier.CPU: 1, Tier.RECOMPUTE: 2}


@dataclass(frozen=True)
class TokenRange:
    """Slot indices ``[start, end)``; empty when ``start == end``."""

    start: int  # first slot index in the range
    end: int  # one past the last slot index

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise ValueError(f"TokenRange needs 0 <= start <= end, got [{self.start}, {self.end})")

    def __len__(self) -> int:
        return self.end - self.start

    def __contains__(self, slot: object) -> bool:
        return isinstance(slot, int) and self.start <= slot < self.end

    def intersect(self, other: TokenRange) -> TokenRange:
        """The common part of two ranges (an empty range at ``self.start`` when disjoint)."""
        start, end = max(self.start, other.start), min(self.end, other.end)
        return TokenRange(start, end) if start < end else TokenRange(self.start, self.start)


@dataclass(frozen=True)
class Move:
    """Move the K,V (or drop them, keeping the hidden) of ``tokens`` from ``src`` to ``dst``."""

    tokens: TokenRange  # slots to move; never empty
    src: Tier  # tier they live in before the move
    dst: Tier  # tier they live in after; always older than ``src`` (GPU→CPU→recompute)

    def __post_init__(self) -> None:
        if len(self.tokens) == 0:
            raise ValueError("a Move needs a non-empty token range")
        if self.dst.age <= self.src.age:
            raise ValueError(f"tokens only move older-ward, not {self.src.value}→{self.dst.value}")


@dataclass(frozen=True)
class Placement:
    """Where a run of this step's new tokens is stored."""

    tokens: TokenRange  # new slots, never empty
    tier: Tier  # their home tier after this step's store
