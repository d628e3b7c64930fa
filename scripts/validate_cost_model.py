"""Predicted vs measured throughput of the engine on this machine (cost-model validation).

Runs ``flexalisa.engine.Engine`` (the all-on-device engine, fp32 on CPU; its ``prefill`` and
``decode_step`` with greedy argmax) with the real SmolLM2-135M GGUF on a 6-workload grid, and
compares each run with ``policy.predict`` for the matching policy (all weights, KV and
activations on the device, dense attention, one GPU batch; priced with the profile's per-layer
cost for the engine, ``engine_layer_overhead_s``, where it has one) under a profile measured here
(``python -m cost_model profile``) or loaded with ``--hardware hw.json``.

Prints a table on stderr and one JSON object on stdout, with the median absolute relative error
of total throughput (target <= 15%). The offloading runtime (tiers, phases, delegation) is not
validated by the default grid; ``--runner offload`` runs ``flexalisa.runtime.OffloadRunner``
with three offloading policies instead (wall-clock, since it uses copy threads).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

from cost_model.hardware import HardwareProfile
from cost_model.presets import spec_from_gguf
from cost_model.units import parse_bytes
from policy import Policy, predict

GRID = ((1, 64, 32), (4, 64, 32), (16, 64, 32), (1, 256, 32), (4, 256, 32), (16, 256, 16))
# --runner offload: (gpu batch, num gpu batches, prompt, gen, weights on GPU, KV on CPU, method)
OFFLOAD_GRID = ((4, 2, 64, 16, 0.5, 0.5, "swa"), (4, 2, 64, 16, 1.0, 0.5, "dense"),
                (8, 1, 128, 16, 0.25, 0.75, "swa"))


def device_policy(batch: int) -> Policy:
    """Everything on the device, dense, no phases: what `Engine` does."""
    return Policy(gpu_batch_size=batch, num_gpu_batches=1, weights_gpu_share=1.0,
                  weights_cpu_share=0.0, kv_gpu_share=1.0, kv_cpu_share=0.0,
                  kv_recompute_share=0.0, phase2_start_step=None, phase3_start_step=None,
                  act_gpu_share=1.0, act_cpu_share=0.0, sparsity_method="dense", sparsity=0.0,
                  cpu_attention=False, overlap=True)


def measure(engine, batch: int, prompt_len: int, gen_len: int, vocab: int) -> dict:
    """Greedy generation with the engine's own prefill / decode_step, timed in process CPU time.

    With one torch thread, process time is the work done, however many other jobs share the
    machine (wall time on a busy 2-core box is dominated by waiting for a core).
    """
    import torch

    from flexalisa.cache import KVCache
    from flexalisa.engine import left_pad

    rng = random.Random(batch * 1000 + prompt_len)
    prompts = [[rng.randrange(10, vocab) for _ in range(prompt_len)] for _ in range(batch)]
    ids, valid = left_pad(prompts, 0)
    cache = KVCache(engine.spec, batch, prompt_len + gen_len, engine.device, engine.dtype)
    positions = torch.full((batch,), prompt_len, dtype=torch.long)
    start = time.process_time()
    logits = engine.prefill(cache, ids, valid)
    next_ids = logits.argmax(dim=-1)
    prefill_s = time.process_time() - start
    for _ in range(gen_len - 1):
        logits = engine.decode_step(cache, next_ids, positions)
        next_ids, positions = logits.argmax(dim=-1), positions + 1
    decode_s = time.process_time() - start - prefill_s
    return {"prefill_s": prefill_s, "decode_s": decode_s,
            "prefill_tok_per_s": batch * prompt_len / prefill_s,
            "decode_tok_per_s": batch * (gen_len - 1) / decode_s,
            "total_tok_per_s": batch * gen_len / (prefill_s + decode_s)}


def offload_policy(bs: int, nb: int, wg: float, kv_cpu: float, method: str) -> Policy:
    """A FlexGen-style static split (p1 = p2 = 0) for the offloading runner."""
    return Policy(gpu_batch_size=bs, num_gpu_batches=nb, weights_gpu_share=wg,
                  weights_cpu_share=1.0 - wg, kv_gpu_share=1.0 - kv_cpu, kv_cpu_share=kv_cpu,
                  kv_recompute_share=0.0, phase2_start_step=0, phase3_start_step=0,
                  act_gpu_share=1.0, act_cpu_share=0.0, sparsity_method=method,
                  sparsity=0.0 if method == "dense" else 0.5, cpu_attention=False, overlap=True)


def measure_offload(weights, policy: Policy, prompt_len: int, gen_len: int, vocab: int,
                    gpu_mem: int) -> dict:
    """One OffloadRunner run, its own wall-clock prefill / decode split (it uses copy threads,
    so process time would add the threads up)."""
    from flexalisa.runtime import OffloadRunner

    rng = random.Random(policy.batch_size * 1000 + prompt_len)
    prompts = [[rng.randrange(10, vocab) for _ in range(prompt_len)]
               for _ in range(policy.batch_size)]
    runner = OffloadRunner(weights, policy, device="cpu", gpu_mem_bytes=gpu_mem)
    result = runner.generate(prompts, gen_len, ignore_eos=True)
    b = policy.batch_size
    return {"prefill_s": result.prefill_s, "decode_s": result.decode_s,
            "prefill_tok_per_s": b * prompt_len / result.prefill_s,
            "decode_tok_per_s": b * (gen_len - 1) / result.decode_s,
            "total_tok_per_s": b * gen_len / (result.prefill_s + result.decode_s)}


def _fastest(runs: list[dict], batch: int, prompt_len: int, gen_len: int) -> dict:
    """The fastest prefill and decode over repeated runs (the profile keeps fastest runs too)."""
    prefill_s = min(r["prefill_s"] for r in runs)
    decode_s = min(r["decode_s"] for r in runs)
    return {"prefill_s": prefill_s, "decode_s": decode_s,
            "prefill_tok_per_s": batch * prompt_len / prefill_s,
            "decode_tok_per_s": batch * (gen_len - 1) / decode_s,
            "total_tok_per_s": batch * gen_len / (prefill_s + decode_s)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="cost model: predicted vs measured")
    parser.add_argument("--hardware", default=None, help="profile JSON (default: measure now)")
    parser.add_argument("--gpu-mem", type=parse_bytes, default=parse_bytes("4GiB"))
    parser.add_argument("--model", default=None, help="GGUF path (default: SmolLM2-135M)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per workload; the fastest prefill and decode are kept")
    parser.add_argument("--runner", choices=("engine", "offload"), default="engine",
                        help="engine: all-on-device Engine grid; offload: OffloadRunner with "
                        "offloading policies (wall time)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for profile and engine (default 1: on a shared "
                        "2-core machine more threads stall in OpenMP barriers)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from flexalisa.engine import Engine
    from flexalisa.models.loader import default_model_path, load_model

    torch.manual_seed(0)
    path = args.model or str(default_model_path())
    hw = (HardwareProfile.load(args.hardware).with_memory(args.gpu_mem) if args.hardware
          else HardwareProfile.measure(gpu_mem_bytes=args.gpu_mem, budget_s=10.0,
                                       threads=args.threads))
    spec = spec_from_gguf(path)  # the cost model reads shapes only
    weights, _ = load_model(path)
    engine = Engine(weights, device="cpu")
    measure(engine, 2, 16, 4, spec.vocab_size)  # warm-up: lazy init, allocator, threads
    rows = []
    grid = GRID if args.runner == "engine" else [
        (bs * nb, prompt_len, gen_len, offload_policy(bs, nb, wg, kv, method))
        for bs, nb, prompt_len, gen_len, wg, kv, method in OFFLOAD_GRID]
    for batch, prompt_len, gen_len, *maybe_policy in grid:
        policy = maybe_policy[0] if maybe_policy else device_policy(batch)
        pred = predict(spec, hw, policy, prompt_len, gen_len,
                       runner="offload" if maybe_policy else "engine")
        runs = [measure(engine, batch, prompt_len, gen_len, spec.vocab_size) if not maybe_policy
                else measure_offload(weights, policy, prompt_len, gen_len, spec.vocab_size,
                                     args.gpu_mem)
                for _ in range(max(1, args.repeats))]
        meas = _fastest(runs, batch, prompt_len, gen_len)
        err = pred.total_tok_per_s / meas["total_tok_per_s"] - 1
        rows.append({"batch": batch, "prompt_len": prompt_len, "gen_len": gen_len,
                     "policy": policy.to_dict(),
                     "predicted": {k: getattr(pred, k) for k in meas},
                     "measured": meas, "total_rel_error": err, "fits": pred.fits})
        print(f"b={batch:>3} prompt={prompt_len:>4} gen={gen_len:>3}  "
              f"prefill {pred.prefill_tok_per_s:8.1f} / {meas['prefill_tok_per_s']:8.1f}  "
              f"decode {pred.decode_tok_per_s:7.1f} / {meas['decode_tok_per_s']:7.1f}  "
              f"total {pred.total_tok_per_s:7.1f} / {meas['total_tok_per_s']:7.1f} tok/s "
              f"(predicted / measured)  error {100 * err:+.1f}%", file=sys.stderr)
    median = statistics.median(abs(r["total_rel_error"]) for r in rows)
    print(f"median |error| of total throughput: {100 * median:.1f}% (target <= 15%)",
          file=sys.stderr)
    print(json.dumps({"model": path, "hardware": hw.to_dict(), "rows": rows,
                      "median_abs_total_error": median}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
