"""The compiled decode attention (`flexalisa.attention.native`) inside the engine vs HF
transformers (dense) and vs torch's ops (SWA), on tiny random-init checkpoints whose head dims
it is built for (the shared tiny models have 8- and 16-channel heads, which it leaves to
torch): OPT (MHA, one query head per KV head) and LLaMA with MQA (four query heads on one KV
head), 32 channels per head."""

from __future__ import annotations

import pytest
import torch

from flexalisa.attention import make_method, native
from flexalisa.cache import KVCache
from flexalisa.engine import Engine, left_pad, positions_of
from flexalisa.models import load_model
from flexalisa.runtime import OffloadRunner
from tests.conftest import make_prompts
from tests.parity.test_runtime_dense import make_policy

CONFIGS = {
    "opt_d32": dict(model_type="opt", vocab_size=320, hidden_size=64, num_hidden_layers=2,
                    ffn_dim=128, num_attention_heads=2, max_position_embeddings=128,
                    do_layer_norm_before=True, word_embed_proj_dim=64),
    "llama_mqa_d32": dict(model_type="llama", vocab_size=320, hidden_size=128,
                          num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
                          num_key_value_heads=1, max_position_embeddings=256,
                          rope_theta=10000.0, tie_word_embeddings=False),
}


@pytest.fixture(scope="module")
def kernel_models(tmp_path_factory) -> dict:
    transformers = pytest.importorskip("transformers")
    out = {}
    for kind, raw in CONFIGS.items():
        cfg = dict(raw)
        model_type = cfg.pop("model_type")
        torch.manual_seed(0)
        model = (transformers.OPTForCausalLM(transformers.OPTConfig(**cfg)) if model_type == "opt"
                 else transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)))
        model.eval()
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path)
        out[kind] = (path, model)
    return out


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_decode_through_the_kernel_matches_hf(kernel_models, kind):
    """A decode step's logits within 1e-4 of HF's full forward at that position, and 32 greedy
    tokens identical to `generate`, for left-padded rows of different lengths."""
    if not native.status().available:
        pytest.skip(native.status().reason)
    path, hf = kernel_models[kind]
    weights, _ = load_model(path)
    spec = weights.spec
    assert spec.head_dim in native.HEAD_DIMS
    engine = Engine(weights)
    prompts = make_prompts(3, 16, seed=5)
    ids, valid = left_pad(prompts, pad_id=1)  # (B, T)

    cache = KVCache(spec, ids.shape[0], ids.shape[1] + 1, engine.device, engine.dtype)
    first = engine.prefill(cache, ids, valid).argmax(-1)  # (B,)
    ours = engine.decode_step(cache, first, positions_of(valid)[:, -1] + 1)  # (B, V)
    with torch.no_grad():
        ref = hf(input_ids=torch.cat([ids, first[:, None]], dim=1),
                 attention_mask=torch.cat([valid, torch.ones_like(valid[:, :1])], 1).long()
                 ).logits[:, -1]
    assert (ours - ref).abs().max().item() <= 1e-4

    res = engine.generate(prompts, 32, ignore_eos=True)
    with torch.no_grad():
        gen = hf.generate(input_ids=ids, attention_mask=valid.long(), max_new_tokens=32,
                          do_sample=False, eos_token_id=None, pad_token_id=1)
    assert res.tokens == gen[:, ids.shape[1]:].tolist()


def swa_decode(weights, prompts: list[list[int]], num_new: int) -> tuple[list, torch.Tensor]:
    """Greedy tokens (B, N) and logits (B, N, V) of the Engine with SWA at 0.5, step by step."""
    engine = Engine(weights, method=make_method("swa", 0.5))
    ids, valid = left_pad(prompts, pad_id=1)
    max_len = ids.shape[1] + num_new
    cache = KVCache(weights.spec, len(prompts), max_len, engine.device, engine.dtype)
    state = engine.new_method_state(len(prompts), max_len)
    logits = engine.prefill(cache, ids, valid, state)
    positions = valid.sum(1)
    steps = [logits]
    for _ in range(num_new - 1):
        logits = engine.decode_step(cache, logits.argmax(-1), positions, state)
        positions = positions + 1
        steps.append(logits)
    stacked = torch.stack(steps, 1)
    return stacked.argmax(-1).tolist(), stacked


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_sparse_decode_through_the_kernel_matches_torch(kernel_models, kind, monkeypatch):
    """SWA at 0.5 with the kernel attending each selection where it lies in the cache (no
    gathered copy) vs torch's ops (gather, then softmax and matmul), the eager reference:
    logits within 1e-4 and the same 32 greedy tokens. The offloading runner with every stored
    token in the CPU tier, attended in place there by the same kernel, gives those tokens."""
    if not native.status().available:
        pytest.skip(native.status().reason)
    weights, _ = load_model(kernel_models[kind][0])
    prompts = make_prompts(3, 40, seed=7)
    kernel_calls = {"indexed": 0}
    kernel = native.decode_attention

    def counting(*args, **kwargs):
        kernel_calls["indexed"] += kwargs.get("indices", args[7] if len(args) > 7 else None
                                              ) is not None
        return kernel(*args, **kwargs)

    monkeypatch.setattr(native, "decode_attention", counting)
    tokens, logits = swa_decode(weights, prompts, 32)
    assert kernel_calls["indexed"] == weights.spec.num_layers * 31
    policy = make_policy("kv_all_cpu", 1, True, True, gpu_batch_size=3, sparsity_method="swa",
                         sparsity=0.5)
    runner = OffloadRunner(weights, policy, check_integrity=True)
    try:
        assert runner.generate(prompts, 32, ignore_eos=True).tokens == tokens
    finally:
        runner.close()
    assert kernel_calls["indexed"] == 2 * weights.spec.num_layers * 31

    monkeypatch.setattr(native, "decode_attention", lambda *args, **kwargs: None)
    ref_tokens, ref_logits = swa_decode(weights, prompts, 32)
    assert (logits - ref_logits).abs().max().item() <= 1e-4
    assert tokens == ref_tokens
