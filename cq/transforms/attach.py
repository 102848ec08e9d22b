"""Give a layer its calibration Hessian: a stage like any other (the runner reads the file, not the stage)."""

from __future__ import annotations

import attrs
import torch

from ..errors import InputError
from ..state import LayerState, record

__all__ = ["HessianInput", "attach_hessian"]


@attrs.frozen(eq=False)
class HessianInput:
    """The Hessian ``[K, K]`` (original basis) for one layer, or ``None`` with the reason in ``note``.

    ``source`` says where it came from (``"calibration"``, ``"synthetic"``) for the report.
    """

    hessian: torch.Tensor | None = attrs.field(default=None, repr=lambda t: "None" if t is None else
                                               f"Tensor{list(t.shape)}")
    note: str | None = None
    source: str = "calibration"


def attach_hessian(state: LayerState, *, cfg: HessianInput) -> LayerState:
    """Set ``state.hessian`` (before any rotation: the rotation stages carry it into the working basis).

    Example:
        >>> s = attach_hessian(LayerState.from_weight("fc", torch.ones(2, 3)), cfg=HessianInput(torch.eye(3)))
        >>> s.hessian.shape, s.stage_names()
        (torch.Size([3, 3]), ('attach_hessian',))
    """
    h = cfg.hessian
    if h is None:
        return record(state, "attach_hessian", cfg, note=cfg.note)
    k = state.shape[1]
    if tuple(h.shape) != (k, k):
        raise InputError(f"{state.name}: the {cfg.source} Hessian has shape {list(h.shape)}, the weight needs "
                         f"[{k}, {k}]; the calibration file belongs to another model")
    if state.basis is not None:
        raise InputError(f"{state.name}: attach the Hessian before rotating the layer (calibration files hold "
                         "original-basis Hessians)")
    return record(state, "attach_hessian", cfg, note=cfg.note, hessian=h.to(state.weight.device))
