"""Step costs and memory of one candidate as affine functions of the placement variables.

Paper symbols (used only inside ``cost_model``):

=========  =======================================================================
symbol     meaning (Policy field)
=========  =======================================================================
wg         share of the layers' weights on the GPU (``weights_gpu_share``); wc = 1 - wg on
           the CPU. The globals (embeddings, final norm, lm_head) always live on the GPU
hg         share of activations on the GPU (``act_gpu_share``); hc = 1 - hg
α (alpha)  share of tokens whose KV lives on the CPU from phase II on (``kv_cpu_share``)
β (beta)   share of the oldest tokens whose KV is dropped and recomputed from stored layer
           inputs in phase III (``kv_recompute_share``); cg = 1 - α - β on the GPU
p1, p2     decode-step index where phase II / phase III begins (``phase2/3_start_step``)
=========  =======================================================================

Tier split per phase (shares of a sequence's tokens; the GPU keeps the most recent ones)::

    phase I   (step < p1)       | GPU 1                                  |
    phase II  (p1 <= step < p2) | CPU α             | GPU 1 - α          |
    phase III (step >= p2)      | rec β | CPU α     | GPU 1 - α - β      |
                                  oldest ---------------------------> newest

The prefill belongs to the phase of step 0. (open) decisions: selected tokens are assumed spread
over the tiers in proportion to the shares; the recompute tier's layer inputs are kept in CPU
memory and loaded for the selected tokens; each token's KV is moved to its final tier once.

Step time, whole block (``num_gpu_batches`` GPU batches) and all layers, overlap timeline::

    iteration (j, k), then wait (as FlexGen's loop and ours: every iteration ends in a sync)
    h2d      |== load W(j+1) (k == 0 only) ==|== load KV/hidden(j, k+1) ==|
    d2h      |== store KV/hidden(j, k-1) ==|
    compute  |== gpu part ==|== delegated CPU attention ==|== gpu part ==|   (one chain)
    host mem |== CPU attention reads ==|== DMA reads/writes of h2d, d2h ==|
    T_iter  >= each lane (overlap);  >= h2d + d2h + gpu + cpu (no overlap)
    with hw.copy_overlap = o < 1 (copies on the compute's cores, as on the CPU stand-in) the
    compute lane also takes (1 - o) of the copies and each copy lane (1 - o) of the compute
    (``shared_lanes``)
    T_step   = L * (T_iter(k=0) + (nb - 1) * T_iter(k>0)) + T_head

A sparse step also pays for choosing and gathering its tokens (``_selection_s``: what the
profile measured SWA's select, gather, attention with weights and observe to cost beyond dense
attention over as many tokens, fixed plus per cached token), on the compute chain: on a CPU it
can outweigh the attention the sparsity saves.

The delegated attention sits inside the layer's compute chain (the MLP needs the merged
output), so it adds to the GPU time rather than overlapping it; the host memory lane bounds the
CPU attention and the DMA engines that read and write the same DRAM.
"""

from __future__ import annotations

from dataclasses import dataclass

from cost_model import costs
from cost_model.affine import Affine
from cost_model.hardware import HardwareProfile
from cost_model.spec import ModelSpec

ZERO = Affine()


@dataclass(frozen=True)
class Knobs:
    """The discrete choices of one candidate (everything except the continuous placement)."""

    gpu_batch_size: int  # sequences per GPU batch
    num_gpu_batches: int  # GPU batches per block
    sparsity_method: str  # one of costs.SPARSITY_METHODS
    sparsity: float  # share of cached tokens not read per step (0 for dense)
    kv_compression: str  # one of costs.COMPRESSIONS
    weight_compression: str  # "none" or "int4"
    cpu_attention: bool  # attention over CPU-tier tokens runs on the CPU
    overlap: bool  # transfers overlap compute
    p1: int  # decode step where phase II begins (>= num decode steps: never)
    p2: int  # decode step where phase III begins (>= p1)

    @property
    def batch(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches


@dataclass(frozen=True)
class Workload:
    """The request: how many tokens each sequence brings and generates."""

    prompt_len: int  # tokens per prompt
    gen_len: int  # tokens generated per sequence (the first comes from the prefill)

    @property
    def num_decode_steps(self) -> int:
        return self.gen_len - 1


@dataclass(frozen=True)
class StepCost:
    """One step of the whole block; per-iteration terms are affine in the placement.

    An iteration is (layer j, GPU batch k); the first iteration of a layer also loads the next
    layer's weights. ``total_*`` give the step's traffic for reports.
    """

    num_layers: int  # decoder layers
    num_gpu_batches: int  # iterations per layer
    weight_h2d_bytes: Affine  # weights loaded once per layer (its CPU share)
    h2d_bytes: Affine  # per iteration: KV / hidden / activations loaded
    d2h_bytes: Affine  # per iteration: KV / hidden / activations stored
    gpu_s: Affine  # per iteration: device compute
    cpu_s: Affine  # per iteration: delegated attention on the host
    recomputed_tokens: Affine  # per iteration: K,V rows recomputed
    head_gpu_s: float  # per step: lm_head compute (the globals are device-resident)

    def iteration_lanes(self, hw: HardwareProfile, overlap: bool, first: bool) -> list[Affine]:
        """The time terms one iteration is bounded by (see the module docstring)."""
        h2d_bytes = self.h2d_bytes + (self.weight_h2d_bytes if first else 0.0)
        h2d, d2h = h2d_bytes / hw.h2d_bytes_per_s, self.d2h_bytes / hw.d2h_bytes_per_s
        if not overlap:
            return [h2d + d2h + self.gpu_s + self.cpu_s]
        host_mem = self.cpu_s + (h2d_bytes + self.d2h_bytes) / hw.cpu_mem_bytes_per_s
        return [*shared_lanes(self.gpu_s + self.cpu_s, [h2d, d2h], hw.copy_overlap), host_mem]

    def head_lanes(self) -> list[Affine]:
        """The lm_head's compute: nothing is loaded for it (see ``_head``)."""
        return [Affine(self.head_gpu_s)]

    def total_h2d_bytes(self) -> Affine:
        return (self.weight_h2d_bytes + self.num_gpu_batches * self.h2d_bytes) * self.num_layers

    def total_d2h_bytes(self) -> Affine:
        return self.d2h_bytes * (self.num_layers * self.num_gpu_batches)

    def total_recomputed_tokens(self) -> Affine:
        return self.recomputed_tokens * (self.num_layers * self.num_gpu_batches)


def shared_lanes(compute: Affine, copies: list[Affine], copy_overlap: float) -> list[Affine]:
    """Lanes bounding compute beside copy lanes that overlap it by ``copy_overlap`` (o).

    For one copy ``c`` beside compute ``a`` the time is ``a + c - o * min(a, c)``, which is
    ``max(a + (1 - o) c, c + (1 - o) a)``: affine lanes, so the LP keeps its epigraph form.
    o = 1 gives the plain lanes (a GPU's DMA engines); o = 0 adds the copies to compute
    (copy threads taking turns with compute on the same cores).
    """
    if copy_overlap >= 1.0:
        return [*copies, compute]
    serial = 1.0 - copy_overlap
    return [compute + serial * sum(copies, ZERO), *(c + serial * compute for c in copies)]


def phase_of(step_idx: int, knobs: Knobs) -> int:
    """1, 2 or 3: the phase decode step ``step_idx`` (the prefill: 0) runs in."""
    if step_idx < knobs.p1:
        return 1
    return 2 if step_idx < knobs.p2 else 3


def tier_shares(phase: int) -> tuple[Affine, Affine]:
    """(CPU share, recompute share) of the KV in ``phase``; the GPU holds the rest."""
    alpha = Affine.var("alpha") if phase >= 2 else ZERO
    beta = Affine.var("beta") if phase == 3 else ZERO
    return alpha, beta


def _gemm_s(hw: HardwareProfile, rows: float, shapes: list[tuple[int, int]],
            mem_bytes: float) -> float:
    """Roofline of a set of projections: summed compute time vs the weight bytes they read."""
    compute = sum(2.0 * rows * k * n / hw.gemm_flops_per_s(rows, k) for k, n in shapes)
    return max(compute, mem_bytes / hw.gpu_mem_bytes_per_s)


def _elementwise_s(spec: ModelSpec, hw: HardwareProfile, rows: float) -> float:
    """Memory-bound element-wise work of one layer over ``rows`` tokens."""
    traffic = rows * costs.activation_traffic_numel(spec) * hw.compute_dtype_bytes
    return traffic / hw.gpu_mem_bytes_per_s


def _weight_read_bytes(spec: ModelSpec, knobs: Knobs, dt: int) -> float:
    """Device bytes touched reading one layer's weights (dequantizing when compressed)."""
    stored = costs.layer_weight_bytes(spec, knobs.weight_compression, dt)
    return stored if knobs.weight_compression == "none" else stored + 2 * spec.layer_numel * dt


def _kv_read_bytes_per_token(spec: ModelSpec, knobs: Knobs, dt: int) -> float:
    """Device bytes touched per attended token per layer (a gather/dequantize writes a copy)."""
    stored = costs.kv_bytes_per_token(spec, knobs.kv_compression, dt)
    if knobs.sparsity_method == "dense" and knobs.kv_compression == "none":
        return stored
    return stored + 2 * spec.kv_numel_per_token * dt


def _cpu_attention_s_per_token(spec: ModelSpec, hw: HardwareProfile, knobs: Knobs) -> float:
    """Host seconds per delegated token per layer per sequence.

    Per element, the token-major cache is read and copied head-major in the stored dtype, then
    upcast when the host computes in a wider dtype, and the product reads the result. A write
    costs twice its bytes in DRAM traffic (write-allocate: torch's CPU kernels use ordinary,
    not streaming, stores, so each written line is first read). fp16 stored, fp32 computed:
    reads 2 + 2 + 4, writes 2 + 4 -> 8 + 2 * 6 = 20 bytes. A compressed cache is dequantized
    straight into the head-major copy: reads q + 4, writes 4.
    """
    dt, cdt = hw.compute_dtype_bytes, hw.cpu_compute_dtype_bytes
    numel = spec.kv_numel_per_token
    stored = costs.kv_bytes_per_token(spec, knobs.kv_compression, dt)
    if knobs.kv_compression != "none":
        reads, writes = stored + numel * cdt, numel * cdt
    elif dt == cdt:
        reads, writes = 2 * stored, stored
    else:
        reads, writes = 2 * stored + numel * cdt, stored + numel * cdt
    touched = reads + 2 * writes
    flops = costs.decode_attention_flops(spec, 1, 1.0)
    return max(touched / hw.cpu_mem_bytes_per_s, flops / hw.cpu_flops_per_s)


def _selection_s(hw: HardwareProfile, knobs: Knobs, num_tokens: float) -> float:
    """A sparse step's selection work for one layer and GPU batch, beyond attending the
    selected tokens (which ``decode_step_cost`` prices by their bytes): the profile's fixed
    part plus its part per sequence per cached token (the method scores the whole context to
    pick from it). Dense steps select nothing."""
    if knobs.sparsity_method == "dense" or knobs.sparsity <= 0:
        return 0.0
    return (hw.selection_overhead_s
            + knobs.gpu_batch_size * num_tokens * hw.selection_s_per_token)


def _head(spec: ModelSpec, hw: HardwareProfile, knobs: Knobs) -> dict:
    """The lm_head for one step, per GPU batch. The runtime keeps the globals (embeddings,
    final norm, lm_head) on the device whatever ``wg`` is, so none of them is loaded."""
    dt, b = hw.compute_dtype_bytes, knobs.gpu_batch_size
    per_batch = _gemm_s(hw, b, [(spec.embed_dim, spec.vocab_size)],
                        spec.vocab_size * spec.embed_dim * dt)
    return dict(head_gpu_s=knobs.num_gpu_batches * per_batch)


def _layer_weights(spec: ModelSpec, hw: HardwareProfile, knobs: Knobs) -> dict:
    wc = 1.0 - Affine.var("wg")
    return dict(num_layers=spec.num_layers, num_gpu_batches=knobs.num_gpu_batches,
                weight_h2d_bytes=wc * costs.layer_weight_bytes(spec, knobs.weight_compression,
                                                               hw.compute_dtype_bytes))


def decode_step_cost(spec: ModelSpec, hw: HardwareProfile, knobs: Knobs, num_tokens: float,
                     phase: int) -> StepCost:
    """One decode step at context length ``num_tokens`` (new token included)."""
    dt, b = hw.compute_dtype_bytes, knobs.gpu_batch_size
    alpha, beta = tier_shares(phase)
    hc = 1.0 - Affine.var("hg")
    sel = costs.selected_tokens(num_tokens, knobs.sparsity_method, knobs.sparsity)
    kv_b = costs.kv_bytes_per_token(spec, knobs.kv_compression, dt)
    hid_b = costs.hidden_bytes_per_token(spec, dt)
    act_b = spec.hidden_size * dt
    delegated = alpha * (1.0 if knobs.cpu_attention else 0.0)
    fetched = alpha - delegated
    partial = knobs.cpu_attention and phase >= 2  # q goes down, (out, lse) come back
    h2d = b * (fetched * (sel * kv_b) + beta * (sel * hid_b) + hc * act_b
               + partial * (spec.q_dim + spec.num_heads) * dt)
    d2h = b * (alpha * kv_b + beta * hid_b + hc * act_b + partial * spec.q_dim * dt)
    gemm = _gemm_s(hw, b, costs.layer_gemm_shapes(spec), _weight_read_bytes(spec, knobs, dt))
    attn = (1.0 - delegated) * (b * sel * _kv_read_bytes_per_token(spec, knobs, dt)
                                / hw.gpu_mem_bytes_per_s)
    rows = b * sel
    recompute = beta * (costs.recompute_flops(spec, rows)
                        / hw.gemm_flops_per_s(rows, spec.hidden_size))
    cpu = delegated * (b * sel * _cpu_attention_s_per_token(spec, hw, knobs))
    gpu = (attn + recompute + gemm + _elementwise_s(spec, hw, b) + hw.layer_overhead_s
           + _selection_s(hw, knobs, num_tokens))
    return StepCost(**_layer_weights(spec, hw, knobs), h2d_bytes=h2d, d2h_bytes=d2h,
                    gpu_s=gpu, cpu_s=cpu,
                    recomputed_tokens=beta * rows, **_head(spec, hw, knobs))


def prefill_cost(spec: ModelSpec, hw: HardwareProfile, knobs: Knobs, prompt_len: int) -> StepCost:
    """The prefill of one block; its KV goes to the tiers of step 0's phase."""
    dt, b = hw.compute_dtype_bytes, knobs.gpu_batch_size
    alpha, beta = tier_shares(phase_of(0, knobs))
    hc = 1.0 - Affine.var("hg")
    rows = b * prompt_len
    kv_b = costs.kv_bytes_per_token(spec, knobs.kv_compression, dt)
    act_b = spec.hidden_size * dt
    h2d = hc * (rows * act_b)
    d2h = rows * (alpha * kv_b + beta * costs.hidden_bytes_per_token(spec, dt) + hc * act_b)
    gemm = _gemm_s(hw, rows, costs.layer_gemm_shapes(spec), _weight_read_bytes(spec, knobs, dt))
    attn = costs.prefill_attention_flops(spec, b, prompt_len) / hw.gemm_flops_per_s(
        rows, spec.head_dim)
    return StepCost(**_layer_weights(spec, hw, knobs), h2d_bytes=h2d, d2h_bytes=d2h,
                    gpu_s=Affine(gemm + attn + _elementwise_s(spec, hw, rows)
                                 + hw.layer_overhead_s), cpu_s=ZERO,
                    recomputed_tokens=ZERO, **_head(spec, hw, knobs))


def step_time(cost: StepCost, hw: HardwareProfile, overlap: bool,
              assignment: dict[str, float]) -> float:
    """Seconds of a step: L * (first iteration + (nb - 1) * other iterations) + head."""
    def worst(lanes: list[Affine]) -> float:
        return max(lane.value(assignment) for lane in lanes)

    first = worst(cost.iteration_lanes(hw, overlap, first=True))
    other = worst(cost.iteration_lanes(hw, overlap, first=False))
    head = worst(cost.head_lanes())
    return cost.num_layers * (first + (cost.num_gpu_batches - 1) * other) + head


def decode_chunks(workload: Workload, knobs: Knobs, max_chunks_per_phase: int = 8
                  ) -> list[tuple[int, float, int]]:
    """(phase, mean context length, number of steps) for runs of consecutive decode steps.

    Each phase's steps are cut into at most ``max_chunks_per_phase`` runs evaluated at their
    mean length; both the LP and ``predict`` use these runs, so they agree exactly.
    """
    chunks: list[tuple[int, float, int]] = []
    steps = workload.num_decode_steps
    bounds = [0, min(knobs.p1, steps), min(max(knobs.p2, knobs.p1), steps), steps]
    for phase, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
        count = stop - start
        if count <= 0:
            continue
        num = min(max_chunks_per_phase, count)
        edges = [start + (count * i) // num for i in range(num + 1)]
        for lo, hi in zip(edges[:-1], edges[1:]):
            mean_len = workload.prompt_len + (lo + hi - 1) / 2 + 1
            chunks.append((phase, mean_len, hi - lo))
    return chunks
