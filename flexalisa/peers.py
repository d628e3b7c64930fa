"""Peers measured in the same run as flexalisa: HF transformers `generate` on the same model
and workload, and the machine's fp32 GEMM roofline.

HF is timed with every row forced to the full length (EOS ignored); its prefill time is a
`generate` with max_new_tokens=1 and its decode time the rest of a full run.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from cost_model.spec import ModelSpec


def load_hf_model(path: str | Path):
    """transformers' own fp32 load of an HF dir or a GGUF file (the parity reference)."""
    import transformers

    path = Path(path)
    if path.suffix == ".gguf":
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def time_hf(model, prompts: list[list[int]], gen_len: int) -> dict:
    """{"prefill_s", "decode_s"} of HF `generate` on equal-length prompts."""
    ids = torch.tensor(prompts)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None,
                  pad_token_id=0)
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=gen_len, min_new_tokens=gen_len, **kwargs)
        t2 = time.perf_counter()
    assert out.shape[1] == ids.shape[1] + gen_len
    prefill = t1 - t0
    return {"prefill_s": prefill, "decode_s": max(t2 - t1 - prefill, 1e-9)}


def workload_flops(spec: ModelSpec, batch: int, prompt_len: int, gen_len: int,
                   attended_share: float = 1.0) -> float:
    """Matmul FLOPs of a run: 2 x layer parameters per token, attention QK^T and PV over the
    attended tokens (`attended_share` of the cache in decode), and the lm_head once per prompt
    in prefill plus once per decode token."""
    layer = 2 * spec.layer_numel * spec.num_layers
    lm_head = 2 * spec.vocab_size * spec.embed_dim
    per_key = 4 * spec.num_heads * spec.head_dim * spec.num_layers  # QK^T + PV, per (q, k)
    prefill = batch * (prompt_len * layer + per_key * prompt_len * (prompt_len + 1) / 2 + lm_head)
    decode = 0.0
    for n in range(prompt_len + 1, prompt_len + gen_len):
        decode += batch * (layer + per_key * n * attended_share + lm_head)
    return prefill + decode


def gemm_peak_flops(size: int = 1024, repeat: int = 5) -> float:
    """Best observed fp32 GEMM rate of this machine with torch's current threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best
