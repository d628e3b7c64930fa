"""Continuous batching in the Engine (`generate(..., max_batch=B)`): prompts that wait take the
place of rows that finish, and every prompt gets the tokens it gets alone; the cache's
`shift` and `put_rows` move and place KV slots exactly."""

from __future__ import annotations

import pytest
import torch

from flexalisa.attention import make_method
from flexalisa.cache import KVCache
from flexalisa.engine import Engine
from flexalisa.models import load_model
from flexalisa.sampling import SamplingParams
from tests.conftest import make_prompts, make_spec

CPU = torch.device("cpu")


def filled_cache(batch: int, max_len: int, length: int, seed: int = 0) -> KVCache:
    cache = KVCache(make_spec(), batch, max_len, CPU, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    for t in cache.keys + cache.values:
        t.copy_(torch.randn(t.shape, generator=gen))
    cache.valid[:, :length] = torch.rand(batch, length, generator=gen) > 0.3
    cache.length = length
    return cache


@pytest.mark.parametrize("delta", [-3, 4, 0])
def test_shift_moves_every_rows_held_slots(delta):
    cache = filled_cache(3, 16, 10)
    cache.valid[:, :3] = False  # slots 0-2 hold only padding: the span is [3, 10)
    cache.valid[0, 3] = True
    before = [t[:, :, 3:10].clone() for t in cache.keys + cache.values]
    valid = cache.valid[:, 3:10].clone()
    cache.shift(delta)
    assert cache.length == 10 + delta
    assert all(torch.equal(t[:, :, 3 + delta:10 + delta], want)
               for t, want in zip(cache.keys + cache.values, before))
    assert torch.equal(cache.valid[:, 3 + delta:10 + delta], valid)
    assert int(cache.valid.sum()) == int(valid.sum())  # nothing else is marked held
    with pytest.raises(ValueError, match="cannot shift"):
        cache.shift(-(3 + delta) - 1)  # the span would start before slot 0
    with pytest.raises(ValueError, match="cannot shift"):
        cache.shift(16 - cache.length + 1)  # or end past the capacity


def test_put_rows_right_aligns_another_caches_slots():
    cache, other = filled_cache(4, 12, 9), filled_cache(2, 5, 5, seed=1)
    untouched = [t[[0, 2]].clone() for t in cache.keys + cache.values]
    cache.put_rows(torch.tensor([3, 1]), other)
    for t, src in zip(cache.keys + cache.values, other.keys + other.values):
        assert torch.equal(t[[3, 1], :, 4:9], src)
    assert torch.equal(cache.valid[[3, 1], 4:9], other.valid)
    assert not cache.valid[[3, 1], :4].any()
    assert all(torch.equal(t[[0, 2]], want)
               for t, want in zip(cache.keys + cache.values, untouched))
    with pytest.raises(ValueError, match="shift first"):
        cache.put_rows(torch.tensor([0]), filled_cache(1, 10, 10))


def test_a_shift_past_the_old_length_leaves_no_unwritten_slot_below_length():
    """Fresh cache memory can hold NaN, which SDPA turns into NaN output even where masked:
    a move right by more than the held span must not leave [old length, new start) unwritten
    (the CI failure of 17e5186, random queue seed 2)."""
    cache = filled_cache(2, 24, 6)
    for t in cache.keys + cache.values:
        t[:, :, 6:].fill_(float("nan"))  # never written
    cache.valid[:, :4] = False
    cache.valid[:, 4:6] = True  # the held span is [4, 6)
    cache.shift(10)  # to [14, 16): slots [6, 14) were never written
    assert cache.length == 16
    assert all(torch.isfinite(t[:, :, :cache.length]).all() for t in cache.keys + cache.values)


@pytest.fixture(scope="module")
def engine(tiny_models):
    return Engine(load_model(tiny_models["llama"][0])[0])


def spy_shifts(monkeypatch) -> list[int]:
    deltas, real = [], KVCache.shift

    def shift(self, delta):
        deltas.append(delta)
        real(self, delta)

    monkeypatch.setattr(KVCache, "shift", shift)
    return deltas


@pytest.mark.parametrize("max_batch", [1, 2, 3, 5])
def test_refilled_rows_generate_what_they_generate_alone(engine, monkeypatch, max_batch):
    """Prompts of ragged lengths in no particular order, limits from 1 to 20, and rows that
    end early on a stop condition: every prompt's tokens and finish reason are what it gets on
    its own, with the cache shifted both ways on the way."""
    prompts = make_prompts(11, 14, seed=5)
    prompts[4] = prompts[4] * 3  # longer than the first batch's prompts: room made on the left
    limits = [20, 3, 1, 17, 8, 20, 2, 12, 20, 5, 9]

    def stop_when(row, tokens):  # rows 1, 6 and 9 also end on a token, whichever comes first
        return row in (1, 6, 9) and tokens[-1] % 3 == 0

    deltas = spy_shifts(monkeypatch)
    got = engine.generate(prompts, limits, ignore_eos=True, stop_when=stop_when,
                          max_batch=max_batch)
    if max_batch in (1, 3):  # these runs make room on the left and drop padding slots
        assert any(d > 0 for d in deltas) and any(d < 0 for d in deltas)
    for i, (p, n) in enumerate(zip(prompts, limits)):
        alone = engine.generate([p], n, ignore_eos=True,
                                stop_when=lambda row, tokens, i=i: stop_when(i, tokens))
        assert got.tokens[i] == alone.tokens[0], f"prompt {i}"
        assert got.finish_reasons[i] == alone.finish_reasons[0]
    assert got.num_prompt_tokens == sum(map(len, prompts))
    assert got.prefill_s > 0 and got.decode_s > 0


def test_refilled_rows_sample_as_in_one_batch(engine):
    """Sampling is seeded per row key, so refilling changes no row's draws."""
    prompts, keys = make_prompts(7, 10, seed=2), [f"k{i}" for i in range(7)]
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=4)
    together = engine.generate(prompts, 12, params, ignore_eos=True, row_keys=keys)
    refilled = engine.generate(prompts, 12, params, ignore_eos=True, row_keys=keys, max_batch=3)
    assert refilled.tokens == together.tokens


def test_a_sparsity_method_runs_consecutive_batches(tiny_models):
    weights = load_model(tiny_models["llama"][0])[0]
    engine = Engine(weights, method=make_method("swa", sparsity=0.5))
    prompts = make_prompts(5, 12, seed=7)
    got = engine.generate(prompts, 6, ignore_eos=True, max_batch=2)
    want = [t for s in (0, 2, 4) for t in engine.generate(prompts[s:s + 2], 6,
                                                          ignore_eos=True).tokens]
    assert got.tokens == want


@pytest.mark.parametrize("seed", range(6))
def test_random_queues_refill_without_running_out_of_room(engine, seed):
    """Random prompt lengths (1-40 tokens, in random order), limits (1-24) and stops, at 1-4
    rows: the cache always makes room (shift raises where it cannot), and every prompt gets
    its tokens alone."""
    import random

    rng = random.Random(seed)
    prompts = [p[:rng.randint(1, 40)] for p in make_prompts(10, 40, seed=seed, ragged=False)]
    limits = [rng.randint(1, 24) for _ in prompts]
    stop_tokens = rng.sample(range(3, 320), 30)

    def stop_when(row, tokens):
        return row % 2 == 0 and tokens[-1] in stop_tokens

    got = engine.generate(prompts, limits, ignore_eos=True, stop_when=stop_when,
                          max_batch=rng.randint(1, 4))
    for i, (p, n) in enumerate(zip(prompts, limits)):
        alone = engine.generate([p], n, ignore_eos=True,
                                stop_when=lambda row, tokens, i=i: stop_when(i, tokens))
        assert got.tokens[i] == alone.tokens[0], f"prompt {i}"


def test_rows_are_refilled_on_cuda_by_default_and_where_asked(tiny_chat_model, engine):
    from flexalisa import LLM
    from flexalisa.errors import FlexalisaError

    on_cuda = Engine.__new__(Engine)  # only its device is read
    on_cuda.device = torch.device("cuda")
    default, on, off = (LLM(tiny_chat_model, refill=r) for r in (None, True, False))
    assert default.refills(on_cuda) and not default.refills(engine)  # engine: on the CPU
    assert on.refills(on_cuda) and on.refills(engine)
    assert not off.refills(on_cuda) and not off.refills(engine)
    assert not on.refills(object())  # the offloading runner
    sparse = LLM(tiny_chat_model, sparsity=0.5)
    assert not sparse.refills(on_cuda)  # a method runs consecutive batches
    for bad in ({"sparsity": 0.5}, {"gpu_mem": "1GB"}, {"auto_policy": True}):
        with pytest.raises(FlexalisaError, match="needs the all-on-device engine"):
            LLM(tiny_chat_model, refill=True, **bad)


def test_llm_generate_refilled_gives_the_fixed_batches_completions(tiny_chat_model):
    from flexalisa import LLM

    prompts = [f"Entry {i}: the value is" for i in range(7)]
    limits = [2, 9, 4, 9, 1, 6, 3]
    fixed = LLM(tiny_chat_model, batch_size=2, refill=False)
    refilled = LLM(tiny_chat_model, batch_size=2, refill=True)
    want = fixed.generate(prompts, limits, ignore_eos=True)
    got = refilled.generate(prompts, limits, ignore_eos=True)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [len(c.token_ids) for c in got] == limits
    assert refilled.stats.num_prompts == fixed.stats.num_prompts == 7
