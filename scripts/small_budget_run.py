"""A run under a small device budget that crosses all three KV phases; prints one JSON line.

    python scripts/small_budget_run.py [--batch 16] [--prompt-len 256] [--gen-len 256]
                                       [--gpu-mem BYTES|SIZE] [--device cpu]

SmolLM2-135M (the embedded GGUF), random prompt ids, greedy, EOS ignored. The policy leaves the
phase starts to the runtime (None): with the default budget the GPU tier holds
``--capacity-tokens`` slots per store, so phase II starts once a sequence outgrows that and
phase III once the phase-II GPU share (1 - kv_cpu_share) of it does. On a CPU-only machine the
budget stands in for GPU memory and every GPU-tier <-> host copy counts as a transfer.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch

from cost_model.units import parse_bytes
from flexalisa.models import load_model
from flexalisa.runtime import BlockShapeInfo, OffloadRunner, gpu_budget_for
from policy.policy import Policy


def small_budget_policy(batch: int) -> Policy:
    return Policy(gpu_batch_size=batch // 2, num_gpu_batches=2,
                  weights_gpu_share=0.8, weights_cpu_share=0.2,
                  kv_gpu_share=0.2, kv_cpu_share=0.4, kv_recompute_share=0.4,
                  phase2_start_step=None, phase3_start_step=None,
                  act_gpu_share=0.5, act_cpu_share=0.5, overlap=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--gen-len", type=int, default=256)
    parser.add_argument("--capacity-tokens", type=int, default=280,
                        help="GPU-tier slots per store the default budget leaves")
    parser.add_argument("--gpu-mem", default=None, help="device budget (default: derived)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    weights, _ = load_model()
    policy = small_budget_policy(args.batch)
    shape = BlockShapeInfo(policy.gpu_batch_size, policy.num_gpu_batches, args.prompt_len,
                           args.gen_len)
    dtype = torch.float32 if args.device == "cpu" else torch.float16
    gpu_mem = (parse_bytes(args.gpu_mem) if args.gpu_mem else
               gpu_budget_for(weights, policy, shape, dtype, args.capacity_tokens))
    rng = random.Random(0)
    prompts = [[rng.randrange(100, weights.spec.vocab_size) for _ in range(args.prompt_len)]
               for _ in range(args.batch)]
    runner = OffloadRunner(weights, policy, device=args.device, gpu_mem_bytes=gpu_mem,
                           dtype=dtype)
    start = time.perf_counter()
    result = runner.generate(prompts, args.gen_len, ignore_eos=True)
    wall_s = time.perf_counter() - start
    runner.close()
    extras = dict(result.extras)
    extras.pop("policy")
    generated = sum(len(t) for t in result.tokens)
    line = {"model": weights.spec.name, "batch": args.batch, "prompt_len": args.prompt_len,
            "gen_len": args.gen_len, "gpu_mem_bytes": gpu_mem, "policy": policy.describe(),
            "wall_s": round(wall_s, 2), "prefill_s": round(result.prefill_s, 2),
            "decode_s": round(result.decode_s, 2),
            "total_tok_per_s": round(generated / (result.prefill_s + result.decode_s), 2),
            **extras}
    print(json.dumps(line))
    crossed = extras["phase_crossed_at_step"]
    ok = (crossed["phase2"] is not None and crossed["phase3"] is not None
          and extras["h2d_bytes"] > 0 and extras["tokens_recomputed"] > 0)
    if not ok:
        print("did not cross all three phases with bytes moved and recomputed", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
