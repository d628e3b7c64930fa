"""Greedy and temperature/top-p sampling with one random generator per row.

Each row draws from its own `torch.Generator` seeded from (seed, row key), so a row's sample does
not depend on which other rows share its batch: a resumed job reproduces an uninterrupted one.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax); > 0 scales logits before sampling
    top_p: float = 1.0  # nucleus: sample among the smallest set of tokens with this much mass
    seed: int = 0  # combined with each row's key into that row's generator seed

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def row_generators(params: SamplingParams, keys: list[str]) -> list[torch.Generator] | None:
    if params.greedy:
        return None
    gens = []
    for key in keys:
        g = torch.Generator()
        g.manual_seed(zlib.crc32(f"{params.seed}:{key}".encode()))
        gens.append(g)
    return gens


def sample(logits: Tensor, params: SamplingParams,
           generators: list[torch.Generator] | None) -> Tensor:
    """logits (B, V) float32 -> next token ids (B,) on logits' device."""
    if params.greedy:  # max(dim)'s indices: argmax's (first maximum on ties), ~2x faster on CPU
        return logits.max(dim=-1).indices
    probs = torch.softmax(logits.float() / params.temperature, dim=-1).cpu()
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(dim=-1)
        drop = cumulative - sorted_probs >= params.top_p  # keeps at least the top token
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    assert generators is not None and len(generators) == probs.shape[0]
    picks = [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)]
    return torch.cat(picks).to(logits.device)
