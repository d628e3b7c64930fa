"""Load a GGUF file (llama.cpp's format) with the `gguf` package, dequantized to fp32.

llama.cpp's converter permutes the rows of Q and K for its interleaved RoPE; we undo that so the
weights use the HF rotate-half convention, as `transformers` does when it loads a GGUF.
Only the `llama` architecture is supported (SmolLM2, LLaMA 1/2/3 shapes, Mistral-like dense).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cost_model import presets
from flexalisa.errors import ModelLoadError
from flexalisa.models.weights import ModelWeights


def open_gguf(path: Path):  # -> gguf.GGUFReader
    try:
        return presets.open_gguf(path)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None


def _unpermute(w: Tensor, num_heads: int) -> Tensor:
    """Invert llama.cpp's Q/K row permutation (rows grouped per head, pairs interleaved)."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(
        w.shape)


def _tensors(reader, path: Path, dtype: torch.dtype) -> dict[str, Tensor]:
    from gguf import dequantize

    out = {}
    for t in reader.tensors:
        try:
            array = dequantize(t.data, t.tensor_type)
        except (ValueError, NotImplementedError) as exc:
            raise ModelLoadError(f"{path}: cannot dequantize {t.name} ({exc})") from None
        array = np.asarray(array, dtype=np.float32)
        if not (array.flags.writeable and array.flags.c_contiguous):
            array = array.copy()  # F32 tensors come back as read-only views of the mmap
        out[t.name] = torch.from_numpy(array).to(dtype)  # fp32: no copy
    return out


def weights_from_gguf(reader, path: Path, dtype: torch.dtype = torch.float32) -> ModelWeights:
    """Weights from an open GGUFReader, dequantized (through fp32) to ``dtype``."""
    try:
        spec = presets.spec_from_gguf_reader(reader, path)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    t = _tensors(reader, path, dtype)

    def take(name: str) -> Tensor:
        if name not in t:
            raise ModelLoadError(f"{path}: GGUF lacks tensor {name!r}")
        return t.pop(name)

    g = {"embed": take("token_embd.weight"), "final_norm_w": take("output_norm.weight")}
    g["lm_head"] = g["embed"] if spec.tie_word_embeddings else take("output.weight")
    layers = []
    for i in range(spec.num_layers):
        b = f"blk.{i}."
        q = _unpermute(take(b + "attn_q.weight"), spec.num_heads)
        k = _unpermute(take(b + "attn_k.weight"), spec.num_kv_heads)
        layers.append({
            "attn_norm_w": take(b + "attn_norm.weight"),
            "wqkv": torch.cat([q, k, take(b + "attn_v.weight")]),
            "wo": take(b + "attn_output.weight"),
            "mlp_norm_w": take(b + "ffn_norm.weight"),
            "w_gate_up": torch.cat([take(b + "ffn_gate.weight"), take(b + "ffn_up.weight")]),
            "w_down": take(b + "ffn_down.weight"),
        })
    left = [n for n in t if not n.startswith("rope_")]
    if left:
        raise ModelLoadError(f"{path}: {len(left)} unused GGUF tensors, e.g. {left[0]!r}")
    return ModelWeights(spec, g, layers)
