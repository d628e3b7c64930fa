"""Cost model: model shapes, hardware profiles, per-layer costs and the placement LP."""

from cost_model.spec import ModelSpec

__all__ = ["ModelSpec"]
