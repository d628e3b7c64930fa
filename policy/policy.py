"""`Policy`: where weights, KV and activations live, and how attention is sparsified.

Every share is a fraction in [0, 1] (never a percent). Each group of shares must sum to 1 within
``SHARE_TOLERANCE`` (1e-6). The KV split is the split once all phases are reached::

    phase I   (step < phase2_start_step)                   all KV on the GPU
    phase II  (phase2_start_step <= step < phase3_start)   kv_cpu_share on the CPU, rest on GPU
    phase III (step >= phase3_start_step)                  kv_cpu_share CPU, kv_recompute_share
                                                           dropped + recomputed, kv_gpu_share GPU

Steps are decode-step indices (0 = the first decode step; the prefill belongs to step 0's phase).
A FlexGen-style static split is ``phase2_start_step = 0`` with no recompute share; ``None`` lets
the runtime derive the boundary from memory capacity. A start step at or past the last decode
step means the phase never begins, and so does phase III with no recompute share (its layout
would be phase II's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cost_model.jsonio import dataclass_from_dict, dataclass_to_dict, load_json, save_json

SHARE_TOLERANCE = 1e-6  # |sum of a share group - 1| allowed
SPARSITY_METHODS = ("dense", "swa", "h2o", "local", "strided", "sinks")
KV_COMPRESSIONS = ("none", "int8", "int4")
WEIGHT_COMPRESSIONS = ("none", "int4")
_SHARE_GROUPS = (("weights_gpu_share", "weights_cpu_share"),
                 ("kv_gpu_share", "kv_cpu_share", "kv_recompute_share"),
                 ("act_gpu_share", "act_cpu_share"))


@dataclass(frozen=True)
class Policy:
    gpu_batch_size: int  # sequences per GPU batch
    num_gpu_batches: int  # GPU batches per block; effective batch = product
    weights_gpu_share: float  # share of weights kept on the GPU
    weights_cpu_share: float  # share of weights kept on the CPU, streamed in per layer
    kv_gpu_share: float  # share of each sequence's tokens with KV on the GPU (all phases reached)
    kv_cpu_share: float  # share of older tokens with KV on the CPU from phase II (ALISA's alpha)
    kv_recompute_share: float  # share of oldest tokens dropped + recomputed in phase III (beta)
    phase2_start_step: int | None  # decode step phase II begins (p1); None: runtime decides
    phase3_start_step: int | None  # decode step phase III begins (p2, >= p1); None: runtime
    act_gpu_share: float  # share of the block's hidden states kept on the GPU between layers
    act_cpu_share: float  # share of the block's hidden states kept on the CPU
    sparsity_method: str = "dense"  # one of SPARSITY_METHODS
    sparsity: float = 0.0  # share of cached tokens NOT attended per step, in [0, 1); 0 if dense
    kv_compression: str = "none"  # KV storage: "none", "int8", "int4" (group-wise)
    weight_compression: str = "none"  # weight storage: "none", "int4" (group-wise)
    cpu_attention: bool = False  # attention over CPU-tier tokens runs on the CPU, LSE-merged
    overlap: bool = True  # overlap compute with transfers

    def __post_init__(self) -> None:
        for name in ("gpu_batch_size", "num_gpu_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Policy.{name} must be an integer >= 1, got {value!r}")
        for group in _SHARE_GROUPS:
            self._check_share_group(group)
        self._check_phases()
        if self.sparsity_method not in SPARSITY_METHODS:
            raise ValueError(f"Policy.sparsity_method {self.sparsity_method!r} not in "
                             f"{SPARSITY_METHODS}")
        if not (isinstance(self.sparsity, (int, float)) and 0.0 <= self.sparsity < 1.0):
            raise ValueError(f"Policy.sparsity must be in [0, 1), got {self.sparsity!r}")
        if self.sparsity_method == "dense" and self.sparsity != 0.0:
            raise ValueError(f"Policy.sparsity must be 0 with dense attention, got {self.sparsity}")
        if self.kv_compression not in KV_COMPRESSIONS:
            raise ValueError(f"Policy.kv_compression {self.kv_compression!r} not in "
                             f"{KV_COMPRESSIONS}")
        if self.weight_compression not in WEIGHT_COMPRESSIONS:
            raise ValueError(f"Policy.weight_compression {self.weight_compression!r} not in "
                             f"{WEIGHT_COMPRESSIONS}")
        for name in ("cpu_attention", "overlap"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Policy.{name} must be a bool, got {getattr(self, name)!r}")

    def _check_share_group(self, group: tuple[str, ...]) -> None:
        for name in group:
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"Policy.{name} must be a share in [0, 1], got {value!r}")
        total = sum(getattr(self, name) for name in group)
        if abs(total - 1.0) > SHARE_TOLERANCE:
            raise ValueError(f"Policy shares {' + '.join(group)} sum to {total!r}, "
                             f"must be 1 within {SHARE_TOLERANCE}")

    def _check_phases(self) -> None:
        for name in ("phase2_start_step", "phase3_start_step"):
            value = getattr(self, name)
            bad = not isinstance(value, int) or isinstance(value, bool) or value < 0
            if value is not None and bad:
                raise ValueError(f"Policy.{name} must be None or an integer >= 0, got {value!r}")
        p1, p2 = self.phase2_start_step, self.phase3_start_step
        if p1 is not None and p2 is not None and p2 < p1:
            raise ValueError(f"Policy.phase3_start_step={p2} must be >= phase2_start_step={p1}")

    @property
    def batch_size(self) -> int:
        """Effective batch: sequences per block."""
        return self.gpu_batch_size * self.num_gpu_batches

    @property
    def all_on_device(self) -> bool:
        """Whether every weight, activation and KV entry stays on the device, uncompressed:
        nothing to offload. flexalisa runs such a policy, when the cost model chose it, on the
        all-on-device engine, which does the runtime's work without its bookkeeping."""
        return (self.weights_gpu_share == 1.0 and self.act_gpu_share == 1.0
                and self.kv_gpu_share == 1.0 and self.weight_compression == "none")

    def describe(self) -> str:
        """One line in FlexGen's order: batch, then weight / KV / activation shares in percent."""
        pct = [self.weights_gpu_share, self.weights_cpu_share, self.kv_gpu_share,
               self.kv_cpu_share, self.kv_recompute_share, self.act_gpu_share, self.act_cpu_share]
        shares = " ".join(f"{100 * x:.0f}" for x in pct)
        return (f"{self.gpu_batch_size}x{self.num_gpu_batches} w/kv/kv_rec/act% {shares} "
                f"p1={self.phase2_start_step} p2={self.phase3_start_step} "
                f"{self.sparsity_method}@{self.sparsity:g} kv:{self.kv_compression} "
                f"w:{self.weight_compression} cpu_attn={self.cpu_attention} "
                f"overlap={self.overlap}")

    # ---- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclass_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Policy:
        return dataclass_from_dict(cls, d)

    def save(self, path: str | Path) -> None:
        save_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        data = load_json(path, "cannot read policy {path!r}: {exc}")
        if isinstance(data, dict) and isinstance(data.get("policy"), dict):
            data = data["policy"]  # a `python -m policy search` result file
        if not isinstance(data, dict):
            raise ValueError(f"policy {str(path)!r} must hold a JSON object")
        return cls.from_dict(data)
