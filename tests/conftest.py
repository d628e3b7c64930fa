"""Shared factories: tiny random-init HF checkpoints, the real SmolLM2 model, prompts."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from types import ModuleType

import pytest
import torch

from cost_model.spec import ModelSpec

# Tests use tiny shapes, where a second OpenMP thread only adds spin-wait time, and on a busy
# 2-core machine oversubscription makes every op ~20x slower. Benchmarks use all cores.
torch.set_num_threads(1)

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` imported as a module (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_CONFIGS = {
    # OPT with pre-LN (OPT-125m..66b style)
    "opt": dict(model_type="opt", vocab_size=320, hidden_size=64, num_hidden_layers=3,
                ffn_dim=128, num_attention_heads=4, max_position_embeddings=128,
                do_layer_norm_before=True, word_embed_proj_dim=64),
    # OPT-350m style: post-LN and a 32-wide embedding projected to 64
    "opt350": dict(model_type="opt", vocab_size=320, hidden_size=64, num_hidden_layers=3,
                   ffn_dim=128, num_attention_heads=4, max_position_embeddings=128,
                   do_layer_norm_before=False, word_embed_proj_dim=32),
    # LLaMA with GQA (8 query heads over 2 KV heads) and untied embeddings
    "llama": dict(model_type="llama", vocab_size=320, hidden_size=64, num_hidden_layers=3,
                  intermediate_size=160, num_attention_heads=8, num_key_value_heads=2,
                  max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False),
}


def make_spec(**overrides) -> ModelSpec:
    base = dict(family="llama", vocab_size=320, hidden_size=64, num_layers=3, num_heads=8,
                num_kv_heads=2, ffn_size=160, max_seq_len=256, eos_token_ids=(2,), pad_token_id=0)
    base.update(overrides)
    return ModelSpec(**base)


def make_prompts(n: int, length: int, vocab: int = 320, seed: int = 0,
                 ragged: bool = True) -> list[list[int]]:
    """n prompts of token ids in [3, vocab); ragged ones have lengths length//2..length."""
    rng = random.Random(seed)
    lengths = [rng.randint(max(1, length // 2), length) if ragged else length for _ in range(n)]
    return [[rng.randrange(3, vocab) for _ in range(k)] for k in lengths]


def build_tiny_hf(kind: str, out_dir: Path, seed: int = 0):
    """Save a random-init HF model of `kind` (a TINY_CONFIGS key) to out_dir; return the model."""
    import transformers

    cfg = dict(TINY_CONFIGS[kind])
    model_type = cfg.pop("model_type")
    torch.manual_seed(seed)
    if model_type == "opt":
        model = transformers.OPTForCausalLM(transformers.OPTConfig(**cfg))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    model.eval()
    model.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """kind -> (checkpoint dir, the HF model it was saved from)."""
    root = tmp_path_factory.mktemp("tiny")
    return {kind: (root / kind, build_tiny_hf(kind, root / kind)) for kind in TINY_CONFIGS}


@pytest.fixture(scope="session")
def smollm():
    """(weights, tokenizer) of the embedded SmolLM2-135M GGUF, loaded once per session."""
    from flexalisa.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def smollm_hf():
    """transformers' own load of the same GGUF (fp32), the parity reference."""
    transformers = pytest.importorskip("transformers")
    from flexalisa.models import default_model_path

    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model.eval()
    return model, tok


def build_tiny_chat_model(out_dir: Path, hidden: int = 64, layers: int = 2) -> Path:
    """A tiny random LLaMA plus a real byte-level BPE tokenizer.json trained on stdlib text,
    so the full CLI path (tokenize -> generate -> decode) runs in well under a second."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(topics.values())[:200], trainer)
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden,
                                   num_hidden_layers=layers, intermediate_size=2 * hidden,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=96, bos_token_id=1, eos_token_id=2,
                                   pad_token_id=0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out_dir)
    tok.save(str(out_dir / "tokenizer.json"))
    return out_dir


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("chat") / "model")


def write_jsonl(path: Path, rows: list) -> Path:
    import json

    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
