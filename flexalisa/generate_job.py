"""`flexalisa generate`: a resumable JSONL batch job on the Python API's ``LLM`` (api.py;
the file contract: jobs.py)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from flexalisa.api import LLM, check_stops
from flexalisa.attention import SparsityMethod, native
from flexalisa.errors import FlexalisaError, JobInputError
from flexalisa.jobs import (
    append_results,
    check_writable,
    read_prompts,
    repair_and_read_done,
)
from flexalisa.placement import PlacementRequest
from flexalisa.report import RunStats, runtime_sections, write_report
from flexalisa.sampling import SamplingParams

REFILL_GROUP = 4  # batches per group the Engine refills its rows from (see run_generate)


@dataclass(frozen=True)
class GenerateConfig:
    model: str | None  # HF dir or .gguf; None = the embedded SmolLM2
    input: Path  # prompts JSONL
    output: Path  # results JSONL (appended)
    gen_len: int = 64  # default max_new_tokens per prompt
    batch_size: int | None = None  # prompts per batch; None: auto (flexalisa/batch_size.py)
    device: str = "cpu"  # "cpu" or "cuda"
    sampling: SamplingParams = SamplingParams()  # greedy unless temperature > 0
    ignore_eos: bool = False  # always generate the full length (benchmarks)
    stop: tuple[str, ...] = ()  # stop strings for lines that set none
    method: SparsityMethod | None = None  # KV sparsity (flexalisa.attention); None = dense
    chat: bool = False  # wrap each prompt in the model's chat template as a user turn
    placement: PlacementRequest = PlacementRequest()  # policy / budgets: offloading runner
    refill: bool | None = None  # refill rows that end (continuous batching); None: on CUDA

    def __post_init__(self) -> None:
        if self.gen_len < 1:
            raise ValueError(f"--gen-len must be >= 1, got {self.gen_len}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        check_stops(self.stop)


def run_generate(cfg: GenerateConfig, command: str = "") -> RunStats:
    records = read_prompts(cfg.input)  # validate input before the slow model load
    if cfg.output.resolve() == cfg.input.resolve():
        raise JobInputError("--output must differ from --input")
    check_writable(cfg.output)
    done = repair_and_read_done(cfg.output)
    if all(r.key in done for r in records):  # before the model load, the search, the report
        print(f"nothing to do: all {len(records)} ids are already in {cfg.output} "
              f"(its report.json is left as it was)", file=sys.stderr)
        return RunStats()
    llm = LLM.from_parts(cfg.model, cfg.device, cfg.method, cfg.placement, cfg.batch_size,
                         cfg.refill)
    token_lists = llm.encode([r.prompt for r in records], cfg.chat,
                             [f"line {r.line_no}: prompt of id {r.id!r}" for r in records])
    limits = [r.max_new_tokens or cfg.gen_len for r in records]
    engine, policy, prediction = llm.prepare(llm.workload(token_lists, limits))
    choice = llm.batch_choice()
    if choice.reason != "batch_size":
        print(choice.describe(), file=sys.stderr)
    # the Engine refills finished rows from the rest of a group of REFILL_GROUP batches; the
    # group is the unit of output and of resume (a group is rerun whole, so that its rows see
    # the same batches as in an uninterrupted run)
    batches, max_batch = llm.plan_runs(engine, token_lists, REFILL_GROUP)
    pending = [b for b in batches if any(records[i].key not in done for i in b)]
    budget = sum(limits[i] for b in pending for i in b)
    skipped = sum(1 for r in records if r.key in done)
    if skipped:
        print(f"resuming: {skipped} of {len(records)} ids already in {cfg.output}",
              file=sys.stderr)
    try:
        cfg.output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FlexalisaError(f"--output {str(cfg.output)!r}: {exc.strerror}") from None
    started = time.perf_counter()
    try:
        with tqdm(total=budget, unit="tok", desc="generate", file=sys.stderr,
                  dynamic_ncols=True, disable=None) as bar:
            for batch in pending:
                completions = llm.run_batch(
                    engine, [token_lists[i] for i in batch], [limits[i] for i in batch],
                    [records[i].key for i in batch],
                    [records[i].sampling_params(cfg.sampling) for i in batch], cfg.ignore_eos,
                    bar.update,
                    [cfg.stop if records[i].stop is None else records[i].stop for i in batch],
                    max_batch)
                # rows already done were recomputed only so their batch-mates see the same batch
                append_results(cfg.output, [
                    {"id": records[i].id, "text": c.text, "prompt_tokens": c.prompt_tokens,
                     "completion_tokens": c.completion_tokens, "finish_reason": c.finish_reason}
                    for i, c in zip(batch, completions) if records[i].key not in done])
                done.update(records[i].key for i in batch)
    finally:
        llm.close()
    stats = llm.stats
    stats.extras["wall_s"] = time.perf_counter() - started
    print(stats.summary_line(), file=sys.stderr)
    report = {"command": command, "model": llm.weights.spec.name, "device": cfg.device,
              "ids_already_done": skipped, "batch_size": choice.size,
              "batch_size_source": choice.reason,
              "decode_attention": native.describe(cfg.device), "stats": stats.to_dict(),
              **runtime_sections(stats.extras.get("runtime"), policy, prediction,
                                 stats.total_tok_s)}
    write_report(cfg.output.resolve().parent, report)
    return stats
