"""Round-to-nearest codes, dequantization and the fp16 cast."""

from __future__ import annotations

import attrs
import torch

from ..errors import CqError, InputError
from ..kernels import Backend, quantize_int8
from ..state import Granularity, LayerState, PerBlock, PerGroup, record
from .scales import expand_scale

__all__ = ["RoundConfig", "round_to_nearest", "dequantize", "reconstruct", "fp16_cast", "int8_format",
           "working_dequantized"]


def int8_format(granularity: Granularity) -> str:
    """The ``.comfy_quant`` format label of an int8 layer: a pure function of its scale layout."""
    if isinstance(granularity, (PerBlock, PerGroup)):
        return "int8_blockwise"
    return "int8_tensorwise"


@attrs.frozen
class RoundConfig:
    """``backend`` selects the kernel (``"auto"``, ``"torch"``, ``"triton"``)."""

    backend: Backend = attrs.field(default=Backend.AUTO, converter=Backend)


def _need_scale(state: LayerState, what: str) -> None:
    if state.scale is None or state.granularity is None:
        raise CqError(f"{state.name}: {what} needs scales; put absmax_scale (or another scale stage) before it")


def round_to_nearest(state: LayerState, *, cfg: RoundConfig = RoundConfig()) -> LayerState:
    """Set ``state.codes`` = ``clamp(round(weight / scale), -127, 127)`` (round half to even).

    Example:
        >>> from cq.transforms.scales import absmax_scale
        >>> s = round_to_nearest(absmax_scale(LayerState.from_weight("fc", torch.tensor([[0.5, -1.27]]))))
        >>> s.codes.tolist(), s.format
        ([[50, -127]], 'int8_tensorwise')
    """
    _need_scale(state, "round_to_nearest")
    scale = expand_scale(state.scale, state.granularity, state.shape)
    codes = quantize_int8(state.weight, scale, backend=cfg.backend)
    return record(state, "round_to_nearest", cfg, codes=codes, format=int8_format(state.granularity))


def working_dequantized(state: LayerState) -> torch.Tensor:
    """``codes · scale`` in the working (possibly rotated) basis, float32 [N, K]."""
    if state.codes is None:
        return state.weight.to(torch.float32)
    _need_scale(state, "dequantization")
    return state.codes.to(torch.float32) * expand_scale(state.scale, state.granularity, state.shape)


def reconstruct(state: LayerState) -> torch.Tensor:
    """The weight a runtime sees after dequantization, in the *original* basis (float32 [N, K]).

    This is what ComfyUI's ``dequantize()`` returns for the written layer (LoRA and
    full-precision paths); for an unquantized state it is the (fp16-cast) weight itself.
    """
    w = working_dequantized(state)
    if state.basis is not None:
        w = state.basis.to_original(w).to(torch.float32)
    return w


def dequantize(state: LayerState) -> LayerState:
    """Replace the working weight by its dequantized value and drop codes and scales ("fake quant")."""
    w = working_dequantized(state)
    return record(state, "dequantize", None, weight=w, codes=None, scale=None, granularity=None, format=None)


def fp16_cast(state: LayerState) -> LayerState:
    """Store the layer as float16 (the reference's ``--fp16`` target); no codes, no scale."""
    if state.basis is not None:
        raise CqError(f"{state.name}: fp16_cast on a rotated weight would store the rotated basis; "
                      "cast before any rotation stage")
    w16 = state.weight.to(torch.float16)
    if not bool(torch.isfinite(w16).all()) and bool(torch.isfinite(state.weight).all()):
        # Beyond ±65504 the cast gives inf: the stored layer would be unusable, and every metric
        # on it meaningless; the user must keep this layer (or convert it to int8) instead.
        peak = float(state.weight.detach().abs().max())
        raise InputError(f"{state.name}: max |weight| = {peak:.6g} is beyond float16's range (±65504); "
                         "exclude this layer from the fp16 target (e.g. --exclude-layers) or store it as int8")
    return record(state, "fp16_cast", None, weight=w16, codes=None, scale=None,
                  granularity=None, format="fp16")
