"""The `flexalisa` command: generate, bench, report, eval (each registered in `_SUBCOMMANDS`).

Flags are kebab-case and map 1:1 onto config dataclass fields. Results go to files or stdout as
JSON; progress and summaries go to stderr. Bad input exits 1 with one `flexalisa: error:` line.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from flexalisa.cli_flags import add_sparsity_flags
from flexalisa.errors import FlexalisaError
from flexalisa.sampling import SamplingParams


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="batch generation: JSONL prompts in, JSONL results out")
    p.add_argument("--model", default=None,
                   help="HF checkpoint dir or .gguf file (default: embedded SmolLM2-135M)")
    p.add_argument("--input", required=True, type=Path, help="prompts JSONL: {id, prompt, ...}")
    p.add_argument("--output", required=True, type=Path, help="results JSONL (appended; resumes)")
    p.add_argument("--gen-len", type=int, default=64,
                   help="max new tokens per prompt, unless a line sets max_new_tokens "
                        "(default: 64)")
    p.add_argument("--batch-size", default="auto", metavar="N|auto",
                   help="prompts per batch (default: auto, as many as memory holds up to 64 "
                        "on a CPU and 256 on a GPU, or the cost model's choice when it places "
                        "the model; a policy's own batch wins)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="(default: cpu)")
    p.add_argument("--refill", default="auto", choices=["auto", "on", "off"],
                   help="refill rows that end with waiting prompts (continuous batching; "
                        "output is then written per group of 4 batches): auto = on CUDA, on = "
                        "also on a CPU, off = fixed batches (default: auto)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 = greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1)")
    p.add_argument("--top-k", type=int, default=0,
                   help="sample among the k most likely tokens; 0 = off (default: 0)")
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed; each row's sample depends on (seed, id) (default: 0)")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --gen-len tokens")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="end a completion at this string, cut before it (repeatable; a line's "
                        "own \"stop\" wins)")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt in the model's chat template (instruct models)")
    add_sparsity_flags(p)
    _add_placement_flags(p)
    p.set_defaults(func=_cmd_generate)


def batch_size_arg(text: str) -> int | None:
    """``--batch-size``: a positive integer, or ``auto`` (None). Checked here rather than as
    an argparse type, so that a bad value is the one-line error every bad input gets."""
    if text == "auto":
        return None
    try:
        size = int(text)
    except ValueError:
        size = 0
    if size < 1:
        raise FlexalisaError(f"--batch-size must be a positive integer or auto, got {text!r}")
    return size


def _cmd_generate(args: argparse.Namespace) -> int:
    from flexalisa.generate_job import GenerateConfig, run_generate

    cfg = GenerateConfig(
        model=args.model, input=args.input, output=args.output, gen_len=args.gen_len,
        batch_size=batch_size_arg(args.batch_size), device=args.device, ignore_eos=args.ignore_eos,
        stop=tuple(args.stop),
        sampling=SamplingParams(args.temperature, args.top_p, args.seed, args.top_k),
        method=make_sparsity_method(args), chat=args.chat, placement=placement_from_args(args),
        refill={"auto": None, "on": True, "off": False}[args.refill])
    run_generate(cfg, command=args.command_line)
    return 0


def _add_placement_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", type=Path, default=None,
                   help="policy.json (from `python -m policy search`): run offloaded")
    p.add_argument("--auto-policy", action="store_true",
                   help="pick the policy with the cost model's search, then run offloaded")
    p.add_argument("--hardware", default="local",
                   help="profile for --auto-policy: preset, hw.json, or local (measure, ~15 s); "
                        "with --policy, a preset or hw.json adds the cost model's prediction "
                        "to the report")
    p.add_argument("--gpu-mem", default=None,
                   help="device memory budget, e.g. 512MiB (enforced on CPU-only machines too)")
    p.add_argument("--cpu-mem", default=None, help="host memory budget, e.g. 16GB")


def placement_from_args(args: argparse.Namespace):
    from flexalisa.placement import PlacementRequest

    return PlacementRequest(policy_path=args.policy, auto_policy=args.auto_policy,
                            hardware=args.hardware, gpu_mem=args.gpu_mem, cpu_mem=args.cpu_mem)


def make_sparsity_method(args: argparse.Namespace):
    """The attention method the flags describe; None for dense."""
    from flexalisa.api import method_from_flags

    return method_from_flags(args.sparsity_method, args.sparsity, args.per_kv_head,
                             args.query_channels)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="synthetic throughput run at exact lengths (JSON line)")
    p.add_argument("--model", required=True,
                   help="preset name such as opt-1.3b (dummy weights), HF dir or .gguf")
    p.add_argument("--prompt-len", type=int, required=True)
    p.add_argument("--gen-len", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--repeat", type=int, default=3, help="timed runs; medians are reported")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dummy-weights", action="store_true",
                   help="random weights with the checkpoint's shapes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", type=Path, default=None,
                   help="also write report.json / report.md into this directory")
    add_sparsity_flags(p)
    _add_placement_flags(p)
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    import json

    from flexalisa.bench import BenchConfig, load_bench_weights, run_bench
    from flexalisa.placement import Workload, make_generator
    from flexalisa.report import runtime_sections, write_report

    method = make_sparsity_method(args)
    cfg = BenchConfig(model=args.model, prompt_len=args.prompt_len, gen_len=args.gen_len,
                      batch=args.batch, repeat=args.repeat, device=args.device,
                      dummy_weights=args.dummy_weights,
                      sparsity_method=method.name if method else "dense",
                      sparsity=args.sparsity, seed=args.seed)
    work = Workload(batch=cfg.batch, prompt_len=cfg.prompt_len, gen_len=cfg.gen_len,
                    sparsity_method=cfg.sparsity_method, sparsity=cfg.sparsity)
    generator, policy, prediction = make_generator(
        placement_from_args(args), load_bench_weights(cfg), cfg.device, method, work)
    result = run_bench(cfg, generator)
    if prediction is not None:
        result["predicted_total_tok_s"] = prediction.total_tok_per_s
    if policy is not None:
        result["policy"] = policy.to_dict()
    print(json.dumps(result))
    if args.report is not None:
        args.report.mkdir(parents=True, exist_ok=True)
        write_report(args.report, {"command": args.command_line, "model": result["model_name"],
                                   "device": cfg.device, "stats": result, "runs": [result],
                                   **runtime_sections(result.get("extras"), policy, prediction,
                                                      result["total_tok_s"])})
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="render a report.json as markdown and PNG plots")
    p.add_argument("report", type=Path, help="a report.json written by generate or bench")
    p.add_argument("--plot", action="store_true", help="write PNG plots beside the report")
    p.add_argument("--out", type=Path, default=None, help="plot directory (default: beside it)")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    import json

    from flexalisa.report import render_markdown

    if not args.report.is_file():
        raise FlexalisaError(f"report {str(args.report)!r} does not exist")
    try:
        report = json.loads(args.report.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FlexalisaError(f"{args.report}: not a JSON report ({exc})") from None
    if not isinstance(report, dict):
        raise FlexalisaError(f"{args.report}: not a JSON report (top level is not an object)")
    print(render_markdown(report))
    if args.plot:
        from flexalisa.plots import render_all

        out = args.out or args.report.parent
        out.mkdir(parents=True, exist_ok=True)
        written, skipped = render_all(report, out)
        for path in written:
            print(f"wrote {path}", file=sys.stderr)
        if skipped:
            print(f"no data for: {', '.join(skipped)}", file=sys.stderr)
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from flexalisa.eval import add_parser

    add_parser(sub)


_SUBCOMMANDS = [_add_generate, _add_bench, _add_report, _add_eval]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexalisa", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="subcommand", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.command_line = "flexalisa " + shlex.join(argv)
    try:
        return args.func(args)
    except (FlexalisaError, ValueError) as exc:
        print(f"flexalisa: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `flexalisa report r.json | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("flexalisa: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
