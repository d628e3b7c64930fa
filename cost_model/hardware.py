"""`HardwareProfile`: the machine constants the cost model needs, as a frozen dataclass.

A profile comes from a preset (``cost_model.hardware_presets``), from a JSON file written by
``python -m cost_model profile``, or from ``HardwareProfile.measure()`` directly.

The "gpu" fields describe the *device* the runtime computes on. Without CUDA the device is the CPU
itself under a memory budget (``--gpu-mem``); then "h2d"/"d2h" are host memcpy bandwidths, which is
what the runtime's CPU device does when it "moves" a tensor between tiers.

Time model (used by ``cost_model.timing``), per operation::

    gemm_s      = max(flops / gemm_rate(rows), bytes_touched / gpu_mem_bytes_per_s)
    gemm_rate   = gemm_flops_table interpolated at (rows, inner dim) when measured, else
                  gpu_gemm_flops_per_s if rows >= SKINNY_ROWS else gpu_skinny_flops_per_s
    (a layer's GEMM time sums its projections' flops / rate, then takes the max with its bytes)
    copy_s      = bytes / h2d_bytes_per_s   (or d2h)
    cpu_attn_s  = max(flops / cpu_flops_per_s, bytes_touched / cpu_mem_bytes_per_s)
    select_s    = selection_overhead_s + rows * context * selection_s_per_token
                  (sparse decode steps only, per layer per GPU batch of ``rows`` sequences)

Overlap: ``copy_overlap`` is the share of the shorter of a copy and the compute beside it that
runs concurrently, so the two take ``a + c - copy_overlap * min(a, c)``. A GPU's copy engines
overlap fully (1). On the CPU stand-in the copies are threads on the same cores as compute:
with one compute thread on a 2-core box the copy has a core of its own and overlaps; with a
compute thread per core the copy takes its turn and they add up (~0). The profile measures it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cost_model.jsonio import dataclass_from_dict, dataclass_to_dict, load_json, save_json

SKINNY_ROWS = 256  # GEMMs with fewer rows (tokens) than this use the decode-like rate
RUNNERS = ("offload", "engine")  # what runs a policy: the offloading runtime or the engine

_POSITIVE = ("gpu_mem_bytes", "cpu_mem_bytes", "h2d_bytes_per_s", "d2h_bytes_per_s",
             "gpu_gemm_flops_per_s", "gpu_skinny_flops_per_s", "gpu_mem_bytes_per_s",
             "cpu_flops_per_s", "cpu_mem_bytes_per_s", "compute_dtype_bytes",
             "cpu_compute_dtype_bytes")


@dataclass(frozen=True)
class HardwareProfile:
    name: str  # preset key ("t4-16g") or "measured:<host>"
    device_kind: str  # "cuda": a real GPU; "cpu": the CPU stands in for the device under a budget
    gpu_name: str  # human label of the device, e.g. "NVIDIA T4 16GB"
    cpu_name: str  # human label of the host CPU, e.g. "Intel Xeon @2.0GHz, 24 cores"
    link_name: str  # host<->device link, e.g. "PCIe 3.0 x16"
    gpu_mem_bytes: int  # device memory the runtime may use
    cpu_mem_bytes: int  # host memory the runtime may use
    h2d_bytes_per_s: float  # sustained host->device copy bandwidth (pinned memory)
    d2h_bytes_per_s: float  # sustained device->host copy bandwidth (pinned memory)
    gpu_gemm_flops_per_s: float  # sustained GEMM rate on prefill-like (large, square) shapes
    gpu_skinny_flops_per_s: float  # sustained GEMM rate on decode-like shapes (< SKINNY_ROWS rows)
    gpu_mem_bytes_per_s: float  # sustained device memory bandwidth
    cpu_flops_per_s: float  # sustained host FLOP rate (fp32) for delegated attention
    cpu_mem_bytes_per_s: float  # sustained host memory bandwidth (STREAM-like)
    compute_dtype_bytes: int = 2  # element size the device computes and stores in (fp16: 2)
    cpu_compute_dtype_bytes: int = 4  # element size the host computes attention in (fp32: 4)
    # fixed cost per layer per GPU batch per step: kernel launches and the runtime's per-op
    # Python (a profile times the offloading runtime itself on a tiny model)
    layer_overhead_s: float = 2e-4
    # the same for the all-on-device engine, which flexalisa runs for a searched policy that
    # offloads nothing (no tiers or copy bookkeeping: about half the runtime's on a CPU);
    # None = not measured, layer_overhead_s is used
    engine_layer_overhead_s: float | None = None
    # what a sparse decode step costs beyond attending its selected tokens (SWA's select and
    # observe, gathering the selection, attention that returns its weights), per layer per GPU
    # batch: a fixed part plus a part per sequence per cached token (scores are O(context));
    # 0 = not counted (profiles saved before these fields existed)
    selection_overhead_s: float = 0.0
    selection_s_per_token: float = 0.0
    copy_overlap: float = 1.0  # share of min(copy, compute) run concurrently (1: DMA engines)
    gemm_flops_table: tuple[tuple[int, int, float], ...] = ()  # (rows, inner dim, FLOP/s) grid

    def __post_init__(self) -> None:
        if self.device_kind not in ("cuda", "cpu"):
            raise ValueError(f"device_kind must be 'cuda' or 'cpu', got {self.device_kind!r}")
        for field_name in _POSITIVE:
            value = getattr(self, field_name)
            if not value > 0:
                raise ValueError(f"HardwareProfile.{field_name} must be > 0, got {value!r}")
        for field_name in ("layer_overhead_s", "selection_overhead_s", "selection_s_per_token"):
            value = getattr(self, field_name)
            if not value >= 0:
                raise ValueError(f"{field_name} must be >= 0, got {value!r}")
        engine = self.engine_layer_overhead_s
        if engine is not None and not engine >= 0:
            raise ValueError(f"engine_layer_overhead_s must be None or >= 0, got {engine!r}")
        if not 0.0 <= self.copy_overlap <= 1.0:
            raise ValueError(f"copy_overlap must be in [0, 1], got {self.copy_overlap!r}")
        self._check_table()

    def _check_table(self) -> None:
        table = self.gemm_flops_table
        rows = sorted({r for r, _, _ in table})
        inners = sorted({k for _, k, _ in table})
        grid = sorted((r, k) for r, k, _ in table)
        if grid != [(r, k) for r in rows for k in inners] or any(
                r < 1 or k < 1 or f <= 0 for r, k, f in table):
            raise ValueError(f"gemm_flops_table must be a full (rows x inner) grid with rows, "
                             f"inner >= 1 and rates > 0, got {table!r}")

    def gemm_flops_per_s(self, rows: float, inner_dim: float | None = None) -> float:
        """The GEMM rate for ``rows`` token rows times a weight with ``inner_dim`` inputs.

        With a measured ``gemm_flops_table``: interpolation linear in log(rows) and log(inner
        dim), clamped at the grid's edges. Otherwise decode-like (skinny) below SKINNY_ROWS rows,
        square-GEMM above.
        """
        if not self.gemm_flops_table:
            return self.gpu_gemm_flops_per_s if rows >= SKINNY_ROWS else self.gpu_skinny_flops_per_s
        inners = sorted({k for _, k, _ in self.gemm_flops_table})
        by_inner = [_interp([(r, f) for r, k2, f in self.gemm_flops_table if k2 == k], rows)
                    for k in inners]
        return _interp(list(zip(inners, by_inner)), inner_dim or inners[-1])

    def for_runner(self, runner: str) -> HardwareProfile:
        """The profile as it prices a policy run by ``runner``: "offload" (the offloading
        runtime: this profile) or "engine" (the all-on-device engine: its own per-layer cost,
        where measured)."""
        if runner not in RUNNERS:
            raise ValueError(f"runner must be one of {RUNNERS}, got {runner!r}")
        if runner == "offload" or self.engine_layer_overhead_s is None:
            return self
        return self.replace(layer_overhead_s=self.engine_layer_overhead_s)

    def with_memory(self, gpu_mem_bytes: int | None = None,
                    cpu_mem_bytes: int | None = None) -> HardwareProfile:
        """A copy with the memory limits replaced where given (e.g. from ``--gpu-mem``)."""
        return self.replace(gpu_mem_bytes=gpu_mem_bytes or self.gpu_mem_bytes,
                            cpu_mem_bytes=cpu_mem_bytes or self.cpu_mem_bytes)

    def replace(self, **changes: Any) -> HardwareProfile:
        return HardwareProfile.from_dict({**asdict(self), **changes})

    # ---- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclass_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HardwareProfile:
        return dataclass_from_dict(cls, d, convert={"gemm_flops_table": _table_from_json})

    def save(self, path: str | Path) -> None:
        save_json(self.to_dict(), path)

    @classmethod
    def load(cls, name_or_path: str | Path) -> HardwareProfile:
        """A preset by name (``"t4-16g"``) or a profile JSON file written by ``save``."""
        from cost_model.hardware_presets import HARDWARE_PRESETS

        key = str(name_or_path).lower()
        if key in HARDWARE_PRESETS:
            return HARDWARE_PRESETS[key]
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(f"hardware {str(name_or_path)!r} is neither a preset "
                             f"({', '.join(sorted(HARDWARE_PRESETS))}) nor a profile JSON file")
        return cls.from_dict(load_json(
            path, "hardware profile {path!r} is unreadable or not valid JSON: {exc}"))

    @classmethod
    def measure(cls, gpu_mem_bytes: int | None = None, cpu_mem_bytes: int | None = None,
                budget_s: float = 15.0, threads: int | None = None) -> HardwareProfile:
        """Measure this machine (see ``cost_model.profiling``); imports torch lazily."""
        from cost_model.profiling import measure_profile

        return measure_profile(gpu_mem_bytes=gpu_mem_bytes, cpu_mem_bytes=cpu_mem_bytes,
                               budget_s=budget_s, threads=threads)


def _table_from_json(table: Any) -> tuple[tuple[int, int, float], ...]:
    """``gemm_flops_table`` from JSON lists to (rows, inner dim, FLOP/s) tuples."""
    return tuple((int(r), int(k), float(f)) for r, k, f in table)


def _interp(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear in log(x) through sorted (x, y) points, clamped at the ends."""
    points = sorted(points)
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x <= x1:
            return y0 + math.log(x / x0) / math.log(x1 / x0) * (y1 - y0)
    return points[-1][1]
