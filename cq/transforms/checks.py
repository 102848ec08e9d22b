"""Pass-through checks that raise a clear error naming the layer."""

from __future__ import annotations

import torch

from ..errors import InputError, NonFiniteWeightError
from ..state import LayerState

__all__ = ["check_finite", "check_linear"]


def check_finite(state: LayerState) -> LayerState:
    """Return ``state`` unchanged, or raise if its weight holds NaN or Inf.

    Example:
        >>> check_finite(LayerState.from_weight("fc", torch.tensor([[float("nan")]])))
        Traceback (most recent call last):
        ...
        cq.errors.NonFiniteWeightError: fc: weight has 1 NaN and 0 Inf values (first at [0, 0]); ...
    """
    w = state.weight
    # One reduction is enough when it is finite (a NaN or Inf anywhere makes the sum non-finite);
    # only then pay for the element-wise scan that locates the bad values (or finds a mere overflow).
    if w.is_floating_point() and w.numel() and not bool(torch.isfinite(w.sum(dtype=torch.float32))):
        bad = ~torch.isfinite(w)
        if bool(bad.any()):
            n_nan = int(torch.isnan(w).sum())
            n_inf = int(bad.sum()) - n_nan
            first = [int(i) for i in bad.nonzero()[0]]
            raise NonFiniteWeightError(
                f"{state.name}: weight has {n_nan} NaN and {n_inf} Inf values (first at {first}); "
                "fix the source model, or exclude the layer with --exclude-layers / exclude_layers"
            )
    return state


def check_linear(state: LayerState) -> LayerState:
    """Return ``state`` unchanged, or raise unless its weight is a non-empty 2-D float matrix."""
    w = state.weight
    if w.ndim != 2 or w.numel() == 0 or not w.is_floating_point():
        raise InputError(
            f"{state.name}: only non-empty 2-D float Linear weights can be quantized, got "
            f"shape {tuple(w.shape)} dtype {w.dtype}; leave the tensor out of the quantized set"
        )
    return state
