"""Predicted ALISA / FlexGen throughput ratios for the paper's setups, as a markdown table.

ALISA (Zhao et al., ISCA 2024) reports 1.4-3.0x over FlexGen at batch 4-64, prompt 128, gen 512,
80% sparsity, 20 GB/s PCIe. This runs the policy search twice per row:

* FlexGen: dense attention, static split (p1 = 0), no recompute tier, best over all
  (gpu_batch_size, num_gpu_batches) splits of the batch and CPU attention on/off;
* ALISA: SWA at the given sparsity, three phases, recompute allowed, same splits.

Both use the same hardware profile and no compression unless ``--kv-compression`` is given.
Usage: ``python scripts/paper_compare.py [--batches 4,8,16,32,64] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from cost_model.hardware import HardwareProfile
from cost_model.presets import MODEL_PRESETS
from cost_model.units import parse_bytes
from policy import SearchSpace, search

SETUPS = (("opt-13b", "v100-32g"), ("opt-30b", "h100-80g"))
PAPER_BAND = (1.4, 3.0)


def _row(model: str, hw: HardwareProfile, batch: int, args: argparse.Namespace) -> dict:
    spec = MODEL_PRESETS[model]
    common = dict(batch_sizes=(batch,), kv_compressions=tuple(args.kv_compression.split(",")))
    flexgen = search(spec, hw, args.prompt_len, args.gen_len,
                     SearchSpace(style="flexgen", **common))
    alisa = search(spec, hw, args.prompt_len, args.gen_len,
                   SearchSpace(style="alisa", sparsity_methods=("swa",),
                               sparsities=(args.sparsity,), **common))
    f, a = flexgen.prediction, alisa.prediction
    return {"model": model, "hardware": hw.name, "batch": batch,
            "flexgen_tok_per_s": f.total_tok_per_s, "alisa_tok_per_s": a.total_tok_per_s,
            "ratio": a.total_tok_per_s / f.total_tok_per_s,
            "flexgen_policy": flexgen.policy.describe(), "alisa_policy": alisa.policy.describe()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="4,8,16,32,64")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=512)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--link-bw", type=parse_bytes, default=parse_bytes("20GB"),
                        help="host<->device bytes per second each way (paper: 20 GB/s)")
    parser.add_argument("--kv-compression", default="none", help="e.g. none or none,int8")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    for model, preset in SETUPS:
        hw = HardwareProfile.load(preset).replace(h2d_bytes_per_s=float(args.link_bw),
                                                  d2h_bytes_per_s=float(args.link_bw))
        for batch in (int(b) for b in args.batches.split(",")):
            start = time.perf_counter()
            rows.append(_row(model, hw, batch, args))
            print(f"{model} {preset} batch {batch}: {time.perf_counter() - start:.1f}s",
                  file=sys.stderr)
    print(f"| model | GPU | batch | FlexGen tok/s | ALISA tok/s | ALISA/FlexGen | in "
          f"{PAPER_BAND[0]}-{PAPER_BAND[1]}x | FlexGen policy | ALISA policy |")
    print("|---|---|---:|---:|---:|---:|---|---|---|")
    for r in rows:
        inside = PAPER_BAND[0] <= r["ratio"] <= PAPER_BAND[1]
        print(f"| {r['model']} | {r['hardware']} | {r['batch']} | {r['flexgen_tok_per_s']:.1f} "
              f"| {r['alisa_tok_per_s']:.1f} | {r['ratio']:.2f}x | {'yes' if inside else 'no'} "
              f"| `{r['flexgen_policy']}` | `{r['alisa_policy']}` |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
