"""The benchmark suite: every figure of the README's Results section, from one run on one machine.

    python scripts/bench_suite.py [--out results] [--smoke] [--model PATH] [--hardware HW.json]

Sections (each a list of rows in results/bench_suite.json, a table in results/bench_suite.md):
  1. dense_vs_hf      flexalisa's engine vs HF transformers `generate`, same model and workload
  2. sparse_vs_dense  SWA at sparsity 0.5 / 0.8 / 0.9 vs dense on the engine, prompt 128/512/1024
  3. alisa_vs_flexgen the cost model's best ALISA policy vs its best FlexGen-style policy (dense,
                      static split, no recompute) under the same device budget, on the offloading
                      runner, at several batch sizes (gen 16), and at one longer generation
                      (labels "... gen256"), where SWA reads 20% of a context up to 384
                      tokens; with the cost model's predictions
  4. roofline         each row's matmul FLOP/s over the measured profile's best GEMM rate
Plots (results/*.png): throughput vs batch per policy, predicted vs measured, and the time
breakdown / KV memory of the last ALISA run. Every throughput is a median of 3 runs after a
warm-up, with min and max (engine vs HF: 5 runs, alternating between the two sides so that they
share the machine's drift). `--smoke` shrinks every size so the whole suite runs in ~1 minute.
The hardware profile the searches and rooflines used is written to results/hardware.json;
`--hardware results/hardware.json` reruns the suite with the same policies.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from cost_model import HardwareProfile
from cost_model.profiling import cpu_description
from flexalisa.attention import make_method, native
from flexalisa.bench import run_timings, summarize_timings, synthetic_prompts
from flexalisa.engine import Engine
from flexalisa.errors import FlexalisaError
from flexalisa.models import default_model_path, load_model
from flexalisa.peers import load_hf_model, time_hf, workload_flops
from flexalisa.placement import fitting_search
from flexalisa.plots import render_all
from flexalisa.report import kv_memory_per_step, runtime_sections
from policy import SearchSpace

# gpu_mem: the CPU stand-in's device budget. SmolLM2's tied lm_head takes a second, oneDNN-packed
# copy there (flexalisa.models.linear), so 448 MiB leaves about what 320 MiB left before it.
FULL = dict(hf=(32, 128, 64), sparse_prompts=(128, 512, 1024), sparse_batch=4, sparse_gen=16,
            sparsities=(0.5, 0.8, 0.9), offload_batches=(4, 8, 16), offload_prompt=128,
            offload_gen=16, offload_long=(16, 256), gpu_mem=448 * 2**20, repeat=3,
            hf_repeat=5)
SECTIONS = ("dense_vs_hf", "sparse_vs_dense", "alisa_vs_flexgen")
SMOKE = dict(hf=(2, 16, 4), sparse_prompts=(16, 32), sparse_batch=2, sparse_gen=4,
             sparsities=(0.5, 0.8), offload_batches=(2, 4), offload_prompt=16, offload_gen=4,
             offload_long=(2, 8), gpu_mem=None, repeat=1, hf_repeat=1)


def timed(fn, repeat: int, warmup=None) -> list[dict]:
    """`fn()` -> GenerationResult, `repeat` times after a warm-up (`warmup()`, or `fn()`
    itself); per-run timings."""
    (warmup or fn)()
    return [run_timings(fn()) for _ in range(repeat)]


def with_roofline(row: dict, spec, peak_flops: float, attended_share: float = 1.0) -> dict:
    flops = workload_flops(spec, row["batch"], row["prompt_len"], row["gen_len"], attended_share)
    row["roofline_fraction"] = flops / row["elapsed_s"] / peak_flops
    return row


def dense_vs_hf(model_path, weights, sizes: dict, peak: float) -> list[dict]:
    batch, prompt_len, gen_len = sizes["hf"]
    prompts = synthetic_prompts(weights.spec.vocab_size, batch, prompt_len, seed=0)
    engine, hf = Engine(weights), load_hf_model(model_path)
    ours, theirs = [], []
    engine.generate(prompts, 2, ignore_eos=True)  # warm-ups
    time_hf(hf, prompts, 2)
    for _ in range(sizes["hf_repeat"]):  # alternating, so both sides share the machine's drift
        ours.append(run_timings(engine.generate(prompts, gen_len, ignore_eos=True)))
        theirs.append(time_hf(hf, prompts, gen_len))
    shape = (batch, prompt_len, gen_len)
    rows = [with_roofline({"label": "flexalisa", **summarize_timings(ours, *shape)},
                          weights.spec, peak),
            with_roofline({"label": "hf-transformers", **summarize_timings(theirs, *shape)},
                          weights.spec, peak)]
    rows[0]["ratio_vs_hf"] = rows[0]["total_tok_s"] / rows[1]["total_tok_s"]
    return rows


def sparse_vs_dense(weights, sizes: dict, peak: float) -> list[dict]:
    rows = []
    batch, gen_len = sizes["sparse_batch"], sizes["sparse_gen"]
    shared = Engine(weights).weights  # prepared (packed) once, shared by every engine below
    for prompt_len in sizes["sparse_prompts"]:
        prompts = synthetic_prompts(weights.spec.vocab_size, batch, prompt_len, seed=1)
        dense_tok_s = None
        for sparsity in (0.0, *sizes["sparsities"]):
            method = make_method("swa", sparsity) if sparsity else None
            engine = Engine(shared, method=method)
            runs = timed(lambda e=engine, p=prompts: e.generate(p, gen_len, ignore_eos=True),
                         sizes["repeat"])
            row = {"label": f"swa@{sparsity}" if sparsity else "dense",
                   **summarize_timings(runs, batch, prompt_len, gen_len)}
            dense_tok_s = dense_tok_s or row["decode_tok_s"]
            row["decode_speedup_vs_dense"] = row["decode_tok_s"] / dense_tok_s
            rows.append(with_roofline(row, weights.spec, peak, 1 - sparsity))
    return rows


def alisa_vs_flexgen(weights, sizes: dict, hw: HardwareProfile) -> tuple[list[dict], dict]:
    rows, last_report = [], {}
    prompt_len = sizes["offload_prompt"]
    spaces = {"flexgen": SearchSpace(style="flexgen"),
              "alisa": SearchSpace(style="alisa", sparsity_methods=("swa",), sparsities=(0.8,))}
    long_batch, long_gen = sizes["offload_long"]
    workloads = [(batch, sizes["offload_gen"], "") for batch in sizes["offload_batches"]]
    workloads.append((long_batch, long_gen, f" gen{long_gen}"))
    for batch, gen_len, suffix in workloads:
        prompts = synthetic_prompts(weights.spec.vocab_size, batch, prompt_len, seed=2)
        for style, space in spaces.items():
            space = SearchSpace(**{**space.__dict__, "batch_sizes": (batch,)})
            result, runner, _ = fitting_search(weights, hw, prompts, [gen_len] * batch, space,
                                               gpu_mem_bytes=hw.gpu_mem_bytes)
            runs = timed(lambda r=runner, p=prompts, g=gen_len: r.generate(p, g, ignore_eos=True),
                         sizes["repeat"],  # a long run warms up on a short one
                         warmup=lambda r=runner, p=prompts: r.generate(p, 4, ignore_eos=True))
            runner.close()
            label = style + suffix
            row = {"label": label, **summarize_timings(runs, batch, prompt_len, gen_len),
                   "policy": result.policy.describe(),
                   "predicted_total_tok_s": result.prediction.total_tok_per_s}
            rows.append(row)
            print(f"  {label} batch {batch}: {row['total_tok_s']:.1f} tok/s "
                  f"(predicted {row['predicted_total_tok_s']:.1f})", file=sys.stderr)
            if style == "alisa":
                last_report = runtime_sections(runs[-1]["extras"], result.policy,
                                               result.prediction, row["total_tok_s"])
                extras = runs[-1]["extras"]
                last_report["memory_per_step"] = kv_memory_per_step(
                    weights.spec, result.policy, prompt_len, gen_len, batch,
                    extras["phase2_start_step"], extras["phase3_start_step"])
    return rows, last_report


def markdown(results: dict) -> str:
    lines = ["# flexalisa benchmark suite", "", f"- machine: {results['machine']}",
             f"- command: `{results['command']}`", f"- wall time: {results['wall_s']:.0f} s",
             f"- decode attention: {results.get('decode_attention', 'not recorded')}",
             "- throughputs: FlexGen's definitions, median of the repeats (min-max)", ""]
    for section in ("dense_vs_hf", "sparse_vs_dense", "alisa_vs_flexgen"):
        rows = results.get(section, [])
        if not rows:
            continue
        lines += [f"## {section}", "",
                  "| run | batch | prompt | gen | total tok/s | decode tok/s | extra |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            extra = {k: r[k] for k in ("ratio_vs_hf", "decode_speedup_vs_dense",
                                       "predicted_total_tok_s", "roofline_fraction") if k in r}
            extra_text = ", ".join(f"{k}={v:.3g}" for k, v in extra.items())
            lines.append(
                f"| {r['label']} | {r['batch']} | {r['prompt_len']} | {r['gen_len']} | "
                f"{r['total_tok_s']:.1f} ({r['total_tok_s_min']:.1f}-{r['total_tok_s_max']:.1f})"
                f" | {r['decode_tok_s']:.1f} | {extra_text} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--model", default=None, help="HF dir or .gguf (default: embedded SmolLM2)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, ~1 minute")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--hardware", default=None,
                   help="a saved profile (e.g. a previous run's results/hardware.json) instead "
                        "of measuring one; fixes the policies the searches pick")
    args = p.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    started = time.perf_counter()
    sections = args.sections.split(",")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    try:  # bad input: one line, before anything is measured or written
        hw = HardwareProfile.load(args.hardware) if args.hardware else None
        model_path = args.model or default_model_path()
        weights, _ = load_model(model_path)
    except (ValueError, FlexalisaError) as exc:
        print(f"bench_suite: error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if hw is not None:  # a saved profile: the searches pick the same policies as in its run
        if sizes["gpu_mem"] is not None:
            hw = hw.with_memory(sizes["gpu_mem"])
    else:
        print("measuring this machine's profile...", file=sys.stderr)
        hw = HardwareProfile.measure(gpu_mem_bytes=sizes["gpu_mem"],
                                     budget_s=5 if args.smoke else 15)
    hw.save(args.out / "hardware.json")
    peak = hw.gpu_gemm_flops_per_s  # measured best GEMM rate of the stand-in device (CPU)
    results: dict = {"machine": f"{platform.machine()} {cpu_description()}, "
                                f"{torch.get_num_threads()} threads, torch {torch.__version__}",
                     "command": "python scripts/bench_suite.py " + " ".join(argv or sys.argv[1:]),
                     "model": str(model_path), "gemm_peak_flops": peak,
                     "decode_attention": native.describe("cpu")}

    def save() -> None:  # after every section, so a failure later keeps what was measured
        results["wall_s"] = time.perf_counter() - started
        (args.out / "bench_suite.json").write_text(json.dumps(results, indent=2) + "\n")

    if "dense_vs_hf" in sections:
        print("section 1: dense vs HF transformers", file=sys.stderr)
        results["dense_vs_hf"] = dense_vs_hf(model_path, weights, sizes, peak)
        save()
    if "sparse_vs_dense" in sections:
        print("section 2: SWA vs dense", file=sys.stderr)
        results["sparse_vs_dense"] = sparse_vs_dense(weights, sizes, peak)
        save()
    report: dict = {}
    if "alisa_vs_flexgen" in sections:
        print("section 3: ALISA vs FlexGen-style policy under one budget", file=sys.stderr)
        results["alisa_vs_flexgen"], report = alisa_vs_flexgen(weights, sizes, hw)
    save()
    (args.out / "bench_suite.md").write_text(markdown(results))
    written, _ = render_all({**report, "runs": results.get("alisa_vs_flexgen", [])}, args.out)
    print(markdown(results))
    print("wrote " + ", ".join(str(p) for p in [args.out / "bench_suite.json", *written]),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
