"""scripts/decode_gemms.py: times a decode step's weight GEMMs with each layer's own weights and
with one cache-resident layer's, on the model's real matrix shapes, then its lm_head and its
attention."""

from __future__ import annotations

import json

from tests.conftest import load_script


def test_reports_both_timings_for_the_models_matrices(tiny_chat_model, capsys):
    script = load_script("decode_gemms")
    assert script.main(["--model", str(tiny_chat_model), "--rows", "4", "--context", "8",
                        "--repeat", "3"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    config = json.loads((tiny_chat_model / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    assert out["layers"] == layers and out["rows"] == 4
    assert out["matrices"]["w_down"] == [hidden, config["intermediate_size"]]
    assert out["matrices"]["w_gate_up"] == [2 * config["intermediate_size"], hidden]
    per_layer = sum(o * i for o, i in out["matrices"].values())
    assert out["weight_mb"] == per_layer * 4 * layers / 1e6
    for key in ("own_weights_ms", "cached_weights_ms", "own_weights_gflops", "gemm_peak_gflops",
                "lm_head_ms", "attention_ms", "attention_read_gb_s", "plain_read_gb_s"):
        assert out[key] > 0
    assert out["context"] == 8
    heads = config["num_key_value_heads"] * config["hidden_size"] // config["num_attention_heads"]
    assert out["attention_read_gb_s"] == 2 * 4 * 8 * heads * 4 * layers / out["attention_ms"] / 1e6
    assert out["own_weights_gflops"] == 2 * 4 * layers * per_layer / out["own_weights_ms"] / 1e6
