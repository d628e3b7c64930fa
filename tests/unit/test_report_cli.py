"""`flexalisa report`: markdown on stdout, PNG plots for the data present, one-line errors."""

from __future__ import annotations

import json

import pytest

from flexalisa.cli import main
from flexalisa.report import breakdown_by_op

REPORT = {
    "model": "tiny", "stats": {"total_tok_s": 12.5, "num_prompts": 4},
    "breakdown": {"by_op": {"linear": 2.0, "attention": 0.5, "transfer_wait": 0.4},
                  "by_phase": {"prefill": 1.0, "phase1": 1.5, "phase2": 0.4}},
    "memory_per_step": [{"step": i, "gpu": 1e6 * min(i, 5), "cpu": 1e6 * max(0, i - 5)}
                        for i in range(10)],
    "runs": [{"label": lab, "batch": b, "total_tok_s": b * f, "predicted_total_tok_s": b * f}
             for lab, f in (("flexgen", 1.0), ("alisa", 2.0)) for b in (4, 8)],
}


def write(tmp_path, obj, name="report.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_report_plots_every_view_with_data(tmp_path, capsys):
    path = write(tmp_path, REPORT)
    assert main(["report", str(path), "--plot"]) == 0
    out = capsys.readouterr().out
    assert "| total_tok_s | 12.500 |" in out
    for name in ("time_breakdown", "memory_per_step", "throughput_vs_batch",
                 "predicted_vs_measured"):
        png = tmp_path / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_report_skips_views_without_data(tmp_path, capsys):
    path = write(tmp_path, {"model": "tiny", "stats": {"total_tok_s": 1.0}})
    assert main(["report", str(path), "--plot", "--out", str(tmp_path / "plots")]) == 0
    assert "no data for: time_breakdown, memory_per_step" in capsys.readouterr().err
    assert not list((tmp_path / "plots").glob("*.png"))


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("{broken", "not a JSON report"),
    ("[1, 2]", "top level is not an object"),
])
def test_report_bad_input(tmp_path, capsys, content, message):
    path = tmp_path / "missing.json" if content is None else write(tmp_path, content)
    assert main(["report", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("flexalisa: error:") and message in err and err.count("\n") == 1


def test_merged_extras_add_counts_keep_peaks_and_weight_the_hidden_share():
    from flexalisa.report import merge_extras

    first = {"device": "cpu", "copy_mode": "threads", "transfer_busy_s": 1.0,
             "transfer_hidden_share": 0.9, "h2d_bytes": 10, "op_s": {"linear": 2.0},
             "peak_bytes": {"gpu": 5, "cpu": 1}}
    second = {"device": "cpu", "copy_mode": "threads", "transfer_busy_s": 3.0,
              "transfer_hidden_share": 0.5, "h2d_bytes": 30, "op_s": {"linear": 1.0},
              "peak_bytes": {"gpu": 4, "cpu": 7}}
    merged = merge_extras(merge_extras(None, first), second)
    assert merged["transfer_busy_s"] == 4.0 and merged["h2d_bytes"] == 40
    assert merged["transfer_hidden_share"] == pytest.approx((0.9 * 1 + 0.5 * 3) / 4)  # 0.6
    assert merged["op_s"] == {"linear": 3.0} and merged["peak_bytes"] == {"gpu": 5, "cpu": 7}
    assert merged["copy_mode"] == "threads" and merged["device"] == "cpu"
    idle = merge_extras(merge_extras(None, {**first, "transfer_busy_s": 0.0,
                                            "transfer_hidden_share": 0.0}),
                        {**second, "transfer_busy_s": 0.0, "transfer_hidden_share": 0.0})
    assert idle["transfer_hidden_share"] == 0.0


def test_the_breakdown_counts_recompute_once() -> None:
    """The runner's kv_gather sections contain its recompute sections: the breakdown takes the
    recompute out of kv_gather, so its parts add up to the wall time even when the loop's own
    work ("other") is shorter than the recompute."""
    extras = {"op_s": {"linear": 6.0, "kv_gather": 3.0, "recompute": 2.0, "attention": 0.0},
              "phase_s": {"prefill": 1.5, "phase2": 8.0}}
    by_op = breakdown_by_op(extras)
    assert by_op["kv_gather"] == 1.0 and by_op["recompute"] == 2.0
    assert by_op["other"] == pytest.approx(0.5)
    assert sum(by_op.values()) == pytest.approx(9.5)
