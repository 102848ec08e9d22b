"""Structural check that a safetensors file loads correctly in vanilla ComfyUI (no comfy-kitchen needed).

Mirrors ComfyUI 0.29's loader rules (``comfy/utils.py::convert_old_quants``, ``comfy/ops.py::
_load_quantized_module``): the header's ``_quantization_metadata`` overrides ``.comfy_quant``
tensors; each quantized layer needs a 2-D weight of the format's storage dtype and a finite,
positive float32 ``weight_scale`` of a shape the runtime reads correctly.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from ..errors import InputError
from .comfy import NATIVE_FORMATS, QUANT_METADATA_KEY, decode_comfy_quant
from .loader import SafetensorsHeader, read_header, read_tensor

__all__ = ["COMFY_DTYPES", "validate_comfy_file", "quant_configs"]

#: dtypes ComfyUI's own header parser (``comfy/utils.py::_TYPES``) knows; any other is a KeyError there.
COMFY_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL",
                          "F8_E4M3", "F8_E5M2", "C64", "U64", "U32", "U16"})
_STORAGE = {"int8_tensorwise": "I8", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
# Extra tensors the reference's QuIP path writes; vanilla ComfyUI drops them, which is silently wrong
# when the stored weight is in the transformed basis.
_TRANSFORM_SUFFIXES = (".smooth_factors", ".hadamard_quip", ".hadamard_size_in", ".hadamard_size_out",
                       ".sign_row", ".sign_col", ".quip_s_u", ".quip_s_v")


def _header_layers(header: SafetensorsHeader, problems: list[str]) -> dict[str, dict[str, Any]] | None:
    raw = header.metadata.get(QUANT_METADATA_KEY)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError as e:
        problems.append(f"{QUANT_METADATA_KEY}: not valid JSON ({e}); ComfyUI's json.loads fails on it")
        return None
    layers = doc.get("layers") if isinstance(doc, dict) else None
    if not isinstance(layers, dict):
        problems.append(f"{QUANT_METADATA_KEY}: must be a JSON object with a 'layers' object")
        return None
    good = {}
    for name, entry in layers.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("format"), str):
            problems.append(f"{QUANT_METADATA_KEY}: layer {name!r} must map to an object with a str "
                            f"'format', got {entry!r}")
        else:
            good[name] = entry
    return good


def quant_configs(path: str | os.PathLike, problems: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """The per-layer quant configs ComfyUI would use: ``.comfy_quant`` tensors overlaid by the header.

    Decoding problems and header/tensor disagreements are appended to ``problems`` when given.
    """
    problems = [] if problems is None else problems
    header = read_header(path)
    tensor_confs: dict[str, dict[str, Any]] = {}
    with open(header.path, "rb") as f:
        for name, info in header.tensors.items():
            if not name.endswith(".comfy_quant"):
                continue
            if info.dtype_name != "U8" or len(info.shape) != 1:
                problems.append(f"{name}: must be a 1-D U8 tensor of JSON bytes, got {info.dtype_name}"
                                f"{list(info.shape)}")
                continue
            try:
                tensor_confs[name[: -len(".comfy_quant")]] = decode_comfy_quant(read_tensor(f, info, header.path),
                                                                                name=name)
            except InputError as e:
                problems.append(str(e))
    header_confs = _header_layers(header, problems)
    confs = dict(tensor_confs)
    if header_confs is not None:
        for layer, entry in header_confs.items():
            if layer in tensor_confs and tensor_confs[layer] != entry:
                problems.append(f"{layer}: {QUANT_METADATA_KEY} says {entry} but {layer}.comfy_quant says "
                                f"{tensor_confs[layer]}; ComfyUI uses the header")
            confs[layer] = entry
    return confs


def _is_power_of_4(g: Any) -> bool:
    return isinstance(g, int) and not isinstance(g, bool) and g >= 4 and (g & (g - 1)) == 0 and (
        g.bit_length() - 1) % 2 == 0


def _check_scale(layer: str, header: SafetensorsHeader, f, n: int, problems: list[str],
                 allowed_shapes: list[tuple[int, ...]]) -> None:
    key = f"{layer}.weight_scale"
    info = header.tensors.get(key)
    if info is None:
        problems.append(f"{layer}: {key} is missing; ComfyUI raises 'Missing ... weight scale' at load")
        return
    if info.dtype_name != "F32":
        problems.append(f"{key}: dtype {info.dtype_name}; write scales as F32 (bf16/fp16 scales fail or "
                        "degrade in comfy-kitchen)")
    if info.shape not in allowed_shapes:
        if info.shape == (n,) and n > 1:
            problems.append(f"{key}: shape [{n}] is 1-D; comfy-kitchen's dequantize broadcasts it along K "
                            f"(an error for N != K, silently wrong weights for N == K); write [{n}, 1]")
        else:
            problems.append(f"{key}: shape {list(info.shape)}; allowed {[list(s) for s in allowed_shapes]}")
        return
    scale = read_tensor(f, info, header.path).to(torch.float64)
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        problems.append(f"{key}: {int(bad.sum())} of {scale.numel()} values are not finite and positive")


def _check_layer(layer: str, entry: dict[str, Any], header: SafetensorsHeader, f, problems: list[str]) -> None:
    fmt = entry["format"]
    weight = header.tensors.get(f"{layer}.weight")
    if weight is None:
        problems.append(f"{layer}: quant entry {entry} but no {layer}.weight tensor")
        return
    if len(weight.shape) != 2:
        problems.append(f"{layer}: quant entry on a {len(weight.shape)}-D weight {list(weight.shape)}; "
                        "ComfyUI quantizes only Linear layers and would load raw codes here")
        return
    if fmt == "int8_quip_transformed":
        problems.append(f"{layer}: format {fmt!r} (QuIP, stored in the transformed basis) is not loadable by "
                        "vanilla ComfyUI; map it back with cq.io.quip_file.dequantize_transformed_file")
        return
    if fmt not in NATIVE_FORMATS:
        problems.append(f"{layer}: format {fmt!r} is not loadable by vanilla ComfyUI (KeyError at model "
                        "load); it needs a custom node")
        return
    if "full_precision_matrix_mult" in entry and not isinstance(entry["full_precision_matrix_mult"], bool):
        problems.append(f"{layer}: full_precision_matrix_mult must be true/false, got "
                        f"{entry['full_precision_matrix_mult']!r}")
    n, k = weight.shape
    want = _STORAGE.get(fmt)
    if want is not None and weight.dtype_name != want:
        problems.append(f"{layer}.weight: dtype {weight.dtype_name} but format {fmt!r} stores {want}; "
                        "ComfyUI casts it numerically, which gives garbage")
    if fmt == "int8_tensorwise":
        _check_scale(layer, header, f, n, problems, [(), (1,), (n, 1)])
        if f"{layer}.input_scale" in header.tensors:
            problems.append(f"{layer}.input_scale: ignored by ComfyUI for int8_tensorwise; do not write it")
        if entry.get("convrot"):
            g = entry.get("convrot_groupsize", 256)
            if not _is_power_of_4(g):
                problems.append(f"{layer}: convrot_groupsize {g!r} must be a power of 4 (16, 64, 256, ...)")
            elif k % g:
                problems.append(f"{layer}: convrot_groupsize {g} does not divide in_features {k}")
    elif fmt in ("float8_e4m3fn", "float8_e5m2"):
        _check_scale(layer, header, f, n, problems, [(), (1,)])
        info = header.tensors.get(f"{layer}.input_scale")
        if info is not None:  # a static activation scale: comfy-kitchen needs one float32 value
            if info.dtype_name != "F32" or info.shape not in ((), (1,)):
                problems.append(f"{layer}.input_scale: {info.dtype_name} {list(info.shape)}; write one F32 value")
            else:
                v = float(read_tensor(f, info, header.path).reshape(()))
                if not (v > 0 and v != float("inf")):
                    problems.append(f"{layer}.input_scale: {v} is not finite and positive")


def validate_comfy_file(path: str | os.PathLike) -> list[str]:
    """Problems that would stop vanilla ComfyUI (0.29) from loading ``path`` correctly; ``[]`` = ok.

    Checks the raw header (dtypes ComfyUI knows, string metadata, ``_quantization_metadata``
    shape, full byte coverage), decodes every ``.comfy_quant``, compares them with the header, and
    checks every quantized layer (2-D weight of the right dtype, native format, float32 finite
    positive ``weight_scale`` of shape ``()`` or ``[N, 1]``, convrot group size) and the orphans
    ComfyUI silently mis-loads (int8/fp8 weights without a quant entry, scales without one,
    legacy ``scale_weight`` keys, transform tensors it drops).

    Example:
        >>> import tempfile, os, torch
        >>> from cq.io import write_safetensors
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = os.path.join(d, "m.safetensors")
        ...     write_safetensors(p, {"fc.weight": torch.ones(2, 2, dtype=torch.int8)})
        ...     validate_comfy_file(p)
        ['fc.weight: I8 [2, 2] weight without a quant entry; ComfyUI would load the raw integers as weights']
    """
    problems: list[str] = []
    try:
        header = read_header(path)
        confs = quant_configs(path, problems)
    except InputError as e:
        return [str(e)]
    problems.extend(header.gaps())
    for name, info in header.tensors.items():
        if info.dtype_name not in COMFY_DTYPES:
            problems.append(f"{name}: dtype {info.dtype_name} is unknown to ComfyUI's loader (KeyError)")
    with open(header.path, "rb") as f:
        for layer, entry in confs.items():
            _check_layer(layer, entry, header, f, problems)
    for name, info in header.tensors.items():
        stem, _, suffix = name.rpartition(".")
        if suffix == "weight" and info.dtype_name in ("I8", "F8_E4M3", "F8_E5M2") and stem not in confs:
            problems.append(f"{name}: {info.dtype_name} {list(info.shape)} weight without a quant entry; "
                            "ComfyUI would load the raw integers as weights")
        elif suffix == "weight_scale" and stem not in confs:
            problems.append(f"{name}: a weight_scale without a quant entry; ComfyUI drops it and loads the "
                            "weight unscaled")
        elif suffix == "scale_weight" and "scaled_fp8" not in header.tensors:
            problems.append(f"{name}: legacy non-comfy scale key; vanilla ComfyUI ignores it (write "
                            "weight_scale + .comfy_quant)")
        elif name.endswith(_TRANSFORM_SUFFIXES):
            problems.append(f"{name}: transform tensor that vanilla ComfyUI drops; the layer's weight is "
                            "only correct if stored in the original basis")
    return problems
