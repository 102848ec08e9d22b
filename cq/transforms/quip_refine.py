"""Refinements of fixed-scale INT8 codes on the layer's quadratic loss ``tr(E H Eᵀ)``, ``E = W − s⊙Q``.

The reference's ``QuIPInt8Converter`` options that refine LDLQ's codes, as stages that run after
``ldlq`` (they also refine GPTQ codes; any state with codes, scales and a Hessian):

* :func:`ldlq_repass` (``ldlq_iterations = 1 + passes``): Gauss–Seidel sweeps over the columns.
  Column ``j`` of every row is re-rounded to the integer nearest its conditional optimum given
  *all* other columns' current errors (LDLQ only sees the earlier ones):
  ``q_ij ← round(q_ij + G_ij / (s_ij H_jj))`` with ``G = E H``. Each step minimizes the loss exactly
  over one coordinate (a 1-D convex quadratic), so a sweep never increases it.
* :func:`greedy_cd` (``use_greedy_coordinate_descent``, ``greedy_cd_iterations``): per row, move
  the single code (by ±1) that lowers the loss most, ``iterations`` times; rows stop when no move
  helps. Cheap (``O(NK)`` per step) and local: it fixes the few worst codes.
* :func:`frobenius_rescale` (``frobenius_rho``): the scales are refit to the codes by least
  squares in the ``H`` norm (``H = I``: the Frobenius norm), ``s_r = ⟨w_r, q_r⟩_H / ⟨q_r, q_r⟩_H``
  per row; :func:`scale_multiply` (``rho``) shrinks or widens the absmax range before rounding
  (``rho < 1`` clips the largest weights, which LDLQ's feedback then compensates).

Rows of ``tr(E H Eᵀ)`` are independent, so every stage ends with :func:`keep_better_rows`: a row
whose loss (float64) came out higher than before the stage keeps its previous codes. No stage is
worse than its input on the objective, by construction.
"""

from __future__ import annotations

import math

import attrs
import torch

from ..errors import ConfigError, CqError
from ..pipeline import Pipeline, stage
from ..state import LayerState, PerRow, PerTensor, record
from .rounding import _need_scale
from .scales import expand_scale

__all__ = ["RepassConfig", "GreedyCDConfig", "ScaleMultiplyConfig", "QuIPRefineConfig", "row_losses",
           "keep_better_rows", "ldlq_repass", "greedy_cd", "frobenius_rescale", "scale_multiply",
           "with_refinements"]


def _nonneg_int(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{attribute.name}={value!r} must be an int >= 0, e.g. 1")


def _pos_int(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{attribute.name}={value!r} must be a positive int, e.g. 128")


def _rho(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value <= 4:
        raise ConfigError(f"{attribute.name}={value!r} must be a number in (0, 4]: the fraction of the absmax "
                          "range the int8 grid spans (1.0 = absmax, 0.9 clips the top 10 %)")


# ---------------------------------------------------------------------------------------------
# Shared pieces


def _problem(state: LayerState, what: str):
    """(W, s_exp, Q, H) in float64 when cheap else float32; raises if the state cannot be refined."""
    _need_scale(state, what)
    if state.codes is None:
        raise CqError(f"{state.name}: {what} refines existing codes; put it after a rounding stage "
                      "(ldlq, gptq_update, round_to_nearest)")
    n, k = state.shape
    dtype = torch.float64 if n * k * k <= 2 ** 31 else torch.float32
    w = state.weight.to(dtype)
    s = expand_scale(state.scale, state.granularity, (n, k)).to(dtype).expand(n, k)
    h = state.hessian.to(dtype) if state.hessian is not None else None
    return w, s, state.codes.to(dtype), h


def row_losses(w: torch.Tensor, s: torch.Tensor, q: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
    """Per-row ``e_r H e_rᵀ`` (float64 ``[N]``) of ``E = W − s⊙Q``; ``h=None`` means ``H = I``.

    Example:
        >>> row_losses(torch.tensor([[1.0, 2.0]]), torch.ones(1, 2), torch.tensor([[1.0, 1.0]]), None).tolist()
        [1.0]
    """
    e = (w.to(torch.float64) - s.to(torch.float64) * q.to(torch.float64))
    if h is None:
        return (e * e).sum(1)
    return ((e @ h.to(torch.float64)) * e).sum(1)


def keep_better_rows(state: LayerState, codes: torch.Tensor, *, stage_name: str, cfg=None,
                     scale: torch.Tensor | None = None, extra: dict | None = None) -> LayerState:
    """Record ``codes`` (and ``scale``) row by row where they do not raise the row's loss; else keep the old row.

    Adds metrics ``<stage>_rel_before``, ``<stage>_rel_after`` (rel = √(loss/signal)), ``<stage>_rows_changed``
    and ``extra``; sets ``rel_out_h`` when the state has a Hessian.
    """
    n, k = state.shape
    new_scale = state.scale if scale is None else scale
    s_old = expand_scale(state.scale, state.granularity, (n, k))
    s_new = expand_scale(new_scale, state.granularity, (n, k))
    h = state.hessian
    before = row_losses(state.weight, s_old, state.codes, h)
    after = row_losses(state.weight, s_new, codes, h)
    worse = after > before
    if scale is not None and bool(worse.any()):
        if not isinstance(state.granularity, PerRow):  # a shared scale cannot be kept per row
            if float(after.sum()) > float(before.sum()):
                codes, new_scale, after = state.codes, state.scale, before
            worse = torch.zeros_like(worse)
        else:
            new_scale = torch.where(worse.view(-1, 1), state.scale, new_scale)
    if bool(worse.any()):
        codes = torch.where(worse.view(-1, 1), state.codes, codes)
        after = torch.where(worse, before, after)
    sig = float(row_losses(state.weight, torch.zeros(1, 1), torch.zeros(1, 1), h).sum())
    rel = (lambda x: math.sqrt(max(x, 0.0) / sig) if sig > 0 else 0.0)
    changed = int((codes != state.codes).any(1).sum()) if scale is None else int(n)
    metrics = {f"{stage_name}_rel_before": rel(float(before.sum())), f"{stage_name}_rel_after": rel(float(after.sum())),
               f"{stage_name}_rows_changed": float(changed), **(extra or {})}
    if h is not None:  # the stored codes changed: so did the layer's proxy output error
        metrics["rel_out_h"] = rel(float(after.sum()))
    return record(state, stage_name, cfg, metrics=metrics, codes=codes.to(torch.int8).contiguous(),
                  scale=new_scale)


def _no_hessian(state: LayerState, what: str) -> LayerState | None:
    if state.hessian is None:
        return record(state, what, None, note=f"no calibration: H = I, {what} has nothing to improve on "
                                            "round-to-nearest (left the codes as they are)")
    return None


# ---------------------------------------------------------------------------------------------
# LDLQ re-passes (Gauss–Seidel sweeps)


@attrs.frozen
class RepassConfig:
    """``passes``: full column sweeps (the reference's ``ldlq_iterations - 1``); ``block_size``:
    columns whose rank-1 updates are batched into one GEMM for the rest of ``G = E H``.

    Example:
        >>> RepassConfig(passes=2).block_size
        128
    """

    passes: int = attrs.field(default=1, validator=_nonneg_int)
    block_size: int = attrs.field(default=128, validator=_pos_int)


def _sweep(g: torch.Tensor, q: torch.Tensor, s: torch.Tensor, h: torch.Tensor, block: int) -> int:
    """One Gauss–Seidel sweep, in place on ``g = E H`` and ``q``; returns how many codes moved."""
    n, k = q.shape
    hd = h.diagonal()
    moved = 0
    for b1 in range(0, k, block):
        b2 = min(b1 + block, k)
        gb = g[:, b1:b2].clone()  # exact within the block, by rank-1 updates
        delta = torch.zeros(n, b2 - b1, dtype=q.dtype, device=q.device)
        for j in range(b1, b2):
            if hd[j] <= 0:  # dead input: no column of H to act on
                continue
            c = j - b1
            sj = s[:, j]
            new = torch.clamp(torch.round(q[:, j] + gb[:, c] / (sj * hd[j])), -127, 127)
            d = new - q[:, j]
            if not bool(d.any()):
                continue
            moved += int((d != 0).sum())
            q[:, j] = new
            delta[:, c] = d
            gb.sub_(torch.outer(d * sj, h[j, b1:b2]))
        # E changes by −Δ⊙s on these columns, so G = E H changes by −(Δ⊙s) H[block, :].
        g.sub_((delta * s[:, b1:b2]) @ h[b1:b2])
    return moved


def ldlq_repass(state: LayerState, *, cfg: RepassConfig = RepassConfig()) -> LayerState:
    """Re-round every code given all other columns' errors, ``cfg.passes`` times (never worse).

    Example:
        >>> from cq.synthetic import outlier_layer
        >>> from cq.transforms import absmax_scale
        >>> from cq.transforms.ldlq import ldlq
        >>> w, _, h = outlier_layer(8, 32, 256, seed=0)
        >>> s = ldlq(absmax_scale(LayerState.from_weight("fc", w, hessian=h)))
        >>> m = ldlq_repass(s).metrics
        >>> m["ldlq_repass_rel_after"] <= m["ldlq_repass_rel_before"]
        True
    """
    skip = _no_hessian(state, "ldlq_repass")
    if skip is not None or cfg.passes == 0:
        return skip if skip is not None else record(state, "ldlq_repass", cfg)
    w, s, q, h = _problem(state, "ldlq_repass")
    g = (w - s * q) @ h
    moved = []
    for _ in range(cfg.passes):
        m = _sweep(g, q, s, h, cfg.block_size)
        moved.append(m)
        if m == 0:
            break
    return keep_better_rows(state, q, stage_name="ldlq_repass", cfg=cfg,
                            extra={"ldlq_repass_passes": float(len(moved)), "ldlq_repass_moved": float(sum(moved))})


# ---------------------------------------------------------------------------------------------
# Greedy coordinate descent


@attrs.frozen
class GreedyCDConfig:
    """``iterations``: greedy ±1 moves per row (the reference's ``greedy_cd_iterations``)."""

    iterations: int = attrs.field(default=100, validator=_nonneg_int)


def greedy_cd(state: LayerState, *, cfg: GreedyCDConfig = GreedyCDConfig()) -> LayerState:
    """Per row, apply the ±1 code move with the largest loss decrease, ``cfg.iterations`` times.

    The change of row ``r``'s loss when ``q_rj`` moves by ``δ`` is
    ``−2δ s_rj G_rj + δ² s_rj² H_jj`` (``G = E H``), so each step costs ``O(NK)``.

    Example:
        >>> from cq.synthetic import outlier_layer
        >>> from cq.transforms import absmax_scale, round_to_nearest
        >>> w, _, h = outlier_layer(8, 32, 256, seed=0)
        >>> s = round_to_nearest(absmax_scale(LayerState.from_weight("fc", w, hessian=h)))
        >>> m = greedy_cd(s).metrics
        >>> m["greedy_cd_rel_after"] < m["greedy_cd_rel_before"]
        True
    """
    skip = _no_hessian(state, "greedy_cd")
    if skip is not None or cfg.iterations == 0:
        return skip if skip is not None else record(state, "greedy_cd", cfg)
    w, s, q, h = _problem(state, "greedy_cd")
    n, k = q.shape
    g = (w - s * q) @ h
    hd = h.diagonal().clamp(min=0).view(1, k)
    rows = torch.arange(n, device=q.device)
    steps = 0
    for _ in range(cfg.iterations):
        delta = torch.sign(g)  # the better direction of the two ±1 moves
        delta = torch.where(delta == 0, torch.ones_like(delta), delta)
        gain = -2 * delta * s * g + s * s * hd  # loss change
        blocked = (q + delta).abs() > 127
        gain = gain.masked_fill(blocked, float("inf"))
        best, j = gain.min(1)
        active = best < 0
        if not bool(active.any()):
            break
        steps += 1
        r = rows[active]
        jj = j[active]
        d = delta[r, jj]
        q[r, jj] += d
        g[r] -= (d * s[r, jj]).view(-1, 1) * h[jj]
    return keep_better_rows(state, q, stage_name="greedy_cd", cfg=cfg, extra={"greedy_cd_steps": float(steps)})


# ---------------------------------------------------------------------------------------------
# Scale range and least-squares scale refit


@attrs.frozen
class ScaleMultiplyConfig:
    """``rho``: the int8 grid spans ``rho × absmax`` (the reference's ``frobenius_rho``)."""

    rho: float = attrs.field(default=1.0, validator=_rho)


def scale_multiply(state: LayerState, *, cfg: ScaleMultiplyConfig = ScaleMultiplyConfig()) -> LayerState:
    """Multiply the scales by ``cfg.rho`` (before rounding; ``rho < 1`` clips the largest weights).

    Example:
        >>> from cq.transforms import absmax_scale
        >>> s = absmax_scale(LayerState.from_weight("fc", torch.tensor([[1.27, 0.5]])))
        >>> scale_multiply(s, cfg=ScaleMultiplyConfig(0.5)).scale.flatten().tolist()
        [0.004999999888241291]
    """
    _need_scale(state, "scale_multiply")
    if state.codes is not None:
        raise CqError(f"{state.name}: scale_multiply changes the grid; put it before the rounding stage")
    return record(state, "scale_multiply", cfg, scale=(state.scale * cfg.rho).to(state.scale.dtype))


def frobenius_rescale(state: LayerState) -> LayerState:
    """Refit the per-row (or tensor) scale to the codes: ``s_r = ⟨w_r, q_r⟩_H / ⟨q_r, q_r⟩_H`` (never worse).

    Example:
        >>> from cq.transforms import absmax_scale, round_to_nearest
        >>> s = round_to_nearest(absmax_scale(LayerState.from_weight("fc", torch.randn(4, 64))))
        >>> m = frobenius_rescale(s).metrics
        >>> m["frobenius_rescale_rel_after"] <= m["frobenius_rescale_rel_before"]
        True
    """
    if not isinstance(state.granularity, (PerRow, PerTensor)):
        raise ConfigError(f"{state.name}: frobenius_rescale refits per-row or tensor scales, got "
                          f"{state.granularity!r}; use PerRow() (ComfyUI's int8_tensorwise) or drop frobenius_rho")
    w, s, q, h = _problem(state, "frobenius_rescale")
    qh = q if h is None else q @ h
    num = (w * qh).sum(1)
    den = (q * qh).sum(1)
    if isinstance(state.granularity, PerTensor):
        num, den = num.sum().view(()), den.sum().view(())
        new = torch.where(den > 0, num / den.clamp(min=1e-300), state.scale.to(num.dtype))
        new = torch.where(new > 0, new, state.scale.to(num.dtype))
    else:
        old = state.scale.to(num.dtype).view(-1)
        new = torch.where(den > 0, num / den.clamp(min=1e-300), old)
        new = torch.where(new > 0, new, old).view(-1, 1)
    return keep_better_rows(state, state.codes, stage_name="frobenius_rescale",
                            scale=new.to(torch.float32).reshape(state.scale.shape))


# ---------------------------------------------------------------------------------------------
# The QuIP options as one config


@attrs.frozen
class QuIPRefineConfig:
    """The reference ``QuIPInt8Converter`` refinement options, as cq stages after ``ldlq``.

    ``ldlq_iterations``: ``1`` = LDLQ only; ``n`` adds ``n - 1`` :func:`ldlq_repass` sweeps.
    ``greedy_cd`` / ``greedy_cd_iterations``: :func:`greedy_cd`. ``frobenius_rho``: ``1.0`` = off;
    else :func:`scale_multiply` before LDLQ and :func:`frobenius_rescale` after the refinements.
    ``learned_rounding``: a :class:`~cq.transforms.learned_round.LearnedRoundConfig` (or ``None``),
    run last on the codes.

    Example:
        >>> QuIPRefineConfig(ldlq_iterations=2).active
        True
    """

    ldlq_iterations: int = attrs.field(default=1, validator=_pos_int)
    greedy_cd: bool = False
    greedy_cd_iterations: int = attrs.field(default=100, validator=_nonneg_int)
    frobenius_rho: float = attrs.field(default=1.0, validator=_rho)
    learned_rounding: object = None

    @property
    def active(self) -> bool:
        return (self.ldlq_iterations > 1 or self.greedy_cd or self.frobenius_rho != 1.0
                or self.learned_rounding is not None)


def with_refinements(pipe: Pipeline, cfg: QuIPRefineConfig, *, after: str = "ldlq",
                     scale_stage: str = "scale") -> Pipeline:
    """``pipe`` with ``cfg``'s stages inserted right after the stage named ``after``.

    Example:
        >>> from cq.transforms.quip import quip_pipeline
        >>> with_refinements(quip_pipeline(), QuIPRefineConfig(ldlq_iterations=2, greedy_cd=True)).names
        ('check_finite', 'shrink_hessian', 'upstream_correct', 'convrot', 'scale', 'scale_search', 'ldlq', 'ldlq_repass', 'greedy_cd')
    """
    names = pipe.names
    if after not in names:
        raise ConfigError(f"with_refinements: the pipeline has no {after!r} stage to refine (stages: {list(names)})")
    extra = []
    if cfg.ldlq_iterations > 1:
        extra.append(stage(ldlq_repass, RepassConfig(passes=cfg.ldlq_iterations - 1)))
    if cfg.greedy_cd:
        extra.append(stage(greedy_cd, GreedyCDConfig(cfg.greedy_cd_iterations)))
    if cfg.learned_rounding is not None:
        from .learned_round import learned_round

        extra.append(stage(learned_round, cfg.learned_rounding))
    if cfg.frobenius_rho != 1.0:
        extra.append(stage(frobenius_rescale))
        if scale_stage not in names:
            raise ConfigError(f"with_refinements: frobenius_rho needs the pipeline's {scale_stage!r} stage")
    i = names.index(after)
    stages = list(pipe.stages[: i + 1]) + extra + list(pipe.stages[i + 1:])
    out = Pipeline(stages)
    if cfg.frobenius_rho != 1.0:
        out = out.insert_before(after, stage(scale_multiply, ScaleMultiplyConfig(cfg.frobenius_rho)))
    return out
