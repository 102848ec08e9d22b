"""Absmax scales at tensor, row, 2-D block or row-group granularity."""

from __future__ import annotations

import attrs
import torch

from ..errors import ConfigError
from ..state import Granularity, LayerState, PerBlock, PerGroup, PerRow, PerTensor, record

__all__ = ["ScaleConfig", "absmax_scale", "compute_scale", "expand_scale", "SCALE_FLOOR", "QMAX"]

QMAX = 127
#: Smallest scale written: an all-zero row still gets a strictly positive, finite scale
#: (comfy-kitchen clamps at the same value).
SCALE_FLOOR = 1e-30


def _granularity(instance, attribute, value):
    if not isinstance(value, (PerTensor, PerRow, PerBlock, PerGroup)):
        raise ConfigError(
            f"granularity must be PerTensor(), PerRow(), PerBlock(size) or PerGroup(size), got {value!r}"
        )


@attrs.frozen
class ScaleConfig:
    """How :func:`absmax_scale` computes scales.

    ``granularity`` picks the layout; when the weight's dims do not divide a block or group size
    the scale falls back to :class:`~cq.state.PerRow` and the state records a note.
    """

    granularity: Granularity = attrs.field(factory=PerRow, validator=_granularity)


def fits(granularity: Granularity, n: int, k: int) -> bool:
    """Whether ``granularity`` tiles an ``[n, k]`` weight exactly."""
    if isinstance(granularity, PerBlock):
        return n % granularity.size == 0 and k % granularity.size == 0
    if isinstance(granularity, PerGroup):
        return k % granularity.size == 0
    return True


def compute_scale(w: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """Absmax/127 scales of ``w`` [N, K] in float32, floored at :data:`SCALE_FLOOR`.

    Example:
        >>> compute_scale(torch.tensor([[1.27, -2.54], [0.0, 0.0]]), PerRow()).flatten().tolist()
        [0.019999999552965164, 1.0000000031710769e-30]
    """
    # abs and max are exact in any float dtype: reduce in the weight's own dtype and convert only
    # the (small) result, instead of materializing a float32 copy of the whole weight.
    a = w.detach().abs()
    n, k = a.shape
    if isinstance(granularity, PerTensor):
        amax = a.amax() if a.numel() else torch.zeros((), dtype=a.dtype)
    elif isinstance(granularity, PerRow):
        amax = a.amax(dim=1, keepdim=True)
    elif isinstance(granularity, PerBlock):
        b = granularity.size
        amax = a.reshape(n // b, b, k // b, b).amax(dim=(1, 3))
    elif isinstance(granularity, PerGroup):
        g = granularity.size
        amax = a.reshape(n, k // g, g).amax(dim=2, keepdim=True)
    else:  # pragma: no cover - guarded by ScaleConfig
        raise ConfigError(f"unknown granularity {granularity!r}")
    return (amax.to(torch.float32) / QMAX).clamp(min=SCALE_FLOOR)


def expand_scale(scale: torch.Tensor, granularity: Granularity, shape: tuple[int, int]) -> torch.Tensor:
    """A view of ``scale`` that broadcasts against a weight of ``shape`` ([N, K])."""
    n, k = shape
    if isinstance(granularity, (PerTensor, PerRow)):
        return scale
    if isinstance(granularity, PerBlock):
        b = granularity.size
        return scale.repeat_interleave(b, dim=0).repeat_interleave(b, dim=1)
    if isinstance(granularity, PerGroup):
        g = granularity.size
        return scale.expand(n, k // g, g).reshape(n, k)
    raise ConfigError(f"unknown granularity {granularity!r}")


def absmax_scale(state: LayerState, *, cfg: ScaleConfig = ScaleConfig()) -> LayerState:
    """Set ``state.scale`` to absmax/127 scales of ``state.weight`` at ``cfg.granularity``.

    Example:
        >>> s = absmax_scale(LayerState.from_weight("fc", torch.tensor([[0.5, -1.27]])))
        >>> tuple(s.scale.shape), round(s.scale.item(), 6)
        ((1, 1), 0.01)
    """
    n, k = state.shape
    gran = cfg.granularity
    note = None
    if not fits(gran, n, k):
        note = f"{gran!r} does not tile [{n}, {k}]; used per-row scales instead"
        gran = PerRow()
    scale = compute_scale(state.weight, gran)
    return record(state, "absmax_scale", cfg, note=note, scale=scale, granularity=gran)
