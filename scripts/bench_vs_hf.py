"""Our engine vs HF transformers `generate` on the same model and workload, in one process.

    python scripts/bench_vs_hf.py [--model PATH] [--batch 32 --prompt-len 128 --gen-len 64]
                                  [--repeat 3]

Both run fp32 on the same device with every row forced to the full generation length (EOS
ignored), on the same random prompt ids. Each side gets one warm-up run, then `--repeat` timed
runs; medians are reported (min/max alongside). HF's prefill time is measured as `generate` with
max_new_tokens=1, and its decode time as the rest. The roofline is the workload's matmul FLOPs
over this machine's measured fp32 GEMM peak. Prints one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from flexalisa.engine import Engine
from flexalisa.models import load_model
from flexalisa.models.loader import default_model_path


def workload_flops(spec, batch: int, prompt_len: int, gen_len: int) -> float:
    """Matmul FLOPs of a run: 2 * params per token through the layers, attention QK and PV,
    and the lm_head once per prefill row plus once per decode token."""
    layer = 2 * spec.layer_numel
    lm_head = 2 * spec.vocab_size * spec.hidden_size
    total = 0.0
    for n in range(prompt_len, prompt_len + gen_len):
        tokens = prompt_len if n == prompt_len else 1
        attn = 4 * spec.num_heads * spec.head_dim * (n if tokens == 1 else n * n / 2)
        total += batch * (tokens * spec.num_layers * layer + spec.num_layers * attn + lm_head)
    return total


def gemm_peak_flops(size: int = 1024, repeat: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def time_ours(engine: Engine, prompts, gen_len: int) -> dict:
    res = engine.generate(prompts, gen_len, ignore_eos=True)
    tokens = sum(len(t) for t in res.tokens)
    assert tokens == len(prompts) * gen_len
    return {"prefill_s": res.prefill_s, "decode_s": res.decode_s}


def time_hf(model, ids: torch.Tensor, gen_len: int) -> dict:
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=gen_len, min_new_tokens=gen_len, **kwargs)
        t2 = time.perf_counter()
    assert out.shape[1] == ids.shape[1] + gen_len
    prefill = t1 - t0
    return {"prefill_s": prefill, "decode_s": max(t2 - t1 - prefill, 1e-9)}


def summarize(runs: list[dict], batch: int, prompt_len: int, gen_len: int) -> dict:
    totals = [batch * gen_len / (r["prefill_s"] + r["decode_s"]) for r in runs]
    return {
        "total_tok_s": statistics.median(totals),
        "total_tok_s_min": min(totals), "total_tok_s_max": max(totals),
        "prefill_tok_s": statistics.median(batch * prompt_len / r["prefill_s"] for r in runs),
        "decode_tok_s": statistics.median(batch * (gen_len - 1) / r["decode_s"] for r in runs),
        "elapsed_s": statistics.median(r["prefill_s"] + r["decode_s"] for r in runs),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF dir or .gguf (default: embedded SmolLM2)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    import transformers

    path = default_model_path() if args.model is None else args.model
    weights, _ = load_model(path)
    spec = weights.spec
    if str(path).endswith(".gguf"):
        from pathlib import Path

        path = Path(path)
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32)
    else:
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf.eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, spec.vocab_size, (args.batch, args.prompt_len), generator=gen)
    prompts = ids.tolist()
    engine = Engine(weights)
    shape = (args.batch, args.prompt_len, args.gen_len)
    ours, theirs = [], []
    for i in range(args.repeat + 1):  # run 0 is the warm-up; sides alternate to share noise
        o, h = time_ours(engine, prompts, args.gen_len), time_hf(hf, ids, args.gen_len)
        print(f"run {i}: ours {o}, hf {h}", file=sys.stderr)
        if i:
            ours.append(o)
            theirs.append(h)
    flops = workload_flops(spec, *shape)
    peak = gemm_peak_flops()
    ours_s, hf_s = summarize(ours, *shape), summarize(theirs, *shape)
    result = {
        "model": spec.name.rsplit("/", 1)[-1], "batch": args.batch, "prompt_len": args.prompt_len,
        "gen_len": args.gen_len, "repeat": args.repeat, "threads": torch.get_num_threads(),
        "flexalisa": ours_s, "hf": hf_s,
        "ratio_total": ours_s["total_tok_s"] / hf_s["total_tok_s"],
        "ratio_prefill": ours_s["prefill_tok_s"] / hf_s["prefill_tok_s"],
        "ratio_decode": ours_s["decode_tok_s"] / hf_s["decode_tok_s"],
        "gemm_peak_gflops": peak / 1e9,
        "roofline_fraction_flexalisa": flops / ours_s["elapsed_s"] / peak,
        "roofline_fraction_hf": flops / hf_s["elapsed_s"] / peak,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
