"""`flexalisa bench`: synthetic throughput runs at exact prompt and generation lengths.

Prompts are random token ids of exactly `prompt_len` tokens; every row generates exactly
`gen_len` tokens (EOS ignored). One short warm-up run (gen_len 2) precedes `repeat` timed runs;
the result is the median of each FlexGen throughput, with min and max, as one JSON object.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

import torch

from flexalisa.attention import native
from flexalisa.errors import FlexalisaError
from flexalisa.models.weights import ModelWeights
from flexalisa.report import RunStats, summarize_runs, timing_stats


@dataclass(frozen=True)
class BenchConfig:
    model: str  # preset name (dummy weights), HF dir or .gguf
    prompt_len: int  # exact prompt tokens per row
    gen_len: int  # exact generated tokens per row
    batch: int  # prompts per run
    repeat: int = 3  # timed runs; the median is reported
    device: str = "cpu"  # "cpu" or "cuda"
    dummy_weights: bool = False  # random weights with the checkpoint's shapes
    sparsity_method: str = "dense"  # attention method (see flexalisa.attention)
    sparsity: float = 0.0  # KV sparsity for the method
    seed: int = 0  # prompt ids and dummy weights

    def __post_init__(self) -> None:
        for name in ("prompt_len", "gen_len", "batch", "repeat"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, "
                                 f"got {getattr(self, name)}")


def load_bench_weights(cfg: BenchConfig) -> ModelWeights:
    """Real weights from a path, or dummy weights for a preset name or with --dummy-weights."""
    from pathlib import Path

    from cost_model.presets import MODEL_ALIASES, MODEL_PRESETS
    from flexalisa.engine import default_dtype, resolve_device
    from flexalisa.models import load_model
    from flexalisa.models.dummy import dummy_weights

    dtype = default_dtype(resolve_device(cfg.device))  # the host holds no wider copy
    name = MODEL_ALIASES.get(cfg.model, cfg.model)
    if name in MODEL_PRESETS:
        return dummy_weights(MODEL_PRESETS[name], seed=cfg.seed, dtype=dtype)
    if not Path(cfg.model).exists():
        raise FlexalisaError(f"--model {cfg.model!r} is neither a path nor a preset "
                             f"({', '.join(sorted(MODEL_PRESETS))})")
    weights, _ = load_model(cfg.model, dtype)
    return dummy_weights(weights.spec, seed=cfg.seed, dtype=dtype) if cfg.dummy_weights else weights


def synthetic_prompts(vocab_size: int, batch: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch, length), generator=gen).tolist()


def run_timings(res) -> dict:
    """One GenerationResult's timings and counters, as ``summarize_timings`` reads them."""
    return {"prefill_s": res.prefill_s, "decode_s": res.decode_s, "extras": res.extras}


def summarize_timings(runs: list[dict], batch: int, prompt_len: int, gen_len: int) -> dict:
    """The workload and the median / min / max FlexGen throughputs of timed runs
    (``run_timings`` or peers' ``time_hf`` dicts) of ``batch`` rows at exact lengths."""
    row = {"batch": batch, "prompt_len": prompt_len, "gen_len": gen_len, "repeat": len(runs)}
    row.update(summarize_runs([timing_stats(batch, prompt_len, gen_len, r["prefill_s"],
                                            r["decode_s"]) for r in runs]))
    return row


def run_bench(cfg: BenchConfig, generator) -> dict:
    """`generator(prompts, gen_len) -> GenerationResult`; returns the JSON-ready result."""
    spec = generator.spec
    if cfg.prompt_len + cfg.gen_len > spec.max_seq_len:
        raise FlexalisaError(f"prompt_len + gen_len = {cfg.prompt_len + cfg.gen_len} exceeds "
                             f"the model's context of {spec.max_seq_len}")
    prompts = synthetic_prompts(spec.vocab_size, cfg.batch, cfg.prompt_len, cfg.seed)
    generator.generate(prompts, 2, ignore_eos=True)  # warm-up: allocator, caches, threads
    runs = []
    for i in range(cfg.repeat):
        res = generator.generate(prompts, cfg.gen_len, ignore_eos=True)
        stats = RunStats()
        stats.add(len(prompts), res.num_prompt_tokens, sum(len(t) for t in res.tokens),
                  res.prefill_s, res.decode_s)
        runs.append(stats)
        print(f"run {i + 1}/{cfg.repeat}: {stats.summary_line()}", file=sys.stderr)
    result = {k: v for k, v in asdict(cfg).items()}
    result["model_name"] = spec.name
    result.update(summarize_runs(runs))
    result["extras"] = res.extras
    result["decode_attention"] = native.describe(cfg.device)
    return result
