"""``python -m cost_model profile --out hw.json [--gpu-mem 2GiB] [--cpu-mem 8GiB]``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import NoReturn

from cost_model.hardware import HardwareProfile
from cost_model.units import format_bytes, parse_bytes


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump
        self.exit(2, f"error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m cost_model",
                     description="Measure this machine into a hardware profile.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    prof = sub.add_parser("profile", help="measure GEMM rates, bandwidths; write a profile JSON")
    prof.add_argument("--out", required=True, help="where to write the profile JSON")
    prof.add_argument("--gpu-mem", type=parse_bytes, default=None,
                      help="device memory budget, e.g. 2GiB (CPU-as-device default: 2GiB)")
    prof.add_argument("--cpu-mem", type=parse_bytes, default=None,
                      help="host memory budget (default: available RAM)")
    prof.add_argument("--budget-s", type=float, default=12.0,
                      help="seconds to spend measuring (default 12)")
    prof.add_argument("--threads", type=int, default=None,
                      help="torch intra-op threads to measure with (default: torch's default)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.budget_s <= 0 or args.budget_s > 120:
        print(f"error: --budget-s must be in (0, 120], got {args.budget_s}", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    profile = HardwareProfile.measure(args.gpu_mem, args.cpu_mem, budget_s=args.budget_s,
                                      threads=args.threads)
    profile.save(args.out)
    for key, value in profile.to_dict().items():
        shown = format_bytes(value) if key.endswith("mem_bytes") else value
        print(f"{key:>24}: {shown}", file=sys.stderr)
    print(json.dumps(profile.to_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
