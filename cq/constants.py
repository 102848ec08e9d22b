"""The reference's ``convert_to_quant.constants`` names: dtypes, INT8 range, presets, type aliases."""

from __future__ import annotations

from typing import Any, Dict

import torch

from .presets import (
    AVOID_KEY_NAMES,
    DISTILL_LAYER_KEYNAMES_LARGE,
    DISTILL_LAYER_KEYNAMES_SMALL,
    FLUX2_LAYER_KEYNAMES,
    HUNYUAN_AVOID_KEY_NAMES,
    LORA_AVOID_KEY_NAMES,
    MODEL_FILTERS,
    NERF_LAYER_KEYNAMES_LARGE,
    NERF_LAYER_KEYNAMES_SMALL,
    QWEN_AVOID_KEY_NAMES,
    QWEN_LAYER_KEYNAMES,
    RADIANCE_LAYER_KEYNAMES,
    T5XXL_REMOVE_KEY_NAMES,
    VISUAL_AVOID_KEY_NAMES,
    WAN_LAYER_KEYNAMES,
    ZIMAGE_AVOID_KEY_NAMES,
    ZIMAGE_LAYER_KEYNAMES,
    ZIMAGE_REFINER_LAYER_KEYNAMES,
    build_exclusion_patterns,
)

__all__ = [
    "TARGET_INT8_DTYPE",
    "COMPUTE_DTYPE",
    "SCALE_DTYPE",
    "INT8_MIN",
    "INT8_MAX",
    "INT8_SYMMETRIC_MAX",
    "VALID_QUANT_FORMATS",
    "NORMALIZE_SCALES_ENABLED",
    "MODEL_FILTERS",
    "build_exclusion_patterns",
    "WeightTensor",
    "ScaleTensor",
    "HessianMatrix",
    "FilterFlags",
    "LayerConfig",
    "AVOID_KEY_NAMES",
    "LORA_AVOID_KEY_NAMES",
    "T5XXL_REMOVE_KEY_NAMES",
    "VISUAL_AVOID_KEY_NAMES",
    "QWEN_AVOID_KEY_NAMES",
    "HUNYUAN_AVOID_KEY_NAMES",
    "ZIMAGE_AVOID_KEY_NAMES",
    "FLUX2_LAYER_KEYNAMES",
    "DISTILL_LAYER_KEYNAMES_LARGE",
    "DISTILL_LAYER_KEYNAMES_SMALL",
    "NERF_LAYER_KEYNAMES_LARGE",
    "NERF_LAYER_KEYNAMES_SMALL",
    "RADIANCE_LAYER_KEYNAMES",
    "WAN_LAYER_KEYNAMES",
    "QWEN_LAYER_KEYNAMES",
    "ZIMAGE_LAYER_KEYNAMES",
    "ZIMAGE_REFINER_LAYER_KEYNAMES",
]

TARGET_INT8_DTYPE = torch.int8
COMPUTE_DTYPE = torch.float32
SCALE_DTYPE = torch.float32

INT8_MIN = int(torch.iinfo(TARGET_INT8_DTYPE).min)  # -128: never produced (codes are symmetric)
INT8_MAX = int(torch.iinfo(TARGET_INT8_DTYPE).max)  # 127
INT8_SYMMETRIC_MAX = min(-INT8_MIN, INT8_MAX)  # 127: codes lie in [-127, 127]

#: The ``.comfy_quant`` int8 format labels the reference writes. Only ``int8_tensorwise`` loads
#: in vanilla ComfyUI; cq writes the other two only on explicit request.
VALID_QUANT_FORMATS = frozenset({"int8_tensorwise", "int8_blockwise", "int8_axiswise"})

#: 1-element scales are written as 0-d tensors (the reference's always-on normalisation).
NORMALIZE_SCALES_ENABLED = True

# Type aliases (the reference's API.md).
WeightTensor = torch.Tensor  # [out_features, in_features]
ScaleTensor = torch.Tensor  # () tensor-wise, [out_features, 1] per row, [N/bs, K/bs] blockwise
HessianMatrix = torch.Tensor  # [in_features, in_features], H = 2/T · XᵀX
FilterFlags = Dict[str, bool]  # {preset name: enabled}
LayerConfig = Dict[str, Any]  # see cq.io.layer_config.load_layer_config
