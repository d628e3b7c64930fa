"""Policy validation and JSON round-trip."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from policy import Policy


def make_policy(**overrides) -> Policy:
    fields = dict(gpu_batch_size=8, num_gpu_batches=2, weights_gpu_share=0.25,
                  weights_cpu_share=0.75, kv_gpu_share=0.5, kv_cpu_share=0.3,
                  kv_recompute_share=0.2, phase2_start_step=4, phase3_start_step=10,
                  act_gpu_share=1.0, act_cpu_share=0.0, sparsity_method="swa", sparsity=0.8,
                  kv_compression="int8", weight_compression="none", cpu_attention=True,
                  overlap=True)
    fields.update(overrides)
    return Policy(**fields)


def test_batch_size_is_product():
    assert make_policy().batch_size == 16


def test_json_round_trip(tmp_path):
    policy = make_policy()
    assert Policy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy
    path = tmp_path / "policy.json"
    policy.save(path)
    assert Policy.load(path) == policy


def test_load_accepts_search_output(tmp_path):
    policy = make_policy(phase2_start_step=None, phase3_start_step=None)
    path = tmp_path / "result.json"
    path.write_text(json.dumps({"policy": policy.to_dict(), "prediction": {}}))
    assert Policy.load(path) == policy


def test_static_split_and_none_phases_are_valid():
    make_policy(phase2_start_step=0, phase3_start_step=0)
    make_policy(phase2_start_step=None, phase3_start_step=3)


def test_shares_within_tolerance_accepted():
    make_policy(weights_gpu_share=0.25 + 5e-7)


@pytest.mark.parametrize("overrides, fragment", [
    (dict(gpu_batch_size=0), "gpu_batch_size"),
    (dict(num_gpu_batches=1.5), "num_gpu_batches"),
    (dict(weights_gpu_share=0.3), "weights_gpu_share + weights_cpu_share"),
    (dict(kv_gpu_share=0.6), "sum to"),
    (dict(act_gpu_share=1.5, act_cpu_share=-0.5), "act_gpu_share"),
    (dict(weights_gpu_share=20, weights_cpu_share=80), "weights_gpu_share"),  # percents
    (dict(phase2_start_step=5, phase3_start_step=4), "phase3_start_step=4"),
    (dict(phase2_start_step=-1), "phase2_start_step"),
    (dict(sparsity_method="topk"), "topk"),
    (dict(sparsity=1.0), "sparsity"),
    (dict(sparsity_method="dense", sparsity=0.5), "dense"),
    (dict(kv_compression="int2"), "int2"),
    (dict(weight_compression="int8"), "int8"),
    (dict(cpu_attention="yes"), "cpu_attention"),
])
def test_validation_names_the_bad_value(overrides, fragment):
    with pytest.raises(ValueError, match=fragment.replace("+", r"\+")):
        make_policy(**overrides)


def test_unknown_field_rejected():
    with pytest.raises(ValueError, match="bogus"):
        Policy.from_dict({**make_policy().to_dict(), "bogus": 1})


def test_load_errors_are_value_errors(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read policy"):
        Policy.load(path)
    with pytest.raises(ValueError, match="cannot read policy"):
        Policy.load(tmp_path / "missing.json")


def test_frozen():
    policy = make_policy()
    with pytest.raises(AttributeError):
        policy.sparsity = 0.5  # type: ignore[misc]
    assert replace(policy, sparsity=0.5).sparsity == 0.5


def test_describe_uses_flexgen_order():
    text = make_policy().describe()
    assert text.startswith("8x2 w/kv/kv_rec/act% 25 75 50 30 20 100 0")
