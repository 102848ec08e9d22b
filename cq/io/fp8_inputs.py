"""Read models that are already quantized: fp8 and int8 layers decoded to float32, with the keys they consume.

Layouts in use (all found by :func:`find_stored_layers` from keys, dtypes and ``.comfy_quant``):

* ``comfy_quant``: ComfyUI's mixed-precision layers: ``L.weight`` + ``L.weight_scale`` +
  ``L.comfy_quant`` (or the header's ``_quantization_metadata``, which wins, as in ComfyUI), optional
  ``L.input_scale``. Formats ``float8_e4m3fn``/``float8_e5m2`` (and the fork's fp8 row/block
  variants) and ``int8_tensorwise`` (optionally ``convrot``) or the fork's int8 block/axis layouts.
* ``scaled_fp8``: the legacy layout ComfyUI still translates: a root ``scaled_fp8`` marker tensor,
  ``L.weight`` fp8, ``L.scale_weight`` and optionally ``L.scale_input``.
* ``scale_weight``: the same per-layer keys without the marker (older converters).
* ``unscaled``: an fp8 weight with no scale at all (a plain ``.to(float8)`` cast; scale 1).

The value of a layer is ``weight.float() · scale`` with the scale broadcast by its shape (``()``/``[1]``
per tensor, ``[N]``/``[N, 1]`` per row, ``[N/b, K/b]`` tiles, ``[N, K/g, 1]`` row groups), then, for
``convrot`` int8 layers, mapped back to the original basis (``W = W_rot · R``).

Policy (:func:`plan_stored_inputs`): fp8 layers are decoded and converted like any float weight; int8
``.comfy_quant`` layers are kept byte for byte by default, and re-quantized from their dequantized
value only with ``requantize_int8=True`` (a warning: the error of the first quantization stays and
a second one is added).
"""

from __future__ import annotations

import json
import types
import warnings
from typing import Any, Mapping

import attrs
import torch

from ..errors import InputError
from .comfy import QUANT_METADATA_KEY, decode_comfy_quant

__all__ = ["StoredLayer", "DecodedWeight", "InputPlan", "RequantizeWarning", "find_stored_layers",
           "decode_stored", "plan_stored_inputs", "DecodedView", "passthrough_tensors", "FP8_DTYPES", "SCALED_FP8_MARKER"]

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
#: The root key whose presence marks a legacy scaled-fp8 file (ComfyUI's ``convert_old_quants``).
SCALED_FP8_MARKER = "scaled_fp8"
_FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fn_rowwise", "float8_e4m3fn_blockwise")
_INT8_FORMATS = ("int8_tensorwise", "int8_blockwise", "int8_axiswise")
#: Formats cq cannot decode (packed 4-bit, block-scaled fp8): an error naming them, never a silent copy.
_UNSUPPORTED = ("nvfp4", "mxfp8", "convrot_w4a4", "asym_w4a8_int8", "awq_w4a16")


class RequantizeWarning(UserWarning):
    """An already-quantized int8 layer is quantized again: its first rounding error stays."""


def _frozen(d):
    return types.MappingProxyType(dict(d or {}))


@attrs.frozen
class StoredLayer:
    """One already-quantized tensor of the input and the keys that belong to it.

    ``kind`` is ``"fp8"`` or ``"int8"``; ``layout`` one of ``comfy_quant``, ``scaled_fp8``,
    ``scale_weight``, ``unscaled``; ``format`` the ``.comfy_quant`` format (``float8_e4m3fn`` for
    the legacy fp8 layouts, ``float8_e5m2`` for an unscaled e5m2 weight); ``companions`` every
    other key of the layer (scales, ``.comfy_quant``, input scales).
    """

    stem: str
    weight_key: str
    kind: str
    format: str
    layout: str
    dtype: torch.dtype
    scale_key: str | None = None
    companions: tuple[str, ...] = ()
    conf: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen)


@attrs.frozen(eq=False)
class DecodedWeight:
    """A stored layer's float32 value and the keys decoding consumed (not to be written again)."""

    weight: torch.Tensor
    consumed: tuple[str, ...]
    source: StoredLayer
    note: str


@attrs.frozen
class InputPlan:
    """What a conversion does with the already-quantized layers of its input.

    ``decode``: weight key → layer to dequantize and convert; ``keep``: weight key → int8 layer copied
    as it is (``keys_to_copy`` lists its tensors); ``drop``: keys never written (consumed companions
    of decoded layers, the ``scaled_fp8`` marker); ``from_fp8``: stems of decoded fp8 layers (for
    the report); ``notes``: one line each, to print and keep in the report.
    """

    decode: Mapping[str, StoredLayer] = attrs.field(converter=_frozen)
    keep: Mapping[str, StoredLayer] = attrs.field(converter=_frozen)
    drop: frozenset[str] = attrs.field(converter=frozenset)
    from_fp8: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def keys_to_copy(self) -> tuple[str, ...]:
        """Every tensor of the kept int8 layers (weight, scales, ``.comfy_quant``), to copy unchanged."""
        return tuple(k for layer in self.keep.values() for k in (layer.weight_key,) + layer.companions)


def _configs(view) -> dict[str, dict[str, Any]]:
    """ComfyUI's per-layer configs: ``.comfy_quant`` tensors, then the header's layers on top."""
    confs: dict[str, dict[str, Any]] = {}
    for key in view.keys():
        if key.endswith(".comfy_quant"):
            confs[key[: -len(".comfy_quant")]] = decode_comfy_quant(view.tensor(key), name=key)
    raw = (view.metadata() or {}).get(QUANT_METADATA_KEY)
    if raw is not None:
        try:
            layers = json.loads(raw)["layers"]
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"the header's {QUANT_METADATA_KEY} is not {{'layers': {{...}}}} JSON ({e!r})") from None
        for stem, entry in layers.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("format"), str):
                raise InputError(f"{QUANT_METADATA_KEY}: layer {stem!r} has no string 'format' ({entry!r})")
            confs[stem] = entry
    return confs


def find_stored_layers(view) -> dict[str, StoredLayer]:
    """Every fp8 or int8-quantized weight of ``view`` (a :class:`cq.model.ModelView`), by weight key.

    Raises:
        InputError: a ``.comfy_quant`` cq cannot decode (nvfp4, mxfp8, 4-bit formats), a quant entry
            without its weight, or a malformed config.

    Example:
        >>> from cq.model import DictView
        >>> v = DictView({"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
        ...               "a.weight": torch.ones(2, 2).to(torch.float8_e4m3fn), "a.scale_weight": torch.tensor(0.5)})
        >>> layer = find_stored_layers(v)["a.weight"]
        >>> layer.kind, layer.format, layer.layout, layer.companions
        ('fp8', 'float8_e4m3fn', 'scaled_fp8', ('a.scale_weight',))
    """
    keys = list(view.keys())
    present = set(keys)
    confs = _configs(view)
    marker = SCALED_FP8_MARKER in present
    out: dict[str, StoredLayer] = {}
    for stem, conf in confs.items():
        fmt = conf["format"]
        wkey = f"{stem}.weight"
        if fmt in _UNSUPPORTED or fmt not in _FP8_FORMATS + _INT8_FORMATS:
            raise InputError(f"{stem}: stored format {fmt!r} cannot be decoded by cq (it reads "
                             f"{list(_FP8_FORMATS + _INT8_FORMATS)}); convert from the original bf16/fp16 weights")
        if wkey not in present:
            raise InputError(f"{stem}: a quant entry {conf} but no {wkey} tensor; the file is incomplete")
        comps = tuple(k for k in (f"{stem}.weight_scale", f"{stem}.comfy_quant", f"{stem}.input_scale",
                                  f"{stem}.weight_scale_2") if k in present)
        skey = f"{stem}.weight_scale" if f"{stem}.weight_scale" in present else None
        kind = "fp8" if fmt.startswith("float8") else "int8"
        out[wkey] = StoredLayer(stem, wkey, kind, fmt, "comfy_quant", view.dtype(wkey), skey, comps, conf)
    for key in keys:
        if key in out or not key.endswith(".weight") or view.dtype(key) not in FP8_DTYPES:
            continue
        stem = key[: -len(".weight")]
        fmt = "float8_e5m2" if view.dtype(key) == torch.float8_e5m2 else "float8_e4m3fn"
        scale_key = next((k for k in (f"{stem}.scale_weight", f"{stem}.weight_scale") if k in present), None)
        comps = tuple(k for k in (f"{stem}.scale_weight", f"{stem}.weight_scale", f"{stem}.scale_input",
                                  f"{stem}.input_scale") if k in present)
        layout = "unscaled" if scale_key is None else ("scaled_fp8" if marker else "scale_weight")
        out[key] = StoredLayer(stem, key, "fp8", fmt, layout, view.dtype(key), scale_key, comps)
    return dict(sorted(out.items(), key=lambda kv: keys.index(kv[0])))


def _broadcast_scale(scale: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """A view of ``scale`` that multiplies a weight of ``shape`` (see the module docstring for layouts)."""
    s = scale.to(torch.float32)
    if s.numel() == 1:
        return s.reshape(())
    if len(shape) != 2:
        raise InputError(f"{name}: a {list(s.shape)} scale on a {len(shape)}-D weight {list(shape)}; only per-tensor "
                         "scales apply to non-matrix weights")
    n, k = shape
    if s.shape in ((n,), (n, 1)):
        return s.reshape(n, 1)
    if s.ndim == 2 and n % s.shape[0] == 0 and k % s.shape[1] == 0 and n // s.shape[0] == k // s.shape[1]:
        b = n // s.shape[0]
        return s.repeat_interleave(b, 0).repeat_interleave(b, 1)
    if s.ndim == 3 and s.shape[0] == n and s.shape[2] == 1 and k % s.shape[1] == 0:
        return s.expand(n, s.shape[1], k // s.shape[1]).reshape(n, k)
    raise InputError(f"{name}: scale of shape {list(s.shape)} does not fit a weight {list(shape)} (expected (), [1], "
                     "[N], [N, 1], [N/b, K/b] tiles or [N, K/g, 1] groups)")


def _scale_of(view, layer: StoredLayer) -> torch.Tensor | None:
    """The layer's stored scale (checked finite), or ``None`` for an unscaled fp8 weight."""
    if layer.scale_key is None:
        if layer.kind == "int8" or layer.layout == "comfy_quant":
            raise InputError(f"{layer.stem}: {layer.format} layer without {layer.stem}.weight_scale (ComfyUI raises "
                             "'Missing weight scale'); the file is incomplete")
        return None
    scale = view.tensor(layer.scale_key)
    if not bool(torch.isfinite(scale.to(torch.float32)).all()):
        raise InputError(f"{layer.scale_key}: scale holds non-finite values; the file is corrupt")
    return scale


def _convrot_groupsize(layer: StoredLayer) -> int | None:
    conf = layer.conf
    nested = conf.get("params") if isinstance(conf.get("params"), dict) else {}
    if not conf.get("convrot", nested.get("convrot", False)):
        return None
    return int(conf.get("convrot_groupsize", nested.get("convrot_groupsize", 256)))


def _note(layer: StoredLayer) -> str:
    """The report line of a decoded layer: ``decoded from <format> (<layout>[, convrot G undone])``."""
    g = _convrot_groupsize(layer)
    return f"decoded from {layer.format} ({layer.layout}" + (f", convrot {g} undone)" if g else ")")


def _value(layer: StoredLayer, q: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, str]:
    """``q · scale`` (broadcast by the scale's layout) in the original basis, and the note saying so."""
    w = q.to(torch.float32)
    if scale is not None:
        w = w * _broadcast_scale(scale, tuple(q.shape), layer.scale_key)
    g = _convrot_groupsize(layer)
    if g is not None:
        from ..transforms.convrot import ConvRot

        w = ConvRot.for_features(w.shape[-1], g, layer=layer.stem).to_original(w).to(torch.float32)
    return w, _note(layer)


def decode_stored(view, layer: StoredLayer) -> DecodedWeight:
    """The float32 value of ``layer`` in the original basis, and the keys it consumed.

    Example:
        >>> from cq.model import DictView
        >>> v = DictView({"a.weight": torch.tensor([[2.0, -4.0]]).to(torch.float8_e4m3fn),
        ...               "a.scale_weight": torch.tensor(0.25)})
        >>> d = decode_stored(v, find_stored_layers(v)["a.weight"])
        >>> d.weight.tolist(), d.consumed
        ([[0.5, -1.0]], ('a.weight', 'a.scale_weight'))
    """
    name = layer.stem
    q = view.tensor(layer.weight_key)
    if layer.kind == "int8" and q.dtype != torch.int8:
        raise InputError(f"{name}: format {layer.format!r} but the weight is {q.dtype}; the file is inconsistent")
    if layer.kind == "fp8" and q.dtype not in FP8_DTYPES:
        raise InputError(f"{name}: format {layer.format!r} but the weight is {q.dtype}; the file is inconsistent")
    w, note = _value(layer, q, _scale_of(view, layer))
    return DecodedWeight(weight=w, consumed=(layer.weight_key,) + layer.companions, source=layer, note=note)


class DecodedView:
    """A :class:`cq.model.ModelView` of an input with its stored layers decoded (see :func:`plan_stored_inputs`).

    Decoded weights read as float32 ``codes · scale`` in the original basis (so the selection, the
    model transforms and the recipes see an ordinary float model); the companions they consumed are
    hidden; int8 layers kept as they are keep their stored tensors.

    Example:
        >>> from cq.model import DictView
        >>> v = DictView({"a.weight": torch.tensor([[2.0, -4.0]]).to(torch.float8_e4m3fn),
        ...               "a.scale_weight": torch.tensor(0.25)})
        >>> d = DecodedView(v, plan_stored_inputs(v))
        >>> d.keys(), d.dtype("a.weight"), d.tensor("a.weight").tolist(), d.stored("a.weight").format
        (['a.weight'], torch.float32, [[0.5, -1.0]], 'float8_e4m3fn')
    """

    def __init__(self, view, plan: InputPlan):
        self.base = view
        self.plan = plan
        self.path = getattr(view, "path", None)

    def keys(self) -> list[str]:
        return [k for k in self.base.keys() if k not in self.plan.drop]

    def __contains__(self, key: object) -> bool:
        return key not in self.plan.drop and key in self.base

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.base.shape(key))

    def dtype(self, key: str) -> torch.dtype:
        return torch.float32 if key in self.plan.decode else self.base.dtype(key)

    def tensor(self, key: str) -> torch.Tensor:
        layer = self.plan.decode.get(key)
        return self.base.tensor(key) if layer is None else decode_stored(self.base, layer).weight

    def metadata(self):
        return self.base.metadata()

    def stored(self, key: str) -> StoredLayer | None:
        """The stored layer ``key`` was decoded from, or ``None`` for an ordinary tensor."""
        return self.plan.decode.get(key)

    def note(self, key: str) -> str | None:
        """``"decoded from …"`` for a decoded weight (the report says which layers came from fp8)."""
        layer = self.plan.decode.get(key)
        return None if layer is None else _note(layer)


def passthrough_tensors(view, layer: StoredLayer) -> dict[str, torch.Tensor]:
    """A stored fp8 layer that stays as it is (kept by a preset or a layer config), in ComfyUI's native
    layout with no new rounding: the same codes, ``weight_scale`` (float32 0-dim), ``.comfy_quant``,
    and ``input_scale`` when the input had one other than 1.0 (the legacy ``scale_input`` is renamed;
    ComfyUI drops a 1.0 one the same way when it translates a scaled-fp8 file).

    Example:
        >>> from cq.model import DictView
        >>> v = DictView({"a.weight": torch.ones(2, 2).to(torch.float8_e4m3fn), "a.scale_weight": torch.tensor([0.5]),
        ...               "a.scale_input": torch.tensor(1.0)})
        >>> {k: (str(t.dtype), list(t.shape)) for k, t in passthrough_tensors(v, find_stored_layers(v)["a.weight"]).items()}
        {'a.weight': ('torch.float8_e4m3fn', [2, 2]), 'a.weight_scale': ('torch.float32', []), 'a.comfy_quant': ('torch.uint8', [27])}
    """
    from .comfy import encode_comfy_quant

    if layer.kind != "fp8" or layer.format not in ("float8_e4m3fn", "float8_e5m2"):
        raise InputError(f"{layer.stem}: only per-tensor fp8 layers pass through unchanged (got {layer.format}); "
                         "int8 layers are copied with InputPlan.keys_to_copy")
    q = view.tensor(layer.weight_key)
    scale = _scale_of(view, layer)
    if scale is None:
        scale = torch.ones(())
    if scale.numel() != 1:
        raise InputError(f"{layer.scale_key}: a {list(scale.shape)} scale is not ComfyUI's per-tensor fp8 layout; "
                         "convert this layer instead of keeping it")
    out = {layer.weight_key: q, f"{layer.stem}.weight_scale": scale.to(torch.float32).reshape(()),
           f"{layer.stem}.comfy_quant": encode_comfy_quant({**dict(layer.conf), "format": layer.format})}
    for key in (f"{layer.stem}.input_scale", f"{layer.stem}.scale_input"):
        if key in layer.companions:
            s_in = view.tensor(key).to(torch.float32)
            if s_in.numel() == 1 and float(s_in) != 1.0:
                out[f"{layer.stem}.input_scale"] = s_in.reshape(())
            break
    return out


def plan_stored_inputs(view, *, requantize_int8: bool = False) -> InputPlan:
    """Decide what happens to every already-quantized layer of ``view`` (see :class:`InputPlan`).

    Example:
        >>> from cq.model import DictView
        >>> v = DictView({"a.weight": torch.ones(2, 2).to(torch.float8_e4m3fn), "a.scale_weight": torch.tensor(1.0),
        ...               "b.weight": torch.ones(2, 2)})
        >>> p = plan_stored_inputs(v)
        >>> list(p.decode), sorted(p.drop), p.from_fp8
        (['a.weight'], ['a.scale_weight'], ('a',))
    """
    layers = find_stored_layers(view)
    decode, keep, drop, notes = {}, {}, set(), []
    for wkey, layer in layers.items():
        if layer.kind == "int8" and not requantize_int8:
            keep[wkey] = layer
            continue
        decode[wkey] = layer
        drop.update(layer.companions)
    int8_re = [l.stem for l in decode.values() if l.kind == "int8"]
    if int8_re:
        msg = (f"re-quantizing {len(int8_re)} already-INT8 layer(s) (e.g. {int8_re[0]}) from their dequantized "
               "values: the first quantization's error stays and a second one is added; convert from the "
               "original bf16/fp16 weights when you have them")
        warnings.warn(msg, RequantizeWarning, stacklevel=2)
        notes.append(msg)
    if keep:
        notes.append(f"{len(keep)} INT8 layer(s) already in ComfyUI format are copied unchanged "
                     "(requantize_int8=True re-quantizes them)")
    if SCALED_FP8_MARKER in set(view.keys()):
        drop.add(SCALED_FP8_MARKER)
    unscaled = [l.stem for l in decode.values() if l.layout == "unscaled"]
    if unscaled:
        notes.append(f"{len(unscaled)} fp8 weight(s) without a scale (e.g. {unscaled[0]}) read with scale 1")
    from_fp8 = tuple(l.stem for l in decode.values() if l.kind == "fp8")
    return InputPlan(decode=decode, keep=keep, drop=drop, from_fp8=from_fp8, notes=tuple(notes))
