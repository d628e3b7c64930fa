"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""

from __future__ import annotations


class FlexalisaError(Exception):
    """Bad input or an impossible request; the message names the bad value and the limit."""


class ModelLoadError(FlexalisaError):
    """A checkpoint that is missing, corrupt, truncated or of an unsupported architecture."""


class JobInputError(FlexalisaError):
    """A malformed prompts file: bad JSON, missing or duplicate ids, over-long prompts."""


class BudgetError(FlexalisaError):
    """A policy that cannot fit the device/host memory budgets; says what would fit.

    ``device_over``: bytes by which the policy's fixed device reservation (weights,
    activations, working buffers) exceeds the device budget; 0 when something else misfits.
    """

    def __init__(self, message: str, device_over: int = 0) -> None:
        super().__init__(message)
        self.device_over = device_over


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (tokenizers' messages span several)."""
    return " ".join(str(exc).split())
