"""Cost model: model shapes, hardware profiles, per-layer costs and the placement LP.

Torch-free except ``HardwareProfile.measure`` (``cost_model.profiling``), which imports it lazily.
"""

from cost_model.hardware import HardwareProfile
from cost_model.hardware_presets import HARDWARE_PRESETS
from cost_model.presets import MODEL_PRESETS, load_model_spec
from cost_model.spec import ModelSpec
from cost_model.units import format_bytes, parse_bytes

__all__ = ["HARDWARE_PRESETS", "MODEL_PRESETS", "HardwareProfile", "ModelSpec", "format_bytes",
           "load_model_spec", "parse_bytes"]
