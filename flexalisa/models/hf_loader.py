"""Load an HF checkpoint directory: config.json + model.safetensors | pytorch_model.bin, or their
sharded `*.index.json` forms. `.bin` files are read with `torch.load(weights_only=True)`.

The HF -> flexalisa name mapping is checked both ways: every expected tensor must be present and
every tensor in the checkpoint must be used (rotary `inv_freq` buffers excepted).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from cost_model.presets import spec_from_hf_config
from cost_model.spec import ModelSpec
from flexalisa.errors import ModelLoadError
from flexalisa.models.weights import ModelWeights

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir}: no config.json (not an HF checkpoint directory)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: corrupt config.json ({exc})") from None


def spec_from_config(cfg: dict, name: str = "model") -> ModelSpec:
    """The cost model's config reader, its ValueErrors turned into ModelLoadError."""
    try:
        return spec_from_hf_config(cfg, name=name)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None


def _load_one(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise ModelLoadError(f"missing weight file {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError,
            pickle.UnpicklingError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{path}: corrupt or truncated checkpoint ({first})") from None


def read_state_dict(model_dir: Path) -> dict[str, Tensor]:
    for fname in WEIGHT_FILES:
        path = model_dir / fname
        if not path.exists():
            continue
        if not fname.endswith(".index.json"):
            return _load_one(path)
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise ModelLoadError(f"{path}: corrupt shard index ({exc})") from None
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(_load_one(model_dir / shard))
        return state
    raise ModelLoadError(f"{model_dir}: no weights (looked for {', '.join(WEIGHT_FILES)})")


class _Taker:
    """Pops tensors by HF name so that leftovers can be reported."""

    def __init__(self, state: dict[str, Tensor], prefix: str, dtype: torch.dtype) -> None:
        self.state, self.prefix, self.dtype = dict(state), prefix, dtype

    def __call__(self, name: str) -> Tensor:
        key = self.prefix + name
        if key not in self.state:
            raise ModelLoadError(f"checkpoint lacks tensor {key!r}")
        return self.state.pop(key).to(self.dtype)

    def maybe(self, name: str) -> Tensor | None:
        return self(name) if self.prefix + name in self.state else None

    def maybe_top(self, name: str) -> Tensor | None:
        """A tensor outside the `model.` prefix (lm_head), if present."""
        return self.state.pop(name).to(self.dtype) if name in self.state else None

    def finish(self) -> None:
        left = [k for k in self.state if not k.endswith("inv_freq")]
        if left:
            raise ModelLoadError(f"checkpoint has {len(left)} unused tensors, e.g. {left[0]!r}")


def _opt_weights(spec: ModelSpec, take: _Taker) -> ModelWeights:
    p = "decoder."
    g = {"embed": take(p + "embed_tokens.weight"), "pos_embed": take(p + "embed_positions.weight")}
    if spec.word_embed_proj_dim:
        g["project_in"] = take(p + "project_in.weight")
        g["project_out"] = take(p + "project_out.weight")
    final_w = take.maybe(p + "final_layer_norm.weight")
    if final_w is not None:
        g["final_norm_w"], g["final_norm_b"] = final_w, take(p + "final_layer_norm.bias")
    layers = []
    for i in range(spec.num_layers):
        lp = f"{p}layers.{i}."
        a = lp + "self_attn."
        layers.append({
            "attn_norm_w": take(lp + "self_attn_layer_norm.weight"),
            "attn_norm_b": take(lp + "self_attn_layer_norm.bias"),
            "wqkv": torch.cat([take(a + f"{n}_proj.weight") for n in "qkv"]),
            "bqkv": torch.cat([take(a + f"{n}_proj.bias") for n in "qkv"]),
            "wo": take(a + "out_proj.weight"), "bo": take(a + "out_proj.bias"),
            "mlp_norm_w": take(lp + "final_layer_norm.weight"),
            "mlp_norm_b": take(lp + "final_layer_norm.bias"),
            "fc1": take(lp + "fc1.weight"), "fc1_b": take(lp + "fc1.bias"),
            "fc2": take(lp + "fc2.weight"), "fc2_b": take(lp + "fc2.bias"),
        })
    lm_head = take.maybe_top("lm_head.weight")
    g["lm_head"] = g["embed"] if lm_head is None else lm_head
    return ModelWeights(spec, g, layers)


def _llama_weights(spec: ModelSpec, take: _Taker) -> ModelWeights:
    g = {"embed": take("embed_tokens.weight"), "final_norm_w": take("norm.weight")}
    layers = []
    for i in range(spec.num_layers):
        lp = f"layers.{i}."
        a, m = lp + "self_attn.", lp + "mlp."
        layers.append({
            "attn_norm_w": take(lp + "input_layernorm.weight"),
            "wqkv": torch.cat([take(a + f"{n}_proj.weight") for n in "qkv"]),
            "wo": take(a + "o_proj.weight"),
            "mlp_norm_w": take(lp + "post_attention_layernorm.weight"),
            "w_gate_up": torch.cat([take(m + "gate_proj.weight"), take(m + "up_proj.weight")]),
            "w_down": take(m + "down_proj.weight"),
        })
    lm_head = take.maybe_top("lm_head.weight")
    if spec.tie_word_embeddings or lm_head is None:
        g["lm_head"] = g["embed"]
    else:
        g["lm_head"] = lm_head
    return ModelWeights(spec, g, layers)


def load_hf_dir(model_dir: Path, dtype: torch.dtype = torch.float32
                ) -> tuple[ModelWeights, dict]:
    """Weights (in ``dtype``, on the CPU) and the raw config of an HF checkpoint directory."""
    cfg = read_config(model_dir)
    spec = spec_from_config(cfg, name=str(model_dir))
    state = read_state_dict(model_dir)
    prefix = "model." if any(k.startswith("model.") for k in state) else ""
    take = _Taker(state, prefix, dtype)
    try:
        weights = (_opt_weights if spec.family == "opt" else _llama_weights)(spec, take)
    except RuntimeError as exc:  # torch.cat over mismatched shapes
        raise ModelLoadError(
            f"{model_dir}: tensor shapes do not match config.json ({exc})") from None
    take.finish()
    _check_shapes(weights)
    return weights, cfg


def _check_shapes(w: ModelWeights) -> None:
    s = w.spec
    expect = {"wqkv": (s.q_dim + 2 * s.kv_dim, s.hidden_size), "wo": (s.hidden_size, s.q_dim)}
    for i, layer in enumerate(w.layers):
        for key, shape in expect.items():
            if tuple(layer[key].shape) != shape:
                raise ModelLoadError(f"layer {i} {key} has shape {tuple(layer[key].shape)}, "
                                     f"config.json implies {shape}")
    if tuple(w.globals["embed"].shape) != (s.vocab_size, s.embed_dim):
        raise ModelLoadError(f"embedding shape {tuple(w.globals['embed'].shape)} does not match "
                             f"config.json ({s.vocab_size}, {s.embed_dim})")
