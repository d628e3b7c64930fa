"""Is a decode step's weight GEMM bound by reading the weights or by the multiply, here?

    python scripts/decode_gemms.py [--model PATH] [--rows 32] [--repeat 15]

Runs every layer's weight matrices (fp32, oneDNN-packed as the engine multiplies them) on
`--rows` one-token rows, as one decode step of a batch of that size does, twice: with each
layer's own weights (the step as it runs: every matrix is read from memory), and with layer
0's weights for every layer (the same multiplies on weights that stay in cache). Close times
mean the multiply bounds the step; a large gap means reading the weights does. Prints one JSON
line with both medians, their GFLOP/s and this machine's best fp32 GEMM rate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from cost_model.profiling import cpu_description
from flexalisa.models import default_model_path, load_model
from flexalisa.models.linear import PACKED_KEYS, can_pack, linear, pack_tensor
from flexalisa.peers import gemm_peak_flops


def step_ms(layers: list[list[torch.Tensor]], inputs: list[torch.Tensor], repeat: int) -> float:
    def one_step() -> None:
        for layer in layers:
            for weight, x in zip(layer, inputs):
                linear(x, weight)

    one_step()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF dir or .gguf (default: embedded SmolLM2)")
    p.add_argument("--rows", type=int, default=32, help="sequences in the decode step")
    p.add_argument("--repeat", type=int, default=15)
    args = p.parse_args(argv)
    weights, _ = load_model(args.model or default_model_path())
    keys = sorted(k for k in weights.layers[0] if k in PACKED_KEYS)
    packed = can_pack(torch.device("cpu"), torch.float32)
    layers = [[pack_tensor(k, layer[k]) if packed else layer[k] for k in keys]
              for layer in weights.layers]
    shapes = [tuple(weights.layers[0][k].shape) for k in keys]  # (out, in) each
    inputs = [torch.randn(args.rows, 1, fan_in) for _, fan_in in shapes]
    flops = 2 * args.rows * len(layers) * sum(o * i for o, i in shapes)
    own = step_ms(layers, inputs, args.repeat)
    cached = step_ms([layers[0]] * len(layers), inputs, args.repeat)
    print(json.dumps({
        "model": weights.spec.family, "layers": len(layers), "rows": args.rows,
        "matrices": dict(zip(keys, shapes)), "packed": packed,
        "weight_mb": sum(o * i for o, i in shapes) * 4 * len(layers) / 1e6,
        "own_weights_ms": own, "own_weights_gflops": flops / own / 1e6,
        "cached_weights_ms": cached, "cached_weights_gflops": flops / cached / 1e6,
        "gemm_peak_gflops": gemm_peak_flops() / 1e9, "threads": torch.get_num_threads(),
        "machine": cpu_description(),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
