"""The ``auto`` batch size (flexalisa/batch_size.py): the engine's largest batch that fits the
memory share, the search's candidates under a placement, and how the CLI and API report it."""

from __future__ import annotations

import json

import pytest
import torch

from cost_model.costs import working_set_bytes
from cost_model.presets import MODEL_PRESETS as PRESETS
from flexalisa import LLM, batch_size
from flexalisa.batch_size import (
    AUTO_BATCH_CAP,
    batch_bytes,
    batch_candidates,
    cache_gen_len,
    engine_batch_size,
    host_memory_bytes,
)
from flexalisa.cache import KVCache
from flexalisa.cli import main
from tests.conftest import make_spec, write_jsonl

CPU = torch.device("cpu")


def test_candidates_are_powers_of_two_and_the_limit():
    assert batch_candidates(1) == (1,)
    assert batch_candidates(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_candidates(48) == (1, 2, 4, 8, 16, 32, 48)


def test_batch_bytes_counts_the_engines_cache_and_the_plans_scratch():
    spec = make_spec()
    cache = KVCache(spec, 3, 24 + 16, CPU, torch.float32)  # as Engine.generate allocates it
    assert batch_bytes(spec, 3, 24, 16, 4) == cache.nbytes + working_set_bytes(spec, 3, 24, 0, 4)


def test_engine_weight_bytes_count_one_copy_and_a_tied_heads_packed_one(tiny_chat_model):
    from flexalisa.engine import Engine
    from flexalisa.models import load_model

    weights = load_model(tiny_chat_model)[0]
    tensors = {id(t): t for t in [*weights.globals.values(),
                                  *(t for layer in weights.layers for t in layer.values())]}
    loaded = sum(t.numel() * t.element_size() for t in tensors.values())
    head = weights.globals["lm_head"]
    tied = head.numel() * 4 if head is weights.globals["embed"] else 0
    assert batch_size.engine_weight_bytes(weights, CPU, torch.float32) == loaded + tied
    packed = Engine(weights).weights  # what the LLM keeps: the same count
    assert batch_size.engine_weight_bytes(packed, CPU, torch.float32) == loaded + tied


def test_engine_batch_is_capped_by_the_device_and_the_job(monkeypatch):
    monkeypatch.setattr(batch_size, "device_memory_bytes", lambda device: 2**40)
    spec = make_spec()
    big = engine_batch_size(spec, CPU, torch.float32, 0, 1000, 32, 16)
    assert big.size == AUTO_BATCH_CAP["cpu"] and "cpu cap" in big.reason
    small = engine_batch_size(spec, CPU, torch.float32, 0, 5, 32, 16)
    assert small.size == 5 and "every prompt" in small.reason


@pytest.mark.parametrize("method, sparsity", [("dense", 0.0), ("swa", 0.8)])
def test_engine_batch_is_the_largest_that_fits(monkeypatch, method, sparsity):
    """The chosen batch fits the room left after the weights, and one more row would not; a
    longer context fits fewer rows."""
    spec = PRESETS["opt-1.3b"]
    room, weights = 6 * 2**30, 2**30
    monkeypatch.setattr(batch_size, "device_memory_bytes", lambda device: room + weights)
    choice = engine_batch_size(spec, CPU, torch.float32, weights, 1000, 512, 256, method,
                               sparsity)
    assert 1 < choice.size < AUTO_BATCH_CAP["cpu"]
    assert batch_bytes(spec, choice.size, 512, 256, 4, method, sparsity) <= room
    assert batch_bytes(spec, choice.size + 1, 512, 256, 4, method, sparsity) > room
    assert "6.00 GiB of cpu memory" in choice.reason and "768 cached tokens" in choice.reason
    longer = engine_batch_size(spec, CPU, torch.float32, weights, 1000, 1536, 256, method,
                               sparsity)
    assert 1 <= longer.size < choice.size


def test_engine_batch_is_one_when_nothing_fits(monkeypatch):
    monkeypatch.setattr(batch_size, "device_memory_bytes", lambda device: 2**20)
    assert engine_batch_size(PRESETS["opt-1.3b"], CPU, torch.float32, 2**30, 50, 64,
                             64).size == 1


def test_the_choice_depends_on_total_not_free_memory(monkeypatch):
    """A resumed job must cut the same batches: free memory, which varies, is not an input."""
    import psutil

    real = psutil.virtual_memory()
    spec = PRESETS["opt-1.3b"]
    sizes = set()
    for free in (real.total // 10, real.total // 2):
        monkeypatch.setattr(psutil, "virtual_memory",
                            lambda free=free: real._replace(available=free))
        sizes.add(engine_batch_size(spec, CPU, torch.float32, 2**30, 1000, 2048, 2048).size)
    assert len(sizes) == 1


def test_host_memory_honours_a_cgroup_limit(monkeypatch, tmp_path):
    limit = tmp_path / "memory.max"
    monkeypatch.setattr(batch_size, "CGROUP_LIMIT", limit)
    total = host_memory_bytes()  # no limit file: the host's total
    limit.write_text("max\n")
    assert host_memory_bytes() == total
    limit.write_text(f"{2**30}\n")
    assert host_memory_bytes() == min(total, 2**30)


def test_generate_defaults_to_auto_and_reports_it(tiny_chat_model, tmp_path, capsys):
    rows = [{"id": i, "prompt": f"The {w} of the module is"}
            for i, w in enumerate(["name", "value", "type", "size", "list"])]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(tiny_chat_model), "--input", str(inp),
                 "--output", str(out), "--gen-len", "4"]) == 0
    assert "batch size 5 (auto: every prompt of the job)" in capsys.readouterr().err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["batch_size"] == 5 and report["batch_size_source"].startswith("auto")
    assert "- **batch_size**: `5`" in (tmp_path / "report.md").read_text()
    assert report["stats"]["num_prompts"] == 5 and len(out.read_text().splitlines()) == 5


@pytest.mark.parametrize("value", ["0", "-3", "sixteen", "2.5"])
def test_bad_batch_size_is_a_one_line_error(tiny_chat_model, tmp_path, capsys, value):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 0, "prompt": "x"}])
    code = main(["generate", "--model", str(tiny_chat_model), "--input", str(inp),
                 "--output", str(tmp_path / "out.jsonl"), "--batch-size", value])
    err = capsys.readouterr().err
    assert code == 1 and err.strip().count("\n") == 0
    assert f"error: --batch-size must be a positive integer or auto, got '{value}'" in err


def test_auto_batch_under_a_budget_is_the_searchs(tiny_chat_model):
    """With a budget and no batch size the cost model chooses the batch among the candidates,
    up to the prompt count; the completions equal the engine's. A later call with fewer
    prompts reuses the placement; one with more prompts than it could batch searches again."""
    prompts = ["The module", "A longer prompt about the functions", "x = 1", "def f(x):",
               "import os", "class A:"]
    with LLM(tiny_chat_model, batch_size=6) as on_device:
        want = [c.token_ids for c in on_device.generate(prompts, 6, ignore_eos=True)]
    with LLM(tiny_chat_model, gpu_mem="64MiB", hardware="t4-16g") as off:
        got = [c.token_ids for c in off.generate(prompts, 6, ignore_eos=True)]
        choice = off.batch_choice()
        runner = off.prepare(off.workload([[5] * 3] * 2, [4, 4]))[0]
        assert off.prepare(off.workload([[5] * 3] * 6, [4] * 6))[0] is runner
        assert off.prepare(off.workload([[5] * 3] * 12, [4] * 12))[0] is not runner
    assert got == want
    assert choice.size in batch_candidates(6) and choice.reason == "auto: the cost model's choice"


def test_the_cache_holds_twice_the_generation_only_where_rows_are_refilled():
    assert cache_gen_len(256, 8, 9, True) == 512
    assert cache_gen_len(256, 8, 8, True) == 256  # every prompt in the batch: nothing waits
    assert cache_gen_len(256, 8, 9, False) == 256  # fixed batches


def test_a_refilled_auto_batch_counts_twice_the_generation(monkeypatch):
    spec = PRESETS["opt-1.3b"]
    room, weights = 6 * 2**30, 2**30
    monkeypatch.setattr(batch_size, "device_memory_bytes", lambda device: room + weights)
    fixed = engine_batch_size(spec, CPU, torch.float32, weights, 1000, 512, 256)
    refilled = engine_batch_size(spec, CPU, torch.float32, weights, 1000, 512, 256, refill=True)
    assert batch_bytes(spec, refilled.size, 512, 512, 4) <= room
    assert batch_bytes(spec, refilled.size + 1, 512, 512, 4) > room
    assert refilled.size < fixed.size and "1024 cached tokens" in refilled.reason
