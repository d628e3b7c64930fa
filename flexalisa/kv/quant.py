"""Group-wise asymmetric min/max quantization (INT8, INT4) of the last dimension.

``x (..., D)`` is cut into groups of ``group_size`` along D. Each group keeps its minimum and
``scale = (max - min) / (2**bits - 1)`` in float32, and each element the code
``q = round((x - min) / scale)``. Dequantization is ``q * scale + min``, so the error of an
element is at most ``scale / 2`` (half a step of its group), plus float rounding. INT4 codes are
packed two per byte along D (even index in the low nibble). A constant group has ``scale = 0``
and dequantizes exactly.

Bytes per element: INT8 ``1 + 8 / group_size``, INT4 ``0.5 + 8 / group_size`` (vs 2 for fp16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SUPPORTED_BITS = (4, 8)


@dataclass(frozen=True)
class QTensor:
    """A quantized tensor; every part keeps x's leading dims so it slices like x along them."""

    codes: Tensor  # uint8, (..., D) for INT8, (..., D // 2) for INT4 (two codes a byte)
    scale: Tensor  # float32, (..., D // group_size): step of each group
    minimum: Tensor  # float32, (..., D // group_size): value of code 0 in each group
    bits: int  # 8 or 4
    group_size: int  # elements per group along D
    dtype: torch.dtype  # dtype dequantize() returns

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.minimum))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> QTensor:
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return QTensor(move(self.codes), move(self.scale), move(self.minimum), self.bits,
                       self.group_size, self.dtype)


def check_quant_args(bits: int, group_size: int, last_dim: int) -> None:
    """Raise ValueError unless ``last_dim`` splits into groups of ``group_size`` at ``bits``."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"quantization bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size < 2 or group_size % 2 or last_dim % group_size:
        raise ValueError(f"group_size must be even and divide the last dim {last_dim}, "
                         f"got {group_size}")


def quantize(x: Tensor, bits: int, group_size: int) -> QTensor:
    """Quantize ``x (..., D)`` group-wise along D; works on any device."""
    check_quant_args(bits, group_size, x.shape[-1])
    lead, dim = x.shape[:-1], x.shape[-1]
    groups = x.float().reshape(*lead, dim // group_size, group_size)  # (..., G, g)
    minimum = groups.amin(dim=-1)  # (..., G)
    scale = (groups.amax(dim=-1) - minimum) / (2**bits - 1)  # (..., G)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((groups - minimum[..., None]) / safe[..., None])
    codes = codes.clamp_(0, 2**bits - 1).to(torch.uint8).reshape(*lead, dim)  # (..., D)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)  # (..., D // 2)
    return QTensor(codes, scale, minimum, bits, group_size, x.dtype)


def dequantize(q: QTensor) -> Tensor:
    """The tensor ``q`` stands for, in ``q.dtype`` on ``q.codes``'s device."""
    codes = q.codes
    if q.bits == 4:
        low, high = codes & 0x0F, codes >> 4
        codes = torch.stack((low, high), dim=-1).flatten(-2)  # (..., D)
    lead, dim = codes.shape[:-1], codes.shape[-1]
    groups = codes.float().reshape(*lead, dim // q.group_size, q.group_size)  # (..., G, g)
    values = groups * q.scale[..., None] + q.minimum[..., None]
    return values.reshape(*lead, dim).to(q.dtype)


def max_abs_error(q: QTensor) -> Tensor:
    """The worst-case error of each group, ``scale / 2``, (..., G)."""
    return q.scale / 2
