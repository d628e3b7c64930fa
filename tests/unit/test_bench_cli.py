"""`flexalisa bench`: one JSON line with FlexGen throughputs; bad arguments are one-line errors."""

from __future__ import annotations

import json

import pytest

from flexalisa.cli import main


def bench(capsys, *args):
    code = main(["bench", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_bench_prints_medians_with_min_max(tiny_chat_model, capsys, tmp_path):
    code, out, err = bench(capsys, "--model", str(tiny_chat_model), "--prompt-len", "12",
                           "--gen-len", "5", "--batch", "3", "--repeat", "3",
                           "--report", str(tmp_path))
    assert code == 0
    result = json.loads(out)
    for key in ("prefill_tok_s", "decode_tok_s", "total_tok_s"):
        assert result[f"{key}_min"] <= result[key] <= result[f"{key}_max"]
        assert result[key] > 0
    assert (result["batch"], result["prompt_len"], result["gen_len"]) == (3, 12, 5)
    assert err.count("run ") == 3  # three timed runs reported on stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["runs"][0]["total_tok_s"] == result["total_tok_s"]


def test_bench_runs_a_sparse_method_on_a_preset_with_dummy_weights(capsys):
    code, out, _ = bench(capsys, "--model", "opt-125m", "--prompt-len", "8", "--gen-len", "3",
                         "--batch", "2", "--repeat", "1", "--sparsity-method", "swa",
                         "--sparsity", "0.5")
    assert code == 0
    result = json.loads(out)
    assert result["sparsity_method"] == "swa" and result["model_name"] == "opt-125m"


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "--batch must be >= 1"),
    (["--repeat", "0"], "--repeat must be >= 1"),
    (["--prompt-len", "90"], "exceeds the model's context of 96"),
    (["--sparsity-method", "dense", "--sparsity", "0.5"], "--sparsity needs a --sparsity-method"),
    (["--query-channels", "4"], "--sparsity needs a --sparsity-method"),
    (["--sparsity-method", "swa", "--sparsity", "1.5"], "sparsity"),
])
def test_bench_bad_arguments(tiny_chat_model, capsys, args, message):
    base = {"--prompt-len": "8", "--gen-len": "8", "--batch": "2", "--repeat": "1"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    flat = [x for kv in base.items() for x in kv]
    code, out, err = bench(capsys, "--model", str(tiny_chat_model), *flat)
    assert code == 1 and out == ""
    assert err.startswith("flexalisa: error:") and message in err and err.count("\n") == 1


def test_bench_unknown_model(capsys):
    code, _, err = bench(capsys, "--model", "gpt-17", "--prompt-len", "8", "--gen-len", "8",
                         "--batch", "2")
    assert code == 1 and "neither a path nor a preset" in err


def test_bench_missing_required_flag_is_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--model", "opt-125m"])
    assert exc.value.code == 2
    assert "required" in capsys.readouterr().err


def test_bench_report_prices_a_policy_file(tiny_chat_model, capsys, tmp_path):
    from tests.unit.test_cli_offload import offload_policy

    offload_policy().save(tmp_path / "policy.json")
    code, out, _ = bench(capsys, "--model", str(tiny_chat_model), "--prompt-len", "12",
                         "--gen-len", "5", "--batch", "4", "--repeat", "1", "--policy",
                         str(tmp_path / "policy.json"), "--hardware", "t4-16g",
                         "--report", str(tmp_path))
    assert code == 0
    result = json.loads(out)
    prediction = json.loads((tmp_path / "report.json").read_text())["prediction"]
    assert prediction["predicted_total_tok_s"] == result["predicted_total_tok_s"] > 0
    assert prediction["measured_total_tok_s"] == result["total_tok_s"] > 0
    assert prediction["relative_error"] == pytest.approx(
        result["predicted_total_tok_s"] / result["total_tok_s"] - 1)


def test_sparsity_alone_means_alisas_swa(tiny_chat_model, capsys):
    """``--sparsity 0.8`` without a method is SWA, as DESIGN.md writes the job."""
    code, out, _ = bench(capsys, "--model", str(tiny_chat_model), "--prompt-len", "8",
                         "--gen-len", "4", "--batch", "2", "--repeat", "1", "--sparsity", "0.5")
    assert code == 0
    result = json.loads(out)
    assert (result["sparsity_method"], result["sparsity"]) == ("swa", 0.5)
