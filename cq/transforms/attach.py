"""Give a layer its calibration data: a stage like any other (the runner reads the file, not the stage)."""

from __future__ import annotations

from typing import Any, Mapping

import attrs
import torch

from ..errors import InputError
from ..state import LayerState, record

__all__ = ["LayerData", "attach_data"]


def _t(x):
    return "None" if x is None else f"Tensor{list(x.shape)}"


@attrs.frozen(eq=False)
class LayerData:
    """One layer's calibration data, read by the runner (or :func:`cq.io.calibration.layer_data`).

    ``hessian`` ``[K, K]`` in the original basis (``None``: GPTQ/LDLQ use ``H = I``; ``note`` says
    why); ``stats`` (``input_absmax``, ``input_mean``, ``samples``) go to ``meta["calibration"]``
    (SmoothQuant, bias correction, FP8 input scales); ``w8a8`` (ConvRot group → activation-path
    statistics) to ``meta["w8a8_stats"]``; ``upstream`` (the sequential calibration's cross term
    ``2/T·(X − X̃)ᵀX̃``, see :mod:`cq.sequential`) to ``meta["upstream"]``. ``source`` says where the
    Hessian came from.
    """

    hessian: torch.Tensor | None = attrs.field(default=None, repr=_t)
    stats: Mapping[str, Any] = attrs.field(factory=dict)
    w8a8: Mapping[int, Any] = attrs.field(factory=dict)
    note: str | None = None
    upstream: torch.Tensor | None = attrs.field(default=None, repr=_t)
    source: str = "calibration"


def attach_data(state: LayerState, *, cfg: LayerData) -> LayerState:
    """Set ``state.hessian`` and the calibration statistics; must run before any rotation stage.

    Example:
        >>> s = attach_data(LayerState.from_weight("fc", torch.ones(2, 3)), cfg=LayerData(torch.eye(3)))
        >>> s.hessian.shape, s.stage_names()
        (torch.Size([3, 3]), ('attach_data',))
    """
    meta = {}
    if cfg.stats:
        meta["calibration"] = dict(cfg.stats)
    if cfg.w8a8:
        meta["w8a8_stats"] = dict(cfg.w8a8)
    if cfg.upstream is not None:
        meta["upstream"] = cfg.upstream
    h = cfg.hessian
    if h is None:
        return record(state, "attach_data", cfg, note=cfg.note, meta=meta or None)
    k = state.shape[1]
    if tuple(h.shape) != (k, k):
        raise InputError(f"{state.name}: the {cfg.source} Hessian has shape {list(h.shape)}, the weight needs "
                         f"[{k}, {k}]; the calibration file belongs to another model")
    if state.basis is not None:
        raise InputError(f"{state.name}: attach the calibration before rotating the layer (calibration files hold "
                         "original-basis Hessians)")
    return record(state, "attach_data", cfg, note=cfg.note, meta=meta or None, hessian=h.to(state.weight.device))
