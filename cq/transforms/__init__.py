"""Pure transforms ``f(state, *, cfg) -> state`` over :class:`~cq.state.LayerState`.

Families: scales and rounding (``absmax_scale``, ``round_to_nearest``), checks, metrics, data-aware
rounding (``gptq_update``, ``ldlq``; Hessian helpers in :mod:`cq.transforms.hessian`), rotations
(``hadamard`` functions, ``convrot``, ``incoherence``), the QuIP recipe (``quip_pipeline``) and
LoRA merging (``merge_lora``).
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
]
