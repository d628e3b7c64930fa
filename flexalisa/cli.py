"""The `flexalisa` command: generate (more subcommands plug in via `_SUBCOMMANDS`).

Flags are kebab-case and map 1:1 onto config dataclass fields. Results go to files or stdout as
JSON; progress and summaries go to stderr. Bad input exits 1 with one `flexalisa: error:` line.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from flexalisa.errors import FlexalisaError
from flexalisa.sampling import SamplingParams


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="batch generation: JSONL prompts in, JSONL results out")
    p.add_argument("--model", default=None,
                   help="HF checkpoint dir or .gguf file (default: embedded SmolLM2-135M)")
    p.add_argument("--input", required=True, type=Path, help="prompts JSONL: {id, prompt, ...}")
    p.add_argument("--output", required=True, type=Path, help="results JSONL (appended; resumes)")
    p.add_argument("--gen-len", type=int, default=64, help="max new tokens per prompt")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --gen-len tokens")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    from flexalisa.generate_job import GenerateConfig, run_generate

    cfg = GenerateConfig(
        model=args.model, input=args.input, output=args.output, gen_len=args.gen_len,
        batch_size=args.batch_size, device=args.device, ignore_eos=args.ignore_eos,
        sampling=SamplingParams(args.temperature, args.top_p, args.seed))
    run_generate(cfg, command=args.command_line)
    return 0


_SUBCOMMANDS = [_add_generate]


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
    except KeyboardInterrupt:
        print("flexalisa: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
