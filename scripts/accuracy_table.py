"""Markdown table: teacher-forced perplexity of every KV sparsity method x sparsity.

    python scripts/accuracy_table.py [--text FILE] [--context 1024] [--segments 2]

Every method and sparsity runs as row blocks of one batch next to dense (``flexalisa.eval``), so
the weights are read once per step for all of them. At s = 0 every method's budget covers all
tokens, so each equals dense by construction (tested for SWA in tests/unit/test_eval.py); the
s = 0 column reports dense unless ``--sparsities`` lists 0 explicitly. Each cell is
``ppl (+x% vs dense, top-1 agreement)``. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flexalisa.attention import SparsityMethod, make_method
from flexalisa.eval import DEFAULT_TEXT, MethodScore, read_text, score_methods, text_segments
from flexalisa.models import load_model


@dataclass(frozen=True)
class Variant:
    label: str  # the table's row label
    name: str  # method name
    per_kv_head: bool = False  # select per KV head
    query_channels: int = 0  # SWA's query-aware selection channels (0 = off)

    def method(self, sparsity: float) -> SparsityMethod:
        return make_method(self.name, sparsity, self.per_kv_head, self.query_channels)


def variants(query_channels: int) -> list[Variant]:
    return [
        Variant("swa (ALISA, per layer)", "swa"),
        Variant("swa per KV head", "swa", per_kv_head=True),
        Variant(f"swa query-aware (r={query_channels}, per KV head)", "swa", per_kv_head=True,
                query_channels=query_channels),
        Variant("h2o", "h2o"),
        Variant("sinks", "sinks"),
        Variant("local", "local"),
        Variant("strided", "strided"),
    ]


def cell(score: MethodScore, dense: MethodScore) -> str:
    change = 100.0 * (score.ppl / dense.ppl - 1.0)
    return f"{score.ppl:.2f} ({change:+.1f}%, {100 * score.top1_agreement:.1f}%)"


def render(rows: dict[str, dict[float, MethodScore]], dense: MethodScore,
           sparsities: list[float]) -> str:
    columns = sorted(set(sparsities) | {0.0})
    lines = ["| method | " + " | ".join(f"s={s:g}" for s in columns) + " |",
             "|---" * (len(columns) + 1) + "|",
             "| dense | " + " | ".join(f"{dense.ppl:.2f}" for _ in columns) + " |"]
    for label, by_s in rows.items():
        cells = [cell(by_s.get(s, dense), dense) for s in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF dir or .gguf (default: embedded SmolLM2)")
    p.add_argument("--text", type=Path, default=None, help="UTF-8 text (default: pydoc topics)")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--prefill", type=int, default=64)
    p.add_argument("--segments", type=int, default=2)
    p.add_argument("--sparsities", default="0.5,0.8,0.9")
    p.add_argument("--query-channels", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--jsonl", type=Path, default=None, help="also write one record per cell")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    weights, tok = load_model(args.model)
    ids = text_segments(read_text(args.text), tok, args.segments, args.context)
    cells = [(v, s) for v in variants(args.query_channels) for s in sparsities]
    started = time.perf_counter()
    dense, scores = score_methods(weights, [v.method(s) for v, s in cells], ids, args.prefill)
    elapsed = time.perf_counter() - started
    rows: dict[str, dict[float, MethodScore]] = {}
    for (variant, sparsity), score in zip(cells, scores):
        rows.setdefault(variant.label, {})[sparsity] = score
    text = str(args.text) if args.text else DEFAULT_TEXT
    print(f"{weights.spec.name}, {text}: {args.segments} segments x {args.context} tokens, "
          f"{args.prefill}-token dense prefill, {dense.num_tokens} evaluated tokens; "
          f"cell = ppl (+% vs dense, top-1 agreement with dense); {elapsed:.0f} s\n")
    print(render(rows, dense, sparsities))
    if args.jsonl:
        with args.jsonl.open("w") as f:
            for (variant, sparsity), score in zip(cells, scores):
                f.write(json.dumps({"method": variant.label, "sparsity": sparsity,
                                    "ppl": score.ppl, "dense_ppl": dense.ppl,
                                    "top1_agreement": score.top1_agreement,
                                    "num_tokens": score.num_tokens, "text": text}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
