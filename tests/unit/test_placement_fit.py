"""The cost model's device memory against the runtime's own plan, and the search that refits
until the runtime's plan fits the budget (`flexalisa generate --auto-policy --gpu-mem`)."""

from __future__ import annotations

import json

import pytest

from cost_model import costs
from cost_model.hardware import HardwareProfile
from cost_model.spec import ModelSpec
from flexalisa.cli import main
from flexalisa.errors import FlexalisaError
from flexalisa.models import load_model
from flexalisa.models.dummy import dummy_weights
from flexalisa.placement import fitting_search
from flexalisa.runtime import OffloadRunner
from policy import Policy, SearchSpace, predict
from tests.conftest import build_tiny_chat_model, write_jsonl

KIB = 2**10
SPEC = ModelSpec(family="llama", vocab_size=512, hidden_size=128, num_layers=8, num_heads=4,
                 num_kv_heads=2, ffn_size=256, max_seq_len=256, tie_word_embeddings=True,
                 eos_token_ids=(2,), pad_token_id=0, name="dummy-8l")
LAYER = costs.layer_weight_bytes(SPEC, "none", 4)
BATCH, PROMPT, GEN = 4, 32, 16


def cpu_profile(gpu_mem_bytes: int) -> HardwareProfile:
    """A CPU stand-in profile (fp32 on the device, as the runtime computes there)."""
    return HardwareProfile(
        name="test-cpu", device_kind="cpu", gpu_name="cpu", cpu_name="cpu", link_name="memcpy",
        gpu_mem_bytes=gpu_mem_bytes, cpu_mem_bytes=2**34, h2d_bytes_per_s=1e10,
        d2h_bytes_per_s=1e10, gpu_gemm_flops_per_s=1e11, gpu_skinny_flops_per_s=3e10,
        gpu_mem_bytes_per_s=3e10, cpu_flops_per_s=1e11, cpu_mem_bytes_per_s=3e10,
        compute_dtype_bytes=4, cpu_compute_dtype_bytes=4, copy_overlap=0.0)


@pytest.fixture(scope="module")
def weights():
    return dummy_weights(SPEC)


def runtime_device_bytes(weights, policy: Policy, budget: int | None = None) -> int:
    runner = OffloadRunner(weights, policy, gpu_mem_bytes=budget)
    try:
        return runner.plan([[5] * PROMPT] * BATCH, [GEN] * BATCH)[0][1].gpu_bytes
    finally:
        runner.close()


def kv_on_cpu(weights_gpu_share: float, kv_gpu_share: float = 0.0) -> Policy:
    return Policy(gpu_batch_size=BATCH, num_gpu_batches=1, weights_gpu_share=weights_gpu_share,
                  weights_cpu_share=1 - weights_gpu_share, kv_gpu_share=kv_gpu_share,
                  kv_cpu_share=1 - kv_gpu_share, kv_recompute_share=0.0, phase2_start_step=0,
                  phase3_start_step=0, act_gpu_share=1.0, act_cpu_share=0.0,
                  cpu_attention=True)


@pytest.mark.parametrize("layers_on_device", [0, 3, 8])
@pytest.mark.parametrize("kv_gpu_share", [0.0, 1.0])
def test_cost_model_device_memory_is_the_runtime_plan(weights, layers_on_device, kv_gpu_share):
    """Globals (with the packed copy of the tied lm_head), resident layers, KV, activations and
    working set are counted alike; only the two streaming buffers are relaxed to (1 - wg) of
    them, since the LP's weight share is continuous."""
    share = layers_on_device / SPEC.num_layers
    policy = kv_on_cpu(share, kv_gpu_share)
    model = predict(SPEC, cpu_profile(2**34), policy, PROMPT, GEN).peak_gpu_bytes
    runtime = runtime_device_bytes(weights, policy)
    relaxed = 2 * LAYER * share if 0 < layers_on_device < SPEC.num_layers else 0
    # the KV of the one token the runtime reserves beyond the model's last stored one
    token_kv = BATCH * SPEC.num_layers * costs.kv_bytes_per_token(SPEC, "none", 4)
    assert runtime - relaxed - token_kv * kv_gpu_share <= model <= runtime - relaxed


def test_a_share_places_whole_layers_rounded_down(weights):
    one = runtime_device_bytes(weights, kv_on_cpu(1 / SPEC.num_layers))
    assert runtime_device_bytes(weights, kv_on_cpu(1.99 / SPEC.num_layers)) == one
    assert runtime_device_bytes(weights, kv_on_cpu(2 / SPEC.num_layers)) == one + LAYER


@pytest.mark.parametrize("budget_kib", [2400, 3200, 4200, 6000])
def test_fitting_search_fits_the_runtime_plan(weights, budget_kib):
    budget = budget_kib * KIB
    space = SearchSpace(batch_sizes=(BATCH,))
    result, runner, searched = fitting_search(weights, cpu_profile(budget), [[5] * PROMPT] * BATCH,
                                              [GEN] * BATCH, space, gpu_mem_bytes=budget)
    try:
        reserved = runner.plan([[5] * PROMPT] * BATCH, [GEN] * BATCH)[0][1].gpu_bytes
    finally:
        runner.close()
    assert reserved <= budget and searched <= budget
    # a refit gives up at most the overshoot plus a layer, each time; one refit is the norm
    assert budget - reserved <= 2 * LAYER + (budget - searched)
    assert result.policy.gpu_batch_size * result.policy.num_gpu_batches == BATCH


def test_auto_policy_measures_the_machine_once_and_fits(tmp_path, monkeypatch, capsys):
    """A job whose first searched policy does not fit the runtime's plan: the search is re-run
    on the same measured profile (no second 15 s measurement) and the job runs in budget."""
    model_dir = build_tiny_chat_model(tmp_path / "model", hidden=128, layers=8)
    weights, tok = load_model(model_dir)
    rows = [{"id": i, "prompt": f"Item {i} of the list of modules is"} for i in range(BATCH)]
    prompt_len = max(map(len, tok.encode_batch([r["prompt"] for r in rows])))
    shape = ([[5] * prompt_len] * BATCH, [GEN] * BATCH)

    def needs_refit(budget: int) -> bool:
        try:
            _, runner, searched = fitting_search(weights, cpu_profile(budget), *shape,
                                                 SearchSpace(batch_sizes=(BATCH,)),
                                                 gpu_mem_bytes=budget)
        except FlexalisaError:
            return False
        runner.close()
        return searched < budget

    budget = next((b * KIB for b in range(2000, 8000, 300) if needs_refit(b * KIB)), None)
    assert budget is not None, "no budget needs a refit any more; the test needs another model"
    measured = []

    def fake_measure(cls, gpu_mem_bytes=None, cpu_mem_bytes=None, **_):
        measured.append(gpu_mem_bytes)
        return cpu_profile(gpu_mem_bytes or 2**30)

    monkeypatch.setattr(HardwareProfile, "measure", classmethod(fake_measure))
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out" / "out.jsonl"
    code = main(["generate", "--model", str(model_dir), "--input", str(inp), "--output",
                 str(out), "--gen-len", str(GEN), "--batch-size", str(BATCH), "--ignore-eos",
                 "--auto-policy", "--gpu-mem", f"{budget // KIB}KiB"])
    err = capsys.readouterr().err
    assert code == 0 and measured == [budget], err
    assert err.count("auto-policy:") == 1 and "searched as if the device had" in err
    report = json.loads((out.parent / "report.json").read_text())
    assert report["runtime"]["runner"] == "offload"
    assert report["runtime"]["reserved_bytes"]["gpu"] <= budget
    assert len(out.read_text().splitlines()) == BATCH


def test_a_budget_everything_fits_in_runs_the_engine(tiny_chat_model, tmp_path, capsys):
    """`--gpu-mem` large enough for everything: the search puts it all on the device and the
    job runs on the Engine, with the same tokens as a plain run and the policy and its
    prediction in the report."""
    cpu_profile(2**30).save(tmp_path / "hw.json")
    inp = write_jsonl(tmp_path / "in.jsonl",
                      [{"id": i, "prompt": f"Item {i} of the list is"} for i in range(5)])

    def job(name, *extra):
        out = tmp_path / name / "out.jsonl"
        code = main(["generate", "--model", str(tiny_chat_model), "--input", str(inp),
                     "--output", str(out), "--gen-len", "8", "--batch-size", "4",
                     "--ignore-eos", *extra])
        assert code == 0
        return out

    plain = job("plain")
    fitted = job("fitted", "--gpu-mem", "1GiB", "--hardware", str(tmp_path / "hw.json"))
    assert "running the all-on-device engine" in capsys.readouterr().err
    assert fitted.read_text() == plain.read_text()
    report = json.loads((fitted.parent / "report.json").read_text())
    assert "runtime" not in report and report["policy"]["weights_gpu_share"] == 1.0
    assert report["prediction"]["measured_total_tok_s"] > 0
