"""Compensate the quantization error of the layers before this one (GPTAQ-style asymmetric target).

A layer of the quantized model sees inputs ``X̃`` that differ from the float model's ``X``: every
earlier layer was rounded too. GPTQ/LDLQ fit ``Ŵ X̃`` to ``W X̃``, so that upstream error passes
through untouched. Fitting ``Ŵ X̃`` to the float model's output ``W X`` instead (GPTAQ, arXiv
2504.02692) lets each layer cancel the systematic part of what came before it. The least-squares
target is

    W* = W · Xᵀ X̃ (X̃ᵀ X̃)⁻¹ = W + W · D · H⁻¹,   H = 2/T · X̃ᵀX̃,  D = 2/T · (X − X̃)ᵀ X̃,

and GPTQ/LDLQ then round ``W*`` under ``H`` as usual. :func:`cq.sequential.capture_sequential`
gathers ``H`` and ``D`` (the calibration file's ``<L>.hessian`` and ``<L>.upstream``) by running the
model with its earlier layers already quantized.

The cross term is estimated from a finite sample and overfits it as freely as ``H`` does, so the
correction is damped twice: ``ridge`` adds ``ridge · mean(diag H)`` to ``H`` before the solve, and
``strength`` applies only that fraction of the step. Measured on held-out MiniLM sentences
(benchmarks/bench_quality.py, 64 calibration sentences): ConvRot + LDLQ with Hessian shrink 0.3,
weight-only 1 − cos 5.48e-5 → 4.92e-5 with the defaults (strength 0.5, ridge 0.1); strength 1 with
ridge 0.1 gives 5.66e-5 (overfit), and a correction from statistics of a model whose later layers
are also quantized (one pass instead of sequential) diverges. Only the *weight* error of earlier
layers is worth compensating: rounding noise of the per-token int8 activations is unpredictable
(see :mod:`cq.transforms.w8a8_round`), so the sequential capture runs the earlier layers weight-only.

``state.original`` stays the float weight: the report's errors still compare against ``W`` under
``H``, so they include the deliberate correction (the conversion's own target is ``W X``, not ``W X̃``).
"""

from __future__ import annotations

import math

import attrs
import torch

from ..errors import ConfigError, CqError, InputError
from ..state import LayerState, record

__all__ = ["UpstreamConfig", "upstream_correct"]


def _fraction(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        raise ConfigError(f"{attribute.name}={value!r} must be a number in [0, 1], e.g. "
                          f"{attribute.default}")


def _ridge(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"ridge={value!r} must be a finite number ≥ 0 (a multiple of mean(diag H)), e.g. 0.1")


def strength_validator(instance, attribute, value):
    """attrs validator for a record field holding an upstream-correction strength (a number in [0, 1])."""
    try:
        UpstreamConfig(strength=value)
    except ConfigError as exc:
        raise ConfigError(f"{type(instance).__name__}.{attribute.name}: {exc}") from None


@attrs.frozen
class UpstreamConfig:
    """``strength``: fraction of the least-squares step taken (0: off, 1: the full GPTAQ target);
    ``ridge``: ``ridge · mean(diag H)`` added to ``H`` in the solve.

    Example:
        >>> UpstreamConfig()
        UpstreamConfig(strength=0.5, ridge=0.1)
    """

    strength: float = attrs.field(default=0.5, validator=_fraction)
    ridge: float = attrs.field(default=0.1, validator=_ridge)


def upstream_correct(state: LayerState, *, cfg: UpstreamConfig = UpstreamConfig()) -> LayerState:
    """Move ``state.weight`` to ``W + strength · W D (H + ridge·h̄·I)⁻¹`` when the state carries ``D``.

    ``D`` is ``state.meta["upstream"]`` (``[K, K]``, original basis, set by ``attach_data`` from a
    sequential calibration file); ``H`` is ``state.hessian`` (after any shrinkage). A state without
    ``D`` or without a Hessian passes unchanged (files captured without ``capture_sequential``), as
    does ``strength = 0``. Run it after ``shrink_hessian`` and before any rotation or scale.

    Example:
        >>> w, h = torch.eye(2), torch.eye(2)
        >>> s = LayerState.from_weight("fc", w, hessian=h, meta={"upstream": torch.tensor([[0.0, 0.0], [0.5, 0.0]])})
        >>> upstream_correct(s, cfg=UpstreamConfig(strength=1.0, ridge=0.0)).weight.tolist()
        [[1.0, 0.0], [0.5, 1.0]]
    """
    d = state.meta.get("upstream")
    if d is None or state.hessian is None or cfg.strength == 0:
        return state
    if state.basis is not None:
        raise CqError(f"{state.name}: upstream_correct must run before the rotation ({state.basis!r}): the "
                      "calibration's cross term is in the original basis")
    if state.codes is not None:
        raise CqError(f"{state.name}: upstream_correct changes the float weight; run it before the rounding stage")
    k = state.shape[1]
    if tuple(d.shape) != (k, k):
        raise InputError(f"{state.name}: the upstream cross term is {list(d.shape)}, the weight needs [{k}, {k}]; "
                         "the calibration file belongs to another model")
    h = state.hessian.to(torch.float64)
    diag = h.diagonal()
    live = diag > 0  # dead inputs (never non-zero in the calibration) carry no information
    if not bool(live.any()):
        return record(state, "upstream_correct", cfg, note="upstream correction skipped: the Hessian is zero")
    a = h + (cfg.ridge * float(diag[live].mean()) + 1e-12 * float(diag.max())) * torch.eye(k, dtype=torch.float64,
                                                                                             device=h.device)
    a[~live, :] = 0
    a[:, ~live] = 0
    a[~live, ~live] = 1
    w = state.weight.to(torch.float64)
    dm = d.to(device=w.device, dtype=torch.float64).clone()
    dm[:, ~live] = 0
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        return record(state, "upstream_correct", cfg,
                      note="upstream correction skipped: H + ridge is not positive-definite")
    # (W D) A⁻¹ = ((A⁻¹)ᵀ (W D)ᵀ)ᵀ and A is symmetric: one Cholesky solve for all rows.
    step = torch.cholesky_solve((w @ dm).T.contiguous(), chol).T
    new = (w + cfg.strength * step).to(state.weight.dtype)
    if not bool(torch.isfinite(new).all()):
        return record(state, "upstream_correct", cfg, note="upstream correction skipped: non-finite result")
    # How far the target moved, relative to the weight (the report's trace of the correction).
    moved = float((new.to(torch.float64) - w).norm() / w.norm().clamp_min(1e-300))
    return record(state, "upstream_correct", cfg, weight=new, metrics={"upstream_step": moved})
