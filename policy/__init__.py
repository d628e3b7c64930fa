"""Policy: where weights, KV and activations live; its prediction and search (torch-free).

The runtime reads a `Policy` (``policy.policy``) and may call ``predict``; it never needs
``search``, which is imported lazily here so that ``import policy`` stays light.
"""

from __future__ import annotations

from typing import Any

from policy.policy import Policy
from policy.predict import Prediction, predict

__all__ = ["InfeasibleError", "Policy", "Prediction", "SearchResult", "SearchSpace", "predict",
           "search"]


def __getattr__(name: str) -> Any:
    if name in ("InfeasibleError", "SearchResult", "SearchSpace", "search"):
        from policy import searcher

        return getattr(searcher, name)
    raise AttributeError(f"module 'policy' has no attribute {name!r}")
