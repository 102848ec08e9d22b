"""Pure transforms ``f(state, *, cfg) -> state`` over :class:`~cq.state.LayerState`.

Families: scales and rounding (``absmax_scale``, ``round_to_nearest``), checks, metrics, data-aware
rounding (``gptq_update``, ``ldlq``; Hessian helpers in :mod:`cq.transforms.hessian`), rotations
(``hadamard`` functions, ``convrot``, ``incoherence``), the QuIP recipe (``quip_pipeline``), LoRA
merging (``merge_lora``), calibration attach and Hessian checks (``attach_data``, ``check_hessian``,
``shrink_hessian``), scale search, W8A8-aware rounding, learned rounding, bias correction, FP8, the
fused per-row RTN stage, and the SmoothQuant model transform (``smoothquant``).
"""

from .checks import check_finite, check_linear
from .convrot import ConvRot, ConvRotConfig, convrot, convrot_groupsizes, rotate_hessian
from .gptq import GPTQConfig, gptq_update
from .hadamard import (KroneckerOrthogonal, hadamard_matrix, hadamard_transform, is_hadamard_order, kron_apply,
                       orthogonal_transform, paley_hadamard, random_orthogonal, randomized_hadamard_transform,
                       regular_hadamard, sylvester_hadamard, transform_plan)
from .hessian import DampingConfig
from .incoherence import Incoherence, IncoherenceConfig, incoherence, undo_incoherence
from .ldlq import LDLQConfig, ldlq
from .lora import LoraFactors, MergeLoraConfig, merge_lora
from .metrics import (MetricsConfig, measure, mse, rel_output_error, sqnr_db, w8a8_output_error, weight_metrics)
from .quip import QuIPConfig, quip_config_from_legacy, quip_extra_tensors, quip_ldlq, quip_pipeline
from .rounding import RoundConfig, dequantize, fp16_cast, int8_format, reconstruct, round_to_nearest
from .scales import ScaleConfig, absmax_scale, compute_scale, expand_scale
from .attach import LayerData, attach_data
from .bias_correction import BiasCorrectionConfig, bias_correction
from .fp8 import Fp8Config, fp8_pipeline, fp8_round, fp8_scale, measure_fp8
from .fused import FusedRTNConfig, fused_rtn
from .hessian_check import HessianCheckConfig, check_hessian
from .hessian_shrink import HessianShrinkConfig, shrink_hessian
from .learned_round import LearnedRoundConfig, learned_round
from .quip_refine import QuIPRefineConfig, with_refinements
from .scale_search import ScaleSearchConfig, scale_search
from .smoothquant import SmoothQuantConfig, smoothquant
from .upstream import UpstreamConfig, upstream_correct
from .w8a8_round import W8A8RoundConfig, w8a8_round

__all__ = [
    "check_finite", "check_linear",
    "ScaleConfig", "absmax_scale", "compute_scale", "expand_scale",
    "RoundConfig", "round_to_nearest", "dequantize", "reconstruct", "fp16_cast", "int8_format",
    "MetricsConfig", "measure", "mse", "sqnr_db", "weight_metrics", "rel_output_error", "w8a8_output_error",
    "DampingConfig", "GPTQConfig", "gptq_update", "LDLQConfig", "ldlq",
    "hadamard_transform", "randomized_hadamard_transform", "orthogonal_transform", "hadamard_matrix",
    "sylvester_hadamard", "paley_hadamard", "regular_hadamard", "KroneckerOrthogonal", "kron_apply",
    "random_orthogonal", "transform_plan", "is_hadamard_order",
    "ConvRot", "ConvRotConfig", "convrot", "convrot_groupsizes", "rotate_hessian",
    "IncoherenceConfig", "Incoherence", "incoherence", "undo_incoherence",
    "QuIPConfig", "quip_pipeline", "quip_config_from_legacy", "quip_extra_tensors", "quip_ldlq",
    "LoraFactors", "MergeLoraConfig", "merge_lora",
    "LayerData", "attach_data", "HessianCheckConfig", "check_hessian", "HessianShrinkConfig", "shrink_hessian",
    "ScaleSearchConfig", "scale_search", "W8A8RoundConfig", "w8a8_round", "UpstreamConfig", "upstream_correct", "BiasCorrectionConfig", "bias_correction",
    "LearnedRoundConfig", "learned_round", "QuIPRefineConfig", "with_refinements", "Fp8Config", "fp8_pipeline",
    "fp8_scale", "fp8_round", "measure_fp8", "FusedRTNConfig", "fused_rtn", "SmoothQuantConfig", "smoothquant",
]
