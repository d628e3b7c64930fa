"""Per-GPU-batch state of one block: rows, positions, validity, sampling and the method state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from flexalisa.attention import SparsityMethod
from flexalisa.attention.base import MethodState
from flexalisa.engine import left_pad
from flexalisa.sampling import RowSampler, SamplingParams
from flexalisa.stops import StopWhen


@dataclass
class BatchState:
    """One GPU batch of a block; rows that are padding (``rows[r] is None``) are never reported."""

    rows: list[int | None]  # original prompt index of each row, None for a filler row
    prompt_ids: Tensor  # (B, T) left-padded prompt ids on the device
    valid: Tensor  # (B, T + N) bool on the device: prompt validity, then True for every step
    pad: Tensor  # (B,) long left padding per row (slot = position + pad)
    ids: Tensor  # (B,) long next input ids (after the prefill)
    positions: Tensor  # (B,) long next positions
    limits: list[int]  # tokens each row may generate (0 for filler rows)
    method_state: MethodState  # the sparsity method's per-layer scores for these rows
    sampler: RowSampler  # per-row sampling params and generators
    tokens: list[list[int]] = field(default_factory=list)  # generated ids per row
    reasons: list[str] = field(default_factory=list)  # finish reason per row
    finished: list[bool] = field(default_factory=list)  # row done (EOS or limit)
    cache: dict[str, Any] = field(default_factory=dict)  # per-step tensors shared by layers

    @property
    def prompt_len(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def done(self) -> bool:
        return all(self.finished)


def make_batch(prompts: list[list[int]], rows: list[int | None], limits: list[int],
               num_steps: int, pad_id: int, method: SparsityMethod, num_layers: int,
               num_kv_heads: int, sampling: list[SamplingParams], keys: list[str],
               device: torch.device, prompt_len: int) -> BatchState:
    """A GPU batch left-padded to ``prompt_len`` (the block's longest prompt); ``sampling``
    and ``keys``: each row's."""
    ids, valid = left_pad(prompts, pad_id)
    extra = prompt_len - ids.shape[1]  # pad further so every GPU batch shares slot indices
    ids = torch.cat([torch.full((len(prompts), extra), pad_id, dtype=torch.long), ids], 1)
    valid = torch.cat([torch.zeros(len(prompts), extra, dtype=torch.bool), valid], 1)
    length = prompt_len
    full_valid = torch.cat([valid, torch.ones(len(prompts), num_steps, dtype=torch.bool)], 1)
    state = method.init_state(len(prompts), num_layers, num_kv_heads, length + num_steps, device)
    return BatchState(
        rows=rows, prompt_ids=ids.to(device), valid=full_valid.to(device),
        pad=(length - valid.sum(1)).to(device), ids=ids[:, -1].to(device),
        positions=valid.sum(1).to(device), limits=limits, method_state=state,
        sampler=RowSampler(sampling, keys), tokens=[[] for _ in rows],
        reasons=["length"] * len(rows), finished=[limit == 0 for limit in limits])


def take_tokens(batch: BatchState, step_idx: int, logits: Tensor, eos_ids: Tensor,
                ignore_eos: bool, max_position: int,
                stop_when: StopWhen | None = None) -> int:
    """Sample step ``step_idx``'s token of every row; record it for live rows; return how many
    were recorded. The sampled ids become the next step's input. A row ends at EOS (unless
    ``ignore_eos``), when ``stop_when(prompt index, tokens)`` says so, or at its limit."""
    next_ids = batch.sampler.sample(logits)
    is_eos = torch.isin(next_ids, eos_ids).tolist()
    produced = 0
    for r, token in enumerate(next_ids.tolist()):
        if batch.finished[r]:
            continue
        produced += 1
        batch.tokens[r].append(token)
        if is_eos[r] and not ignore_eos or stop_when and stop_when(batch.rows[r],
                                                                   batch.tokens[r]):
            batch.reasons[r], batch.finished[r] = "stop", True
        elif len(batch.tokens[r]) >= batch.limits[r]:
            batch.finished[r] = True
    batch.ids = next_ids
    if step_idx > 0:  # the prefill's token sits at position len(prompt), the initial value
        # finished rows keep running (fixed shapes) but must not walk past the position table
        batch.positions = (batch.positions + 1).clamp_(max=max_position)
    return produced
