"""The GPU check's plans, checked on any machine: ``tests/gpu`` runs only where CUDA is lent,
rarely, so its two policies are planned here first, with meta tensors (shapes only), for a
CUDA device in fp16 under its 16 GB budget."""

from __future__ import annotations

import pytest
import torch

from cost_model import parse_bytes
from flexalisa.runtime.runner import plan_blocks
from tests.gpu.test_runtime_gpu import (
    BUDGET,
    HOST_BUDGET,
    OPT_SHAPES,
    alisa_policy,
    dummy_opt,
    flexgen_policy,
    workload,
)


@pytest.mark.parametrize("model", list(OPT_SHAPES))
def test_the_gpu_checks_policies_fit_their_budget(model):
    weights = dummy_opt(model, device="meta")
    alisa, flexgen = alisa_policy(weights), flexgen_policy()
    assert (alisa.sparsity_method, alisa.sparsity) == ("swa", 0.8)
    assert flexgen.sparsity_method == "dense" and flexgen.kv_cpu_share == 1.0
    assert flexgen.kv_recompute_share == 0.0
    for policy in (alisa, flexgen):
        blocks = plan_blocks(weights, policy, *workload(), torch.float16, parse_bytes(BUDGET),
                             parse_bytes(HOST_BUDGET), "cuda")
        assert len(blocks) == 1  # batch 64 in one block
        memory = blocks[0][1]
        assert memory.gpu_bytes <= parse_bytes(BUDGET)
        print(f"{model}: {policy.describe()} reserves {memory.gpu_bytes / 2**30:.2f} GiB on the "
              f"device, {memory.cpu_bytes / 2**30:.2f} GiB on the host")
