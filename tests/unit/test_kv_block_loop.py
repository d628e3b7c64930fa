"""The two building blocks together: a toy model run op by op from the block schedule through
per-(layer, batch) tiered stores gives exactly the outputs of an all-in-memory run."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from flexalisa.kv import KVStoreConfig, TieredKVStore
from flexalisa.schedule import (
    BlockShape,
    OpKind,
    TierPlan,
    TierPlanConfig,
    block_schedule,
    plan_tiers,
)

BATCH, HEADS, DIM, LAYERS = 2, 2, 4, 2  # per GPU batch; hidden = HEADS * DIM


def project_kv(layer_idx: int, hidden: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
    """Toy K/V projection + position term, elementwise so recomputation is bit-exact."""
    heads = hidden.view(hidden.shape[0], hidden.shape[1], HEADS, DIM).transpose(1, 2)
    position = slots[:, None, :, None].float()  # (B, 1, m, 1)
    scale = 1.0 + 0.1 * layer_idx
    return heads * scale + position * 0.01, heads * -scale + torch.cos(position)


def attend(layer_idx: int, hidden: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """hidden (B, T, hidden) attends causally to k, v (B, H, S, D) whose last T are its own."""
    num_new, num_keys = hidden.shape[1], k.shape[2]
    q = hidden.view(hidden.shape[0], num_new, HEADS, DIM).transpose(1, 2) * 0.5  # (B, H, T, D)
    scores = q @ k.transpose(-1, -2)  # (B, H, T, S)
    causal = torch.ones(num_new, num_keys, dtype=torch.bool).tril(num_keys - num_new)
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return hidden + (probs @ v).transpose(1, 2).reshape(hidden.shape)  # (B, T, hidden)


def reference(prompts: list[Tensor], gen_len: int) -> list[list[Tensor]]:
    """outputs[batch][step]: the last layer's output, with every K,V kept in memory."""
    outputs = []
    for hidden in prompts:
        cache: list[tuple[Tensor, Tensor] | None] = [None] * LAYERS
        per_step = []
        for _ in range(gen_len):
            start = 0 if cache[0] is None else cache[0][0].shape[2]
            slots = torch.arange(start, start + hidden.shape[1]).expand(BATCH, -1)
            for layer_idx in range(LAYERS):
                k_new, v_new = project_kv(layer_idx, hidden, slots)
                old = cache[layer_idx]
                k = k_new if old is None else torch.cat([old[0], k_new], 2)
                v = v_new if old is None else torch.cat([old[1], v_new], 2)
                cache[layer_idx] = (k, v)
                hidden = attend(layer_idx, hidden, k, v)
            per_step.append(hidden)
            hidden = torch.tanh(hidden[:, -1:])  # the next step's input
        outputs.append(per_step)
    return outputs


def run_block(prompts: list[Tensor], plan: TierPlan, overlap: bool) -> list[list[Tensor]]:
    shape = BlockShape(len(plan.steps), LAYERS, len(prompts))
    config = KVStoreConfig.for_plan(plan, batch_size=BATCH, num_kv_heads=HEADS, head_dim=DIM,
                                    hidden_size=HEADS * DIM, group_size=2)
    stores = {(j, b): TieredKVStore(config, "cpu") for j in range(LAYERS)
              for b in range(len(prompts))}
    layer_out: dict[tuple[int, int, int], Tensor] = {}
    live: dict[str, dict] = {"fetched": {}, "input": {}, "new_kv": {}, "output": {}}
    outputs: list[list[Tensor]] = [[] for _ in prompts]
    for op in block_schedule(shape, overlap):
        i, j, b = op.step_idx, op.layer_idx, op.batch_idx
        store = stores.get((j, b)) if b is not None else None
        if op.kind is OpKind.LOAD_KV:
            old = torch.arange(plan.steps[i - 1].num_tokens).expand(BATCH, -1)  # dense selection
            live["fetched"][(i, j, b)] = (old, store.fetch(old))
        elif op.kind is OpKind.LOAD_HIDDEN:
            source = (layer_out.pop((i, j - 1, b)) if j else prompts[b] if i == 0
                      else torch.tanh(layer_out.pop((i - 1, LAYERS - 1, b))[:, -1:]))
            live["input"][(i, j, b)] = source
        elif op.kind is OpKind.COMPUTE:
            hidden = live["input"].pop((i, j, b))
            start = plan.steps[i - 1].num_tokens if i else 0
            slots = torch.arange(start, start + hidden.shape[1]).expand(BATCH, -1)
            k_new, v_new = project_kv(j, hidden, slots)
            k, v = k_new, v_new
            if i:
                old, fetched = live["fetched"].pop((i, j, b))
                recompute = lambda h, s, j=j: project_kv(j, h, s)  # noqa: E731
                k_old, v_old = store.gather(old, recompute, fetched=fetched)
                k, v = torch.cat([k_old, k_new], 2), torch.cat([v_old, v_new], 2)
            live["new_kv"][(i, j, b)] = (k_new, v_new, hidden)
            live["output"][(i, j, b)] = attend(j, hidden, k, v)
        elif op.kind is OpKind.STORE_KV:
            store.commit(plan.steps[i], *live["new_kv"].pop((i, j, b)))
            store.check_integrity()
        elif op.kind is OpKind.STORE_HIDDEN:
            out = live["output"].pop((i, j, b))
            layer_out[(i, j, b)] = out
            if j == LAYERS - 1:
                outputs[b].append(out)
    assert not any(live.values())
    counters = [store.counters for store in stores.values()]
    assert all(c.tokens_fetched and c.tokens_recomputed and c.h2d_bytes for c in counters)
    return outputs


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("num_gpu_batches", [1, 3])
def test_three_phase_tiered_run_matches_in_memory_run(overlap: bool, num_gpu_batches: int) -> None:
    plan = plan_tiers(TierPlanConfig(6, 9, 0.3, 0.5, 0.2, phase2_start_step=3,
                                     phase3_start_step=6))
    assert isinstance(plan, TierPlan)
    assert {step.phase for step in plan.steps} == {1, 2, 3}
    generator = torch.Generator().manual_seed(num_gpu_batches)
    prompts = [torch.randn(BATCH, 6, HEADS * DIM, generator=generator)
               for _ in range(num_gpu_batches)]
    got, want = run_block(prompts, plan, overlap), reference(prompts, 9)
    for got_batch, want_batch in zip(got, want, strict=True):
        assert len(got_batch) == 9
        assert all(torch.equal(g, w) for g, w in zip(got_batch, want_batch, strict=True))
