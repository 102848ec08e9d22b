"""cq: convert safetensors weights to INT8 files that ComfyUI loads natively."""

from .errors import ConfigError, CqError, InputError, NonFiniteWeightError, UnsupportedBackendError
from .pipeline import Pipeline, Stage, pipeline, stage, tap
from .state import LayerState, PerBlock, PerGroup, PerRow, PerTensor, record

__version__ = "0.1.0"

__all__ = [
    "CqError",
    "ConfigError",
    "InputError",
    "NonFiniteWeightError",
    "UnsupportedBackendError",
    "LayerState",
    "PerTensor",
    "PerRow",
    "PerBlock",
    "PerGroup",
    "record",
    "Stage",
    "Pipeline",
    "pipeline",
    "stage",
    "tap",
]
