"""Reading a selection out of a tiered store: fetch (``load_kv``) and gather (``compute``).

A selection is a tensor of slot indices, (B, K) or (B, 1, K) shared by the KV heads, or
(B, Hkv, K) per KV head; values in [0, n), duplicates allowed.
Each selected entry is read from the tier holding its slot::

    GPU tier        → read in place on the device
    CPU tier        → only the selected entries are copied host→device (as stored: INT8/INT4
                      codes stay compressed in transit) and decoded on the device; or, for
                      CPU-delegated attention, a ``skip_cpu`` fetch reads them on the host
                      (``FetchedKV.host``)
    recompute tier  → the distinct selected slots of each row have their hidden states copied
                      host→device; ``recompute_kv(hidden (B, R, hidden), slots (B, R))`` rebuilds
                      K,V (B, Hkv, R, D) on the device (the caller's K/V projection + RoPE; it
                      maps slot indices to RoPE positions, e.g. subtracting each row's left pad)

A dense selection (every stored slot, in slot order) is read by ranges instead
(``flexalisa.kv.dense``); the store dispatches on ``fetch(..., dense=True)``.

``fetch`` does only the copies, so the runner can issue it ahead on a copy stream or thread;
``gather`` needs the layer's weights (for recomputation) and runs at compute time. The per-row
recompute slots are padded to a common R by repeating a row's last slot (or slot 0 for a row
with none); padding is recomputed but not counted in ``tokens_recomputed``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from flexalisa.schedule import Tier

if TYPE_CHECKING:  # store.py imports this module for its methods
    from flexalisa.kv.store import TieredKVStore

RecomputeFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class TierMasks:
    """Which tier each selected entry lives in; bool (B, Hkv, K) each, disjoint, covering all."""

    gpu: Tensor  # read in place on the device
    cpu: Tensor  # fetched (or attended on the host)
    recompute: Tensor  # rebuilt from the hidden state


@dataclass(frozen=True)
class FetchedKV:
    """What ``load_kv`` brought to the device for one selection of one store."""

    indices: Tensor  # (B, Hkv, K) int64 slot indices, on the device
    masks: TierMasks | None  # on the device; None for a dense fetch (read by ranges)
    cpu_k: list[Tensor]  # stored parts of the m selected CPU-tier K entries, each (m, ·)
    cpu_v: list[Tensor]  # same for V; empty lists when skipped or none selected
    num_cpu_entries: int  # m: selected (row, head, slot) entries in the CPU tier
    num_gpu_entries: int  # selected entries in the GPU tier (0: no real entry is there)
    cpu_skipped: bool  # True: fetched with skip_cpu, CPU-tier entries left on the host
    recompute_slots: Tensor  # (B, R) int64 distinct recompute-tier slots of each row, padded
    recompute_hidden: Tensor  # (B, R, hidden) their layer inputs, on the device
    num_recompute: int  # distinct (row, slot) pairs among recompute_slots, padding excluded
    version: int  # store.version at fetch time; any later move makes this stale
    # True: a dense fetch (flexalisa.kv.dense); cpu_k / cpu_v are the CPU tier's whole range,
    # (B, Hkv, c, ·) each, and recompute_slots every slot of the recompute range, (B, r)
    dense: bool = False
    # skip_cpu with CPU-tier entries selected: their K, V (B, Hkv, K, D) and mask (B, Hkv, K)
    # on the host, read here so that a copy thread does it ahead of compute; entries outside
    # the CPU tier hold the K, V of the CPU-tier slot nearest theirs: mask them
    host: tuple[Tensor, Tensor, Tensor] | None = None
    # True: every stored slot is in an uncompressed CPU tier, so nothing was read here: the
    # host attends the tier in place at compute time (``store.host_dense_views``, and for a
    # sparse selection over a half-precision tier ``store.host_gather``); see ``fetch_in_place``
    in_place: bool = False


def expand_heads(store: TieredKVStore, indices: Tensor) -> Tensor:
    """(B, K), (B, 1, K) or (B, Hkv, K) → a (B, Hkv, K) view on ``indices``'s device."""
    cfg = store.config
    if indices.dim() == 2:
        indices = indices[:, None]  # (B, 1, K)
    if indices.dim() == 3 and indices.shape[1] == 1:
        indices = indices.expand(-1, cfg.num_kv_heads, -1)  # (B, Hkv, K)
    if indices.dim() != 3 or indices.shape[:2] != (cfg.batch_size, cfg.num_kv_heads):
        raise ValueError(f"indices must be (B, K) or (B, Hkv, K) with B={cfg.batch_size}, "
                         f"Hkv={cfg.num_kv_heads}; got {tuple(indices.shape)}")
    return indices


def _expand(store: TieredKVStore, indices: Tensor) -> Tensor:
    """(B, K), (B, 1, K) or (B, Hkv, K) → (B, Hkv, K) int64 on the host, range-checked."""
    idx = expand_heads(store, indices).to("cpu", torch.int64)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= store.num_tokens):
        raise ValueError(f"selected slots must lie in [0, {store.num_tokens}), got "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    return idx


def _masks(store: TieredKVStore, idx: Tensor) -> TierMasks:
    recompute_end, cpu_end = store.ranges[Tier.RECOMPUTE].end, store.ranges[Tier.CPU].end
    recompute, gpu = idx < recompute_end, idx >= cpu_end
    return TierMasks(gpu=gpu, cpu=~(recompute | gpu), recompute=recompute)


def tier_masks(store: TieredKVStore, indices: Tensor) -> TierMasks:
    """The tier of each selected entry, on ``indices``'s device."""
    masks = _masks(store, _expand(store, indices))
    return TierMasks(*(m.to(indices.device) for m in (masks.gpu, masks.cpu, masks.recompute)))


def to_device(store: TieredKVStore, parts: list[Tensor]) -> list[Tensor]:
    pin = torch.cuda.is_available() and store.device.type == "cuda"
    return [(p.pin_memory() if pin else p).to(store.device, non_blocking=pin) for p in parts]


def _recompute_slots(idx: Tensor, mask: Tensor) -> tuple[Tensor, int]:
    """Distinct selected slots of each row (B, R), padded by repeating; and the real count."""
    if not bool(mask.any()):
        return torch.zeros(idx.shape[0], 0, dtype=torch.int64), 0
    rows = [torch.unique(idx[b][mask[b]]) for b in range(idx.shape[0])]  # each sorted
    width = max((len(r) for r in rows), default=0)
    slots = torch.zeros(idx.shape[0], width, dtype=torch.int64)
    for b, row in enumerate(rows):
        if len(row):
            slots[b, : len(row)] = row
            slots[b, len(row):] = row[-1]
    return slots, sum(len(r) for r in rows)


def fetch(store: TieredKVStore, indices: Tensor, skip_cpu: bool = False) -> FetchedKV:
    """Copy the selection's CPU-tier entries and recompute hidden states to the device.

    ``skip_cpu``: leave CPU-tier entries on the host (the runner attends them there).
    """
    idx = _expand(store, indices)
    masks = _masks(store, idx)
    cpu_k: list[Tensor] = []
    cpu_v: list[Tensor] = []
    num_cpu_entries = int(masks.cpu.sum())
    if not skip_cpu and num_cpu_entries:
        batch_idx, head_idx, _ = masks.cpu.nonzero(as_tuple=True)
        slots = idx[masks.cpu]  # (m,)
        k_parts, v_parts = store.cpu.gather_entries(batch_idx, head_idx, slots)
        cpu_k, cpu_v = to_device(store, k_parts), to_device(store, v_parts)
        store.counters.h2d_bytes += sum(p.numel() * p.element_size() for p in k_parts + v_parts)
        store.counters.tokens_fetched += int(torch.unique(batch_idx * store.num_tokens
                                                          + slots).numel())
    slots, num_recompute = _recompute_slots(idx, masks.recompute)  # (B, R)
    hidden = store.hidden.hidden[torch.arange(idx.shape[0])[:, None], slots]  # (B, R, hidden)
    if num_recompute:
        store.counters.h2d_bytes += hidden.numel() * hidden.element_size()
    device_masks = TierMasks(*to_device(store, [masks.gpu, masks.cpu, masks.recompute]))
    host = _host_read(store, idx, masks.cpu) if skip_cpu and num_cpu_entries else None
    return FetchedKV(indices=idx.to(store.device), masks=device_masks, cpu_k=cpu_k, cpu_v=cpu_v,
                     num_cpu_entries=num_cpu_entries, num_gpu_entries=int(masks.gpu.sum()),
                     cpu_skipped=skip_cpu, host=host,
                     recompute_slots=slots.to(store.device),
                     recompute_hidden=to_device(store, [hidden])[0],
                     num_recompute=num_recompute, version=store.version)


def fetch_in_place(store: TieredKVStore, idx: Tensor, num_cpu_entries: int,
                   dense: bool) -> FetchedKV:
    """The fetch of a selection idx (B, Hkv, K) that the host will read in place from a CPU
    tier holding every stored slot (``store.host_ready()``): it copies nothing and records the
    selection and the store's version; no recompute slots, no tier masks."""
    cfg = store.config
    return FetchedKV(indices=idx, masks=None, cpu_k=[], cpu_v=[],
                     num_cpu_entries=num_cpu_entries, num_gpu_entries=0, cpu_skipped=True,
                     recompute_slots=torch.zeros(cfg.batch_size, 0, dtype=torch.int64,
                                                 device=store.device),
                     recompute_hidden=torch.zeros(cfg.batch_size, 0, cfg.hidden_size,
                                                  dtype=cfg.dtype, device=store.device),
                     num_recompute=0, version=store.version, dense=dense, in_place=True)


def _recompute(store: TieredKVStore, fetched: FetchedKV, recompute_kv: RecomputeFn,
               dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """K, V (m, D) of the m recompute-tier entries, in ``masks.recompute``'s row-major order."""
    slots = fetched.recompute_slots  # (B, R)
    k_new, v_new = recompute_kv(fetched.recompute_hidden, slots)
    cfg = store.config
    expected = (cfg.batch_size, cfg.num_kv_heads, slots.shape[1], cfg.head_dim)
    if tuple(k_new.shape) != expected or tuple(v_new.shape) != expected:
        raise ValueError(f"recompute_kv must return K, V of shape {expected}, got "
                         f"{tuple(k_new.shape)}, {tuple(v_new.shape)}")
    idx = fetched.indices
    batch, heads, num_sel = idx.shape
    flat = idx.reshape(batch, heads * num_sel).contiguous()  # searchsorted wants both dense
    column = torch.searchsorted(slots.contiguous(), flat)  # (B, Hkv*K)
    column = column.view(batch, heads, num_sel)  # (B, Hkv, K): where each slot was rebuilt
    batch_idx, head_idx, entry = fetched.masks.recompute.nonzero(as_tuple=True)  # (m,) each
    column = column[batch_idx, head_idx, entry]
    store.counters.tokens_recomputed += fetched.num_recompute
    return (k_new[batch_idx, head_idx, column].to(dtype),
            v_new[batch_idx, head_idx, column].to(dtype))


def check_fetched(store: TieredKVStore, indices: Tensor, fetched: FetchedKV,
                  skip_cpu: bool) -> None:
    if fetched.version != store.version:
        raise ValueError(f"stale fetch: made at store version {fetched.version}, tokens have "
                         f"moved since (version {store.version})")
    shape = fetched.indices.shape
    if indices.shape[0] != shape[0] or indices.shape[-1] != shape[-1]:
        raise ValueError(f"fetch was made for indices of shape {tuple(shape)}, not "
                         f"{tuple(indices.shape)}")
    if fetched.cpu_skipped and fetched.num_cpu_entries and not skip_cpu:
        raise ValueError("the fetch skipped CPU-tier entries (skip_cpu); gather with "
                         "skip_cpu=True or fetch them")


def gather(store: TieredKVStore, indices: Tensor, recompute_kv: RecomputeFn | None,
           fetched: FetchedKV | None = None, skip_cpu: bool = False) -> tuple[Tensor, Tensor]:
    """K, V (B, Hkv, K, D) of the selection on the device; CPU entries zero when ``skip_cpu``.

    Both are new tensors (never views of the store), which the caller may write into.

    ``fetched``: the result of an earlier ``fetch`` of the same indices (from ``load_kv``);
    None fetches now. ``recompute_kv`` may be None only if no recompute-tier slot is selected.
    """
    if fetched is None:
        fetched = fetch(store, indices, skip_cpu)
    else:
        check_fetched(store, indices, fetched, skip_cpu)
    if fetched.in_place:
        raise ValueError("an in-place fetch is read on the host (store.host_dense_views / "
                         "store.host_gather), not gathered to the device")
    if fetched.dense:
        raise ValueError("a dense fetch is gathered by flexalisa.kv.dense.gather")
    masks = fetched.masks
    # fresh tensors (advanced indexing copies) whose GPU-tier entries are the answer; every
    # other entry holds some ring slot and is overwritten in place below, as the tier masks
    # cover every entry: one pass over K, V plus the CPU and recompute entries themselves
    k_out, v_out = store.gpu.gather_slots(fetched.indices)  # (B, Hkv, K, D)
    if fetched.num_cpu_entries:
        if fetched.cpu_k and not skip_cpu:
            k_out[masks.cpu] = store.cpu.decode(fetched.cpu_k).to(k_out.dtype)  # (m, D)
            v_out[masks.cpu] = store.cpu.decode(fetched.cpu_v).to(v_out.dtype)
        else:
            k_out.masked_fill_(masks.cpu[..., None], 0.0)
            v_out.masked_fill_(masks.cpu[..., None], 0.0)
    if fetched.num_recompute:
        if recompute_kv is None:
            raise ValueError("recompute-tier slots are selected but no recompute_kv was given")
        k_rec, v_rec = _recompute(store, fetched, recompute_kv, k_out.dtype)  # (m, D) each
        k_out[masks.recompute] = k_rec
        v_out[masks.recompute] = v_rec
    return k_out, v_out


def _host_read(store: TieredKVStore, idx: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One gather per part with the host indices (B, Hkv, K) clamped into the (non-empty) CPU
    tier, instead of compacting its entries and scattering them back into zeros."""
    tier = store.ranges[Tier.CPU]
    k, v = store.cpu.gather_slots(idx.clamp(tier.start, tier.end - 1))
    return k, v, mask
