"""Model shape presets (published configs) and `load_model_spec` for presets, HF dirs, JSON, GGUF.

OPT shapes are from the ``facebook/opt-*`` config.json files (Zhang et al., 2022, Table 1):
vocab 50272, 2048 positions, tied lm_head. LLaMA shapes are from Touvron et al., 2023 (Table 2;
vocab 32000, 2048 positions; ``llama-30b`` is the model the paper calls 33B) and LLaMA-2 70B
from its HF config (GQA with 8 KV heads, ffn 28672, 4096 positions).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cost_model.spec import ModelSpec


def _opt(name: str, hidden: int, layers: int, heads: int, **extra: Any) -> ModelSpec:
    return ModelSpec(family="opt", name=name, vocab_size=50272, hidden_size=hidden,
                     num_layers=layers, num_heads=heads, num_kv_heads=heads, ffn_size=4 * hidden,
                     max_seq_len=2048, tie_word_embeddings=True, bos_token_id=2,
                     eos_token_ids=(2,), pad_token_id=1, **extra)


def _llama(name: str, hidden: int, layers: int, heads: int, ffn: int, kv_heads: int = 0,
           max_seq_len: int = 2048, norm_eps: float = 1e-6) -> ModelSpec:
    return ModelSpec(family="llama", name=name, vocab_size=32000, hidden_size=hidden,
                     num_layers=layers, num_heads=heads, num_kv_heads=kv_heads or heads,
                     ffn_size=ffn, max_seq_len=max_seq_len, norm_eps=norm_eps, bos_token_id=1,
                     eos_token_ids=(2,))


MODEL_PRESETS: dict[str, ModelSpec] = {
    "opt-125m": _opt("opt-125m", 768, 12, 12),
    "opt-350m": _opt("opt-350m", 1024, 24, 16, word_embed_proj_dim=512, pre_layer_norm=False),
    "opt-1.3b": _opt("opt-1.3b", 2048, 24, 32),
    "opt-2.7b": _opt("opt-2.7b", 2560, 32, 32),
    "opt-6.7b": _opt("opt-6.7b", 4096, 32, 32),
    "opt-13b": _opt("opt-13b", 5120, 40, 40),
    "opt-30b": _opt("opt-30b", 7168, 48, 56),
    "opt-66b": _opt("opt-66b", 9216, 64, 72),
    "opt-175b": _opt("opt-175b", 12288, 96, 96),
    "llama-7b": _llama("llama-7b", 4096, 32, 32, 11008),
    "llama-13b": _llama("llama-13b", 5120, 40, 40, 13824),
    "llama-30b": _llama("llama-30b", 6656, 60, 52, 17920),
    "llama-65b": _llama("llama-65b", 8192, 80, 64, 22016),
    "llama-2-70b": _llama("llama-2-70b", 8192, 80, 64, 28672, kv_heads=8, max_seq_len=4096,
                          norm_eps=1e-5),
}
MODEL_ALIASES = {"llama-33b": "llama-30b"}


def _rope_theta(cfg: dict[str, Any]) -> float:
    """Default RoPE only; transformers 4.x keeps it in rope_theta/rope_scaling, 5.x in
    rope_parameters."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise ValueError(f"unsupported RoPE scaling type {rope_type!r} (only default RoPE)")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _check_variant(arch: str, cfg: dict[str, Any]) -> None:
    """Refuse variants the layer functions do not implement, instead of computing nonsense."""
    if arch == "opt" and (cfg.get("activation_function", "relu") != "relu"
                          or not cfg.get("enable_bias", True)
                          or not cfg.get("layer_norm_elementwise_affine", True)):
        raise ValueError("unsupported OPT variant (needs relu, biases, affine LayerNorm)")
    if arch == "llama" and (cfg.get("hidden_act", "silu") != "silu" or cfg.get("attention_bias")
                            or cfg.get("mlp_bias")):
        raise ValueError("unsupported LLaMA variant (needs silu, no biases)")


def spec_from_hf_config(cfg: dict[str, Any], name: str = "model") -> ModelSpec:
    """A ModelSpec from an HF ``config.json`` dict (``model_type`` "opt" or "llama")."""
    arch = cfg.get("model_type")
    if arch not in ("opt", "llama"):
        raise ValueError(f"{name}: unsupported architecture {arch!r}; supported: opt, llama")
    _check_variant(arch, cfg)
    try:
        eos = cfg.get("eos_token_id")
        common = dict(name=name, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                      num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
                      max_seq_len=cfg["max_position_embeddings"],
                      bos_token_id=cfg.get("bos_token_id"), pad_token_id=cfg.get("pad_token_id"),
                      eos_token_ids=tuple(eos) if isinstance(eos, list) else
                      ((int(eos),) if eos is not None else ()))
        if arch == "opt":
            proj = cfg.get("word_embed_proj_dim", cfg["hidden_size"])
            return ModelSpec(family="opt", num_kv_heads=cfg["num_attention_heads"],
                             ffn_size=cfg["ffn_dim"],
                             pre_layer_norm=cfg.get("do_layer_norm_before", True),
                             word_embed_proj_dim=0 if proj == cfg["hidden_size"] else proj,
                             tie_word_embeddings=True, **common)
        return ModelSpec(family="llama", ffn_size=cfg["intermediate_size"],
                         num_kv_heads=cfg.get("num_key_value_heads")
                         or cfg["num_attention_heads"],
                         head_dim_override=cfg.get("head_dim") or 0,
                         rope_theta=_rope_theta(cfg),
                         norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                         tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                         **common)
    except KeyError as exc:
        raise ValueError(f"{name}: config.json lacks {exc.args[0]!r}") from None


GGUF_END_MARKERS = ("<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>", "<|end|>")


def spec_from_gguf_reader(reader: Any, path: Path) -> ModelSpec:
    """A ModelSpec from an open ``gguf.GGUFReader``'s metadata (weights are not read).

    End-of-sequence ids: the metadata's eos id plus any vocabulary token that is a common
    end-of-turn marker (``GGUF_END_MARKERS``), so instruct models stop at the end of a turn.
    """
    def meta(key: str, default: Any = None) -> Any:
        field = reader.fields.get(key)
        if field is None and default is None:
            raise ValueError(f"{path}: GGUF metadata lacks {key}")
        return default if field is None else field.contents()

    arch = meta("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r}; supported: llama")
    hidden, heads = int(meta("llama.embedding_length")), int(meta("llama.attention.head_count"))
    head_dim = int(meta("llama.rope.dimension_count", hidden // heads))
    tokens = meta("tokenizer.ggml.tokens")
    eos = reader.fields.get("tokenizer.ggml.eos_token_id")
    eos_ids = {int(eos.contents())} if eos is not None else set()
    eos_ids |= {i for i, t in enumerate(tokens) if t in GGUF_END_MARKERS}
    bos = reader.fields.get("tokenizer.ggml.bos_token_id")
    return ModelSpec(
        family="llama", name=str(path), vocab_size=len(tokens),
        hidden_size=hidden, num_layers=int(meta("llama.block_count")), num_heads=heads,
        num_kv_heads=int(meta("llama.attention.head_count_kv", heads)),
        ffn_size=int(meta("llama.feed_forward_length")),
        max_seq_len=int(meta("llama.context_length")),
        head_dim_override=head_dim if head_dim != hidden // heads else 0,
        rope_theta=float(meta("llama.rope.freq_base", 10000.0)),
        norm_eps=float(meta("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in {t.name for t in reader.tensors},
        bos_token_id=int(bos.contents()) if bos is not None else None,
        eos_token_ids=tuple(sorted(eos_ids)),
        pad_token_id=int(meta("tokenizer.ggml.padding_token_id", 0)))


def open_gguf(path: Path) -> Any:
    """A ``gguf.GGUFReader``; ValueError for a corrupt or truncated file."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise ValueError(f"{path}: corrupt or truncated GGUF file ({exc})") from None


def spec_from_gguf(path: Path) -> ModelSpec:
    """A ModelSpec from a GGUF file's metadata (weights are not read)."""
    return spec_from_gguf_reader(open_gguf(path), path)


def load_model_spec(source: str | Path) -> ModelSpec:
    """A preset name (``opt-30b``), an HF directory, a ``config.json``, a ModelSpec JSON, a GGUF."""
    key = str(source).lower()
    key = MODEL_ALIASES.get(key, key)
    if key in MODEL_PRESETS:
        return MODEL_PRESETS[key]
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"model {str(source)!r} is neither a preset ({', '.join(MODEL_PRESETS)}) "
                         f"nor an HF directory / config.json / spec JSON / .gguf file")
    if path.suffix == ".gguf":
        return spec_from_gguf(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if "family" in data:
        return ModelSpec.from_dict(data)
    return spec_from_hf_config(data, name=str(path.parent if path.name == "config.json" else path))
