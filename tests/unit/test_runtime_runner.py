"""The runner's generate contract against the Engine: several blocks, ragged rows, EOS and
per-row limits, sampling; INT4 weights; an out-of-memory retry that loses nothing."""

from __future__ import annotations

import pytest
import torch

from flexalisa.engine import Engine
from flexalisa.models import load_model
from flexalisa.runtime import EXTRAS_KEYS, OffloadRunner
from flexalisa.runtime.loop import BlockLoop
from flexalisa.runtime.weights import WeightLayout, WeightStore
from flexalisa.sampling import SamplingParams
from tests.conftest import make_prompts
from tests.parity.test_runtime_dense import engine_logits, make_policy, runner_logits


@pytest.fixture(scope="module")
def llama(tiny_models):
    return load_model(tiny_models["llama"][0])[0]


def test_many_blocks_eos_limits_and_sampling_match_the_engine(llama):
    # the tiny model's EOS is id 2: make it likely by generating long, and mix row limits
    prompts = make_prompts(11, 12, seed=4)
    limits = [5, 30, 17, 30, 1, 30, 30, 9, 30, 30, 22]
    policy = make_policy("kv_30_50_20", 2, True, False, gpu_batch_size=2)
    runner = OffloadRunner(llama, policy)
    hot = SamplingParams(temperature=0.9, top_p=0.9, seed=3)
    mixed = [hot if i % 3 else SamplingParams(seed=i) for i in range(len(prompts))]  # per row
    for sampling in (SamplingParams(), hot, mixed):
        keys = [f"id{i}" for i in range(len(prompts))]
        want = Engine(llama).generate(prompts, limits, sampling=sampling, row_keys=keys)
        counted: list[int] = []
        got = runner.generate(prompts, limits, sampling=sampling, row_keys=keys,
                              on_tokens=counted.append)
        assert got.tokens == want.tokens and got.finish_reasons == want.finish_reasons
        assert sum(counted) == sum(len(t) for t in got.tokens)
        assert got.extras["num_blocks"] == 3  # 11 rows in blocks of 2 x 2
        assert got.num_prompt_tokens == want.num_prompt_tokens
    assert set(EXTRAS_KEYS) <= set(got.extras)
    runner.close()


def test_int4_weights_are_streamed_compressed_and_stay_close(llama):
    prompts = make_prompts(3, 16, seed=6)
    ref_tokens, ref_logits = engine_logits(llama, prompts, 4)
    policy = make_policy("weights_half_cpu", 1, True, False, gpu_batch_size=4,
                         weight_compression="int4")
    runner = OffloadRunner(llama, policy)
    result, logits = runner_logits(runner, prompts, 4)
    runner.close()
    dense_layer = sum(t.numel() * 4 for t in llama.layers[-1].values())
    streamed = result.extras["bytes"]["weight_h2d"]
    layout = WeightLayout.from_share(0.5, llama.spec.num_layers, compressed=True)
    num_streamed = llama.spec.num_layers - layout.num_resident_layers
    assert 0 < streamed < 0.25 * dense_layer * num_streamed * 4  # INT4 codes, not fp32
    err = (logits[:, 0] - ref_logits[:, 0]).abs().max().item()
    assert 0 < err < 0.5  # lossy but close (prefill logits; random tiny weights)


def test_weight_store_double_buffers_streamed_layers(llama):
    from flexalisa.runtime import make_device

    device = make_device("cpu")
    layout = WeightLayout.from_share(0.34, llama.spec.num_layers, compressed=False)
    store = WeightStore(llama, layout, device, torch.float32)
    assert layout.num_resident_layers == 1 and store.is_streamed(2)
    layer, moved = store.load(2)
    assert moved == llama.layer_bytes(2)
    # on CPU fp32 the copy into the device pool is the oneDNN packing of the matrices
    assert all(torch.equal(t.to_dense() if t.is_mkldnn else t, llama.layers[2][k])
               for k, t in layer.items())
    assert layer["wqkv"].is_mkldnn == store.packed
    assert store.load(0)[1] == 0  # resident: nothing copied

    def dense(t):
        return t.to_dense() if t.is_mkldnn else t

    # CPU: two reused working buffers. With both held, a third load gets a fresh copy; a
    # released buffer is refilled in place by the next load, with the new layer's values.
    other, _ = store.load(1)
    third, _ = store.load(2)
    assert all(third[k] is not layer[k] and third[k] is not other[k] for k in layer)
    store.release(layer)
    store.release(third)  # not a buffer: nothing to free
    again, _ = store.load(1)
    assert all(again[k] is layer[k] for k in layer)
    assert all(torch.equal(dense(t), llama.layers[1][k]) for k, t in again.items())
    assert all(torch.equal(dense(t), llama.layers[1][k]) for k, t in other.items())
    device.close()


def test_out_of_memory_in_a_block_retries_with_half_the_gpu_batch(llama, monkeypatch):
    prompts = make_prompts(8, 12, seed=9)
    want = Engine(llama).generate(prompts, 10, ignore_eos=True)
    original = BlockLoop.run
    failures = []

    def flaky(self, ops):
        if self.batches[0].prompt_ids.shape[0] == 4:  # the first attempt's gpu batch
            failures.append(1)
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return original(self, ops)

    monkeypatch.setattr(BlockLoop, "run", flaky)
    runner = OffloadRunner(llama, make_policy("kv_all_cpu", 2, True, False, gpu_batch_size=4))
    got = runner.generate(prompts, 10, ignore_eos=True)
    runner.close()
    assert failures == [1]
    assert got.tokens == want.tokens and got.extras["oom_retries"] == 1
    assert got.extras["num_blocks"] == 2  # the 8 rows, rerun as two blocks of 2 x 2
