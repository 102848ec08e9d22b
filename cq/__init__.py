"""cq: convert safetensors weights to INT8 files that ComfyUI loads natively.

The public surface: the facade (:func:`convert_to_int8`) and converter classes of the reference
tool, the layer-state pipeline API (:class:`LayerState`, :func:`pipeline`, :func:`stage` and the
transforms in :mod:`cq.transforms`), I/O (:mod:`cq.io`) and the reference's utilities.
"""

from . import _startup  # noqa: F401 - first: `cq` started from a shell says Ctrl-C in one line, even while torch imports
from .api import convert_to_int8
from .calibrate import HessianStats, capture, hessian_finalize, hessian_init, hessian_update
from .sequential import capture_sequential
from .io.calibration import Calibration, attach_calibration, load_calibration, save_calibration, synthetic_hessian
from .config import ConvertConfig
from .constants import (COMPUTE_DTYPE, INT8_MAX, INT8_MIN, INT8_SYMMETRIC_MAX, SCALE_DTYPE, TARGET_INT8_DTYPE,
                        VALID_QUANT_FORMATS, FilterFlags, HessianMatrix, LayerConfig, ScaleTensor, WeightTensor)
from .convert import LayerPlan, convert_file, plan_model
from .model import DictView, ModelEdits, ModelView
from .converters import GPTQInt8Converter, LearnedRoundingConverter, QuIPInt8Converter
from .converters.quip import QuIPResult
from .io.quip_file import dequantize_transformed, dequantize_transformed_file
from .transforms.quip import quip_pipeline
from .errors import ConfigError, CqError, InputError, NonFiniteWeightError, UnsupportedBackendError
from .io import (MemoryEfficientSafeOpen, SafetensorsWriter, UnifiedSafetensorsLoader, check_with_comfy_kitchen,
                 validate_comfy_file, write_safetensors)
from .io.layer_config import create_layer_config_template, get_layer_settings, load_layer_config
from .logs import get_logger, setup_logging
from .lora_merge import LoraMergeConfig, merge_loras
from .lora import (load_lora_for_merging, load_lora_tensors, load_multiple_loras_for_merging, lora_key_map,
                   merge_lora_into_weight, merge_multiple_loras)
from .pipeline import Pipeline, Stage, pipeline, stage, tap
from .presets import MODEL_FILTERS, PRESETS, Preset
from .quality import QualityReporter, compute_max_error, compute_mse, compute_quality_metrics, compute_sqnr
from .recipes import FP16, GPTQ, RTN, QuIP, gptq_pipeline, recipe_pipeline, register_recipe, rtn_pipeline
from .report import ConversionReport, LayerReport
from .selection import Decision, LayerOverride, SelectionConfig, decide, iter_decisions
from .state import LayerState, PerBlock, PerGroup, PerRow, PerTensor, record
from . import synthetic  # noqa: E402 - the README's `cq.synthetic.outlier_layer` after a plain `import cq`

__version__ = "0.1.0"

__all__ = [
    # facade and converters (the reference's API)
    "convert_to_int8", "QuIPInt8Converter", "LearnedRoundingConverter", "GPTQInt8Converter",
    "UnifiedSafetensorsLoader", "MemoryEfficientSafeOpen", "QualityReporter", "load_lora_tensors",
    "load_lora_for_merging", "load_multiple_loras_for_merging", "merge_lora_into_weight", "merge_multiple_loras",
    "load_layer_config", "get_layer_settings", "create_layer_config_template", "setup_logging", "get_logger",
    "TARGET_INT8_DTYPE", "COMPUTE_DTYPE", "SCALE_DTYPE", "INT8_SYMMETRIC_MAX", "INT8_MIN", "INT8_MAX",
    "MODEL_FILTERS", "VALID_QUANT_FORMATS", "WeightTensor", "ScaleTensor", "HessianMatrix", "FilterFlags",
    "LayerConfig", "compute_mse", "compute_sqnr", "compute_max_error", "compute_quality_metrics",
    # cq's own API
    "ConvertConfig", "convert_file", "ConversionReport", "LayerReport", "SelectionConfig", "LayerOverride",
    "Decision", "decide", "iter_decisions", "PRESETS", "Preset", "lora_key_map", "merge_loras", "LoraMergeConfig",
    "SafetensorsWriter",
    "write_safetensors", "validate_comfy_file", "check_with_comfy_kitchen", "rtn_pipeline", "recipe_pipeline", "register_recipe", "RTN", "GPTQ", "QuIP", "FP16",
    "LayerPlan", "plan_model", "ModelEdits", "ModelView", "DictView",
    "LayerState", "PerTensor", "PerRow", "PerBlock", "PerGroup", "record", "Stage", "Pipeline", "pipeline",
    "stage", "tap",
    "capture", "capture_sequential", "HessianStats", "hessian_init", "hessian_update", "hessian_finalize", "save_calibration",
    "load_calibration", "Calibration", "synthetic_hessian", "attach_calibration", "gptq_pipeline", "quip_pipeline",
    "QuIPResult", "dequantize_transformed", "dequantize_transformed_file", "synthetic",
    # errors
    "CqError", "ConfigError", "InputError", "NonFiniteWeightError", "UnsupportedBackendError",
]

_startup.release()  # last: a Ctrl-C held while torch imported is raised here, in Python
