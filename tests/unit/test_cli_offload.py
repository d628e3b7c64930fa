"""`flexalisa generate --policy/--gpu-mem`: offloaded jobs equal on-device jobs; bad policies
and budgets are one-line errors."""

from __future__ import annotations

import json

import pytest

from flexalisa.cli import main
from policy import Policy
from tests.conftest import write_jsonl

PROMPTS = [{"id": i, "prompt": f"Item {i} of the list is"} for i in range(5)]


def run(model, tmp_path, name, *extra):
    inp = write_jsonl(tmp_path / "in.jsonl", PROMPTS)
    out = tmp_path / name / "out.jsonl"
    code = main(["generate", "--model", str(model), "--input", str(inp), "--output", str(out),
                 "--gen-len", "12", "--batch-size", "4", "--ignore-eos", *extra])
    return code, out


def offload_policy(**overrides) -> Policy:
    base = dict(gpu_batch_size=2, num_gpu_batches=2, weights_gpu_share=0.5,
                weights_cpu_share=0.5, kv_gpu_share=0.3, kv_cpu_share=0.5,
                kv_recompute_share=0.2, phase2_start_step=0, phase3_start_step=0,
                act_gpu_share=0.5, act_cpu_share=0.5)
    base.update(overrides)
    return Policy(**base)


def test_policy_file_runs_offloaded_with_the_same_tokens(tiny_chat_model, tmp_path):
    _, ref = run(tiny_chat_model, tmp_path, "ref")
    policy_path = tmp_path / "policy.json"
    offload_policy().save(policy_path)
    code, out = run(tiny_chat_model, tmp_path, "off", "--policy", str(policy_path))
    assert code == 0

    def texts(path):
        return {r["id"]: r["text"] for r in map(json.loads, path.read_text().splitlines())}

    assert texts(out) == texts(ref)
    report = json.loads((out.parent / "report.json").read_text())
    assert report["policy"]["kv_recompute_share"] == 0.2
    assert report["runtime"]["runner"] == "offload"
    assert report["runtime"]["tokens_recomputed"] > 0 and report["runtime"]["h2d_bytes"] > 0
    by_op = report["breakdown"]["by_op"]
    assert set(by_op) >= {"linear", "attention", "transfer_wait", "other"}
    # the breakdown adds up to the wall time; inline copies are a part of their own
    assert sum(by_op.values()) == pytest.approx(sum(report["runtime"]["phase_s"].values()))
    inline = report["runtime"]["copy_mode"] == "inline"
    assert ("copies (inline)" in by_op) == inline
    if inline:
        assert by_op["copies (inline)"] == report["runtime"]["transfer_busy_s"] > 0
    assert "prediction" not in report  # pricing a policy file needs a named --hardware

    code, out = run(tiny_chat_model, tmp_path, "priced", "--policy", str(policy_path),
                    "--hardware", "t4-16g")
    report = json.loads((out.parent / "report.json").read_text())
    assert code == 0 and report["prediction"]["predicted_total_tok_s"] > 0


@pytest.mark.parametrize("extra, message", [
    (["--gpu-mem", "lots"], "lots"),
    (["--policy", "missing.json"], "--policy missing.json"),
    (["--policy", "p.json", "--auto-policy"], "mutually exclusive"),
    (["--policy", "bad.json"], "sum to 1.4, must be 1"),
    (["--policy", "tiny.json", "--gpu-mem", "1KiB"], "policy does not fit"),
    (["--gpu-mem", "1KiB", "--hardware", "t4-16g"], "error: no policy fits: GPU 0.00 GiB"),
])
def test_bad_policy_or_budget(tiny_chat_model, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.json").write_text("{}")
    bad = offload_policy().to_dict()
    bad["kv_cpu_share"] = 0.9
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    offload_policy().save(tmp_path / "tiny.json")
    code, out = run(tiny_chat_model, tmp_path, "x", *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and not out.exists()
    assert err[-1].startswith("flexalisa: error:") and message in err[-1], err
