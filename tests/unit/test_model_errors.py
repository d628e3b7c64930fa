"""Bad model paths and checkpoints: one-line errors with a non-zero exit, no traceback."""

from __future__ import annotations

import json
import shutil

import pytest

from flexalisa.cli import main
from flexalisa.models import default_model_path
from tests.conftest import write_jsonl


def run_with_model(tmp_path, model, capsys) -> str:
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "hello"}])
    code = main(["generate", "--model", str(model), "--input", str(inp),
                 "--output", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("flexalisa: error:") and "\n" not in err, err
    assert not (tmp_path / "out.jsonl").exists()
    return err


def copy_model(tiny_chat_model, tmp_path):
    return shutil.copytree(tiny_chat_model, tmp_path / "model")


def test_unknown_model_path(tmp_path, capsys):
    assert "does not exist" in run_with_model(tmp_path, tmp_path / "nope", capsys)


def test_not_a_model(tmp_path, capsys):
    (tmp_path / "weights.txt").write_text("hi")
    assert "expected an HF checkpoint directory or a .gguf" in run_with_model(
        tmp_path, tmp_path / "weights.txt", capsys)


def test_truncated_safetensors(tiny_chat_model, tmp_path, capsys):
    model = copy_model(tiny_chat_model, tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "corrupt or truncated checkpoint" in run_with_model(tmp_path, model, capsys)


def test_corrupt_bin(tiny_chat_model, tmp_path, capsys):
    model = copy_model(tiny_chat_model, tmp_path)
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"PK\x03\x04 this is not a torch checkpoint")
    assert "corrupt or truncated checkpoint" in run_with_model(tmp_path, model, capsys)


def test_missing_weights(tiny_chat_model, tmp_path, capsys):
    model = copy_model(tiny_chat_model, tmp_path)
    (model / "model.safetensors").unlink()
    assert "no weights" in run_with_model(tmp_path, model, capsys)


def test_weights_not_matching_config(tiny_chat_model, tmp_path, capsys):
    model = copy_model(tiny_chat_model, tmp_path)
    cfg = json.loads((model / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (model / "config.json").write_text(json.dumps(cfg))
    assert "lacks tensor 'model.layers.2." in run_with_model(tmp_path, model, capsys)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2_moe"])
def test_unsupported_architecture(tiny_chat_model, tmp_path, capsys, arch):
    model = copy_model(tiny_chat_model, tmp_path)
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = arch
    (model / "config.json").write_text(json.dumps(cfg))
    assert f"unsupported architecture {arch!r}" in run_with_model(tmp_path, model, capsys)


@pytest.mark.parametrize("keep_bytes", [100, 5_000_000])
def test_truncated_gguf(tmp_path, capsys, keep_bytes):
    path = tmp_path / "cut.gguf"
    with default_model_path().open("rb") as fh:
        path.write_bytes(fh.read(keep_bytes))
    assert "corrupt or truncated GGUF" in run_with_model(tmp_path, path, capsys)


def test_unsupported_gguf_architecture(tmp_path, capsys):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "gpt2.gguf"
    writer = GGUFWriter(str(path), "gpt2")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b"])
    writer.add_tensor("token_embd.weight", np.zeros((2, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert "unsupported GGUF architecture 'gpt2'" in run_with_model(tmp_path, path, capsys)


def vocab_merges_model(tiny_chat_model, tmp_path):
    """The tiny model with its tokenizer as vocab.json + merges.txt instead of tokenizer.json."""
    from tokenizers import Tokenizer

    model = copy_model(tiny_chat_model, tmp_path)
    Tokenizer.from_file(str(model / "tokenizer.json")).model.save(str(model))
    (model / "tokenizer.json").unlink()
    (model / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": False,
         "unk_token": {"lstrip": False}, "added_tokens_decoder": {"7": "odd", "8": {}}}))
    return model


def test_vocab_and_merges_instead_of_tokenizer_json(tiny_chat_model, tmp_path):
    from flexalisa import LLM

    prompts = ["The module", "x = [1, 2]  # café", "a</s>b<pad>"]
    with LLM(tiny_chat_model) as ref, LLM(vocab_merges_model(tiny_chat_model, tmp_path)) as llm:
        assert llm.encode(prompts) == ref.encode(prompts)
        assert llm.generate(prompts, 8) == ref.generate(prompts, 8)
        assert llm.tokenizer.decode([5, 2, 0, 6]) == ref.tokenizer.decode([5, 2, 0, 6])


@pytest.mark.parametrize("name, content", [("vocab.json", "{not json"),
                                           ("vocab.json", "{\"a\": \"not an id\"}"),
                                           ("merges.txt", "a\n"),
                                           ("tokenizer_config.json", "[1]")])
def test_broken_vocab_merges_tokenizer(tiny_chat_model, tmp_path, capsys, name, content):
    model = vocab_merges_model(tiny_chat_model, tmp_path)
    (model / name).write_text(content)
    assert "flexalisa: error:" in run_with_model(tmp_path, model, capsys)


def test_no_tokenizer_at_all(tiny_chat_model, tmp_path, capsys):
    model = copy_model(tiny_chat_model, tmp_path)
    (model / "tokenizer.json").unlink()
    assert "no tokenizer (tokenizer.json, or vocab.json + merges.txt)" in run_with_model(
        tmp_path, model, capsys)


def test_gguf_tokenizer_metadata_that_makes_no_bpe():
    from flexalisa.errors import ModelLoadError
    from flexalisa.models.gguf_tokenizer import GGUFVocab, gguf_backend

    with pytest.raises(ModelLoadError, match="does not make a BPE vocabulary"):
        gguf_backend(GGUFVocab(model="gpt2", tokens=["a", "b"], token_types=[1, 1],
                               merges=["abc"]))
    with pytest.raises(ModelLoadError, match="unsupported GGUF tokenizer model 't5'"):
        gguf_backend(GGUFVocab(model="t5", tokens=["a"], token_types=[1], merges=[]))
