"""``LearnedRoundingConverter``: the reference's class, running cq's :func:`~cq.transforms.learned_round.learned_round`.

The reference API passes one weight and no activations, so by default the objective is the
reference's data-free one (the error on ``W``'s top singular subspace) started from round-to-nearest.
That objective cannot beat round-to-nearest on real inputs (see :mod:`cq.transforms.learned_round`):
it is kept so that scripts written against the reference run, not as an improvement. Pass
``H=`` (a ``[K, K]`` Hessian ``2/T·XᵀX``, a cq extension) and the converter optimises the layer's
output error instead, starting from LDLQ's codes; even then, at INT8, it rarely improves on LDLQ
(README, "Learned rounding").

Knob mapping (reference → cq): ``optimizer`` original → SignSGD, adamw / radam → torch.optim;
``num_iter``, ``lr``, ``lr_schedule`` (adaptive = cosine decay, exponential, plateau, constant),
``lr_gamma``, ``lr_patience``, ``lr_factor``, ``lr_min``, ``lr_cooldown``, ``lr_threshold``,
``lr_threshold_mode``, ``early_stop_loss``, ``early_stop_lr``, ``early_stop_stall``, ``top_p``,
``min_k``, ``max_k``, ``full_matrix`` → the :class:`~cq.transforms.learned_round.LearnedRoundConfig`
fields of the same names. ``lr_adaptive_mode`` and ``lr_shape_influence`` tune the reference's
shape-aware heuristic, which cq does not reproduce: non-default values warn.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import attrs
import torch

from ..errors import ConfigError, InputError
from ..pipeline import pipeline, stage
from ..state import LayerState, PerBlock, PerRow, PerTensor
from ..transforms import reconstruct
from ..transforms.checks import check_finite
from ..transforms.learned_round import LearnedRoundConfig, learned_round, learned_round_pipeline
from ..transforms.rounding import fp16_cast, round_to_nearest
from ..transforms.scales import ScaleConfig, absmax_scale

__all__ = ["LearnedRoundingConverter", "ConvertResult", "learned_round_config_from_legacy"]

_CONFIG_KNOBS = ("lr_gamma", "lr_patience", "lr_factor", "lr_min", "lr_cooldown", "lr_threshold",
                 "lr_threshold_mode", "early_stop_loss", "early_stop_lr", "early_stop_stall", "full_matrix")
_HEURISTIC = {"lr_adaptive_mode": "simple-reset", "lr_shape_influence": 1.0}


class ConvertResult(NamedTuple):
    """``(q, scale, dequantized)``: int8 (or fp16) codes, float32 scale, float32 reconstruction."""

    q: torch.Tensor
    scale: torch.Tensor
    dequantized: torch.Tensor


def learned_round_config_from_legacy(*, optimizer: str = "original", num_iter: int = 500, lr: float | None = 8.0773e-3,
                                     lr_schedule: str = "adaptive", top_p: float = 0.01, min_k: int = 1,
                                     max_k: int = 16, **kw: Any) -> LearnedRoundConfig:
    """:class:`LearnedRoundConfig` from the reference's knobs (``convert_to_int8(**converter_kwargs)``, CLI flags).

    Unknown names raise :class:`~cq.errors.ConfigError`; ``lr_adaptive_mode`` / ``lr_shape_influence``
    at non-default values warn (no effect in cq). ``None`` values mean "the default".

    Example:
        >>> c = learned_round_config_from_legacy(optimizer="adamw", num_iter=100, lr_schedule="plateau")
        >>> c.optimizer, c.num_iter, c.lr_schedule
        ('adamw', 100, 'plateau')
    """
    kw = {k: v for k, v in kw.items() if v is not None}
    unknown = sorted(set(kw) - set(_CONFIG_KNOBS) - set(_HEURISTIC))
    if unknown:
        raise ConfigError(f"learned rounding got unknown options {unknown}; accepted: "
                          f"{sorted(_CONFIG_KNOBS + tuple(_HEURISTIC))} plus optimizer, num_iter, lr, lr_schedule, "
                          "top_p, min_k, max_k")
    odd = {k: kw.pop(k) for k in list(kw) if k in _HEURISTIC}
    odd = {k: v for k, v in odd.items() if v != _HEURISTIC[k]}
    if odd:
        warnings.warn(f"learned rounding: {odd} tune the reference's shape-aware LR heuristic, which cq does not "
                      "reproduce (its 'adaptive' schedule is a cosine decay); they have no effect",
                      UserWarning, stacklevel=3)
    return LearnedRoundConfig(optimizer=optimizer, num_iter=num_iter, lr=lr, lr_schedule=lr_schedule,
                              top_p=top_p, min_k=min_k, max_k=max_k, **kw)


class LearnedRoundingConverter:
    """Reference-compatible converter class (``scaling_mode``: tensor, row/axis, block).

    ``no_learned_rounding=True`` (the reference's ``--simple``) is plain round-to-nearest.
    ``smoothquant=True`` / ``activation_scales`` raise :class:`~cq.errors.ConfigError`: a smoothing
    factor must fold into a neighbouring layer, which a one-weight converter cannot see (the
    reference stored smoothed weights uncompensated, i.e. wrong outputs); use the model-level
    ``--smoothquant`` (:func:`cq.transforms.smoothquant.smoothquant`).

    Example:
        >>> c = LearnedRoundingConverter(scaling_mode="axis", no_learned_rounding=True)
        >>> q, scale, deq = c.convert(torch.tensor([[0.5, -1.27]]))
        >>> q.tolist(), tuple(scale.shape)
        ([[50, -127]], (1, 1))
        >>> c = LearnedRoundingConverter(scaling_mode="axis", num_iter=20)
        >>> q, scale, deq = c.convert(torch.randn(8, 16))
        >>> q.dtype, c.last_state.stage_names()[-1]
        (torch.int8, 'learned_round')
    """

    def __init__(self, block_size: int = 128, num_iter: int = 500, lr: float = 8.0773e-3,
                 optimizer: str = "original", lr_schedule: str = "adaptive", top_p: float = 0.01, min_k: int = 1,
                 max_k: int = 16, scaling_mode: str = "block", target_format: str = "int8",
                 smoothquant: bool = False, smoothquant_alpha: float = 0.5, low_memory: bool = False,
                 no_learned_rounding: bool = False, **optimizer_kwargs: Any):
        if target_format not in ("int8", "fp16"):
            raise ConfigError(f"target_format={target_format!r} is not one of ['int8', 'fp16']")
        if smoothquant:
            raise ConfigError("smoothquant=True: a one-weight converter cannot fold the smoothing factor into a "
                              "neighbouring layer, and an unfolded factor changes the model's outputs; use the "
                              "model-level --smoothquant (cq.transforms.smoothquant.smoothquant)")
        if scaling_mode not in ("tensor", "axis", "row", "block"):
            raise ConfigError(f"scaling_mode={scaling_mode!r} is not one of ['tensor', 'axis', 'row', 'block']")
        self.block_size = block_size
        self.scaling_mode = scaling_mode
        self.target_format = target_format
        self.no_learned_rounding = no_learned_rounding
        self.optimizer = optimizer
        self.cfg = learned_round_config_from_legacy(optimizer=optimizer, num_iter=num_iter, lr=lr,
                                                    lr_schedule=lr_schedule, top_p=top_p, min_k=min_k, max_k=max_k,
                                                    **optimizer_kwargs)
        self.optimizer_kwargs = dict(optimizer_kwargs, num_iter=num_iter, lr=lr, lr_schedule=lr_schedule,
                                     top_p=top_p, min_k=min_k, max_k=max_k)
        self.granularity = {"tensor": PerTensor(), "axis": PerRow(), "row": PerRow()}.get(
            scaling_mode, PerBlock(block_size))
        #: The LayerState of the last :meth:`convert` (metrics, notes, history).
        self.last_state: LayerState | None = None

    def _pipeline(self, with_hessian: bool):
        if self.target_format == "fp16":
            return pipeline(check_finite, fp16_cast)
        if self.no_learned_rounding:
            return pipeline(check_finite, stage(absmax_scale, ScaleConfig(self.granularity)), round_to_nearest)
        if with_hessian:
            return learned_round_pipeline(self.granularity, attrs.evolve(self.cfg, objective="hessian"), start="ldlq")
        return pipeline(check_finite, stage(absmax_scale, ScaleConfig(self.granularity)),
                        stage(learned_round, attrs.evolve(self.cfg, objective="svd")))

    def convert(self, W: torch.Tensor, activation_scales: torch.Tensor | None = None, *,
                H: torch.Tensor | None = None) -> ConvertResult:
        """Quantize one ``[N, K]`` weight; ``H`` (cq extension): its ``[K, K]`` Hessian for the data-aware objective."""
        if activation_scales is not None:
            raise ConfigError("activation_scales: SmoothQuant needs a neighbouring layer to fold into; use the "
                              "model-level --smoothquant (cq.transforms.smoothquant.smoothquant)")
        if not isinstance(W, torch.Tensor) or W.ndim != 2 or not W.is_floating_point() or W.numel() == 0:
            raise InputError(f"LearnedRoundingConverter.convert needs a non-empty 2-D float weight, got "
                             f"{type(W).__name__ if not isinstance(W, torch.Tensor) else (W.dtype, tuple(W.shape))}")
        h = None if H is None else H.detach().to(torch.float32)
        state = self._pipeline(h is not None)(LayerState.from_weight("weight", W.detach().to(torch.float32),
                                                                     hessian=h))
        self.last_state = state
        if state.format == "fp16":
            return ConvertResult(state.weight, torch.tensor(1.0), state.weight.float())
        return ConvertResult(state.codes, state.scale, reconstruct(state))
