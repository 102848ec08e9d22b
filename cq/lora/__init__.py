"""LoRA merging as ComfyUI computes it: the key map, the patch model, and the reference tool's API.

* :mod:`cq.lora.keymap`: which base tensor (or slice of a fused tensor) a LoRA layer prefix patches,
  built forward from the base model's keys as ComfyUI does.
* :mod:`cq.lora.patches`: one patch of one tensor (LoRA, LoHa, LoKr, DoRA, diff, set) and its
  arithmetic.
* :mod:`cq.lora.legacy`: ``load_lora_for_merging``, ``merge_lora_into_weight`` ... (the reference API).

The model-level merge used by conversions is :func:`cq.lora_merge.merge_loras`; files are read by
:mod:`cq.io.lora_file`.
"""

from .keymap import BaseKeyMap, Target, comfy_key_map, convert_lora_names, detect_architecture, model_prefix
from .legacy import (
    DAMPEN_BASE,
    LoraKeyMap,
    check_lora_fits,
    dampening,
    load_lora_for_merging,
    load_lora_tensors,
    load_multiple_loras_for_merging,
    lora_delta,
    lora_key_map,
    merge_lora_into_weight,
    merge_multiple_loras,
)
from .patches import LoraPatch, apply_patch, patches_from_group

__all__ = [
    "DAMPEN_BASE", "load_lora_tensors", "load_lora_for_merging", "load_multiple_loras_for_merging", "lora_delta",
    "check_lora_fits", "merge_lora_into_weight", "merge_multiple_loras", "dampening", "LoraKeyMap", "lora_key_map",
    "BaseKeyMap", "Target", "comfy_key_map", "convert_lora_names", "detect_architecture", "model_prefix",
    "LoraPatch", "apply_patch", "patches_from_group",
]
