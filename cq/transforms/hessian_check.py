"""Judge a layer's Hessian before GPTQ/LDLQ use it: fall back to round-to-nearest loudly, or stop.

A Hessian that is NaN/Inf, all zero, negative-definite or indefinite (see
:func:`~cq.transforms.hessian.hessian_problem`) cannot describe ``2/T·XᵀX``: optimizing against it
gives codes and predictions that mean nothing. :func:`check_hessian` drops such a Hessian, so the
next stage rounds to nearest, and says so in a note naming the reason (the runner prints every
layer note as a ``warning:`` line on the console, with the layer's name). With ``strict=True`` it
raises instead, one line, so that a run meant to use calibration data never silently does not.
"""

from __future__ import annotations

import attrs

from ..errors import ConfigError, InputError
from ..state import LayerState, record
from .hessian import _nonneg_float, hessian_problem

__all__ = ["HessianCheckConfig", "check_hessian"]


@attrs.frozen
class HessianCheckConfig:
    """``strict``: raise :class:`~cq.errors.InputError` on a bad Hessian instead of falling back.
    ``percdamp``: the damping the check allows for, as in :class:`~cq.transforms.hessian.DampingConfig`.
    ``definite``: ``False`` skips the definiteness test (a Cholesky factorization, 0.3 s at
    K = 4096) and keeps the ``O(K²)`` ones (non-finite, all zero, negative diagonal, dead inputs
    with off-diagonal entries). Only for a pipeline whose first Hessian consumer is GPTQ, LDLQ or
    QuIP: they factor the damped Hessian anyway and, when that fails, run the full test and round
    to nearest with a warning, so the layer is judged once, not twice. Not with ``strict``.

    Example:
        >>> HessianCheckConfig(definite=False).strict
        False
    """

    strict: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    percdamp: float = attrs.field(default=0.01, validator=_nonneg_float)
    definite: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))

    def __attrs_post_init__(self):
        if self.strict and not self.definite:
            raise ConfigError("HessianCheckConfig(strict=True, definite=False): a strict check must test "
                              "definiteness itself (the solvers fall back to round-to-nearest instead of "
                              "raising); use definite=True with strict=True")


def check_hessian(state: LayerState, *, cfg: HessianCheckConfig = HessianCheckConfig()) -> LayerState:
    """Pass a usable Hessian through untouched; drop a bad one with a note (or raise when strict).

    Example:
        >>> import torch
        >>> s = LayerState.from_weight("blocks.0.fc", torch.randn(4, 2), hessian=-torch.eye(2))
        >>> out = check_hessian(s)
        >>> out.hessian is None, out.notes[-1][:33]
        (True, 'Hessian is negative-definite (eve')
        >>> check_hessian(s, cfg=HessianCheckConfig(strict=True))
        Traceback (most recent call last):
        ...
        cq.errors.InputError: blocks.0.fc: Hessian is negative-definite (every diagonal entry is < 0; a Hessian 2/T·XᵀX has none); recapture the calibration data for this layer, or run without strict Hessian checks to round it to nearest
    """
    if state.hessian is None:
        return state
    why = hessian_problem(state.hessian, state.shape[-1], name=state.name, percdamp=cfg.percdamp,
                          definite=cfg.definite)
    if why is None:
        return state
    if cfg.strict:
        raise InputError(f"{state.name}: {why}; recapture the calibration data for this layer, or run without "
                         "strict Hessian checks to round it to nearest")
    return record(state, "check_hessian", cfg, hessian=None, note=f"{why}; Hessian ignored, rounded to nearest")
