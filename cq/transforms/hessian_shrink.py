"""Shrink a calibration Hessian towards its diagonal: a regulariser for small calibration sets.

``H = 2/T·XᵀX`` from ``T`` tokens estimates the input covariance with an error of order ``√(K/T)``;
with ``T`` near or below ``K`` (MiniLM's ``output.dense``: K = 1536, ~1100 tokens) the estimate has
a null space and GPTQ/LDLQ fit the calibration tokens instead of the input distribution. The
shrunk estimate ``(1 − β)·H + β·diag(H)`` (Ledoit–Wolf-style, towards the per-channel variances)
keeps every channel's energy and damps only the cross-channel structure the sample cannot resolve.
Measured on held-out MiniLM sentences (benchmarks/bench_quality.py): ConvRot + LDLQ weight-only
1 − cos 6.90e-5 → 5.52e-5 at β = 0.3, where raising LDLQ's identity damping to 0.1 reaches 5.99e-5.

How much to shrink depends on how many tokens stand behind ``H``: ``beta="auto"`` (the default) takes
``β = min(0.3, 0.7·K/T)`` with ``T`` from the attached calibration statistics (0.3 when unknown).
Measured on MiniLM: with 64 sentences (891 tokens, K/T ≥ 0.43) that is 0.3 everywhere; with 256
sentences (~3500 tokens) a fixed 0.3 is *worse* than no shrinkage (weight-only 5.11e-5 against 4.89e-5,
padded capture) while ``"auto"`` gives 4.57e-5 (no shrinkage 4.71e-5 on the masked capture). Large calibration sets (T ≫ K, as in diffusion models) get β → 0, the
published algorithms.

Apply it to the original-basis Hessian, before any rotation: after ConvRot the diagonal is nearly
uniform and the shrinkage degenerates into identity damping.
"""

from __future__ import annotations

import math

import attrs
import torch

from ..errors import ConfigError, CqError
from ..state import LayerState, record

__all__ = ["HessianShrinkConfig", "shrink_hessian", "auto_beta"]

#: ``beta="auto"``: ``min(AUTO_CAP, AUTO_SCALE · K / T)``.
AUTO_CAP = 0.3
AUTO_SCALE = 0.7


def auto_beta(k: int, samples: int | None) -> float:
    """The shrinkage ``"auto"`` picks for ``k`` inputs and ``samples`` calibration tokens.

    Example:
        >>> auto_beta(384, 891), auto_beta(3072, 100_000), auto_beta(64, None)
        (0.3, 0.0215, 0.3)
    """
    if not samples or samples <= 0:
        return AUTO_CAP
    return round(min(AUTO_CAP, AUTO_SCALE * k / samples), 4)


def _beta(instance, attribute, value):
    if value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        raise ConfigError(f"beta={value!r} must be 'auto' or a number in [0, 1] (0: keep H, 1: diagonal only), "
                          "e.g. 0.3")


def shrink_validator(instance, attribute, value):
    """attrs validator for a record field holding a shrinkage (``"auto"`` or a number in [0, 1])."""
    try:
        HessianShrinkConfig(value)
    except ConfigError as exc:
        raise ConfigError(f"{type(instance).__name__}.{attribute.name}: {exc}") from None


@attrs.frozen
class HessianShrinkConfig:
    """``beta``: weight of the diagonal in ``(1 − β)·H + β·diag(H)``, or ``"auto"`` (:func:`auto_beta`).

    Example:
        >>> HessianShrinkConfig().beta, HessianShrinkConfig(0.3).beta
        ('auto', 0.3)
    """

    beta: float | str = attrs.field(default="auto", validator=_beta)


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
    beta = cfg.beta
    if beta == "auto":
        samples = (state.meta.get("calibration") or {}).get("samples")
        beta = auto_beta(state.shape[1], int(samples) if isinstance(samples, (int, float)) else None)
    shrunk = h * (1 - beta)
    shrunk.diagonal().copy_(h.diagonal())
    return record(state, "shrink_hessian", cfg, hessian=shrunk, metrics={"hessian_shrink": float(beta)})
