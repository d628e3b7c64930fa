"""Sizes of a tiered KV store (``KVStoreConfig``) and its traffic counters (``KVCounters``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flexalisa.kv.quant import check_quant_args
from flexalisa.schedule import Tier, TierPlan

COMPRESSION_BITS = {"none": None, "int8": 8, "int4": 4}


@dataclass(frozen=True)
class KVStoreConfig:
    """Sizes of one store; every store of a run shares one config."""

    batch_size: int  # B: rows of this GPU batch
    num_kv_heads: int  # Hkv
    head_dim: int  # D
    hidden_size: int  # width of the layer input kept for recomputation
    gpu_capacity_tokens: int  # GPU-tier ring slots (TierPlan.max_gpu_tokens)
    cpu_capacity_tokens: int  # CPU-tier ring slots (TierPlan.max_cpu_tokens)
    hidden_capacity_tokens: int  # slots [0, this) keep their hidden (TierPlan.hidden_tokens)
    dtype: torch.dtype = torch.float32  # K, V and hidden dtype
    compression: str = "none"  # CPU-tier compression: "none", "int8" or "int4"
    group_size: int = 64  # quantization group along head_dim

    def __post_init__(self) -> None:
        for name in ("batch_size", "num_kv_heads", "head_dim", "hidden_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("gpu_capacity_tokens", "cpu_capacity_tokens", "hidden_capacity_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.compression not in COMPRESSION_BITS:
            raise ValueError(f"compression must be one of {sorted(COMPRESSION_BITS)}, "
                             f"got {self.compression!r}")
        if self.bits is not None:
            check_quant_args(self.bits, self.group_size, self.head_dim)

    @property
    def bits(self) -> int | None:
        return COMPRESSION_BITS[self.compression]

    def bytes_per_token(self, tier: Tier) -> int:
        """Bytes one slot takes in ``tier`` over all rows and KV heads (recompute: the hidden)."""
        elt = torch.empty((), dtype=self.dtype).element_size()
        rows = self.batch_size * self.num_kv_heads
        if tier is Tier.RECOMPUTE:
            return self.batch_size * self.hidden_size * elt
        if tier is Tier.GPU or self.bits is None:
            return 2 * rows * self.head_dim * elt
        codes = self.head_dim * self.bits // 8
        return 2 * rows * (codes + 2 * 4 * (self.head_dim // self.group_size))  # + fp32 scale, min

    def reserved_bytes(self, tier: Tier) -> int:
        """Bytes a store with this config allocates for ``tier``; for budgets, before running."""
        capacity = {Tier.GPU: self.gpu_capacity_tokens, Tier.CPU: self.cpu_capacity_tokens,
                    Tier.RECOMPUTE: self.hidden_capacity_tokens}[tier]
        return capacity * self.bytes_per_token(tier)

    @classmethod
    def for_plan(cls, plan: TierPlan, **sizes: object) -> KVStoreConfig:
        """A config whose capacities are the plan's peaks; ``sizes`` gives the other fields."""
        return cls(gpu_capacity_tokens=plan.max_gpu_tokens,
                   cpu_capacity_tokens=plan.max_cpu_tokens,
                   hidden_capacity_tokens=plan.hidden_tokens, **sizes)  # type: ignore[arg-type]


@dataclass
class KVCounters:
    """Traffic and memory of a store (mutable; the runner sums them for its report)."""

    h2d_bytes: int = 0  # host → device: fetched CPU-tier K,V (as stored) and hidden to recompute
    d2h_bytes: int = 0  # device → host: GPU→CPU moves (as stored) and kept hidden states
    tokens_fetched: int = 0  # distinct (row, slot) pairs fetched from the CPU tier
    tokens_recomputed: int = 0  # distinct (row, slot) pairs whose K,V were recomputed
    peak_bytes: dict[Tier, int] = field(default_factory=lambda: dict.fromkeys(Tier, 0))
