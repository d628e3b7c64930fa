"""Per-layer FLOP and byte counts from a `ModelSpec` (pure arithmetic, no placement, no time).

Everything here is per decoder layer and per ``batch`` sequences unless the name says otherwise.
``dtype_bytes`` is the element size the device computes and stores in (fp16: 2, fp32: 4).

Counting rules:

* GEMM FLOPs are ``2 * rows * weight_numel``; GQA enters through ``spec.kv_dim`` (W_k, W_v are
  ``hidden x kv_dim``), so K/V bytes and recompute FLOPs shrink with fewer KV heads.
* Decode attention over ``selected`` tokens: ``QK^T`` and ``PV`` are ``2 * q_dim * selected`` FLOPs
  each per sequence. Prefill attention is dense and causal: ``2 * prompt_len**2 * q_dim``.
* Sparse methods read only the selected budget ``(1 - sparsity) * n`` of the ``n`` cached tokens;
  dense reads all ``n``. (open) decision: every sparse method costs the same budget; their
  selection overheads (score accumulation) are O(n) element-wise work and are not counted.
* Recomputing K, V for ``tokens`` recompute-tier tokens costs ``2 * tokens * hidden * 2 * kv_dim``
  FLOPs and needs their stored layer inputs: ``spec.hidden_numel_per_token`` elements each,
  which with GQA can exceed the ``spec.kv_numel_per_token`` it replaces.
* Element-wise work (norms, residuals, RoPE / biases, the MLP activation) moves
  ``activation_traffic_numel`` elements per token per layer through device memory.
* Compression (group-wise, group size 64, an fp16 scale and an fp16 zero per group, as FlexGen):
  int8 = 1 + 4/64 bytes per element, int4 = 0.5 + 4/64.
"""

from __future__ import annotations

from cost_model.spec import ModelSpec

GROUP_SIZE = 64  # elements per quantization group
GROUP_META_BYTES = 4  # fp16 scale + fp16 zero point per group
COMPRESSIONS = ("none", "int8", "int4")
SPARSITY_METHODS = ("dense", "swa", "h2o", "local", "strided", "sinks")


def bytes_per_element(compression: str, dtype_bytes: int) -> float:
    """Stored bytes per element under ``compression`` (``"none"`` keeps ``dtype_bytes``)."""
    if compression == "none":
        return float(dtype_bytes)
    bits = {"int8": 8, "int4": 4}.get(compression)
    if bits is None:
        raise ValueError(f"unknown compression {compression!r}; known: {COMPRESSIONS}")
    return bits / 8 + GROUP_META_BYTES / GROUP_SIZE


def linear_numel(spec: ModelSpec) -> int:
    """Weight elements in one layer's GEMMs (Q, K, V, O projections and the MLP)."""
    h = spec.hidden_size
    attn = h * spec.q_dim + 2 * h * spec.kv_dim + spec.q_dim * h
    mlp = (2 if spec.family == "opt" else 3) * h * spec.ffn_size
    return attn + mlp


def layer_gemm_shapes(spec: ModelSpec) -> list[tuple[int, int]]:
    """(inner dim, output dim) of each projection of one layer (Q, K, V, O, then the MLP)."""
    h, q, kv, f = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.ffn_size
    mlp = [(h, f), (f, h)] if spec.family == "opt" else [(h, f), (h, f), (f, h)]
    return [(h, q), (h, kv), (h, kv), (q, h), *mlp]


def layer_weight_bytes(spec: ModelSpec, compression: str, dtype_bytes: int) -> float:
    """Stored bytes of one decoder layer's parameters."""
    return spec.layer_numel * bytes_per_element(compression, dtype_bytes)


def kv_bytes_per_token(spec: ModelSpec, compression: str, dtype_bytes: int) -> float:
    """Stored K+V bytes of one token in one layer."""
    return spec.kv_numel_per_token * bytes_per_element(compression, dtype_bytes)


def hidden_bytes_per_token(spec: ModelSpec, dtype_bytes: int) -> float:
    """Stored layer-input bytes of one recompute-tier token in one layer (never compressed)."""
    return spec.hidden_numel_per_token * dtype_bytes


def selected_tokens(num_tokens: float, method: str, sparsity: float) -> float:
    """Tokens attention reads at context length ``num_tokens``: all when dense, else the budget."""
    if method == "dense":
        return float(num_tokens)
    return min(float(num_tokens), max(1.0, (1.0 - sparsity) * num_tokens))


def activation_traffic_numel(spec: ModelSpec) -> int:
    """Elements one token's activations are read + written by one layer's element-wise ops.

    Norms (read + write, x2), residual adds (2 reads + 1 write, x2), positional / bias work on
    Q, K, V (about 3 passes), the MLP activation (OPT ReLU: 2 passes over ffn; LLaMA SiLU and the
    gate product: 5). These are memory-bound and scale with tokens, not with weights.
    """
    h, qkv, f = spec.hidden_size, spec.q_dim + 2 * spec.kv_dim, spec.ffn_size
    return 4 * h + 6 * h + 3 * qkv + (2 if spec.family == "opt" else 5) * f


def gemm_flops(spec: ModelSpec, rows: float) -> float:
    """FLOPs of one layer's projections and MLP for ``rows`` tokens."""
    return 2.0 * rows * linear_numel(spec)


def prefill_attention_flops(spec: ModelSpec, batch: int, prompt_len: int) -> float:
    """Causal dense attention FLOPs of one layer's prefill (QK^T and PV, half the square each)."""
    return 2.0 * batch * prompt_len**2 * spec.q_dim


def decode_attention_flops(spec: ModelSpec, batch: int, selected: float) -> float:
    """Attention FLOPs of one decode step of one layer over ``selected`` tokens per sequence."""
    return 4.0 * batch * selected * spec.q_dim


def recompute_flops(spec: ModelSpec, tokens: float) -> float:
    """FLOPs to recompute K and V of ``tokens`` tokens in one layer from their layer inputs."""
    return 2.0 * tokens * spec.hidden_size * 2 * spec.kv_dim


def head_flops(spec: ModelSpec, rows: float) -> float:
    """lm_head FLOPs for ``rows`` tokens (the logits of the last position of each sequence)."""
    return 2.0 * rows * spec.vocab_size * spec.embed_dim


PREFILL_CHUNK_TOKENS = 1024  # the offloading runtime prefills a GPU batch's rows in chunks of
# about this many tokens (at least one row): on the CPU stand-in the chunk's MLP intermediates
# stay in the L3 cache, and on a GPU the scratch no longer grows with the GPU batch


def seeds_from_prefill(method: str, sparsity: float) -> bool:
    """Whether ``method`` seeds its scores from the prefill's attention weights (the runtime's
    ``method.needs_scores``): SWA and H2O, unless the sparsity leaves nothing out."""
    return method in ("swa", "h2o") and sparsity > 0


def prefill_chunk_rows(batch: int, prompt_len: int) -> int:
    """Sequences per prefill chunk of a GPU batch of ``batch`` sequences (1..batch)."""
    return max(1, min(batch, PREFILL_CHUNK_TOKENS // max(1, prompt_len)))


def working_set_bytes(spec: ModelSpec, batch: int, prompt_len: int, kv_tokens: float,
                      dtype_bytes: int, scored: bool = False) -> float:
    """Device scratch the runtime reserves for one GPU batch besides weights, KV and activations.

    The larger of one layer's prefill and a decode step's gathered K, V of ``kv_tokens`` per
    sequence (the gathered copy and its scratch), plus the batch's fp32 logits. The prefill runs
    ``prefill_chunk_rows`` sequences at a time: per chunk every projection output at once (Q,
    K, V, twice the MLP width, three hidden-sized buffers) and the fp32 ``(b, nh, s, s)``
    attention scores; when there is more than one chunk, the whole batch's K, V and its layer
    input and output, which the chunks are written into. ``scored``: the sparsity method seeds
    its scores from the prefill's attention weights (SWA, H2O), which the chunks collect for
    the whole batch, bounded here by every query row's. ``flexalisa.runtime.budget`` checks
    budgets with this same sum, so the search and the runtime agree on it.
    """
    rows = prefill_chunk_rows(batch, prompt_len)
    width = spec.q_dim + 2 * spec.kv_dim + 2 * spec.ffn_size + 3 * spec.hidden_size
    scores = spec.num_heads * prompt_len**2 * 4  # one sequence's fp32 attention scores
    prefill = rows * (prompt_len * width * dtype_bytes + scores)
    if rows < batch:  # the whole batch's K, V, layer input and output
        prefill += batch * prompt_len * (2 * spec.kv_dim + 2 * spec.hidden_size) * dtype_bytes
    if scored:
        prefill += batch * scores
    gathered = 2 * batch * kv_tokens * spec.kv_numel_per_token * dtype_bytes
    return max(prefill, gathered) + batch * spec.vocab_size * 4
