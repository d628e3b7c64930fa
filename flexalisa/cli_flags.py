"""The sparsity flags shared by ``generate``, ``bench`` (``flexalisa.cli``) and ``eval``.

Torch-free, and imports nothing from ``flexalisa``, so both ``cli`` and ``eval`` can use it.
"""

from __future__ import annotations

import argparse

SPARSITY_METHOD_CHOICES = ("dense", "swa", "h2o", "local", "strided", "sinks")
SPARSITY_HELP = {  # generate/bench wording; keys: method, sparsity, per_kv_head, query_channels
    "method": "which cached tokens each decode step attends to (default: swa when --sparsity "
              "is given, else dense)",
    "sparsity": "KV sparsity s in [0, 1): share of cached tokens not read per step",
    "per_kv_head": "score and select per KV head (swa, h2o)",
    "query_channels": "swa only: choose global tokens from the current query's top-r channels "
                      "(SparQ-style; 0 = the paper's attention-history form)",
}


def add_sparsity_flags(p: argparse.ArgumentParser, method_flag: str = "--sparsity-method",
                       method_default: str | None = None,
                       method_choices: tuple[str, ...] | None = SPARSITY_METHOD_CHOICES,
                       sparsity_default: float = 0.0,
                       help_text: dict[str, str] | None = None) -> None:
    """``method_flag``, ``--sparsity``, ``--per-kv-head`` and ``--query-channels``.

    ``method_choices=None`` leaves the method name to be checked later (``eval``);
    ``help_text`` replaces entries of ``SPARSITY_HELP``.
    """
    text = {**SPARSITY_HELP, **(help_text or {})}
    p.add_argument(method_flag, default=method_default, choices=method_choices,
                   help=text["method"])
    p.add_argument("--sparsity", type=float, default=sparsity_default, help=text["sparsity"])
    p.add_argument("--per-kv-head", action="store_true", help=text["per_kv_head"])
    p.add_argument("--query-channels", type=int, default=0, help=text["query_channels"])
