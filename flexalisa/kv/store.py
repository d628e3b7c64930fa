"""The token-level tiered KV store of one (layer, GPU batch).

Slots ``[0, n)`` are split into three contiguous tiers, as the planner says
(``flexalisa.schedule``)::

    slot 0                         r                      c                        n
      |  recompute: K,V dropped,   |  CPU tier: host ring  |  GPU tier: device ring |
      |  hidden (B, r, hidden)     |  (B, Hkv, ·, D),      |  (B, Hkv, ·, D)        |
      |  kept in host memory       |  maybe INT8/INT4      |                        |
      ^ hidden pool covers [0, hidden_capacity_tokens): every slot that may ever be dropped

Decisions:
  * Hidden states are kept only for slots below ``hidden_capacity_tokens`` (the plan's final
    recompute boundary, ``TierPlan.hidden_tokens``), from the moment they are appended, because
    a layer input cannot be rebuilt later. Nothing else keeps its hidden.
  * The GPU tier lives on ``device``; on a CPU-only machine that is a host pool whose
    ``reserved_bytes(Tier.GPU)`` the runner counts against its GPU budget. The CPU tier and the
    hidden pool are host memory, pinned when CUDA is available.
  * Compression applies to the CPU tier only: a GPU→CPU move quantizes on the device and copies
    the codes; a fetch copies codes and dequantizes on the device.
  * Byte counters are logical: a copy between the GPU tier (or the device) and host memory is
    counted even when ``device`` is the CPU, so a CPU-only run reports what a GPU run would move.
  * Rows with left padding share slot indices; the split is by slot for all rows.
  * Misuse (a move that is not oldest-first, a full tier, a stale fetch) raises ValueError; a
    broken invariant found by ``check_integrity`` raises RuntimeError.
  * A store is not locked: the block schedule never touches one (layer, batch) from two ops at
    once (its ``load_kv`` follows the previous step's ``store_kv`` after a sync), so copy
    threads may each work on a different store.

Per step, for one (layer, batch), the runner calls::

    fetched = store.fetch(selection)                        # load_kv (copy stream / thread)
    k_sel, v_sel = store.gather(selection, recompute_kv, fetched=fetched)   # compute
    ... attention over k_sel, v_sel plus the new tokens' k, v ...
    store.commit(plan.steps[step_idx], k_new, v_new, hidden_in)             # store_kv
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flexalisa.kv import dense as dense_read
from flexalisa.kv import selection
from flexalisa.kv.config import KVCounters, KVStoreConfig
from flexalisa.kv.pools import HiddenPool, KVRing
from flexalisa.schedule import Tier, TierStep, TokenRange


class TieredKVStore:
    """K,V (B, Hkv, n, D) of one (layer, GPU batch), split into GPU, CPU and recompute tiers."""

    def __init__(self, config: KVStoreConfig, device: torch.device | str) -> None:
        self.config, self.device = config, torch.device(device)
        pin = torch.cuda.is_available()
        shape = (config.batch_size, config.num_kv_heads, config.head_dim)
        self.gpu = KVRing(*shape, config.gpu_capacity_tokens, config.dtype, self.device,
                          None, config.group_size)
        self.cpu = KVRing(*shape, config.cpu_capacity_tokens, config.dtype, torch.device("cpu"),
                          config.bits, config.group_size, pin=pin)
        self.hidden = HiddenPool(config.batch_size, config.hidden_size,
                                 config.hidden_capacity_tokens, config.dtype, pin=pin)
        self.ranges = dict.fromkeys(Tier, TokenRange(0, 0))  # contiguous: recompute, cpu, gpu
        self.counters = KVCounters()
        self.version = 0  # bumped by every move; a fetch made before a move is stale
        self._ahead: _WrittenAhead | None = None  # the step's token, written before its commit

    # ---- layout -------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.ranges[Tier.GPU].end

    def tier_of(self, slot: int) -> Tier:
        return next(tier for tier, rng in self.ranges.items() if slot in rng)

    def reserved_bytes(self, tier: Tier) -> int:
        """Bytes allocated for ``tier`` (the GPU tier's count against the GPU budget)."""
        if tier is Tier.GPU:
            return self.gpu.reserved_bytes
        if tier is Tier.CPU:
            return self.cpu.reserved_bytes
        return self.hidden.bytes_per_slot * self.hidden.capacity

    def used_bytes(self, tier: Tier) -> int:
        """Bytes of the slots ``tier`` holds now (recompute: every kept hidden state)."""
        if tier is Tier.RECOMPUTE:
            return self.hidden.bytes_per_slot * self.hidden.num_kept
        ring = self.gpu if tier is Tier.GPU else self.cpu
        return ring.bytes_per_slot * len(self.ranges[tier])

    def _note_peaks(self) -> None:
        for tier in Tier:
            peak = self.counters.peak_bytes
            peak[tier] = max(peak[tier], self.used_bytes(tier))

    def _check_fits(self, tier: Tier, count: int) -> None:
        capacity = {Tier.GPU: self.gpu.capacity, Tier.CPU: self.cpu.capacity}.get(tier)
        if capacity is not None and count > capacity:
            raise ValueError(f"the {tier.value} tier would hold {count} tokens but its capacity "
                             f"is {capacity}; plan with the store's capacities")

    # ---- writes ---------------------------------------------------------------------------
    def append(self, k: Tensor | None, v: Tensor | None, hidden: Tensor | None,
               tier: Tier = Tier.GPU) -> None:
        """Append new slots [n, n+m) to ``tier`` (newer tiers must be empty).

        k, v: (B, Hkv, m, D) on any device (ignored for the recompute tier);
        hidden: (B, m, hidden), the layer input, required when any new slot is below
        ``hidden_capacity_tokens``.
        """
        num_new = self._check_append(k, v, hidden, tier)
        start, rng = self.num_tokens, self.ranges[tier]
        self._keep_hidden(start, num_new, hidden)
        ahead, self._ahead = self._ahead, None
        if k is not None and v is not None and tier is not Tier.RECOMPUTE:
            ring = self.gpu if tier is Tier.GPU else self.cpu
            if ahead is not None and ahead.holds(ring, start, k, v):
                moved = ring.bytes_per_slot * num_new  # already there: written ahead
            else:
                moved = ring.write(start, k, v)
            if tier is Tier.CPU:  # new K,V come from the device
                self.counters.d2h_bytes += moved
        self.ranges[tier] = TokenRange(rng.start, start + num_new)
        for newer_tier in Tier:
            if newer_tier.age < tier.age:
                self.ranges[newer_tier] = TokenRange(start + num_new, start + num_new)
        self._note_peaks()

    def _check_append(self, k: Tensor | None, v: Tensor | None, hidden: Tensor | None,
                      tier: Tier) -> int:
        """Validate an append before anything changes; return the number of new slots."""
        if tier is Tier.RECOMPUTE:
            if hidden is None:
                raise ValueError("appending to the recompute tier needs the hidden states")
            num_new = hidden.shape[1]
        else:
            if k is None or v is None:
                raise ValueError(f"appending to the {tier.value} tier needs k and v")
            num_new = k.shape[2]
            cfg = self.config
            expected = (cfg.batch_size, cfg.num_kv_heads, num_new, cfg.head_dim)
            if tuple(k.shape) != expected or tuple(v.shape) != expected:
                raise ValueError(f"k, v must be {expected}, got {tuple(k.shape)}, "
                                 f"{tuple(v.shape)}")
        start, rng = self.num_tokens, self.ranges[tier]
        newer = [t for t in Tier if t.age < tier.age and len(self.ranges[t])]
        if newer:
            raise ValueError(f"cannot append to the {tier.value} tier while "
                             f"{newer[0].value} holds newer tokens")
        if tier is Tier.RECOMPUTE and start + num_new > self.hidden.capacity:
            raise ValueError(f"slots [{start}, {start + num_new}) cannot be dropped: hidden "
                             f"capacity is {self.hidden.capacity}")
        self._check_fits(tier, len(rng) + num_new)
        return num_new

    def _keep_hidden(self, start: int, num_new: int, hidden: Tensor | None) -> None:
        if start >= self.hidden.capacity:
            return
        if hidden is None:
            raise ValueError(f"slots from {start} may be recomputed later (hidden capacity "
                             f"{self.hidden.capacity}); pass their hidden states")
        expected = (self.config.batch_size, num_new, self.config.hidden_size)
        if tuple(hidden.shape) != expected:
            raise ValueError(f"hidden must be {expected}, got {tuple(hidden.shape)}")
        self.counters.d2h_bytes += self.hidden.keep(start, hidden)

    def move(self, tokens: TokenRange, src: Tier, dst: Tier) -> None:
        """Move the oldest slots ``tokens`` of ``src`` to the new end of the older ``dst``."""
        if dst.age <= src.age:
            raise ValueError(f"tokens only move older-ward, not {src.value}→{dst.value}")
        src_rng, dst_rng = self.ranges[src], self.ranges[dst]
        if tokens.start != src_rng.start or tokens.end > src_rng.end:
            raise ValueError(f"move {tokens} must start at the oldest {src.value} slot and stay "
                             f"inside {src_rng}")
        if dst_rng.end != tokens.start:
            raise ValueError(f"{dst.value} tier {dst_rng} does not end where {tokens} starts")
        if dst is Tier.RECOMPUTE and tokens.end > self.hidden.num_kept:
            raise ValueError(f"cannot drop {tokens}: hidden states kept only for slots "
                             f"[0, {self.hidden.num_kept})")
        self._ahead = None  # a move may reuse ring indices; the next commit writes in full
        if dst is Tier.CPU:
            self._check_fits(Tier.CPU, len(dst_rng) + len(tokens))
            k_parts, v_parts = self.gpu.read_range(tokens.start, tokens.end)
            k, v = self.gpu.decode(k_parts), self.gpu.decode(v_parts)
            self.counters.d2h_bytes += self.cpu.write(tokens.start, k, v)  # quantized on device
        self.ranges[src] = TokenRange(tokens.end, src_rng.end)
        self.ranges[dst] = TokenRange(dst_rng.start, tokens.end)
        for tier in Tier:  # a tier between dst and src that is empty sits at the boundary
            if dst.age > tier.age > src.age:
                self.ranges[tier] = TokenRange(tokens.end, tokens.end)
        self.version += 1
        self._note_peaks()

    def commit(self, step: TierStep, k: Tensor, v: Tensor, hidden: Tensor | None) -> None:
        """The ``store_kv`` of a step: apply its moves, then place its new tokens.

        k, v: (B, Hkv, m, D) of the step's new slots, hidden (B, m, hidden) or None.
        """
        new_start = step.new_tokens[0].tokens.start
        if new_start != self.num_tokens:
            raise ValueError(f"step {step.step_idx} adds slots from {new_start}, the store "
                             f"holds {self.num_tokens}")
        for move in step.moves:
            self.move(move.tokens, move.src, move.dst)
        for placement in step.new_tokens:
            part = slice(placement.tokens.start - new_start, placement.tokens.end - new_start)
            self.append(k[:, :, part], v[:, :, part],
                        None if hidden is None else hidden[:, part], placement.tier)

    # ---- reads (see selection.py) ----------------------------------------------------------
    def tier_masks(self, indices: Tensor) -> selection.TierMasks:
        """Which tier each selected entry of ``indices`` (B, K) | (B, Hkv, K) lives in."""
        return selection.tier_masks(self, indices)

    def fetch(self, indices: Tensor, skip_cpu: bool = False,
              dense: bool = False) -> selection.FetchedKV:
        """``load_kv``: copy the selected CPU-tier K,V and recompute hidden states to the device
        (``dense``: a dense selection, copied by tier ranges)."""
        if dense and not skip_cpu:
            return dense_read.fetch(self, indices)
        if skip_cpu and self.host_ready():  # attended in place on the host: nothing to copy
            if dense:
                return dense_read.fetch_host(self, indices)
            idx = selection.expand_heads(self, indices)
            return selection.fetch_in_place(self, idx, idx.numel(), dense=False)
        return selection.fetch(self, indices, skip_cpu)

    def gather(self, indices: Tensor, recompute_kv: selection.RecomputeFn | None,
               fetched: selection.FetchedKV | None = None,
               skip_cpu: bool = False) -> tuple[Tensor, Tensor]:
        """K, V (B, Hkv, K, D) of the selection on the device (recomputing dropped slots), as
        new tensors the caller may write into."""
        if fetched is not None and fetched.dense and not fetched.in_place:
            selection.check_fetched(self, indices, fetched, skip_cpu)
            return dense_read.gather(self, fetched, recompute_kv)
        return selection.gather(self, indices, recompute_kv, fetched, skip_cpu)

    def dense_views(self, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor] | None:
        """K, V (B, Hkv, n + 1, D) of every stored slot then the step's own token, read in
        place, as the Engine reads its cache; None when the tiers do not allow it.

        Allowed when every stored slot is in the GPU tier (an uncompressed ring starting at
        slot 0) and the ring's next index, right after slot n - 1, is free. The new token's
        k, v (B, Hkv, 1, D) are written there ahead of the step's ``commit``, which writes the
        same values to the same index (ranges do not change until then; a move in that commit
        reads only older slots). Otherwise read with ``fetch`` / ``gather``.
        """
        gpu = self.ranges[Tier.GPU]
        if gpu.start != 0 or gpu.end >= self.gpu.capacity or self.gpu.bits is not None:
            return None
        return self._views_ahead(self.gpu, gpu.end, k_new, v_new)

    def host_ready(self) -> bool:
        """Whether a step may attend the CPU tier in place (``host_dense_views``,
        ``host_gather``): every stored slot in an uncompressed CPU tier from slot 0, and the
        ring's next index free."""
        cpu = self.ranges[Tier.CPU]
        return (0 == cpu.start < cpu.end == self.num_tokens < self.cpu.capacity
                and self.cpu.bits is None)

    def host_dense_views(self, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor] | None:
        """Host K, V (B, Hkv, n + 1, D) of every stored slot, read in place from the CPU tier,
        then the step's own token, for CPU-delegated dense attention; None unless
        ``host_ready()``. As ``dense_views`` on the device ring, the new k, v are written at the
        ring's next index ahead of the step's ``commit``: a free index, which that commit
        writes the same values to if it places the token in the CPU tier."""
        if not self.host_ready():
            return None
        return self._views_ahead(self.cpu, self.num_tokens, k_new, v_new)

    def host_gather(self, indices: Tensor, k_new: Tensor,
                    v_new: Tensor) -> tuple[Tensor, Tensor] | None:
        """Host K, V (B, Hkv, K, D) of a sparse selection ``indices`` (B, K) | (B, Hsel, K) of
        slots in [0, n], where slot n is the step's own token, for CPU-delegated attention;
        None unless ``host_ready()``. The new k, v (B, Hkv, 1, D) are written at the CPU ring's
        next index ahead of the commit, as ``host_dense_views`` does, so one gather of the
        ring reads stored slots and the new token alike (padding entries, which point at slot
        n, read it too)."""
        if not self.host_ready():
            return None
        self._write_ahead(self.cpu, self.num_tokens, k_new, v_new)
        return self.cpu.gather_slots(selection.expand_heads(self, indices).to("cpu"))

    # ---- checks ---------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise RuntimeError unless the tiers partition [0, n) and fit their pools."""
        rec, cpu, gpu = (self.ranges[t] for t in (Tier.RECOMPUTE, Tier.CPU, Tier.GPU))
        if rec.start != 0 or rec.end != cpu.start or cpu.end != gpu.start:
            raise RuntimeError(f"tiers do not partition [0, {gpu.end}): recompute {rec}, "
                               f"cpu {cpu}, gpu {gpu}")
        for tier, ring in ((Tier.GPU, self.gpu), (Tier.CPU, self.cpu)):
            if len(self.ranges[tier]) > ring.capacity:
                raise RuntimeError(f"{tier.value} tier holds {len(self.ranges[tier])} tokens, "
                                   f"ring capacity {ring.capacity}")
        if rec.end > self.hidden.num_kept:
            raise RuntimeError(f"recompute tier {rec} but hidden kept only for "
                               f"[0, {self.hidden.num_kept})")
        expected_kept = min(gpu.end, self.hidden.capacity)
        if self.hidden.num_kept != expected_kept:
            raise RuntimeError(f"hidden kept for {self.hidden.num_kept} slots, expected "
                               f"{expected_kept}")

    def _write_ahead(self, ring: KVRing, index: int, k_new: Tensor, v_new: Tensor) -> None:
        """Write the step's own k, v (B, Hkv, 1, D) at the ring's free ``index`` before its
        commit, and remember them: a commit that appends the same tensors there, unmodified,
        then skips its copy (same values, same place) but still counts the bytes."""
        ring.write(index, k_new, v_new)
        self._ahead = _WrittenAhead(ring, index, (k_new, v_new), _identity(k_new),
                                    _identity(v_new))

    def _views_ahead(self, ring: KVRing, num_stored: int, k_new: Tensor,
                     v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Views (B, Hkv, n + 1, D) of slots [0, n) of an uncompressed ring holding them from
        index 0, then the step's own k, v, written at index n ahead of its commit."""
        self._write_ahead(ring, num_stored, k_new, v_new)
        k_parts, v_parts = ring.range_views(0, num_stored + 1)
        return k_parts[0], v_parts[0]


def _identity(t: Tensor) -> tuple:
    """What makes two tensors hold the same values without comparing them: the same memory,
    layout and dtype, and no in-place change since (the version counter views share)."""
    return (t.data_ptr(), t.device, t.dtype, tuple(t.shape), t.stride(), t._version)


@dataclass(frozen=True)
class _WrittenAhead:
    ring: KVRing
    index: int  # the ring's slot index written
    alive: tuple[Tensor, Tensor]  # the k, v written, held so that no other tensor reuses
    k: tuple  # their memory before the commit; then _identity of each
    v: tuple

    def holds(self, ring: KVRing, index: int, k: Tensor, v: Tensor) -> bool:
        return (ring is self.ring and index == self.index and _identity(k) == self.k
                and _identity(v) == self.v)

