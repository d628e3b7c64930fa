"""Where a decode step's time goes: its weight GEMMs (bound by reading the weights or by the
multiply?), its lm_head and its attention, timed apart at the step's real shapes.

    python scripts/decode_gemms.py [--model PATH] [--rows 32] [--context 160] [--repeat 15]

Runs every layer's weight matrices (fp32, oneDNN-packed as the engine multiplies them) on
`--rows` one-token rows, as one decode step of a batch of that size does, twice: with each
layer's own weights (the step as it runs: every matrix is read from memory), and with layer
0's weights for every layer (the same multiplies on weights that stay in cache). Close times
mean the multiply bounds the step; a large gap means reading the weights does. Then the
lm_head on the same rows, and the engine's one-token attention (``dense_attention``) over
`--context` cached tokens in each layer's own K, V buffers, with the rate it reads them at
beside this machine's plain read rate (a sum over 256 MiB). Prints one JSON line with the
medians, their GFLOP/s or GB/s and this machine's best fp32 GEMM rate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from cost_model.profiling import cpu_description
from flexalisa.attention import dense_attention
from flexalisa.models import default_model_path, load_model
from flexalisa.models.linear import PACKED_KEYS, can_pack, linear, pack_tensor
from flexalisa.peers import gemm_peak_flops


def median_ms(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def step_ms(layers: list[list[torch.Tensor]], inputs: list[torch.Tensor], repeat: int) -> float:
    def one_step() -> None:
        for layer in layers:
            for weight, x in zip(layer, inputs):
                linear(x, weight)

    return median_ms(one_step, repeat)


def attention_ms(spec, rows: int, context: int, repeat: int) -> tuple[float, int]:
    """The engine's one-token attention over ``context`` tokens in every layer's own cache
    (B, Hkv, context + 32, D), as a decode step reads them; (ms, K and V bytes read)."""
    shape = (rows, spec.num_kv_heads, context + 32, spec.head_dim)
    caches = [(torch.randn(shape), torch.randn(shape)) for _ in range(spec.num_layers)]
    q = torch.randn(rows, spec.num_heads, 1, spec.head_dim)
    mask = torch.ones(rows, 1, context, dtype=torch.bool)

    def one_step() -> None:
        for k, v in caches:
            dense_attention(q, k[:, :, :context], v[:, :, :context], mask)

    read = 2 * rows * spec.num_kv_heads * context * spec.head_dim * 4 * spec.num_layers
    return median_ms(one_step, repeat), read


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF dir or .gguf (default: embedded SmolLM2)")
    p.add_argument("--rows", type=int, default=32, help="sequences in the decode step")
    p.add_argument("--context", type=int, default=160, help="cached tokens attended")
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
    head = weights.globals["lm_head"]
    head_flops = 2 * args.rows * head.shape[0] * head.shape[1]
    head = pack_tensor("lm_head", head) if packed else head
    hidden = torch.randn(args.rows, 1, weights.spec.hidden_size)
    head_ms = median_ms(lambda: linear(hidden, head), args.repeat)
    attn_ms, attn_bytes = attention_ms(weights.spec, args.rows, args.context, args.repeat)
    big = torch.randn(64 * 2**20)  # 256 MiB
    read_ms = median_ms(big.sum, args.repeat)
    print(json.dumps({
        "model": weights.spec.family, "layers": len(layers), "rows": args.rows,
        "matrices": dict(zip(keys, shapes)), "packed": packed,
        "weight_mb": sum(o * i for o, i in shapes) * 4 * len(layers) / 1e6,
        "own_weights_ms": own, "own_weights_gflops": flops / own / 1e6,
        "cached_weights_ms": cached, "cached_weights_gflops": flops / cached / 1e6,
        "lm_head_ms": head_ms, "lm_head_gflops": head_flops / head_ms / 1e6,
        "context": args.context, "attention_ms": attn_ms,
        "attention_read_gb_s": attn_bytes / attn_ms / 1e6,
        "plain_read_gb_s": big.numel() * 4 / read_ms / 1e6,
        "gemm_peak_gflops": gemm_peak_flops() / 1e9, "threads": torch.get_num_threads(),
        "machine": cpu_description(),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
