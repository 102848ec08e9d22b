"""The tensors of one ComfyUI-native ``float8_e4m3fn`` layer (ComfyUI ≥ 0.3.67, comfy-kitchen ``TensorCoreFP8Layout``).

``L.weight`` F8_E4M3 ``[N, K]``, ``L.weight_scale`` float32 0-dim (a bf16 scale crashes
comfy-kitchen's fp8 dequantize, Comfy-Org/ComfyUI#11665), optional ``L.input_scale`` float32 0-dim
(a static activation scale; without it the runtime uses a per-call ``amax/448``), ``L.comfy_quant``
``{"format": "float8_e4m3fn"}`` (+ ``"full_precision_matrix_mult": true``), ``L.bias`` unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import CqError
from ..state import LayerState, PerTensor
from .comfy import encode_comfy_quant

__all__ = ["fp8_comfy_quant_entry", "fp8_layer_tensors"]


def fp8_comfy_quant_entry(state: LayerState, *, full_precision_matrix_mult: bool = False) -> dict[str, Any]:
    """The ``.comfy_quant`` dict of an FP8 layer.

    Example:
        >>> from cq.transforms.fp8 import fp8_pipeline
        >>> s = fp8_pipeline()(LayerState.from_weight("fc", torch.randn(4, 8)))
        >>> fp8_comfy_quant_entry(s, full_precision_matrix_mult=True)
        {'format': 'float8_e4m3fn', 'full_precision_matrix_mult': True}
    """
    if state.format != "float8_e4m3fn":
        raise CqError(f"{state.name}: fp8_comfy_quant_entry needs a float8_e4m3fn state, got format {state.format!r}")
    entry: dict[str, Any] = {"format": "float8_e4m3fn"}
    if full_precision_matrix_mult:
        entry["full_precision_matrix_mult"] = True
    return entry


def _scalar(name: str, what: str, t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to(device="cpu", dtype=torch.float32)
    if t.numel() != 1:
        raise CqError(f"{name}: {what} must be one per-tensor value (ComfyUI's FP8 layout), got shape {list(t.shape)}")
    t = t.reshape(())
    if not (bool(torch.isfinite(t)) and float(t) > 0):
        raise CqError(f"{name}: {what} is {float(t)}; it must be finite and positive (floored at 1e-30)")
    return t.contiguous()


def fp8_layer_tensors(state: LayerState, *, full_precision_matrix_mult: bool = False) -> dict[str, torch.Tensor]:
    """``{key: tensor}`` to write for an FP8 state (output of :func:`cq.transforms.fp8.fp8_pipeline`).

    Raises:
        CqError: codes that are not ``float8_e4m3fn [N, K]``, a scale that is not one finite
            positive value, or a rotated (basis) state.

    Example:
        >>> from cq.transforms.fp8 import fp8_pipeline
        >>> s = fp8_pipeline()(LayerState.from_weight("fc", torch.randn(4, 8), bias=torch.zeros(4)))
        >>> for key, t in fp8_layer_tensors(s).items():
        ...     print(key, t.dtype, list(t.shape))
        fc.weight torch.float8_e4m3fn [4, 8]
        fc.weight_scale torch.float32 []
        fc.comfy_quant torch.uint8 [27]
        fc.bias torch.float32 [4]
    """
    name = state.name
    entry = fp8_comfy_quant_entry(state, full_precision_matrix_mult=full_precision_matrix_mult)
    codes = state.codes
    if codes is None or codes.dtype != torch.float8_e4m3fn or tuple(codes.shape) != tuple(state.shape):
        got = None if codes is None else f"{codes.dtype} {list(codes.shape)}"
        raise CqError(f"{name}: an FP8 layer needs float8_e4m3fn codes of shape {list(state.shape)}, got {got}; "
                      "run fp8_pipeline")
    if state.basis is not None:
        raise CqError(f"{name}: ComfyUI's float8_e4m3fn layer cannot carry a rotation; quantize it in the original basis")
    if state.scale is None or not isinstance(state.granularity, PerTensor):
        raise CqError(f"{name}: an FP8 layer needs a per-tensor scale, got granularity {state.granularity!r}")
    out = {f"{name}.weight": codes.detach().cpu().contiguous(),
           f"{name}.weight_scale": _scalar(name, "weight_scale", state.scale),
           f"{name}.comfy_quant": encode_comfy_quant(entry)}
    if state.meta.get("input_scale") is not None:
        out[f"{name}.input_scale"] = _scalar(name, "input_scale", state.meta["input_scale"])
    if state.bias is not None:
        out[f"{name}.bias"] = state.bias.detach().cpu().contiguous()
    return out
