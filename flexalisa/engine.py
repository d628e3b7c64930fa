"""The all-on-device engine: batched greedy/sampled generation with a contiguous KV cache.

This is the reference the offloading runtime is checked against. The loop is gpt-fast shaped:
`prefill` fills the cache from left-padded prompts and returns the last position's logits, and
`decode_step` feeds one token per row. Rows that finish (EOS or their own token limit) are dropped
from the batch so that later steps do not compute them, or, with `max_batch` and prompts
waiting, refilled with those (continuous batching).

Precision: fp32 on CPU (bf16/fp16 GEMMs are ~100x slower on AVX2), fp16 on CUDA by default.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cost_model.costs import prefill_chunk_rows
from flexalisa.attention import (
    MethodState,
    SparsityMethod,
    dense_attention,
    selected_attention,
)
from flexalisa.cache import KVCache
from flexalisa.errors import FlexalisaError
from flexalisa.models.family import family_of
from flexalisa.models.linear import can_pack, pack_weights
from flexalisa.models.weights import ModelWeights
from flexalisa.prefill import prefill_chunks, prefill_layer, prefill_mask, prefill_rows
from flexalisa.sampling import RowSampler, Sampling, per_row
from flexalisa.stops import StopWhen

PREFILL_SCORE_BYTES = 256 * 2**20  # prefill rows are chunked so attention scores stay under this
# with max_batch, free rows are refilled once 1/REFILL_FRACTION of the batch is free (each refill
# is a prefill of the waiting prompts, better batched; a free row wastes its share of a step)
REFILL_FRACTION = 8


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise FlexalisaError("--device cuda requested but CUDA is not available (torch "
                             f"{torch.__version__}, cuda build: {torch.version.cuda})")
    if name not in ("cpu", "cuda"):
        raise FlexalisaError(f"unknown device {name!r}; choose cpu or cuda")
    return torch.device(name)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt, EOS included when it ended the row
    finish_reasons: list[str]  # "stop" (EOS) or "length" (token limit or context end)
    prefill_s: float  # wall time of the prefill
    decode_s: float  # wall time of all decode steps
    num_prompt_tokens: int  # real (unpadded) prompt tokens
    padded_prompt_len: int  # T of the left-padded prompt batch
    extras: dict = field(default_factory=dict)  # runner-specific counters


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Prompts -> ids (B, T) and valid (B, T) bool, padded on the left."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), length), dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, length - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[row, length - len(p):] = True
    return ids, valid


def positions_of(valid: Tensor) -> Tensor:
    """Position ids (B, T): 0.. over real tokens, -1 on left padding (never attended)."""
    return valid.long().cumsum(dim=1) - 1


class Engine:
    """All weights and KV on one device; optional KV sparsity `method` (flexalisa.attention).

    With a method, each decode step attends only to the slots `method.select` returns (gathered
    from the full cache, which is kept whole) and feeds the step's softmax back via `observe`.
    In fp32 on CPU the engine multiplies by its own oneDNN-packed copy of the weight matrices
    (`flexalisa.models.linear`); while the caller keeps `weights` that is a second copy of them,
    which `pack=False` avoids at the cost of slower GEMMs. Engines built from another engine's
    `weights` share them: packed and placed tensors are used as they are.
    """

    def __init__(self, weights: ModelWeights, device: str = "cpu",
                 dtype: torch.dtype | None = None, method: SparsityMethod | None = None,
                 pack: bool = True) -> None:
        self.method = None if method is None or method.name == "dense" else method
        self.device = resolve_device(device)
        self.dtype = dtype or default_dtype(self.device)
        self.spec = weights.spec
        self.fam = family_of(self.spec)
        needs_move = any(t.device != self.device
                         or (t.is_floating_point() and t.dtype != self.dtype)
                         for t in weights.globals.values())
        self.weights = weights.to(self.device, self.dtype) if needs_move else weights
        if pack and can_pack(self.device, self.dtype):  # fp32 CPU: oneDNN-packed GEMMs
            self.weights = pack_weights(self.weights)

    # ---- forward passes ------------------------------------------------------------------
    def forward_logits(self, ids: Tensor, valid: Tensor) -> Tensor:
        """Full-sequence dense logits (B, T, V) float32 for left-padded ids; no cache kept."""
        cache = KVCache(self.spec, ids.shape[0], ids.shape[1], self.device, self.dtype)
        return self._prefill_rows(cache, ids.to(self.device), valid.to(self.device),
                                  slice(None), last_only=False)

    def new_method_state(self, batch: int, max_len: int) -> MethodState | None:
        if self.method is None:
            return None
        return self.method.init_state(batch, self.spec.num_layers, self.spec.num_kv_heads,
                                      max_len, self.device)

    def prefill(self, cache: KVCache, ids: Tensor, valid: Tensor,
                state: MethodState | None = None) -> Tensor:
        """Fill slots [0, T) of `cache`; returns the last position's logits (B, V).

        With a method `state`, the prompt's attention weights seed it, every row of a layer at
        once (`_prefill_by_layer`).
        """
        ids, valid = ids.to(self.device), valid.to(self.device)
        if state is not None:
            logits = self._prefill_by_layer(cache, ids, valid, state)
        else:
            batch, length = ids.shape
            per_row = self.spec.num_heads * length * length * 4
            # the offloading runtime's chunks (~1024 tokens), whose working set the cost model
            # counts; on the CPU they keep the MLP intermediates in the L3 cache, which ran the
            # SmolLM2 prefill at batch 32 x 128 faster here than one 4096-token pass
            chunk = min(max(1, PREFILL_SCORE_BYTES // per_row), prefill_chunk_rows(batch, length))
            logits = torch.cat([self._prefill_rows(cache, ids[r:r + chunk], valid[r:r + chunk],
                                                   slice(r, r + chunk), last_only=True)
                                for r in range(0, batch, chunk)])
        cache.valid[:, :ids.shape[1]] = valid
        cache.length = ids.shape[1]
        return logits[:, -1]

    def _prefill_rows(self, cache: KVCache, ids: Tensor, valid: Tensor, rows: slice,
                      last_only: bool) -> Tensor:
        """Every layer for these rows, one after another (no method state)."""
        spec, fam, w = self.spec, self.fam, self.weights
        positions = positions_of(valid)
        mask = prefill_mask(valid)  # (b, T, T)
        x = fam.embed(spec, w.globals, ids, positions)  # (b, T, H)
        pos = fam.prepare_positions(spec, positions, self.dtype)
        last_layer = len(w.layers) - 1
        for layer_idx, lw in enumerate(w.layers):
            # only the last position feeds the logits: the final layer's attention output,
            # o-proj and MLP are computed for it alone (its K, V are computed for every position)
            x, k, v, _ = prefill_rows(spec, fam, None, lw, x, pos, mask, None,
                                      last_only and layer_idx == last_layer)
            cache.write(layer_idx, 0, k, v, rows)
        return fam.logits(spec, w.globals, x)

    def _prefill_by_layer(self, cache: KVCache, ids: Tensor, valid: Tensor,
                          state: MethodState) -> Tensor:
        """Layer by layer over all rows, each layer in the offloading runtime's row chunks
        (`flexalisa.prefill`), so that the method observes a layer's prompt attention for every
        row at once and the working set is the runtime's. Logits (B, 1, V)."""
        spec, fam, w = self.spec, self.fam, self.weights
        positions = positions_of(valid)
        mask = prefill_mask(valid)  # (B, T, T)
        chunks = prefill_chunks(spec, fam, positions, self.dtype)
        x = fam.embed(spec, w.globals, ids, positions)  # (B, T, H)
        for layer_idx, lw in enumerate(w.layers):
            x, k, v = prefill_layer(spec, fam, self.method, lw, x, chunks, mask, valid, state,
                                    layer_idx)
            cache.write(layer_idx, 0, k, v)
        return fam.logits(spec, w.globals, x)

    def decode_step(self, cache: KVCache, ids: Tensor, positions: Tensor,
                    state: MethodState | None = None) -> Tensor:
        """One new token per row: ids, positions (B,) -> logits (B, V)."""
        spec, fam, w = self.spec, self.fam, self.weights
        slot = cache.length
        cache.valid[:, slot] = True
        mask = cache.valid[:, None, :slot + 1]  # (B, 1, S)
        x = fam.embed(spec, w.globals, ids[:, None], positions[:, None])  # (B, 1, H)
        pos = fam.prepare_positions(spec, positions[:, None], self.dtype)
        for layer_idx, lw in enumerate(w.layers):
            q, k, v = fam.qkv(spec, lw, x, pos)
            cache.write(layer_idx, slot, k, v)
            keys, values = cache.view(layer_idx, slot + 1)
            if state is None:
                attn = dense_attention(q, keys, values, mask)
            else:
                attn = self._sparse_attention(state, layer_idx, q, keys, values,
                                              cache.valid[:, :slot + 1])
            x = fam.finish_layer(spec, lw, x, attn)
        cache.length = slot + 1
        return fam.logits(spec, w.globals, x)[:, -1]

    def _sparse_attention(self, state: MethodState, layer_idx: int, q: Tensor, keys: Tensor,
                          values: Tensor, valid: Tensor) -> Tensor:
        """Attend over the method's selection only; K, V outside it are never read."""
        sel = self.method.select(state, layer_idx, valid, q=q, keys=keys)
        if sel is None:
            return dense_attention(q, keys, values, valid[:, None])
        attn, _, probs = selected_attention(q, keys, values, sel.indices, sel.mask)
        if self.method.needs_scores:
            self.method.observe(state, layer_idx, probs, sel)
        return attn

    # ---- the generation loop ---------------------------------------------------------------
    def generate(self, prompts: list[list[int]], max_new_tokens: int | list[int],
                 sampling: Sampling | None = None, ignore_eos: bool = False,
                 row_keys: list[str] | None = None,
                 on_tokens: Callable[[int], None] | None = None,
                 stop_when: StopWhen | None = None,
                 max_batch: int | None = None) -> GenerationResult:
        """Generate for `prompts` until EOS, each row's limit, or ``stop_when(row, tokens)``
        (stop strings, flexalisa/stops.py; a row it ends finishes with "stop").

        sampling: one SamplingParams for every row or one per row (greedy by default);
        row_keys seed each row's sampler (see sampling.py); on_tokens(n) is called after every
        step with the number of tokens just produced, for progress bars.

        max_batch: at most this many rows at once (default: every prompt). With more prompts
        than that, the rest wait in the given order and take the place of rows that finish
        (continuous batching, as vLLM's scheduler does): once 1/``REFILL_FRACTION`` of the
        rows are free (or as many as prompts wait), the waiting prompts' prefill runs and
        their KV is put in those rows, right-aligned to the filled slots. The cache is then
        sized for the longest prompt plus twice the longest generation, which makes room for
        any prompt at any step after at most one `shift`. A row's tokens depend only on the
        call's inputs, not on timing. With a sparsity method the prompts run instead in
        consecutive batches of `max_batch`.
        """
        limits = row_limits(max_new_tokens, prompts, self.spec.max_seq_len)
        batch = len(prompts) if max_batch is None else max(1, min(max_batch, len(prompts)))
        if batch < len(prompts) and self.method is not None:
            return self._generate_in_batches(prompts, limits, per_row(sampling, len(prompts)),
                                             ignore_eos, row_keys, on_tokens, stop_when, batch)
        pad = self.spec.pad_token_id or 0
        ids, valid = left_pad(prompts[:batch], pad)
        length = ids.shape[1]
        refilling = batch < len(prompts)
        capacity = (max(map(len, prompts)) + 2 * max(limits) if refilling
                    else length + max(limits[:batch]))
        cache = KVCache(self.spec, batch, capacity, self.device, self.dtype)
        state = self.new_method_state(batch, cache.max_len)
        sampler = RowSampler(per_row(sampling, len(prompts)),
                             row_keys or [str(i) for i in range(len(prompts))])
        eos = torch.tensor(self.spec.eos_token_ids or [-1], device=self.device)
        out: list[list[int]] = [[] for _ in prompts]
        reasons = ["length"] * len(prompts)
        rows: list[int | None] = list(range(batch))  # prompt of each cache row; None: free
        waiting = list(range(len(prompts) - 1, batch - 1, -1))  # popped from the end
        refill_at = max(1, batch // REFILL_FRACTION)

        def take(logits: Tensor, cache_rows: list[int]) -> Tensor:
            """Sample the next token of `cache_rows` (logits' rows) and record it; rows that
            end become free (None)."""
            next_ids = sampler.sample(logits, [rows[r] for r in cache_rows])
            is_eos = torch.isin(next_ids, eos).tolist()
            if on_tokens is not None:
                on_tokens(len(cache_rows))
            for local, (r, token) in enumerate(zip(cache_rows, next_ids.tolist())):
                row = rows[r]
                out[row].append(token)
                if is_eos[local] and not ignore_eos or stop_when and stop_when(row, out[row]):
                    reasons[row] = "stop"
                    rows[r] = None
                elif len(out[row]) >= limits[row]:
                    rows[r] = None
            return next_ids

        t0 = time.perf_counter()
        logits = self.prefill(cache, ids, valid, state)
        self._sync()
        prefill_s, refill_s = time.perf_counter() - t0, 0.0
        t1 = time.perf_counter()
        positions = valid.sum(dim=1).to(self.device)  # next position per row
        next_ids = take(logits, list(range(batch)))
        while True:
            free = [r for r, row in enumerate(rows) if row is None]
            while waiting and free and (len(free) >= min(refill_at, len(waiting))
                                        or len(free) == len(rows)):
                t = time.perf_counter()
                # a free row's slots are junk: unheld, they leave the span shifts move
                cache.valid[torch.tensor(free, device=self.device)] = False
                new = [waiting.pop() for _ in free[:len(waiting)]]
                cache_rows = free[:len(new)]
                logits = self._refill(cache, [prompts[i] for i in new], cache_rows,
                                      max(limits[i] for i in new), positions)
                for r, row in zip(cache_rows, new):
                    rows[r] = row
                self._sync()
                refill_s += time.perf_counter() - t
                next_ids[cache_rows] = take(logits, cache_rows)
                free = [r for r, row in enumerate(rows) if row is None]
            if len(free) == len(rows):
                break
            if free and not waiting:  # nothing left to refill with: drop the free rows
                keep = [r for r, row in enumerate(rows) if row is not None]
                kept = torch.tensor(keep, device=self.device)
                cache.keep_rows(kept)
                if state is not None:
                    state.keep_rows(kept)
                next_ids, positions = next_ids[kept], positions[kept]
                rows = [rows[r] for r in keep]
            logits = self.decode_step(cache, next_ids, positions, state)
            positions = positions + 1
            live = [r for r, row in enumerate(rows) if row is not None]
            next_ids[live] = take(logits[live] if len(live) < len(rows) else logits, live)
        self._sync()
        decode_s = time.perf_counter() - t1 - refill_s
        return GenerationResult(out, reasons, prefill_s + refill_s, decode_s,
                                sum(map(len, prompts)), length)

    def _refill(self, cache: KVCache, prompts: list[list[int]], cache_rows: list[int],
                max_new: int, positions: Tensor) -> Tensor:
        """Prefill `prompts` and put their KV in the free (unheld) `cache_rows` (see `generate`),
        shifting the cache's slots first where the prompts or their generation would not fit,
        or where more than half the filled slots hold only padding. Sets their positions;
        returns their last logits (b, V)."""
        ids, valid = left_pad(prompts, self.spec.pad_token_id or 0)
        fresh = KVCache(self.spec, len(prompts), ids.shape[1], self.device, self.dtype)
        logits = self.prefill(fresh, ids, valid)
        rows = torch.tensor(cache_rows, device=self.device)
        first = cache.first_held()
        span = cache.length - first  # the slots live rows hold
        if (fresh.length > cache.length or cache.length + max_new > cache.max_len
                or first > span):
            cache.shift(max(fresh.length, span) - cache.length)
        cache.put_rows(rows, fresh)
        positions[rows] = valid.sum(dim=1).to(self.device)
        return logits

    def _generate_in_batches(self, prompts: list[list[int]], limits: list[int],
                             sampling: list, ignore_eos: bool, row_keys: list[str] | None,
                             on_tokens: Callable[[int], None] | None,
                             stop_when: StopWhen | None, batch: int) -> GenerationResult:
        """`generate` over consecutive slices of `batch` prompts, merged into one result."""
        keys = row_keys or [str(i) for i in range(len(prompts))]
        parts = []
        for s in range(0, len(prompts), batch):
            part = slice(s, s + batch)
            stops = None if stop_when is None else (
                lambda row, tokens, s=s: stop_when(row + s, tokens))
            parts.append(self.generate(prompts[part], limits[part], sampling[part], ignore_eos,
                                       keys[part], on_tokens, stops))
        return GenerationResult([t for r in parts for t in r.tokens],
                                [f for r in parts for f in r.finish_reasons],
                                sum(r.prefill_s for r in parts), sum(r.decode_s for r in parts),
                                sum(r.num_prompt_tokens for r in parts),
                                max(r.padded_prompt_len for r in parts))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def row_limits(max_new_tokens: int | list[int], prompts: list[list[int]],
               max_seq_len: int) -> list[int]:
    """Tokens each row may generate: its requested limit, cut at the end of the context."""
    batch = len(prompts)
    limits = [max_new_tokens] * batch if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != batch or any(n < 1 for n in limits):
        raise ValueError(f"max_new_tokens must be >= 1 for each of {batch} prompts: {limits}")
    limits = [min(n, max_seq_len - len(p)) for n, p in zip(limits, prompts)]
    if any(n < 1 for n in limits):
        raise ValueError(f"a prompt leaves no room in the {max_seq_len}-token context to generate")
    return limits
