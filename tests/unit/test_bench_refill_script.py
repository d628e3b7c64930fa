"""scripts/bench_refill.py: fixed batches vs the engine's refilling on one workload of ragged
limits; both sides must generate the same tokens."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_script


def test_compares_both_sides_on_the_same_workload(tiny_chat_model, capsys):
    script = load_script("bench_refill")
    assert script.main(["--model", str(tiny_chat_model), "--prompts", "9", "--batch", "3",
                        "--prompt-len", "3:9", "--gen-median", "5", "--gen-max", "12"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    prompts, limits = script.workload(320, 9, (3, 9), 5, 12, 0)
    assert [len(p) for p in prompts] == sorted(len(p) for p in prompts)
    assert all(4 <= n <= 12 for n in limits)
    assert out["prompts"] == 9 and out["batch"] == 3 and out["prompt_len"] == [3, 9]
    for side in ("fixed", "refilled"):
        assert out[side]["wall_s"] > 0 and out[side]["decode_steps"] > 0
        assert out[side]["tok_s"] == out["generated_tokens"] / out[side]["wall_s"]
        assert 1 <= out[side]["rows_per_step"] <= 3
    assert out["speedup"] == out["fixed"]["wall_s"] / out["refilled"]["wall_s"]
    assert out["same_tokens"] == 1.0  # fp32 on the CPU: each row generates as alone


def test_runs_a_preset_shape_with_random_weights(capsys):
    script = load_script("bench_refill")
    assert script.main(["--preset", "opt-125m", "--prompts", "3", "--batch", "2",
                        "--prompt-len", "4:6", "--gen-median", "4", "--gen-max", "5"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["model"] == "opt-125m (random weights)" and out["refilled"]["wall_s"] > 0


def test_refuses_bad_sizes(capsys):
    script = load_script("bench_refill")
    with pytest.raises(SystemExit):
        script.main(["--prompt-len", "9:3"])
    assert "LO <= HI" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["--model", "x", "--preset", "opt-125m"])
    assert "not both" in capsys.readouterr().err
