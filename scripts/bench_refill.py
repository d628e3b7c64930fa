"""Continuous batching vs fixed batches on the engine, for a workload whose rows end at
different steps, as chat completions do.

    python scripts/bench_refill.py [--model PATH | --preset opt-1.3b] [--device cpu|cuda]
                                   [--prompts 192]
                                   [--batch 64] [--prompt-len 16:64] [--gen-median 36]
                                   [--gen-max 128] [--repeat 1] [--seed 0]

Each prompt gets random token ids (its length uniform in `--prompt-len`) and its own token
limit, drawn from a log-normal with median `--gen-median`, cut to [4, `--gen-max`]. Every row
runs to its limit (EOS ignored), so both sides do the same work (`same_tokens` says whether
they also chose the same tokens: a row's last bits depend on its batch). `--preset` runs a
cost-model model preset with random weights (FlexGen's dummy weights) instead of a checkpoint,
e.g. on a GPU machine that has none. The prompts
are sorted by length, as `flexalisa generate` sorts a job:
- fixed: consecutive batches of `--batch` prompts, each until its last row ends; rows that
  end leave the batch;
- refilled: one `Engine.generate` call with `max_batch=--batch`, the longest prompts first;
  waiting prompts take the place of rows that end (what jobs do on CUDA or with
  `--refill on`: `LLM.refilling`).

One warm-up of each, then `--repeat` timed runs, alternating. Prints one JSON line with each
side's median wall time and tokens/s (generated tokens over the wall time of the whole run),
the decode steps each ran, the rows per step and the refilled/fixed speedup.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch

from cost_model.presets import MODEL_PRESETS
from cost_model.profiling import cpu_description
from flexalisa.engine import Engine, default_dtype, resolve_device
from flexalisa.models import default_model_path, load_model
from flexalisa.models.dummy import dummy_weights


def workload(vocab: int, prompts: int, lengths: tuple[int, int], gen_median: int,
             gen_max: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """Prompts sorted by length (shortest first) and each one's token limit."""
    rng = random.Random(seed)
    sizes = sorted(rng.randint(*lengths) for _ in range(prompts))
    ids = [[rng.randrange(3, vocab) for _ in range(n)] for n in sizes]
    limits = [max(4, min(gen_max, round(rng.lognormvariate(0.0, 0.8) * gen_median)))
              for _ in ids]
    return ids, limits


class Steps:
    """Counts decode steps and the rows they ran by wrapping ``engine.decode_step``."""

    def __init__(self, engine: Engine) -> None:
        self.steps = self.rows = 0
        inner = engine.decode_step

        def counted(cache, ids, positions, state=None):
            self.steps += 1
            self.rows += ids.shape[0]
            return inner(cache, ids, positions, state)

        engine.decode_step = counted


def fixed(engine: Engine, prompts, limits, batch: int):
    out = []
    for s in range(0, len(prompts), batch):
        out += engine.generate(prompts[s:s + batch], limits[s:s + batch],
                               ignore_eos=True).tokens
    return out


def refilled(engine: Engine, prompts, limits, batch: int):
    order = list(range(len(prompts)))[::-1]  # the longest first, as jobs queue them
    tokens = engine.generate([prompts[i] for i in order], [limits[i] for i in order],
                             ignore_eos=True, max_batch=batch).tokens
    out = [None] * len(prompts)
    for i, t in zip(order, tokens):
        out[i] = t
    return out


def run(engine: Engine, steps: Steps, fn, *args) -> tuple[float, list, int, int]:
    steps.steps = steps.rows = 0
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = fn(engine, *args)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, tokens, steps.steps, steps.rows


def compare(engine: Engine, prompts, limits, batch: int, repeat: int) -> dict:
    steps = Steps(engine)
    sides = {"fixed": fixed, "refilled": refilled}
    times = {name: [] for name in sides}
    counts, outputs = {}, {}
    for i in range(repeat + 1):  # run 0 warms both up
        for name, fn in sides.items():
            wall, tokens, n_steps, n_rows = run(engine, steps, fn, prompts, limits, batch)
            outputs[name], counts[name] = tokens, (n_steps, n_rows)
            print(f"run {i}: {name} {wall:.2f} s, {n_steps} decode steps", file=sys.stderr)
            if i:
                times[name].append(wall)
    generated = sum(limits)
    row = {"same_tokens": sum(a == b for a, b in zip(outputs["fixed"], outputs["refilled"]))
           / len(prompts)}
    for name in sides:
        wall = statistics.median(times[name])
        n_steps, n_rows = counts[name]
        row[name] = {"wall_s": wall, "wall_s_min": min(times[name]),
                     "wall_s_max": max(times[name]), "tok_s": generated / wall,
                     "decode_steps": n_steps, "rows_per_step": n_rows / max(n_steps, 1)}
    row["speedup"] = row["fixed"]["wall_s"] / row["refilled"]["wall_s"]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF dir or .gguf (default: embedded SmolLM2)")
    p.add_argument("--preset", default=None, choices=sorted(MODEL_PRESETS),
                   help="a model shape with random weights instead of --model")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--prompts", type=int, default=192)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", default="16:64", help="LO:HI token lengths (uniform)")
    p.add_argument("--gen-median", type=int, default=36)
    p.add_argument("--gen-max", type=int, default=128)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    lo, _, hi = args.prompt_len.partition(":")
    lengths = (int(lo), int(hi or lo))
    if not 1 <= lengths[0] <= lengths[1] or min(args.prompts, args.batch, args.repeat,
                                                args.gen_median, args.gen_max) < 1:
        p.error("lengths, counts and sizes must be positive, with --prompt-len LO <= HI")
    if args.model and args.preset:
        p.error("give --model or --preset, not both")
    device = resolve_device(args.device)
    if args.preset:
        weights = dummy_weights(MODEL_PRESETS[args.preset], dtype=default_dtype(device))
        name = f"{args.preset} (random weights)"
    else:
        weights, _ = load_model(args.model or default_model_path(), default_dtype(device))
        name = str(args.model or default_model_path()).rsplit("/", 1)[-1]
    engine = Engine(weights, device=args.device)
    prompts, limits = workload(weights.spec.vocab_size, args.prompts, lengths,
                               args.gen_median, args.gen_max, args.seed)
    machine = cpu_description() if args.device == "cpu" else torch.cuda.get_device_name()
    result = {"model": name, "device": args.device, "machine": machine,
              "threads": torch.get_num_threads(),
              "prompts": args.prompts, "batch": args.batch, "prompt_len": list(lengths),
              "generated_tokens": sum(limits), "gen_median": statistics.median(limits),
              "gen_max": max(limits), "repeat": args.repeat,
              **compare(engine, prompts, limits, args.batch, args.repeat)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
