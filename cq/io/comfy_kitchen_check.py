"""Load a written file the way ComfyUI 0.29 does, through comfy-kitchen on CPU, and measure it.

The glue mirrors ``comfy/utils.py::convert_old_quants`` (header ``_quantization_metadata``
overrides ``.comfy_quant`` tensors) and ``comfy/ops.py::_load_quantized_module`` (weight cast to
the layout's storage dtype, ``TensorWiseINT8Layout.Params(scale, orig_dtype=compute dtype,
orig_shape=(N, K)[, convrot, convrot_groupsize])``). ``F.linear(x, qt, bias)`` then dispatches to
comfy-kitchen's eager ``int8_linear`` (dynamic per-token int8 activations, ``torch._int_mm``),
which accepts float32 and bfloat16 activations on CPU; ``qt.dequantize()`` is the path ComfyUI
takes for LoRA, text encoders and devices without int8 matmul.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..errors import CqError, InputError
from .comfy import QUANT_METADATA_KEY

__all__ = ["check_with_comfy_kitchen", "load_comfy_layers"]


def _import_comfy_kitchen():
    try:
        import comfy_kitchen  # noqa: F401
        from comfy_kitchen.tensor import QuantizedTensor, get_layout_class
    except ImportError as e:
        raise ImportError(
            f"check_with_comfy_kitchen needs the comfy-kitchen package ({e}); install it with "
            "`pip install comfy-kitchen packaging` (the wheel imports packaging without declaring it)"
        ) from e
    return QuantizedTensor, get_layout_class


def _configs(f) -> dict[str, dict[str, Any]]:
    """ComfyUI's per-layer configs: ``.comfy_quant`` tensors, then the header's layers on top."""
    confs: dict[str, dict[str, Any]] = {}
    for key in f.keys():
        if key.endswith(".comfy_quant"):
            raw = bytes(f.get_tensor(key).tolist())
            confs[key[: -len(".comfy_quant")]] = json.loads(raw)
    meta = f.metadata() or {}
    if QUANT_METADATA_KEY in meta:
        confs.update(json.loads(meta[QUANT_METADATA_KEY])["layers"])
    return confs


def load_comfy_layers(path: str | os.PathLike, *, compute_dtype: torch.dtype = torch.bfloat16
                      ) -> dict[str, tuple[Any, torch.Tensor | None, dict[str, Any]]]:
    """Every quantized layer of ``path`` as ComfyUI builds it: ``{layer: (QuantizedTensor, bias, conf)}``.

    Raises:
        ImportError: comfy-kitchen is not installed.
        InputError: a layer ComfyUI would refuse (unknown format, missing scale or weight).
    """
    QuantizedTensor, get_layout_class = _import_comfy_kitchen()
    from safetensors import safe_open

    path = os.fspath(path)
    layout = get_layout_class("TensorWiseINT8Layout")
    out = {}
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        for layer, conf in _configs(f).items():
            fmt = conf.get("format")
            if fmt not in ("int8_tensorwise", "float8_e4m3fn"):
                raise InputError(f"{path}: layer {layer!r} has format {fmt!r}; vanilla ComfyUI 0.29 fails on "
                                 "formats outside QUANT_ALGOS, and this check covers int8_tensorwise and "
                                 "float8_e4m3fn only")
            if f"{layer}.weight" not in keys:
                raise InputError(f"{path}: layer {layer!r} has a quant config but no {layer}.weight")
            if fmt == "float8_e4m3fn":
                out[layer] = _fp8_layer(f, keys, layer, conf, compute_dtype, QuantizedTensor, get_layout_class)
                continue
            if f"{layer}.weight_scale" not in keys:
                raise InputError(f"{path}: layer {layer!r}: Missing INT8 weight scale ({layer}.weight_scale)")
            weight = f.get_tensor(f"{layer}.weight").to(torch.int8)  # a numeric cast, as ComfyUI does
            scale = f.get_tensor(f"{layer}.weight_scale")
            nested = conf.get("params") if isinstance(conf.get("params"), dict) else {}
            convrot = bool(conf.get("convrot", nested.get("convrot", False)))
            extra = {}
            if convrot:
                extra = {"convrot": True,
                         "convrot_groupsize": int(conf.get("convrot_groupsize", nested.get("convrot_groupsize", 256)))}
            params = layout.Params(scale=scale, orig_dtype=compute_dtype, orig_shape=tuple(weight.shape), **extra)
            qt = QuantizedTensor(weight, "TensorWiseINT8Layout", params)
            bias = f.get_tensor(f"{layer}.bias") if f"{layer}.bias" in keys else None
            out[layer] = (qt, bias, conf)
    return out


def _fp8_layer(f, keys, layer, conf, compute_dtype, QuantizedTensor, get_layout_class):
    """A ``float8_e4m3fn`` layer as ComfyUI 0.29 builds it (``TensorCoreFP8Layout``; ``input_scale``
    becomes a module parameter, returned in the conf copy as ``"input_scale"``)."""
    layout = get_layout_class("TensorCoreFP8Layout")
    scale = f.get_tensor(f"{layer}.weight_scale") if f"{layer}.weight_scale" in keys else None
    weight = f.get_tensor(f"{layer}.weight").to(torch.float8_e4m3fn)  # a numeric cast, as ComfyUI does
    params = layout.Params(scale=scale, orig_dtype=compute_dtype, orig_shape=tuple(weight.shape))
    qt = QuantizedTensor(weight, "TensorCoreFP8Layout", params)
    bias = f.get_tensor(f"{layer}.bias") if f"{layer}.bias" in keys else None
    conf = dict(conf)
    if f"{layer}.input_scale" in keys:
        conf["input_scale"] = f.get_tensor(f"{layer}.input_scale")
    return qt, bias, conf


def _forward(x: torch.Tensor, qt, bias, conf) -> torch.Tensor:
    """``MixedPrecisionOps.Linear.forward``: FP8 layers quantize the activations first (static
    ``input_scale`` or a dynamic amax); int8 layers run the weight-only path (dynamic W8A8 kernel)."""
    if conf["format"] == "float8_e4m3fn" and not conf.get("full_precision_matrix_mult", False):
        from comfy_kitchen.tensor import QuantizedTensor

        x = QuantizedTensor.from_float(x, "TensorCoreFP8Layout", scale=conf.get("input_scale"))
    return F.linear(x, qt, bias)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(torch.float64), b.to(torch.float64)
    den = float(b.norm())
    err = float((a - b).norm())
    return err / den if den > 0 else err


def _original(originals: Mapping[str, torch.Tensor], layer: str) -> torch.Tensor | None:
    for key in (f"{layer}.weight", layer):
        if key in originals:
            return originals[key]
    return None


def check_with_comfy_kitchen(path: str | os.PathLike, originals: Mapping[str, torch.Tensor], *,
                             tokens: int = 16, seed: int = 0,
                             compute_dtype: torch.dtype = torch.bfloat16) -> dict[str, dict[str, Any]]:
    """Per quantized layer of ``path``, how faithfully ComfyUI's runtime reproduces the original weight.

    ``originals`` maps ``<layer>.weight`` (or the layer stem) to the float weight ``[N, K]`` in the
    original basis; layers without one get ``None`` errors. Returns, per layer:

    * ``dequant_rel_err``: ``‖qt.dequantize() − W‖ / ‖W‖`` (LoRA / text-encoder / CPU path);
    * ``forward_rel_err``: ``F.linear(x, qt, bias)`` (the W8A8 kernel) against a float64
      ``x · Wᵀ + b`` on the same tokens;
    * ``kernel_consistency``: the kernel output against ``F.linear(x, qt.dequantize(), bias)``
      in float32 (the activation-quantization error only);
    * ``finite``, ``format``, ``convrot``, ``scale_shape``.

    ``float8_e4m3fn`` layers run ComfyUI's FP8 forward: the activations are quantized to e4m3 with
    the layer's ``input_scale`` (or a per-call amax) before the matmul, unless the layer sets
    ``full_precision_matrix_mult``.

    ``x`` is ``tokens`` standard-normal rows in ``compute_dtype`` (bfloat16, ComfyUI's usual compute
    dtype, or float32; both run on CPU), drawn from a generator seeded with ``seed``.

    Raises:
        ImportError: comfy-kitchen is missing (``pip install comfy-kitchen packaging``).
        InputError: the file has a layer ComfyUI would refuse.
    """
    if compute_dtype not in (torch.bfloat16, torch.float32):
        raise CqError(f"compute_dtype={compute_dtype}; use torch.bfloat16 or torch.float32 "
                      "(fp16 matmuls are impractically slow on CPU)")
    layers = load_comfy_layers(path, compute_dtype=compute_dtype)
    report: dict[str, dict[str, Any]] = {}
    for layer, (qt, bias, conf) in layers.items():
        n, k = qt.shape
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(tokens, k, generator=gen).to(compute_dtype)
        b_c = None if bias is None else bias.to(compute_dtype)  # ComfyUI casts the bias to compute dtype
        with torch.no_grad():
            y = _forward(x, qt, b_c, conf)
            w_dq = qt.dequantize()
            y_dq = F.linear(x.float(), w_dq.float(), None if bias is None else bias.float())
        entry: dict[str, Any] = {
            "format": conf["format"],
            "convrot": bool(getattr(qt.params, "convrot", False)),
            "scale_shape": tuple(qt.params.scale.shape),
            "kernel_consistency": _rel(y, y_dq),
            "finite": bool(torch.isfinite(y).all() and torch.isfinite(w_dq).all()),
            "dequant_rel_err": None,
            "forward_rel_err": None,
        }
        w = _original(originals, layer)
        if w is not None:
            if tuple(w.shape) != (n, k):
                raise InputError(f"{layer}: original weight has shape {list(w.shape)} but the file's is [{n}, {k}]")
            w64 = w.detach().to(torch.float64)
            y_ref = F.linear(x.to(torch.float64), w64, None if bias is None else bias.to(torch.float64))
            entry["dequant_rel_err"] = _rel(w_dq, w64)
            entry["forward_rel_err"] = _rel(y, y_ref)
        report[layer] = entry
    return report
