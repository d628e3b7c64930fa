"""`flexalisa generate`: a resumable JSONL batch job on the engine (contract: jobs.py)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from flexalisa.attention import SparsityMethod
from flexalisa.errors import FlexalisaError, JobInputError
from flexalisa.jobs import (
    PromptRecord,
    append_results,
    plan_batches,
    read_prompts,
    repair_and_read_done,
)
from flexalisa.models import Tokenizer, load_model
from flexalisa.placement import PlacementRequest, Workload, make_generator
from flexalisa.report import RunStats, merge_extras, runtime_sections, write_report
from flexalisa.sampling import SamplingParams


@dataclass(frozen=True)
class GenerateConfig:
    model: str | None  # HF dir or .gguf; None = the embedded SmolLM2
    input: Path  # prompts JSONL
    output: Path  # results JSONL (appended)
    gen_len: int = 64  # default max_new_tokens per prompt
    batch_size: int = 16  # prompts per engine batch
    device: str = "cpu"  # "cpu" or "cuda"
    sampling: SamplingParams = SamplingParams()  # greedy unless temperature > 0
    ignore_eos: bool = False  # always generate the full length (benchmarks)
    method: SparsityMethod | None = None  # KV sparsity (flexalisa.attention); None = dense
    chat: bool = False  # wrap each prompt in the model's chat template as a user turn
    placement: PlacementRequest = PlacementRequest()  # policy / budgets: offloading runner

    def __post_init__(self) -> None:
        if self.gen_len < 1:
            raise ValueError(f"--gen-len must be >= 1, got {self.gen_len}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")


def _tokenize(records: list[PromptRecord], tok: Tokenizer, max_seq_len: int,
              chat: bool) -> list[list[int]]:
    texts = [tok.apply_chat_template(r.prompt) if chat else r.prompt for r in records]
    token_lists = tok.encode_batch(texts)
    for rec, ids in zip(records, token_lists):
        if not ids:
            raise JobInputError(f"line {rec.line_no}: prompt of id {rec.id!r} is empty")
        if len(ids) >= max_seq_len:
            raise JobInputError(
                f"line {rec.line_no}: prompt of id {rec.id!r} has {len(ids)} tokens; the model's "
                f"context is {max_seq_len}, leaving no room to generate")
    return token_lists


def run_generate(cfg: GenerateConfig, command: str = "") -> RunStats:
    records = read_prompts(cfg.input)  # validate input before the slow model load
    if cfg.output.resolve() == cfg.input.resolve():
        raise JobInputError("--output must differ from --input")
    done = repair_and_read_done(cfg.output)
    if all(r.key in done for r in records):  # before the model load, the search, the report
        print(f"nothing to do: all {len(records)} ids are already in {cfg.output} "
              f"(its report.json is left as it was)", file=sys.stderr)
        return RunStats()
    weights, tok = load_model(cfg.model)
    if tok is None:
        raise FlexalisaError(f"{cfg.model}: no tokenizer.json; generate needs a tokenizer")
    token_lists = _tokenize(records, tok, weights.spec.max_seq_len, cfg.chat)
    method = cfg.method
    work = Workload(batch=cfg.batch_size, prompt_len=max(len(t) for t in token_lists),
                    gen_len=max(r.max_new_tokens or cfg.gen_len for r in records),
                    sparsity_method=method.name if method else "dense",
                    sparsity=method.sparsity if method else 0.0)
    engine, policy, prediction = make_generator(cfg.placement, weights, cfg.device, method, work)
    batch_size = policy.batch_size if policy is not None else cfg.batch_size
    batches = list(plan_batches(records, [len(t) for t in token_lists], batch_size))
    pending = [b for b in batches if any(records[i].key not in done for i in b)]
    budget = sum(records[i].max_new_tokens or cfg.gen_len for b in pending for i in b)
    skipped = sum(1 for r in records if r.key in done)
    if skipped:
        print(f"resuming: {skipped} of {len(records)} ids already in {cfg.output}",
              file=sys.stderr)
    stats = RunStats()
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tqdm(total=budget, unit="tok", desc="generate", file=sys.stderr, dynamic_ncols=True,
              disable=None) as bar:
        for batch in pending:
            _run_batch(engine, tok, cfg, records, token_lists, batch, done, stats, bar.update)
    stats.extras["wall_s"] = time.perf_counter() - started
    print(stats.summary_line(), file=sys.stderr)
    report = {"command": command, "model": weights.spec.name, "device": cfg.device,
              "ids_already_done": skipped, "stats": stats.to_dict(),
              **runtime_sections(stats.extras.get("runtime"), policy, prediction,
                                 stats.total_tok_s)}
    write_report(cfg.output.resolve().parent, report)
    return stats


def _run_batch(engine, tok: Tokenizer, cfg: GenerateConfig,
               records: list[PromptRecord], token_lists: list[list[int]], batch: list[int],
               done: set[str], stats: RunStats, progress) -> None:
    result = engine.generate(
        [token_lists[i] for i in batch],
        [records[i].max_new_tokens or cfg.gen_len for i in batch],
        sampling=cfg.sampling, ignore_eos=cfg.ignore_eos,
        row_keys=[records[i].key for i in batch], on_tokens=progress)
    rows = []
    for i, tokens, reason in zip(batch, result.tokens, result.finish_reasons):
        if records[i].key in done:
            continue  # recomputed only so its batch-mates see the same batch
        rows.append({"id": records[i].id, "text": tok.decode(tokens),
                     "prompt_tokens": len(token_lists[i]), "completion_tokens": len(tokens),
                     "finish_reason": reason})
    append_results(cfg.output, rows)
    done.update(records[i].key for i in batch)
    stats.add(len(batch), result.num_prompt_tokens, sum(len(t) for t in result.tokens),
              result.prefill_s, result.decode_s)
    if result.extras:
        stats.extras["runtime"] = merge_extras(stats.extras.get("runtime"), result.extras)
