"""flexalisa: offline large-batch LLM generation with FlexGen-style offloading and ALISA's
sparse KV caching.

Python API (``flexalisa/api.py``): ``from flexalisa import LLM, SamplingParams``. The command
line: ``flexalisa generate|bench|report|eval`` (``flexalisa/cli.py``). Names load on first use,
so the command line starts without importing torch.
"""

from __future__ import annotations

__all__ = ["LLM", "Completion", "SamplingParams"]


def __getattr__(name: str):
    if name in ("LLM", "Completion"):
        from flexalisa import api

        return getattr(api, name)
    if name == "SamplingParams":
        from flexalisa.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'flexalisa' has no attribute {name!r}")
