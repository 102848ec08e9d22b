"""ComfyUI's quantized-layer format as pure functions of a :class:`~cq.state.LayerState`.

An ``int8_tensorwise`` layer ``L`` is stored as ``L.weight`` (int8 ``[N, K]``), ``L.weight_scale``
(float32 ``()`` or ``[N, 1]``) and ``L.comfy_quant`` (uint8 bytes of a JSON object such as
``{"format": "int8_tensorwise"}``); ComfyUI ≥ 0.27 loads it natively. ``_quantization_metadata``
in the file header repeats the same per-layer dicts and overrides the tensors when present.

Scales are never written 1-D ``[N]`` by default: comfy-kitchen's ``dequantize()`` broadcasts a
scale along the *last* axis, so ``[N]`` raises for N ≠ K and is silently wrong for N == K (the
LoRA, text-encoder and CPU paths all dequantize).
"""

from __future__ import annotations

import json
import warnings
from typing import Any, Mapping

import torch

from ..errors import CqError, InputError
from ..state import LayerState, PerBlock, PerGroup, PerRow, PerTensor

__all__ = [
    "NATIVE_FORMATS",
    "INT8_FORMATS",
    "NonNativeFormatWarning",
    "comfy_quant_entry",
    "layer_tensors",
    "encode_comfy_quant",
    "decode_comfy_quant",
    "quantization_metadata",
    "QUANT_METADATA_KEY",
]

#: ``QUANT_ALGOS`` formats vanilla ComfyUI (0.29) loads; any other format fails the whole model load.
NATIVE_FORMATS = frozenset({"int8_tensorwise", "float8_e4m3fn", "float8_e5m2", "nvfp4", "mxfp8",
                            "convrot_w4a4"})
#: int8 format labels cq can write; only ``int8_tensorwise`` is native.
INT8_FORMATS = frozenset({"int8_tensorwise", "int8_blockwise", "int8_axiswise", "int8_quip_transformed"})
#: cq's label for QuIP layers stored in the two-sided transformed basis (``quip_store_transformed``):
#: deliberately unknown to ComfyUI so that a loader without cq.io.quip_file fails loudly.
QUIP_TRANSFORMED = "int8_quip_transformed"
#: The safetensors ``__metadata__`` key ComfyUI reads per-layer quant configs from.
QUANT_METADATA_KEY = "_quantization_metadata"


class NonNativeFormatWarning(UserWarning):
    """A layer is written in a layout vanilla ComfyUI cannot load (needs a custom node)."""


def _format_label(state: LayerState, legacy_axiswise: bool) -> str:
    fmt = state.format
    if fmt not in INT8_FORMATS:
        raise CqError(f"{state.name}: cannot write format {fmt!r}; the ComfyUI writer handles "
                      f"{sorted(INT8_FORMATS)} and 'fp16' (run round_to_nearest or fp16_cast first)")
    gran = state.granularity
    expected = "int8_blockwise" if isinstance(gran, (PerBlock, PerGroup)) else "int8_tensorwise"
    if fmt == QUIP_TRANSFORMED:
        if not isinstance(gran, (PerRow, PerTensor)):
            raise CqError(f"{state.name}: format {fmt!r} needs per-row or tensor scales, got {gran!r}")
        return fmt
    if fmt == "int8_axiswise":
        if not isinstance(gran, PerRow):
            raise CqError(f"{state.name}: format 'int8_axiswise' needs PerRow() scales, got {gran!r}")
        return fmt
    if fmt != expected:
        raise CqError(f"{state.name}: format {fmt!r} does not match granularity {gran!r} (expected "
                      f"{expected!r}); let round_to_nearest set the format")
    if legacy_axiswise and isinstance(gran, PerRow):
        return "int8_axiswise"
    return fmt


def _basis_fields(state: LayerState) -> dict[str, Any]:
    if state.basis is None or state.format == QUIP_TRANSFORMED:
        return {}  # a transformed QuIP layer describes its basis with extra tensors instead
    fields = dict(state.basis.comfy_fields())
    if not state.basis.native or not fields:
        # The stored weight is in the rotated basis; without a flag ComfyUI would multiply
        # un-rotated activations by it and produce garbage with no error.
        raise CqError(f"{state.name}: its basis {type(state.basis).__name__} has no ComfyUI-native "
                      "form; use a convrot rotation, or requantize in the original basis before writing")
    return fields


def comfy_quant_entry(state: LayerState, *, full_precision_matrix_mult: bool = False,
                      legacy_axiswise: bool = False) -> dict[str, Any]:
    """The layer's ``.comfy_quant`` dict: format, then ``group_size`` (blockwise only), then the
    rotation's fields, then ``full_precision_matrix_mult`` when set.

    Example:
        >>> import torch
        >>> from cq.transforms import absmax_scale, round_to_nearest
        >>> s = round_to_nearest(absmax_scale(LayerState.from_weight("fc", torch.randn(4, 8))))
        >>> comfy_quant_entry(s)
        {'format': 'int8_tensorwise'}
        >>> comfy_quant_entry(s, full_precision_matrix_mult=True, legacy_axiswise=True)
        {'format': 'int8_axiswise', 'full_precision_matrix_mult': True}
    """
    if state.format == "float8_e4m3fn":
        from .comfy_fp8 import fp8_comfy_quant_entry

        return fp8_comfy_quant_entry(state, full_precision_matrix_mult=full_precision_matrix_mult)
    fmt = _format_label(state, legacy_axiswise)
    entry: dict[str, Any] = {"format": fmt}
    if fmt == "int8_blockwise":
        entry["group_size"] = state.granularity.size
    entry.update(_basis_fields(state))
    if full_precision_matrix_mult:
        entry["full_precision_matrix_mult"] = True
    return entry


def _checked_scale(state: LayerState, legacy_axiswise: bool) -> torch.Tensor:
    n, k = state.shape
    gran = state.granularity
    scale = state.scale.detach().to(device="cpu", dtype=torch.float32)
    expected = tuple(gran.scale_shape(n, k))
    if isinstance(gran, PerTensor) and scale.numel() == 1:
        scale = scale.reshape(())  # ComfyUI's LoRA requant treats any dim > 0 as per-channel
    if tuple(scale.shape) != expected:
        raise CqError(f"{state.name}: scale has shape {list(scale.shape)} but {gran!r} on a [{n}, {k}] "
                      f"weight needs {list(expected)}; recompute it with absmax_scale")
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        raise CqError(f"{state.name}: {int(bad.sum())} of {scale.numel()} scales are not finite and "
                      "positive; scales must be floored at SCALE_FLOOR (1e-30) and finite")
    if isinstance(gran, PerRow) and (legacy_axiswise or state.format == "int8_axiswise"):
        scale = scale.reshape(n)
    return scale.contiguous()


def _checked_codes(state: LayerState) -> torch.Tensor:
    codes = state.codes
    if codes is None or state.scale is None or state.granularity is None:
        raise CqError(f"{state.name}: format {state.format!r} needs codes and scales, got "
                      f"codes={'set' if codes is not None else None}, scale="
                      f"{'set' if state.scale is not None else None}; run absmax_scale and round_to_nearest")
    if codes.dtype != torch.int8 or tuple(codes.shape) != tuple(state.shape):
        raise CqError(f"{state.name}: codes must be int8 {list(state.shape)}, got {codes.dtype} "
                      f"{list(codes.shape)}")
    return codes.detach().cpu().contiguous()


def layer_tensors(state: LayerState, *, comfy: bool = True, legacy_axiswise: bool = False,
                  full_precision_matrix_mult: bool = False) -> dict[str, torch.Tensor]:
    """The tensors to write for one layer, keyed by their names in the file.

    ``int8_*`` states give ``<name>.weight`` (int8 ``[N, K]``), ``<name>.weight_scale`` (float32;
    ``()`` per tensor, ``[N, 1]`` per row, ``[N/bs, K/bs]`` per block, ``[N, K/g, 1]`` per group)
    and ``<name>.comfy_quant``. ``legacy_axiswise=True`` writes per-row scales as ``[N]`` labelled
    ``int8_axiswise``; ``comfy=False`` writes the legacy ``<name>.scale_weight`` and no
    ``.comfy_quant``. Both, and ``int8_blockwise``, warn with :class:`NonNativeFormatWarning`
    because vanilla ComfyUI cannot load them. An ``fp16`` state gives only its float16 weight; a
    ``float8_e4m3fn`` state the FP8 layout of :func:`cq.io.comfy_fp8.fp8_layer_tensors`.
    ``<name>.bias`` is added, in its own dtype, when the state has one.

    Raises:
        CqError: an int8 state without codes or scales, a scale of the wrong shape, a scale that
            is not finite and positive, or a rotation ComfyUI cannot apply.

    Example:
        >>> import torch
        >>> from cq.transforms import absmax_scale, round_to_nearest
        >>> s = round_to_nearest(absmax_scale(LayerState.from_weight("fc", torch.randn(4, 8))))
        >>> for key, t in layer_tensors(s).items():
        ...     print(key, t.dtype, list(t.shape))
        fc.weight torch.int8 [4, 8]
        fc.weight_scale torch.float32 [4, 1]
        fc.comfy_quant torch.uint8 [29]
    """
    name = state.name
    if state.format == "float8_e4m3fn":  # ComfyUI's FP8 layout: cq.io.comfy_fp8
        if not comfy or legacy_axiswise:
            raise CqError(f"{name}: a float8_e4m3fn layer is written only in ComfyUI's layout (weight_scale + "
                          ".comfy_quant); drop comfy=False / legacy_axiswise for it")
        from .comfy_fp8 import fp8_layer_tensors

        return fp8_layer_tensors(state, full_precision_matrix_mult=full_precision_matrix_mult)
    out: dict[str, torch.Tensor] = {}
    if state.format == "fp16":
        if state.basis is not None:
            raise CqError(f"{name}: an fp16 layer cannot carry a rotation; cast before rotating")
        out[f"{name}.weight"] = state.weight.detach().cpu().to(torch.float16).contiguous()
    else:
        if state.format not in INT8_FORMATS:
            _format_label(state, legacy_axiswise)  # raises with the list of writable formats
        codes = _checked_codes(state)
        entry = comfy_quant_entry(state, full_precision_matrix_mult=full_precision_matrix_mult,
                                  legacy_axiswise=legacy_axiswise)
        scale = _checked_scale(state, legacy_axiswise)
        unstorable = sorted(entry.keys() - {"format", "group_size", "full_precision_matrix_mult"})
        if not comfy and unstorable:
            # A rotated weight without its flag would be multiplied by un-rotated activations.
            raise CqError(f"{name}: the legacy non-comfy format cannot store {unstorable}; write with comfy=True")
        out[f"{name}.weight"] = codes
        if entry["format"] == QUIP_TRANSFORMED:
            from ..transforms.quip import quip_extra_tensors

            out.update(quip_extra_tensors(state))
        if comfy:
            out[f"{name}.weight_scale"] = scale
            out[f"{name}.comfy_quant"] = encode_comfy_quant(entry)
        else:
            out[f"{name}.scale_weight"] = scale
        if not comfy or entry["format"] not in NATIVE_FORMATS:
            what = "the legacy non-comfy layout (scale_weight)" if not comfy else f"format {entry['format']!r}"
            lost = "; full_precision_matrix_mult is not stored there" if not comfy and full_precision_matrix_mult \
                else ""
            warnings.warn(f"{name}: {what} cannot be loaded by vanilla ComfyUI (it needs a custom node){lost}; "
                          "the default int8_tensorwise with per-row [N, 1] scales loads natively",
                          NonNativeFormatWarning, stacklevel=2)
    if state.bias is not None:
        out[f"{name}.bias"] = state.bias.detach().cpu().contiguous()
    return out


def encode_comfy_quant(entry: Mapping[str, Any]) -> torch.Tensor:
    """The ``.comfy_quant`` tensor: uint8 bytes of ``json.dumps(entry)`` (default separators, no padding).

    Example:
        >>> t = encode_comfy_quant({"format": "int8_tensorwise"})
        >>> t.dtype, t.shape, bytes(t.tolist())[:10]
        (torch.uint8, torch.Size([29]), b'{"format":')
    """
    if not isinstance(entry, Mapping) or not isinstance(entry.get("format"), str):
        raise CqError(f"a .comfy_quant entry must be a dict with a str 'format', got {entry!r}")
    data = bytearray(json.dumps(dict(entry)).encode("utf-8"))
    return torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def decode_comfy_quant(tensor: torch.Tensor, *, name: str = "comfy_quant") -> dict[str, Any]:
    """Decode a ``.comfy_quant`` tensor the way ComfyUI does, with a clear error where ComfyUI crashes.

    Example:
        >>> decode_comfy_quant(encode_comfy_quant({"format": "int8_tensorwise", "convrot": True}))
        {'format': 'int8_tensorwise', 'convrot': True}
    """
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8 or tensor.ndim != 1:
        what = f"{tensor.dtype} {list(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise InputError(f"{name}: a .comfy_quant must be a 1-D uint8 tensor of JSON bytes, got {what}")
    raw = bytes(tensor.tolist())
    if not raw:
        raise InputError(f"{name}: .comfy_quant is empty; it must hold the JSON of the layer's quant config")
    if b"\x00" in raw:
        raise InputError(f"{name}: .comfy_quant holds NUL bytes ({raw.count(0)} of {len(raw)}: zero-filled or "
                         "padded); ComfyUI's json.loads fails on it. Rewrite it from the layer config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{name}: .comfy_quant is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        entry = json.loads(text)
    except ValueError as e:
        raise InputError(f"{name}: .comfy_quant is not valid JSON ({e})") from None
    if not isinstance(entry, dict):
        raise InputError(f"{name}: .comfy_quant must be a JSON object, got {type(entry).__name__}")
    if not isinstance(entry.get("format"), str):
        raise InputError(f"{name}: .comfy_quant lacks a string 'format' (got {entry!r}); ComfyUI "
                         "raises 'Unknown quantization format'")
    return entry


def quantization_metadata(layers: Mapping[str, Mapping[str, Any]]) -> str:
    """The ``_quantization_metadata`` header value for ``layers`` (layer stem → ``.comfy_quant`` dict).

    Example:
        >>> quantization_metadata({"blk.0.a": {"format": "int8_tensorwise"}})
        '{"format_version": "1.0", "layers": {"blk.0.a": {"format": "int8_tensorwise"}}}'
    """
    return json.dumps({"format_version": "1.0", "layers": {k: dict(v) for k, v in layers.items()}})
