"""GPU and CPU memory of one candidate at a phase's peak context length, affine in the placement.

Home placement plus working buffers::

    GPU = G + wg*W + (1-α-β)*KV(n) + hg*A + 2*(1-wg)*W_layer   (double-buffered streamed layers;
                                                             2*W_layer, dequantized, with INT4)
          + max(chunked prefill scratch, gathered selection x2) + logits  (costs.working_set_bytes)
    CPU = (1-wg)*W + α*KV(n) + β*H(n) + (1-hg)*A + delegated-attention upcast buffers

with W the decoder layers' weights, G the globals as the runtime holds them (embeddings, final
norm and lm_head: always on the device and never compressed; on the CPU stand-in in fp32 a tied
lm_head keeps a second, oneDNN-packed copy), KV(n) / H(n) the K+V / layer inputs of ``batch``
sequences of ``n`` tokens over all layers, A the block's prefill activations. Symbols as in
``cost_model.timing``.
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


def layers_bytes(spec: ModelSpec, knobs: Knobs, dtype_bytes: int) -> float:
    """Stored bytes of all decoder layers: what ``wg`` splits between GPU and CPU."""
    return spec.num_layers * costs.layer_weight_bytes(spec, knobs.weight_compression, dtype_bytes)


def globals_device_bytes(spec: ModelSpec, hw: HardwareProfile) -> float:
    """Device bytes of the globals, as the runtime's ``WeightStore`` holds them."""
    numel = spec.embed_numel
    if hw.device_kind == "cpu" and hw.compute_dtype_bytes == 4 and spec.tie_word_embeddings:
        numel += spec.vocab_size * spec.embed_dim  # the packed copy of the tied lm_head
    return numel * hw.compute_dtype_bytes


def _gpu_working(spec: ModelSpec, knobs: Knobs, workload: Workload, num_tokens: int,
                 dt: int) -> float:
    sel = costs.selected_tokens(num_tokens, knobs.sparsity_method, knobs.sparsity)
    scored = costs.seeds_from_prefill(knobs.sparsity_method, knobs.sparsity)
    return costs.working_set_bytes(spec, knobs.gpu_batch_size, workload.prompt_len, sel, dt,
                                   scored=scored)


def _working_layers(spec: ModelSpec, knobs: Knobs, dt: int) -> Affine:
    """The two device buffers a layer is materialised in when it is streamed or dequantized:
    always with INT4 weights; otherwise relaxed to (1 - wg) of them, since the LP's wg is
    continuous and the runtime needs them as soon as one layer is streamed."""
    full = 2.0 * costs.layer_weight_bytes(spec, "none", dt)
    if knobs.weight_compression != "none":
        return Affine(full)
    return (1.0 - Affine.var("wg")) * full


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
    weights = layers_bytes(spec, knobs, dt)
    gpu = (globals_device_bytes(spec, hw) + wg * weights + (1.0 - alpha - beta) * kv + hg * acts
           + _working_layers(spec, knobs, dt) + _gpu_working(spec, knobs, workload, num_tokens, dt))
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
