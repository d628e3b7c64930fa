"""``python -m policy search``: pick a policy, print its prediction, write ``policy.json``.

stdout: one JSON object (workload, hardware, and per style: policy + prediction).
stderr: the chosen policy and a per-phase table; with ``--compare flexgen,alisa`` both side by
side. Exit codes: 0 ok, 1 no policy fits, 2 bad arguments or unreadable inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, NoReturn

from cost_model.hardware import HardwareProfile
from cost_model.presets import load_model_spec
from cost_model.spec import ModelSpec
from cost_model.units import format_bytes, parse_bytes
from policy.policy import KV_COMPRESSIONS, SPARSITY_METHODS, WEIGHT_COMPRESSIONS
from policy.predict import PHASE_NAMES, Prediction
from policy.searcher import InfeasibleError, SearchResult, SearchSpace, search

DEFAULT_COMPARE_SPARSITY = 0.8  # ALISA's headline setting, used by --compare without --sparsity


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        self.exit(2, f"error: {message}\n")


def _csv(kind: type, choices: tuple[str, ...] | None = None):
    def parse(text: str) -> tuple:
        items = tuple(kind(x.strip()) for x in text.split(",") if x.strip())
        bad = [x for x in items if choices is not None and x not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list"
                                             + (f" of {choices}" if choices else ""))
        return items
    return parse


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m policy", description="Offloading policy search.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("search", help="find the best policy for a model, hardware and workload")
    p.add_argument("--model", required=True, help="preset (opt-30b), HF dir, spec JSON or GGUF")
    p.add_argument("--hardware", required=True,
                   help="preset (t4-16g, a100-40g...), hw.json, or local (measure now)")
    p.add_argument("--prompt-len", type=int, required=True, help="tokens per prompt")
    p.add_argument("--gen-len", type=int, required=True, help="tokens generated per prompt")
    p.add_argument("--batch", type=_csv(int), default=None,
                   help="effective batch size(s), comma list (default: search the grid)")
    p.add_argument("--gpu-mem", type=parse_bytes, default=None, help="GPU memory, e.g. 16GiB")
    p.add_argument("--cpu-mem", type=parse_bytes, default=None, help="CPU memory, e.g. 200GB")
    p.add_argument("--link-bw", type=parse_bytes, default=None,
                   help="host<->device bandwidth per second each way, e.g. 20GB")
    p.add_argument("--sparsity-method", type=_csv(str, SPARSITY_METHODS), default=("dense",),
                   help="method(s) to try, comma list (default dense)")
    p.add_argument("--sparsity", type=_csv(float), default=None,
                   help="sparsity ratio(s) in (0, 1) for sparse methods, comma list")
    p.add_argument("--kv-compression", type=_csv(str, KV_COMPRESSIONS), default=("none",))
    p.add_argument("--weight-compression", type=_csv(str, WEIGHT_COMPRESSIONS), default=("none",))
    p.add_argument("--cpu-attention", choices=("auto", "on", "off"), default="auto",
                   help="delegate CPU-tier attention to the CPU (auto: try both)")
    p.add_argument("--style", choices=("alisa", "flexgen"), default="alisa",
                   help="alisa: phases + recompute; flexgen: static split, no recompute")
    p.add_argument("--compare", type=_csv(str, ("flexgen", "alisa")), default=None,
                   help="flexgen,alisa: best of each style side by side")
    p.add_argument("--out", default=None, help="write the (first) chosen policy JSON here")
    return parser


def _space(args: argparse.Namespace, style: str) -> SearchSpace:
    methods, sparsities = args.sparsity_method, args.sparsity or (0.0,)
    if style == "flexgen":
        methods, sparsities = ("dense",), (0.0,)
    elif args.compare and methods == ("dense",):
        methods, sparsities = ("swa",), args.sparsity or (DEFAULT_COMPARE_SPARSITY,)
    if any(m != "dense" for m in methods) and not any(0 < s < 1 for s in sparsities):
        raise ValueError(f"--sparsity must give a ratio in (0, 1) for {methods}, got {sparsities}")
    cpu_attention = {"auto": (False, True), "on": (True,), "off": (False,)}[args.cpu_attention]
    return SearchSpace(batch_sizes=args.batch, sparsity_methods=methods, sparsities=sparsities,
                       kv_compressions=args.kv_compression,
                       weight_compressions=args.weight_compression,
                       cpu_attention=cpu_attention, style=style)


def _hardware(args: argparse.Namespace) -> HardwareProfile:
    if args.hardware == "local":  # measure this machine now (~12 s)
        hw = HardwareProfile.measure(args.gpu_mem, args.cpu_mem, budget_s=12.0)
    else:
        hw = HardwareProfile.load(args.hardware).with_memory(args.gpu_mem, args.cpu_mem)
    if args.link_bw:
        hw = hw.replace(h2d_bytes_per_s=float(args.link_bw), d2h_bytes_per_s=float(args.link_bw))
    return hw


def _phase_table(pred: Prediction) -> str:
    gib = 2**30
    lines = [f"{'phase':<16}{'steps':>6}{'time s':>10}{'h2d GiB':>10}{'d2h GiB':>10}"
             f"{'recomp Mtok':>12}{'GPU peak':>12}{'CPU peak':>12}"]
    for row in pred.phases:
        lines.append(f"{PHASE_NAMES[row.phase]:<16}{row.num_steps:>6}{row.time_s:>10.2f}"
                     f"{row.h2d_bytes / gib:>10.1f}{row.d2h_bytes / gib:>10.1f}"
                     f"{row.recomputed_tokens / 1e6:>12.2f}{format_bytes(row.peak_gpu_bytes):>12}"
                     f"{format_bytes(row.peak_cpu_bytes):>12}")
    lines.append(f"predicted tok/s: prefill {pred.prefill_tok_per_s:.1f}  decode "
                 f"{pred.decode_tok_per_s:.2f}  total {pred.total_tok_per_s:.2f}  "
                 f"(p1={pred.phase2_start_step}, p2={pred.phase3_start_step})")
    return "\n".join(lines)


def _result_json(result: SearchResult) -> dict[str, Any]:
    return {"policy": result.policy.to_dict(), "prediction": result.prediction.to_dict(),
            "num_candidates": result.num_candidates, "num_solved": result.num_solved}


def _run(args: argparse.Namespace, spec: ModelSpec, hw: HardwareProfile) -> dict[str, Any]:
    styles = list(dict.fromkeys(args.compare)) if args.compare else [args.style]
    results = {style: search(spec, hw, args.prompt_len, args.gen_len, _space(args, style))
               for style in styles}
    for style, result in results.items():
        print(f"[{style}] {result.policy.describe()}", file=sys.stderr)
        print(_phase_table(result.prediction), file=sys.stderr)
    out: dict[str, Any] = {"model": spec.name, "hardware": hw.to_dict(),
                           "prompt_len": args.prompt_len, "gen_len": args.gen_len,
                           "results": {s: _result_json(r) for s, r in results.items()}}
    if len(results) == 2 and "flexgen" in results and "alisa" in results:
        ratio = (results["alisa"].prediction.total_tok_per_s
                 / results["flexgen"].prediction.total_tok_per_s)
        out["alisa_over_flexgen"] = ratio
        print(f"ALISA / FlexGen predicted total throughput: {ratio:.2f}x", file=sys.stderr)
    if args.out:
        results[styles[-1]].policy.save(args.out)
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        spec = load_model_spec(args.model)
        hw = _hardware(args)
        out = _run(args, spec, hw)
    except InfeasibleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0
