"""Safetensors I/O: a strict streaming loader, an atomic verified writer, and ComfyUI's quant format.

``check_with_comfy_kitchen`` needs the optional ``comfy-kitchen`` package, which it imports only
when called; importing ``cq.io`` never imports it.
"""

from .comfy import (
    INT8_FORMATS,
    NATIVE_FORMATS,
    QUANT_METADATA_KEY,
    NonNativeFormatWarning,
    comfy_quant_entry,
    decode_comfy_quant,
    encode_comfy_quant,
    layer_tensors,
    quantization_metadata,
)
from .comfy_kitchen_check import check_with_comfy_kitchen, load_comfy_layers
from .loader import (
    DTYPE_NAMES,
    DTYPES,
    MemoryEfficientSafeOpen,
    SafetensorsHeader,
    TensorInfo,
    UnifiedSafetensorsLoader,
    read_header,
)
from .validate import COMFY_DTYPES, quant_configs, validate_comfy_file
from .writer import SafetensorsWriter, same_path, write_safetensors, write_text_atomic

__all__ = [
    "UnifiedSafetensorsLoader",
    "MemoryEfficientSafeOpen",
    "read_header",
    "SafetensorsHeader",
    "TensorInfo",
    "DTYPES",
    "DTYPE_NAMES",
    "SafetensorsWriter",
    "write_safetensors",
    "write_text_atomic",
    "same_path",
    "comfy_quant_entry",
    "layer_tensors",
    "encode_comfy_quant",
    "decode_comfy_quant",
    "quantization_metadata",
    "QUANT_METADATA_KEY",
    "NATIVE_FORMATS",
    "INT8_FORMATS",
    "NonNativeFormatWarning",
    "validate_comfy_file",
    "quant_configs",
    "COMFY_DTYPES",
    "check_with_comfy_kitchen",
    "load_comfy_layers",
]
