"""Group-wise INT8/INT4 quantization: round trip within half a step, packing, misuse."""

from __future__ import annotations

import pytest
import torch

from flexalisa.kv.quant import dequantize, max_abs_error, quantize


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [8, 32])
def test_round_trip_within_half_a_step(bits: int, group_size: int) -> None:
    x = torch.randn(3, 2, 5, 64, generator=torch.Generator().manual_seed(bits + group_size)) * 3
    q = quantize(x, bits, group_size)
    err = (dequantize(q) - x).abs().view(3, 2, 5, 64 // group_size, group_size)
    bound = max_abs_error(q)[..., None] * (1 + 1e-5) + 1e-6  # (..., G, 1)
    assert bool((err <= bound).all())
    assert q.codes.dtype == torch.uint8 and q.codes.shape[-1] == (64 if bits == 8 else 32)
    assert err.max() > 0  # it is lossy: the test would notice a pass-through


def test_constant_groups_and_extremes_are_exact() -> None:
    x = torch.tensor([[5.0] * 8 + [-1.0, 2.0] * 4])  # one constant group, one two-valued group
    for bits in (8, 4):
        assert torch.equal(dequantize(quantize(x, bits, 8)), x)


def test_int4_codes_pack_two_per_byte() -> None:
    x = torch.arange(16.0).view(1, 16)  # min 0, max 15: codes are the values themselves
    q = quantize(x, 4, 16)
    assert q.codes.tolist() == [[(2 * i) | ((2 * i + 1) << 4) for i in range(8)]]
    assert q.nbytes == 8 + 4 + 4


def test_bad_arguments_raise() -> None:
    x = torch.randn(2, 12)
    with pytest.raises(ValueError):
        quantize(x, 3, 4)
    with pytest.raises(ValueError):
        quantize(x, 8, 5)
    with pytest.raises(ValueError):
        quantize(x, 8, 8)  # 12 does not split into groups of 8
