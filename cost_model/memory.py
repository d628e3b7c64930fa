"""GPU and CPU memory of one candidate at a phase's peak context length, affine in the placement.

Home placement plus working buffers::

    GPU = wg*W + (1-α-β)*KV(n) + hg*A + 2*(1-wg)*W_layer   (double-buffered streamed weights)
          + max(prefill scratch, gathered selection x2) (+ one dequantized layer when compressed)
    CPU = (1-wg)*W + α*KV(n) + β*H(n) + (1-hg)*A + delegated-attention upcast buffers

with W all weights, KV(n) / H(n) the K+V / layer inputs of ``batch`` sequences of ``n`` tokens over
all layers, A the block's prefill activations. Symbols as in ``cost_model.timing``.
"""

from __future__ import annotations

from cost_model import costs
from cost_model.affine import Affine
from cost_model.hardware import HardwareProfile
from cost_model.spec import ModelSpec
from cost_model.timing import Knobs, Workload, tier_shares


def phase_peaks(workload: Workload, knobs: Knobs) -> dict[int, int]:
    """Phase -> the largest context length (tokens stored per sequence) reached in it."""
    steps = workload.num_decode_steps
    peaks: dict[int, int] = {}
    first = 1 if knobs.p1 > 0 else (2 if knobs.p2 > 0 else 3)
    peaks[first] = workload.prompt_len
    bounds = {1: (0, knobs.p1), 2: (knobs.p1, knobs.p2), 3: (knobs.p2, steps)}
    for phase, (start, stop) in bounds.items():
        start, stop = max(0, min(start, steps)), max(0, min(stop, steps))
        if stop > start:
            peaks[phase] = workload.prompt_len + stop
    return peaks


def weights_bytes(spec: ModelSpec, knobs: Knobs, dtype_bytes: int) -> float:
    return (spec.num_layers * costs.layer_weight_bytes(spec, knobs.weight_compression, dtype_bytes)
            + costs.head_weight_bytes(spec, knobs.weight_compression, dtype_bytes))


def _gpu_working(spec: ModelSpec, knobs: Knobs, workload: Workload, num_tokens: int,
                 dt: int) -> float:
    b = knobs.gpu_batch_size
    prefill = costs.prefill_working_bytes(spec, b, workload.prompt_len, dt)
    sel = costs.selected_tokens(num_tokens, knobs.sparsity_method, knobs.sparsity)
    gathered = 2 * b * sel * spec.kv_numel_per_token * dt
    dequant = spec.layer_numel * dt if knobs.weight_compression != "none" else 0.0
    logits = b * spec.vocab_size * 4
    return max(prefill, gathered) + dequant + logits


def memory_at(spec: ModelSpec, hw: HardwareProfile, knobs: Knobs, workload: Workload,
              phase: int, num_tokens: int) -> tuple[Affine, Affine]:
    """(GPU bytes, CPU bytes) in ``phase`` with ``num_tokens`` stored per sequence."""
    dt = hw.compute_dtype_bytes
    alpha, beta = tier_shares(phase)
    wg, hg = Affine.var("wg"), Affine.var("hg")
    seq_tokens = knobs.batch * num_tokens * spec.num_layers
    kv = seq_tokens * costs.kv_bytes_per_token(spec, knobs.kv_compression, dt)
    hidden = seq_tokens * costs.hidden_bytes_per_token(spec, dt)
    acts = knobs.batch * workload.prompt_len * spec.hidden_size * dt
    weights = weights_bytes(spec, knobs, dt)
    layer_w = costs.layer_weight_bytes(spec, knobs.weight_compression, dt)
    gpu = (wg * weights + (1.0 - alpha - beta) * kv + hg * acts + (1.0 - wg) * (2 * layer_w)
           + _gpu_working(spec, knobs, workload, num_tokens, dt))
    cpu = (1.0 - wg) * weights + alpha * kv + beta * hidden + (1.0 - hg) * acts
    if knobs.cpu_attention and phase >= 2:
        sel = costs.selected_tokens(num_tokens, knobs.sparsity_method, knobs.sparsity)
        cpu = cpu + alpha * (2 * knobs.gpu_batch_size * sel * spec.kv_numel_per_token
                             * hw.cpu_compute_dtype_bytes)
    return gpu, cpu


def memory_constraints(spec: ModelSpec, hw: HardwareProfile, knobs: Knobs, workload: Workload
                       ) -> list[tuple[str, Affine, float]]:
    """(label, bytes used, limit) for each tier at each phase's peak."""
    out: list[tuple[str, Affine, float]] = []
    for phase, num_tokens in sorted(phase_peaks(workload, knobs).items()):
        gpu, cpu = memory_at(spec, hw, knobs, workload, phase, num_tokens)
        out.append((f"gpu_phase{phase}", gpu, float(hw.gpu_mem_bytes)))
        out.append((f"cpu_phase{phase}", cpu, float(hw.cpu_mem_bytes)))
    return out
