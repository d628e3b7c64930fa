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

from cost_model.spec import ModelSpec
from flexalisa.errors import ModelLoadError
from flexalisa.models.weights import ModelWeights

END_MARKERS = ("<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>", "<|end|>")


def open_gguf(path: Path):  # -> gguf.GGUFReader
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise ModelLoadError(f"{path}: corrupt or truncated GGUF file ({exc})") from None


def field_value(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation (rows grouped per head, pairs interleaved)."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def spec_from_gguf(reader, path: Path, tokens: list[str]) -> ModelSpec:
    arch = field_value(reader, "general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"{path}: unsupported GGUF architecture {arch!r}; supported: llama")

    def meta(key: str, default=None):
        value = field_value(reader, f"llama.{key}", default)
        if value is None:
            raise ModelLoadError(f"{path}: GGUF metadata lacks llama.{key}")
        return value

    num_heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    eos = field_value(reader, "tokenizer.ggml.eos_token_id")
    eos_ids = {int(eos)} if eos is not None else set()
    eos_ids |= {i for i, t in enumerate(tokens) if t in END_MARKERS}
    head_dim = int(field_value(reader, "llama.rope.dimension_count", hidden // num_heads))
    bos = field_value(reader, "tokenizer.ggml.bos_token_id")
    names = {t.name for t in reader.tensors}
    return ModelSpec(
        family="llama", name=str(path), vocab_size=len(tokens), hidden_size=hidden,
        num_layers=int(meta("block_count")), num_heads=num_heads,
        num_kv_heads=int(meta("attention.head_count_kv", num_heads)),
        ffn_size=int(meta("feed_forward_length")), max_seq_len=int(meta("context_length")),
        head_dim_override=head_dim if head_dim != hidden // num_heads else 0,
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=tuple(sorted(eos_ids)),
        pad_token_id=int(field_value(reader, "tokenizer.ggml.padding_token_id", 0)))


def _tensors(reader, path: Path) -> dict[str, Tensor]:
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
        out[t.name] = torch.from_numpy(array)
    return out


def weights_from_gguf(reader, path: Path, tokens: list[str]) -> ModelWeights:
    """Dequantized fp32 weights from an open GGUFReader; `tokens` is its vocabulary."""
    spec = spec_from_gguf(reader, path, tokens)
    t = _tensors(reader, path)

    def take(name: str) -> Tensor:
        if name not in t:
            raise ModelLoadError(f"{path}: GGUF lacks tensor {name!r}")
        return t.pop(name)

    g = {"embed": take("token_embd.weight"), "final_norm_w": take("output_norm.weight")}
    g["lm_head"] = g["embed"] if spec.tie_word_embeddings else take("output.weight")
    layers = []
    for i in range(spec.num_layers):
        b = f"blk.{i}."
        q = _unpermute(take(b + "attn_q.weight").numpy(), spec.num_heads)
        k = _unpermute(take(b + "attn_k.weight").numpy(), spec.num_kv_heads)
        layers.append({
            "attn_norm_w": take(b + "attn_norm.weight"),
            "wqkv": torch.cat([torch.from_numpy(q), torch.from_numpy(k),
                               take(b + "attn_v.weight")]),
            "wo": take(b + "attn_output.weight"),
            "mlp_norm_w": take(b + "ffn_norm.weight"),
            "w_gate_up": torch.cat([take(b + "ffn_gate.weight"), take(b + "ffn_up.weight")]),
            "w_down": take(b + "ffn_down.weight"),
        })
    left = [n for n in t if not n.startswith("rope_")]
    if left:
        raise ModelLoadError(f"{path}: {len(left)} unused GGUF tensors, e.g. {left[0]!r}")
    return ModelWeights(spec, g, layers)
