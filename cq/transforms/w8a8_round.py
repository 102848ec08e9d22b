"""W8A8-aware rounding: minimise the error of the output ComfyUI actually computes, ``‖XWᵀ − X̃Ŵᵀ‖``.

Under ComfyUI's int8 forward a layer computes ``X̃·Ŵᵀ`` where ``X̃`` is the runtime's activation path
(rotate by the layer's basis, per-token absmax/127, round half to even, int8, dequantize); the float
layer computes ``X·Wᵀ``. GPTQ/LDLQ minimise ``‖X(W − Ŵ)ᵀ‖`` and ignore ``X̃ ≠ X``. Per output row
``w`` (working basis, ``E = X̃ − X`` the activation error):

    ‖Xw − X̃ŵ‖² = ŵᵀ(X̃ᵀX̃)ŵ − 2ŵᵀ(X̃ᵀX)w + const = ‖ŵ − w*‖²_{X̃ᵀX̃} + const,
    w* = (X̃ᵀX̃)⁻¹(X̃ᵀX)w,

so LDLQ with the Hessian ``H̃ = X̃ᵀX̃`` and the *target* ``W* = W·(X̃ᵀX)ᵀ·H̃⁻¹`` rounds for the
runtime's output (the asymmetric calibration of GPTAQ, arXiv 2504.02692, for INT8 per-row).
Fitting the full ``K × K`` cross term on a few thousand tokens overfits: the per-token rounding
noise is not predictable from token to token (algorithms.md, "activation-only floor"). Two
regularisations, mixed by :attr:`W8A8RoundConfig.mix`:

* ``mix = 0`` (the *noise model*): ``E`` is isotropic noise independent of ``X``, so
  ``X̃ᵀX̃ ≈ XᵀX + d̄·I`` and ``X̃ᵀX ≈ XᵀX`` with one number ``d̄ = mean(2/T·ΣE²)`` (every
  coordinate of a token shares the step ``s_t``; measured: nothing else in ``E`` replicates on
  held-out tokens). The target is the Wiener shrinkage ``W·H(H + d̄I)⁻¹`` and the rounding Hessian
  is ``H`` damped by the noise it will see. Because ``d̄`` is ~1e-4 of ``mean(diag H)``, the
  expected gain is tiny (≤ ``d̄/λ_min``): see benchmarks/bench_quality.py for the measurement.
* ``mix = 1``: the full empirical ``X̃ᵀX̃`` and ``X̃ᵀX`` (exact on the calibration tokens).

Measured (benchmarks/bench_quality.py, held-out data): no gain. MiniLM W8A8 1 − cos 1.692e-4 →
1.705e-4 (noise model), 1.999e-4 (full cross term); DiT-like 43.41 → 43.41 dB. In 1 − cos the W8A8
error is the activation-only floor *plus* the weight-only error (9.88e-5 + 6.90e-5 ≈ 1.69e-4), and
the activation error is unpredictable noise, so only the weight-only error can be lowered. Kept as
an option, not a default.

plus a ridge ``λ = ridge·mean(diag H̃)`` pulling the target back towards ``W``
(``‖Xw − X̃ŵ‖² + λ‖w − ŵ‖²``). The statistics come from :func:`cq.calibrate.activation_update`
(or :func:`cq.calibrate.capture` with ``w8a8=``) for the same basis the layer is rounded in.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import attrs
import torch

from ..calibrate import ActivationStats
from ..errors import ConfigError, InputError
from ..state import LayerState, PerRow, PerTensor, record
from .hessian import quadratic_forms
from .ldlq import LDLQConfig, ldlq

__all__ = ["ActivationStats", "W8A8RoundConfig", "w8a8_objective", "w8a8_round", "basis_groupsize",
           "stats_for_state"]


def _unit(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{attribute.name}={value!r} must be a number in [0, 1] (0: noise model, 1: full "
                          "empirical cross term)")


def _nonneg(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{attribute.name}={value!r} must be a finite number >= 0, e.g. 0.0")


def _ldlq_cfg(instance, attribute, value):
    if not isinstance(value, LDLQConfig):
        raise ConfigError(f"rounder must be an LDLQConfig, got {type(value).__name__}")


def _search_cfg(instance, attribute, value):
    from .scale_search import ScaleSearchConfig

    if value is not None and not isinstance(value, ScaleSearchConfig):
        raise ConfigError(f"scale_search must be None or a ScaleSearchConfig, got {type(value).__name__}")


@attrs.frozen
class W8A8RoundConfig:
    """How :func:`w8a8_round` builds its objective and rounds.

    ``mix``: 0 = noise model (diagonal activation error, the default: it does not overfit), 1 =
    full empirical cross term, in between a blend. ``ridge``: extra ``λ/mean(diag H̃)`` pulling the
    target towards ``W``. ``prior``: ``XᵀX`` is damped by ``prior·mean(diag H)`` before the target is
    solved (like LDLQ's 1 % damping): with fewer calibration tokens than inputs the undamped Hessian
    has a null space, where the shrinkage would zero the weights (measured on MiniLM's
    ``output.dense``, K = 1536 > 1088 tokens: 1 − cos 4e-2 on held-out sentences without it). ``rounder``: the LDLQ settings. ``scale_search``: optionally search
    per-row scales under the same W8A8 objective (:class:`~cq.transforms.scale_search.ScaleSearchConfig`).

    Example:
        >>> W8A8RoundConfig().mix, W8A8RoundConfig(mix=1.0, ridge=0.01).ridge
        (0.0, 0.01)
    """

    mix: float = attrs.field(default=0.0, validator=_unit)
    ridge: float = attrs.field(default=0.0, validator=_nonneg)
    prior: float = attrs.field(default=0.01, validator=_nonneg)
    rounder: LDLQConfig = attrs.field(factory=LDLQConfig, validator=_ldlq_cfg)
    scale_search: Any = attrs.field(default=None, validator=_search_cfg)


def basis_groupsize(state: LayerState) -> int | None:
    """The ConvRot group size of ``state``'s working basis, 0 when unrotated, ``None`` when the basis
    is not one the runtime applies to activations (then no W8A8 objective exists).

    Example:
        >>> basis_groupsize(LayerState.from_weight("fc", torch.ones(2, 16)))
        0
    """
    basis = getattr(state, "basis", None)
    if basis is None:
        return 0
    if getattr(basis, "native", False) and hasattr(basis, "groupsize"):
        return int(basis.groupsize)
    return None


def stats_for_state(state: LayerState) -> ActivationStats | None:
    """The :class:`ActivationStats` in ``state.meta["w8a8_stats"]`` for the state's basis, if any.

    ``meta["w8a8_stats"]`` maps a ConvRot group size (0: unrotated) to the statistics captured for
    that basis (see :func:`cq.calibrate.capture` with ``w8a8=``).
    """
    g = basis_groupsize(state)
    table = state.meta.get("w8a8_stats") or {}
    if g is None or not isinstance(table, Mapping):
        return None
    st = table.get(g)
    if st is not None and st.k != state.shape[1]:
        raise InputError(f"{state.name}: W8A8 statistics have K={st.k}, the weight has in_features="
                         f"{state.shape[1]}; they were captured for a different layer")
    return st


def w8a8_objective(weight: torch.Tensor, hessian: torch.Tensor, stats: ActivationStats, *, mix: float = 0.0,
                   ridge: float = 0.0, prior: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(target W*, rounding Hessian H̃)`` of the W8A8 objective, float64, in the working basis.

    ``weight`` [N, K] and ``hessian`` (``2/T·XᵀX``) must be in the basis ``stats`` was captured in.
    With ``stats`` from exact inputs (``e = 0``) the target is ``W`` and ``H̃ = H``.

    Example:
        >>> from cq.calibrate import activation_stats
        >>> x = torch.randn(256, 16, dtype=torch.float64)
        >>> st = activation_stats(x, groupsize=0)
        >>> w = torch.randn(4, 16, dtype=torch.float64)
        >>> t, h = w8a8_objective(w, 2 / 256 * x.T @ x, st)
        >>> float((t - w).abs().max()) < 0.01 * float(w.abs().max())  # a small shrinkage of W
        True
    """
    f64 = torch.float64
    h = hessian.detach().to(f64)
    h = (h + h.t()) * 0.5
    if prior:
        h = h + prior * float(h.diagonal().mean()) * torch.eye(h.shape[0], dtype=f64)
    # X̃ = X + E: X̃ᵀX̃ = XᵀX + XᵀE + EᵀX + EᵀE and X̃ᵀX = XᵀX + EᵀX. Measured (DiT-like layers, two
    # disjoint 4096-token sets): XᵀE and the off-diagonal of EᵀE do not replicate (correlation
    # < 0.01), nor do the per-coordinate diag(EᵀE) (0.05): only their mean does. Every token's
    # coordinates share one step s_t, so E[EᵀE] = d̄·I in any basis and E[XᵀE] = 0.
    d_bar = float(stats.err_sq.to(f64).mean())
    hq_model = h + d_bar * torch.eye(h.shape[0], dtype=f64)
    cx_model = h
    if mix > 0:
        if stats.hessian is None or stats.cross is None:
            raise ConfigError(f"W8A8 objective mix={mix} needs the full X̃ᵀX̃ and X̃ᵀX statistics, which calibration "
                              "files do not store (only their diagonals); use mix=0 or pass capture()'s statistics")
        hq_full = stats.hessian.to(f64)
        hq = (1 - mix) * hq_model + mix * (hq_full + hq_full.t()) * 0.5
        cx = (1 - mix) * cx_model + mix * stats.cross.to(f64)
    else:
        hq, cx = hq_model, cx_model
    lam = ridge * float(hq.diagonal().mean())
    if lam:
        hq = hq + lam * torch.eye(hq.shape[0], dtype=f64)
        cx = cx + lam * torch.eye(cx.shape[0], dtype=f64)
    # The least-squares target closest to W: t = w + H̃⁻¹(C − H̃)w. Directions the calibration never
    # exercised (dead inputs, or the null space when tokens < inputs) keep their weights instead of
    # being zeroed. Solved on the live block (inputs with diag H̃ > 0).
    live = hq.diagonal() > 0
    w64 = weight.detach().to(f64)
    target = w64.clone()
    if bool(live.any()):
        idx = live.nonzero().flatten()
        hl = hq.index_select(0, idx).index_select(1, idx)
        rhs = (cx.index_select(0, idx).index_select(1, idx) - hl) @ w64[:, idx].t()
        base = float(hl.diagonal().mean())
        chol, info = torch.linalg.cholesky_ex(hl)
        for rel in (1e-10, 1e-8, 1e-6):  # rank-deficient H̃ (tokens < inputs): smallest jitter that factors
            if not int(info):
                break
            chol, info = torch.linalg.cholesky_ex(hl + rel * base * torch.eye(hl.shape[0], dtype=f64))
        if int(info):
            raise InputError("W8A8 objective: X̃ᵀX̃ could not be factored (not positive semi-definite?); "
                             "use ridge > 0 or prior > 0")
        target[:, idx] += torch.cholesky_solve(rhs, chol).t()
    return target, hq


def w8a8_round(state: LayerState, *, cfg: W8A8RoundConfig = W8A8RoundConfig()) -> LayerState:
    """Round ``state.weight`` with LDLQ for the W8A8 output ``X̃·Ŵᵀ`` instead of ``X·Ŵᵀ``.

    Needs a Hessian, a row or tensor scale and ``state.meta["w8a8_stats"]`` for the state's basis
    (see :func:`stats_for_state`); without the statistics it runs plain LDLQ and leaves a note.
    ``weight`` and ``hessian`` are unchanged on return (only ``codes`` and, with
    ``cfg.scale_search``, ``scale``); ``metrics["rel_out_h"]`` is the weight-only error on the
    original Hessian, ``metrics["rel_out_w8a8_obj"]`` the error on the W8A8 objective.

    Example:
        >>> from cq.calibrate import activation_stats
        >>> from cq.transforms import absmax_scale
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(512, 16, generator=g)
        >>> s = LayerState.from_weight("fc", torch.randn(8, 16, generator=g), hessian=2 / 512 * x.T @ x,
        ...                            meta={"w8a8_stats": {0: activation_stats(x, groupsize=0)}})
        >>> out = w8a8_round(absmax_scale(s))
        >>> out.codes.dtype, out.weight is s.weight, "rel_out_w8a8_obj" in out.metrics
        (torch.int8, True, True)
    """
    if state.hessian is None:
        out = ldlq(state, cfg=cfg.rounder)
        return record(attrs.evolve(out, history=state.history), "w8a8_round", cfg,
                      note="w8a8_round: no calibration Hessian; rounded to nearest")
    if not isinstance(state.granularity, (PerRow, PerTensor)):
        raise ConfigError(f"{state.name}: w8a8_round needs per-row or per-tensor scales (ComfyUI's W8A8 runtime), "
                          f"got {state.granularity!r}; use ScaleConfig(PerRow())")
    stats = stats_for_state(state)
    if stats is None:
        g = basis_groupsize(state)
        why = ("the layer's basis has no ComfyUI activation path" if g is None else
               f"the calibration has no W8A8 statistics for this basis (ConvRot groupsize {g}; recapture "
               "with capture(..., w8a8=...))")
        out = _round(state, cfg)
        return record(attrs.evolve(out, history=state.history), "w8a8_round", cfg,
                      note=f"w8a8_round: {why}; used plain LDLQ")
    target, hq = w8a8_objective(state.weight, state.hessian, stats, mix=cfg.mix, ridge=cfg.ridge, prior=cfg.prior)
    work = attrs.evolve(state, weight=target.to(torch.float32), hessian=hq.to(torch.float32))
    out = _round(work, cfg)
    e = target - out.codes.to(torch.float64) * out.scale.to(torch.float64)
    metrics = {}
    if cfg.rounder.metrics:
        sig_q, loss_q = quadratic_forms([target, e], hq)
        e_plain = state.weight.to(torch.float64) - out.codes.to(torch.float64) * out.scale.to(torch.float64)
        sig, loss = quadratic_forms([state.weight, e_plain], state.hessian)
        metrics = {"rel_out_w8a8_obj": math.sqrt(max(loss_q, 0) / sig_q) if sig_q > 0 else 0.0,
                   "rel_out_h": math.sqrt(max(loss, 0) / sig) if sig > 0 else 0.0}
    back = attrs.evolve(out, weight=state.weight, hessian=state.hessian, history=state.history)
    return record(back, "w8a8_round", cfg, metrics=metrics)


def _round(state: LayerState, cfg: W8A8RoundConfig) -> LayerState:
    if cfg.scale_search is None:
        return ldlq(state, cfg=cfg.rounder)
    from .scale_search import scale_search

    return scale_search(state, cfg=attrs.evolve(cfg.scale_search, rounder=cfg.rounder))
