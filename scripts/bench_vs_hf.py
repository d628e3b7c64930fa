"""Our engine vs HF transformers `generate` on the same model and workload, in one process.

    python scripts/bench_vs_hf.py [--model PATH] [--batch 32 --prompt-len 128 --gen-len 64]
                                  [--repeat 3]

Both run fp32 on the CPU with every row forced to the full generation length, on the same random
prompt ids. One warm-up run each, then `--repeat` timed runs, alternating sides so they share
the machine's noise; medians are reported with min/max. The roofline fraction is the workload's
matmul FLOPs per second over this machine's best fp32 GEMM rate. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from cost_model.profiling import cpu_description
from flexalisa.attention import native
from flexalisa.bench import run_timings, summarize_timings, synthetic_prompts
from flexalisa.engine import Engine
from flexalisa.models import default_model_path, load_model
from flexalisa.peers import gemm_peak_flops, load_hf_model, time_hf, workload_flops


def compare(model_path, batch: int, prompt_len: int, gen_len: int, repeat: int) -> dict:
    weights, _ = load_model(model_path)
    hf = load_hf_model(model_path)
    prompts = synthetic_prompts(weights.spec.vocab_size, batch, prompt_len, seed=0)
    engine = Engine(weights)
    ours, theirs = [], []
    for i in range(repeat + 1):  # run 0 warms both up
        res = engine.generate(prompts, gen_len, ignore_eos=True)
        assert sum(len(t) for t in res.tokens) == len(prompts) * gen_len
        o, h = run_timings(res), time_hf(hf, prompts, gen_len)
        print(f"run {i}: flexalisa {o} | hf {h}", file=sys.stderr)
        if i:
            ours.append(o)
            theirs.append(h)
    shape = (batch, prompt_len, gen_len)
    flops, peak = workload_flops(weights.spec, *shape), gemm_peak_flops()
    ours_s, hf_s = summarize_timings(ours, *shape), summarize_timings(theirs, *shape)
    return {
        "model": str(model_path).rsplit("/", 1)[-1], "batch": batch, "prompt_len": prompt_len,
        "gen_len": gen_len, "repeat": repeat, "threads": torch.get_num_threads(),
        "machine": cpu_description(),
        "flexalisa": ours_s, "hf": hf_s,
        "ratio_total": ours_s["total_tok_s"] / hf_s["total_tok_s"],
        "ratio_prefill": ours_s["prefill_tok_s"] / hf_s["prefill_tok_s"],
        "ratio_decode": ours_s["decode_tok_s"] / hf_s["decode_tok_s"],
        "decode_attention": native.describe("cpu"),
        "gemm_peak_gflops": peak / 1e9,
        "roofline_fraction_flexalisa": flops / ours_s["elapsed_s"] / peak,
        "roofline_fraction_hf": flops / hf_s["elapsed_s"] / peak,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF dir or .gguf (default: embedded SmolLM2)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    model = args.model or default_model_path()
    print(json.dumps(compare(model, args.batch, args.prompt_len, args.gen_len, args.repeat)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
