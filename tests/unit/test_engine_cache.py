"""The engine's KVCache.keep_rows: dropping finished rows keeps exactly the kept rows' filled
slots, in place (no new buffers) when the rows come in ascending order; and generation whose
rows finish at different steps gives each row what it gives alone."""

from __future__ import annotations

import pytest
import torch

from flexalisa.cache import KVCache
from flexalisa.engine import Engine
from flexalisa.models import load_model
from tests.conftest import make_prompts, make_spec


@pytest.mark.parametrize("keep", [[0, 2, 3, 5], [1, 4], [0, 1, 2, 3, 4, 5], [5, 0, 3]])
def test_keep_rows_keeps_the_kept_rows_filled_slots(keep):
    spec = make_spec()
    cache = KVCache(spec, 6, 10, torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(0)
    for t in cache.keys + cache.values:
        t.copy_(torch.randn(t.shape, generator=gen))
    cache.valid[:, :7] = torch.rand(6, 7, generator=gen) > 0.3
    cache.length = 7
    before = [t[keep, :, :7].clone() for t in cache.keys + cache.values]
    valid = cache.valid[keep].clone()
    pointers = [t.data_ptr() for t in cache.keys + cache.values]
    cache.keep_rows(torch.tensor(keep))
    after = cache.keys + cache.values
    assert all(t.shape[0] == len(keep) for t in after)
    assert all(torch.equal(t[:, :, :7], want) for t, want in zip(after, before))
    assert torch.equal(cache.valid, valid)
    in_place = [t.data_ptr() for t in after] == pointers
    assert in_place == (keep == sorted(keep))


def test_rows_that_finish_early_generate_as_they_do_alone(tiny_models):
    weights, _ = load_model(tiny_models["llama"][0])
    engine, prompts = Engine(weights), make_prompts(5, 12, seed=3)
    limits = [3, 9, 1, 6, 9]  # rows drop out after steps 1, 3 and 6
    together = engine.generate(prompts, limits, ignore_eos=True).tokens
    alone = [engine.generate([p], n, ignore_eos=True).tokens[0] for p, n in zip(prompts, limits)]
    assert together == alone
