"""The benchmark suite's 1-minute smoke version: every section runs and writes its outputs."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_script

pytestmark = pytest.mark.slow


def test_smoke_suite_writes_results(tiny_chat_model, tmp_path):
    suite = load_script("bench_suite")
    assert suite.main(["--smoke", "--model", str(tiny_chat_model), "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "bench_suite.json").read_text())
    hf_rows = results["dense_vs_hf"]
    assert [r["label"] for r in hf_rows] == ["flexalisa", "hf-transformers"]
    assert hf_rows[0]["ratio_vs_hf"] > 0 and all(r["total_tok_s"] > 0 for r in hf_rows)
    labels = {r["label"] for r in results["sparse_vs_dense"]}
    assert labels == {"dense", "swa@0.5", "swa@0.8"}
    offload = results["alisa_vs_flexgen"]
    assert [(r["label"], r["batch"], r["gen_len"]) for r in offload] == [
        ("flexgen", 2, 4), ("alisa", 2, 4), ("flexgen", 4, 4), ("alisa", 4, 4),
        ("flexgen gen8", 2, 8), ("alisa gen8", 2, 8)]
    assert all(r["predicted_total_tok_s"] > 0 for r in offload)
    assert "## alisa_vs_flexgen" in (tmp_path / "bench_suite.md").read_text()
    for png in ("throughput_vs_batch.png", "predicted_vs_measured.png", "time_breakdown.png",
                "memory_per_step.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    # the saved profile reruns the offload section with the same searched policies
    hw = tmp_path / "hardware.json"
    assert hw.stat().st_size > 0
    again = tmp_path / "again"
    assert suite.main(["--smoke", "--model", str(tiny_chat_model), "--out", str(again),
                       "--hardware", str(hw), "--sections", "alisa_vs_flexgen"]) == 0
    rerun = json.loads((again / "bench_suite.json").read_text())["alisa_vs_flexgen"]
    assert [r["policy"] for r in rerun] == [r["policy"] for r in offload]


def test_bad_arguments_fail_in_one_line_before_writing(tiny_chat_model, tmp_path, capsys):
    suite = load_script("bench_suite")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    out = tmp_path / "out"
    assert suite.main(["--smoke", "--model", str(tiny_chat_model), "--out", str(out),
                       "--hardware", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not valid JSON" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert suite.main(["--smoke", "--model", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        suite.main(["--smoke", "--model", str(tiny_chat_model), "--sections", "nope"])
    assert exc.value.code == 2 and "unknown section" in capsys.readouterr().err
    assert not out.exists()
