"""The one `linear` every layer function calls, and oneDNN weight prepacking for fp32 on CPU.

`F.linear` hands each call to MKL sgemm, which at decode batch sizes (M = 32 rows against a
576 x 3072 weight, the whole model's weights streaming from DRAM once per step) ran well below its
large-GEMM rate on this repo's AVX2 CPU. Packing each weight once, into oneDNN's blocked layout,
and calling oneDNN's inner-product primitive makes those GEMMs markedly faster there
(`scripts/bench_vs_hf.py` measures the effect end to end against HF). The results are fp32 GEMMs
with another summation order, so logits differ from `F.linear`'s in the last bits, as between
any two BLAS libraries; unlike MKL's, a row's result does not depend on how many rows are
multiplied with it.

A packed weight is an opaque `torch._mkldnn` tensor: it can only be multiplied, not sliced, so
packing is applied to the Engine's and the runner's own copies of the weights, and only to the
keys in `PACKED_KEYS` (never to `embed`, which is indexed, even when it is tied to `lm_head`: a
tied head gets a packed copy, counted in the runner's budget). Recomputing K, V from a layer's
input needs only the K, V rows of the fused QKV matrix; where that happens (a runner with a
recompute tier) `split_qkv` stores the matrix as its Q rows `wq` and K, V rows `wkv`, packed
apart, so recomputation multiplies `wkv` alone. `qkv_rows` and `kv_rows` take either layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flexalisa.models.weights import LayerWeights, ModelWeights

# weights used only as the right-hand side of `linear` (see flexalisa.models.weights)
PACKED_KEYS = frozenset({"wqkv", "wq", "wkv", "wo", "w_gate_up", "w_down", "fc1", "fc2", "lm_head",
                         "project_in", "project_out"})
# the M the blocked layout is chosen for (any M works); a large M suited decode and prefill here
PACK_BATCH_HINT = 4096


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., in) @ weight (out, in)^T + bias, for a plain or a `pack_weights` weight."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def qkv_rows(x: Tensor, w: LayerWeights, bqkv: Tensor | None, q_dim: int) -> Tensor:
    """The fused QKV projection x @ [Wq; Wk; Wv]^T + bqkv, (..., Q + 2K), in either layout."""
    if "wqkv" in w:
        return linear(x, w["wqkv"], bqkv)
    return torch.cat([linear(x, w["wq"], None if bqkv is None else bqkv[:q_dim]),
                      kv_rows(x, w, bqkv, q_dim)], dim=-1)


def kv_rows(x: Tensor, w: LayerWeights, bqkv: Tensor | None, q_dim: int) -> Tensor:
    """The K and V part of the fused QKV projection (output features [q_dim, ...)).

    Multiplies the K, V rows only: `wkv` where the matrix is split, the rows of a plain
    `wqkv`; a packed `wqkv` cannot be sliced, so there the whole product is computed and cut.
    """
    bias = None if bqkv is None else bqkv[q_dim:]
    if "wkv" in w:
        return linear(x, w["wkv"], bias)
    wqkv = w["wqkv"]
    if wqkv.is_mkldnn:
        return linear(x, wqkv, bqkv)[..., q_dim:]
    return F.linear(x, wqkv[q_dim:], bias)


def split_qkv(layer: LayerWeights, q_dim: int) -> LayerWeights:
    """``layer`` with its plain ``wqkv`` stored as ``wq`` (rows [0, q_dim)) and ``wkv`` (the
    rest), contiguous, for packing apart; the same bytes. Other tensors are shared."""
    out = {k: v for k, v in layer.items() if k != "wqkv"}
    out["wq"] = layer["wqkv"][:q_dim].contiguous()
    out["wkv"] = layer["wqkv"][q_dim:].contiguous()
    return out


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype == torch.float32
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def pack_tensor(key: str, t: Tensor) -> Tensor:
    """`t` oneDNN-packed if `key` is in `PACKED_KEYS` (a new tensor), else `t` itself."""
    if key not in PACKED_KEYS or t.is_mkldnn:
        return t
    return pack(t)


def pack(weight: Tensor) -> Tensor:
    """A (out, in) fp32 CPU weight oneDNN-packed for `linear` (a new, opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_BATCH_HINT)


def pack_weights(weights: ModelWeights) -> ModelWeights:
    """A copy whose `PACKED_KEYS` matrices are oneDNN-packed (fp32 CPU weights only).

    Other tensors are shared with `weights`, not copied. A tied `lm_head` gets its own packed
    copy; `embed` stays a plain tensor for the embedding lookup.
    """
    return ModelWeights(
        spec=weights.spec,
        globals={k: pack_tensor(k, v) for k, v in weights.globals.items()},
        layers=[{k: pack_tensor(k, v) for k, v in layer.items()} for layer in weights.layers],
    )
