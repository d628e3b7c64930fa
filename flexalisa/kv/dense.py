"""Reading a dense selection by tier ranges: fetch (``load_kv``) and gather (``compute``).

A dense selection has entry ``s`` = slot ``s`` for every stored slot, as
``flexalisa.attention.selection.dense_selection`` builds it; any further entries (the step's own
token, not stored yet) are read as padding. It covers every tier whole, so instead of the
entry-by-entry read of ``flexalisa.kv.selection`` (tier masks, per-entry copies and scatters)
it is read by ranges::

    slot 0            r                  c                  n          K
      | recomputed     | CPU range,        | GPU range,       | last     |
      | whole, from    | copied as one     | copied once      | slot     |
      | kept hidden    | block (fetch)     | from ring views  | repeated |

Entries for left padding then hold their own slot's K, V instead of a repeated slot's; they are
masked either way. Counters count the selected (non-padding) tokens, bytes the ranges copied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from flexalisa.kv.selection import (
    FetchedKV,
    RecomputeFn,
    expand_heads,
    fetch_in_place,
    to_device,
)
from flexalisa.schedule import Tier, TokenRange

if TYPE_CHECKING:  # store.py imports this module for its methods
    from flexalisa.kv.store import TieredKVStore


def _selected_in(idx: Tensor, tokens: TokenRange) -> int:
    """Selected (row, slot) pairs of a dense selection (B, ·, K) in ``tokens``: the entries
    whose slot is their own position (padding entries point elsewhere)."""
    if not len(tokens):
        return 0
    own = torch.arange(tokens.start, tokens.end, device=idx.device)
    return int((idx[:, 0, tokens.start:tokens.end] == own).sum())


def _dense_indices(store: TieredKVStore, indices: Tensor) -> Tensor:
    """A dense selection as (B, Hkv, K), a view (the indices stay where they are), with an
    entry for every stored slot."""
    idx = expand_heads(store, indices)
    if idx.shape[-1] < store.num_tokens:
        raise ValueError(f"a dense selection has an entry per stored slot: {idx.shape[-1]} "
                         f"entries for {store.num_tokens} slots")
    return idx


def fetch(store: TieredKVStore, indices: Tensor) -> FetchedKV:
    """A dense selection's fetch: the CPU range copied whole, the recompute range's hidden
    states; no per-entry tier masks (a dense gather reads by ranges) and no host copy of the
    indices."""
    cfg = store.config
    idx = _dense_indices(store, indices)
    cpu_range, recompute_range = store.ranges[Tier.CPU], store.ranges[Tier.RECOMPUTE]
    cpu_k, cpu_v = store.cpu.read_range(cpu_range.start, cpu_range.end)
    cpu_k, cpu_v = to_device(store, cpu_k), to_device(store, cpu_v)
    num_cpu = _selected_in(idx, cpu_range)
    if len(cpu_range):
        store.counters.h2d_bytes += sum(p.numel() * p.element_size() for p in cpu_k + cpu_v)
        store.counters.tokens_fetched += num_cpu
    num_rec = len(recompute_range)
    slots = torch.arange(num_rec).expand(cfg.batch_size, num_rec)  # (B, r)
    hidden = store.hidden.hidden[:, :num_rec]  # (B, r, hidden), a view of the pool
    if num_rec:
        store.counters.h2d_bytes += hidden.numel() * hidden.element_size()
    return FetchedKV(indices=idx, masks=None,
                     cpu_k=cpu_k, cpu_v=cpu_v, num_cpu_entries=num_cpu * cfg.num_kv_heads,
                     num_gpu_entries=_selected_in(idx, store.ranges[Tier.GPU]) * cfg.num_kv_heads,
                     cpu_skipped=False, recompute_slots=slots.to(store.device),
                     recompute_hidden=to_device(store, [hidden])[0],
                     num_recompute=_selected_in(idx, recompute_range), version=store.version,
                     dense=True)


def fetch_host(store: TieredKVStore, indices: Tensor) -> FetchedKV:
    """A dense selection over a store whose slots are all in the CPU tier, for CPU-delegated
    attention: the host reads the tier in place at compute time (``host_dense_views``), so
    nothing is copied here."""
    idx = _dense_indices(store, indices)
    num_cpu = _selected_in(idx, store.ranges[Tier.CPU]) * store.config.num_kv_heads
    return fetch_in_place(store, idx, num_cpu, dense=True)


def gather(store: TieredKVStore, fetched: FetchedKV,
           recompute_kv: RecomputeFn | None) -> tuple[Tensor, Tensor]:
    """The three tier ranges end to end (B, Hkv, K, D); entries past the stored slots (the
    step's own token) repeat the last stored slot, for the caller to overwrite."""
    num_stored = store.num_tokens
    cpu_range = store.ranges[Tier.CPU]
    gpu_k, gpu_v = store.gpu.range_views(cpu_range.end, num_stored)  # copied once, below
    k_parts = [store.cpu.decode(fetched.cpu_k), *gpu_k]
    v_parts = [store.cpu.decode(fetched.cpu_v), *gpu_v]
    if fetched.recompute_slots.shape[1]:
        if recompute_kv is None:
            raise ValueError("recompute-tier slots are selected but no recompute_kv was given")
        k_rec, v_rec = recompute_kv(fetched.recompute_hidden, fetched.recompute_slots)
        store.counters.tokens_recomputed += fetched.num_recompute
        k_parts.insert(0, k_rec.to(k_parts[0].dtype))
        v_parts.insert(0, v_rec.to(v_parts[0].dtype))
    num_entries = fetched.indices.shape[-1]
    return _end_to_end(k_parts, num_entries), _end_to_end(v_parts, num_entries)


def _end_to_end(parts: list[Tensor], num_entries: int) -> Tensor:
    """Parts (B, Hkv, ·, D) along the slot axis, then copies of the last slot up to
    ``num_entries``; one new tensor."""
    first = parts[0]
    out = first.new_empty(first.shape[0], first.shape[1], num_entries, first.shape[3])
    pos = 0
    for part in parts:
        out[:, :, pos:pos + part.shape[2]] = part
        pos += part.shape[2]
    out[:, :, pos:] = out[:, :, pos - 1:pos]
    return out
