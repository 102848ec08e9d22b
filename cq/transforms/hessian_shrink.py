"""Shrink a calibration Hessian towards its diagonal: a regulariser for small calibration sets.

``H = 2/T·XᵀX`` from ``T`` tokens estimates the input covariance with an error of order ``√(K/T)``;
with ``T`` near or below ``K`` (MiniLM's ``output.dense``: K = 1536, ~1100 tokens) the estimate has
a null space and GPTQ/LDLQ fit the calibration tokens instead of the input distribution. The
shrunk estimate ``(1 − β)·H + β·diag(H)`` (Ledoit–Wolf-style, towards the per-channel variances)
keeps every channel's energy and damps only the cross-channel structure the sample cannot resolve.
Measured on held-out MiniLM sentences (benchmarks/bench_quality.py): ConvRot + LDLQ weight-only
1 − cos 6.90e-5 → 5.52e-5 at β = 0.3, where raising LDLQ's identity damping to 0.1 reaches 5.99e-5.

Apply it to the original-basis Hessian, before any rotation: after ConvRot the diagonal is nearly
uniform and the shrinkage degenerates into identity damping.
"""

from __future__ import annotations

import math

import attrs
import torch

from ..errors import ConfigError, CqError
from ..state import LayerState, record

__all__ = ["HessianShrinkConfig", "shrink_hessian"]


def _beta(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        raise ConfigError(f"beta={value!r} must be a number in [0, 1] (0: keep H, 1: diagonal only), e.g. 0.3")


@attrs.frozen
class HessianShrinkConfig:
    """``beta``: weight of the diagonal in ``(1 − β)·H + β·diag(H)``.

    Example:
        >>> HessianShrinkConfig().beta
        0.3
    """

    beta: float = attrs.field(default=0.3, validator=_beta)


def shrink_hessian(state: LayerState, *, cfg: HessianShrinkConfig = HessianShrinkConfig()) -> LayerState:
    """Replace ``state.hessian`` by ``(1 − β)·H + β·diag(H)``; a state without a Hessian passes unchanged.

    The result is symmetric positive semi-definite whenever ``H`` is (a convex combination of two
    such matrices), keeps ``diag(H)`` exactly, and keeps dead inputs dead (zero rows stay zero).

    Example:
        >>> s = LayerState.from_weight("fc", torch.ones(1, 2), hessian=torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
        >>> shrink_hessian(s, cfg=HessianShrinkConfig(0.5)).hessian.tolist()
        [[2.0, 0.5], [0.5, 2.0]]
    """
    if state.hessian is None:
        return state
    if state.basis is not None:
        raise CqError(f"{state.name}: shrink_hessian must run before the rotation ({state.basis!r}): the diagonal "
                      "of a rotated Hessian is nearly uniform; put it right after the calibration is attached")
    h = state.hessian
    shrunk = h * (1 - cfg.beta)
    shrunk.diagonal().copy_(h.diagonal())
    return record(state, "shrink_hessian", cfg, hessian=shrunk)
