"""HardwareProfile presets, JSON round-trip, parse_bytes, and a short real measurement."""

from __future__ import annotations

import json

import pytest

from cost_model.hardware import HardwareProfile
from cost_model.hardware_presets import HARDWARE_PRESETS
from cost_model.units import format_bytes, parse_bytes

EXPECTED_PRESETS = ("t4-16g", "v100-16g", "v100-32g", "a100-40g", "a100-80g", "h100-80g",
                    "rtx-4090")


@pytest.mark.parametrize("text, expected", [
    ("512MiB", 512 * 2**20), ("16GB", 16 * 10**9), ("2GiB", 2 * 2**30), ("1024", 1024),
    ("1.5G", int(1.5 * 2**30)), ("20 GB", 20 * 10**9), ("3kb", 3000), ("7B", 7), ("1e3", 1000),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "-1GB", "12 parsecs", "1..5GB", "5 GiBs"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError, match="byte"):
        parse_bytes(text)


def test_format_bytes():
    assert format_bytes(3 * 2**30) == "3.00 GiB"
    assert format_bytes(12) == "12 B"


def test_all_presets_present_and_described():
    assert set(EXPECTED_PRESETS) <= set(HARDWARE_PRESETS)
    for key, hw in HARDWARE_PRESETS.items():
        assert hw.name == key
        assert "PCIe" in hw.link_name and hw.cpu_name and hw.gpu_name
        assert hw.device_kind == "cuda"
        assert hw.gpu_gemm_flops_per_s > hw.cpu_flops_per_s
        assert hw.gpu_mem_bytes_per_s > hw.h2d_bytes_per_s


def test_flexgen_t4_machine():
    hw = HardwareProfile.load("T4-16G")
    assert hw.cpu_mem_bytes == 208 * 10**9
    assert hw.gpu_mem_bytes == 16 * 2**30
    assert hw.link_name == "PCIe 3.0 x16"


def test_preset_ordering_is_physical():
    p = HARDWARE_PRESETS
    assert p["t4-16g"].gpu_gemm_flops_per_s < p["v100-32g"].gpu_gemm_flops_per_s \
        < p["a100-40g"].gpu_gemm_flops_per_s < p["h100-80g"].gpu_gemm_flops_per_s
    assert p["a100-80g"].gpu_mem_bytes_per_s > p["a100-40g"].gpu_mem_bytes_per_s


def test_json_round_trip(tmp_path):
    hw = HARDWARE_PRESETS["a100-40g"]
    assert HardwareProfile.from_dict(json.loads(json.dumps(hw.to_dict()))) == hw
    path = tmp_path / "hw.json"
    hw.save(path)
    assert HardwareProfile.load(path) == hw


def test_with_memory_and_validation():
    hw = HARDWARE_PRESETS["t4-16g"].with_memory(gpu_mem_bytes=2**30)
    assert hw.gpu_mem_bytes == 2**30 and hw.cpu_mem_bytes == 208 * 10**9
    with pytest.raises(ValueError, match="h2d_bytes_per_s"):
        hw.replace(h2d_bytes_per_s=0)
    with pytest.raises(ValueError, match="device_kind"):
        hw.replace(device_kind="tpu")
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="copy_overlap"):
            hw.replace(copy_overlap=bad)
    # a profile saved before copy_overlap existed loads as fully overlapped (a GPU's DMA)
    old = {k: v for k, v in hw.to_dict().items() if k != "copy_overlap"}
    assert HardwareProfile.from_dict(old).copy_overlap == 1.0


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="neither a preset"):
        HardwareProfile.load("b200-192g")
    bad = tmp_path / "hw.json"
    bad.write_text("[1, 2")
    with pytest.raises(ValueError, match="not valid JSON"):
        HardwareProfile.load(bad)
    bad.write_text(json.dumps({**HARDWARE_PRESETS["t4-16g"].to_dict(), "extra": 1}))
    with pytest.raises(ValueError, match="extra"):
        HardwareProfile.load(bad)


def test_measure_is_short_and_sane():
    hw = HardwareProfile.measure(gpu_mem_bytes=2**30, budget_s=0.8)
    assert hw.gpu_mem_bytes == 2**30
    assert hw.gpu_gemm_flops_per_s > 1e8 and hw.h2d_bytes_per_s > 1e7
    assert hw.layer_overhead_s > 0 and hw.engine_layer_overhead_s is not None
    assert hw.for_runner("engine").layer_overhead_s == hw.engine_layer_overhead_s
    assert 0.0 <= hw.copy_overlap <= 1.0
    # SWA's sparse path, timed with the runtime's own method: a fixed part and a per-token
    # part, both >= 0 (each clamped), not both 0 (the sparse path costs more than attention)
    assert 0 <= hw.selection_overhead_s < 0.1 and 0 <= hw.selection_s_per_token < 1e-5
    assert hw.selection_overhead_s + 16 * 128 * hw.selection_s_per_token > 0


def test_no_copy_overlap_is_measured_where_the_runtime_copies_inline(monkeypatch):
    """With compute on every usable CPU the runtime's CPU device copies on the compute thread,
    so the profile records no overlap instead of measuring worker threads it would not use."""
    import torch

    from cost_model import profiling

    monkeypatch.setattr(profiling, "usable_cpus", lambda: torch.get_num_threads())
    monkeypatch.setattr(profiling, "_copy_overlap", lambda *a: pytest.fail("measured"))
    assert HardwareProfile.measure(budget_s=0.4).copy_overlap == 0.0


def test_gemm_rate_table_interpolates_and_round_trips(tmp_path):
    table = ((1, 512, 1e10), (1, 4096, 2e10), (16, 512, 4e10), (16, 4096, 8e10))
    hw = HARDWARE_PRESETS["t4-16g"].replace(gemm_flops_table=table)
    assert hw.gemm_flops_per_s(1, 512) == 1e10 and hw.gemm_flops_per_s(0.5, 100) == 1e10
    assert hw.gemm_flops_per_s(4, 512) == pytest.approx(2.5e10)  # halfway in log(rows)
    assert hw.gemm_flops_per_s(1, 2**10.5) == pytest.approx(1.5e10)  # halfway in log(inner)
    assert hw.gemm_flops_per_s(4096, 10**6) == 8e10
    path = tmp_path / "hw.json"
    hw.save(path)
    assert HardwareProfile.load(path) == hw
    with pytest.raises(ValueError, match="gemm_flops_table"):
        hw.replace(gemm_flops_table=table[:3])  # not a full grid
    # without a table: two classes split at SKINNY_ROWS
    preset = HARDWARE_PRESETS["a100-40g"].replace(gpu_skinny_flops_per_s=1e12)
    assert preset.gemm_flops_per_s(8) == 1e12
    assert preset.gemm_flops_per_s(4096, 8192) == preset.gpu_gemm_flops_per_s


def test_layer_overheads_are_timed_on_the_runtime_and_the_engine():
    """The profile's per-layer costs come from running the offloading runtime and the engine on
    two tiny models; both must be positive. The runtime's includes its bookkeeping, which costs
    more than the bare op sequence of a layer (``_layer_overhead_s``) and than the engine."""
    import time

    import torch

    from cost_model.profiling import _layer_overhead_s, _layer_step_overheads_s, _Timer

    timer = _Timer(time.perf_counter, lambda: None, 1.0)
    measured = _layer_step_overheads_s(torch, timer, "cpu")
    runtime, engine = measured["layer_overhead_s"], measured["engine_layer_overhead_s"]
    assert 0 < engine < runtime < 0.1
    assert runtime > _layer_overhead_s(torch, timer, "cpu", torch.float32)


def test_engine_layer_overhead_prices_engine_runs_only():
    """``engine_layer_overhead_s`` replaces the runtime's per-layer cost only for a policy the
    all-on-device engine runs; a profile without it (presets, older files) prices both alike."""
    hw = HARDWARE_PRESETS["a100-40g"]
    assert hw.engine_layer_overhead_s is None and hw.for_runner("engine") == hw
    measured = hw.replace(layer_overhead_s=9e-4, engine_layer_overhead_s=3e-4)
    assert measured.for_runner("offload") == measured
    assert measured.for_runner("engine") == measured.replace(layer_overhead_s=3e-4)
    with pytest.raises(ValueError, match="runner"):
        measured.for_runner("vllm")
    with pytest.raises(ValueError, match="engine_layer_overhead_s"):
        hw.replace(engine_layer_overhead_s=-1e-6)
    old = {k: v for k, v in measured.to_dict().items() if k != "engine_layer_overhead_s"}
    assert HardwareProfile.from_dict(old).engine_layer_overhead_s is None
