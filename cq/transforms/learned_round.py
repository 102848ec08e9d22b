"""Learned rounding: AdaRound-style optimisation of the up/down choice of each code, from a start solution.

Each weight's code is ``lo + h`` with ``lo`` and ``lo + 1`` the start code and its neighbour towards
``W/s`` and ``h ∈ [0, 1]`` a rectified sigmoid of a free variable ``V`` (Nagel et al. 2020). The loss is
the layer's quadratic objective, normalised by its value at the start, plus AdaRound's regulariser
``λ·mean(1 − |2h − 1|^β)`` with ``β`` annealed from ``beta_start`` to ``beta_end`` after a warm-up
(it drives every ``h`` to 0 or 1). Every ``eval_every`` iterations the hard codes ``lo + [h ≥ ½]``
are scored exactly and, row by row, the best codes seen are kept; the start codes are the first
candidate, so the result is **never worse than its start on its objective** (checked in float64).

Objectives (``cfg.objective``):

* ``"hessian"`` (``"auto"`` with calibration): ``tr(E H Eᵀ)``, ``E = W − s⊙Q``, the layer's output error
  on the calibration inputs; the start is the state's codes (GPTQ/LDLQ) or round-to-nearest.
* ``"svd"`` (``"auto"`` without calibration): the reference tool's data-free objective
  ``‖U_kᵀ E V_k‖_F²`` on the top-``k`` singular subspace of ``W`` (``k`` from ``top_p``, ``min_k``,
  ``max_k``). It knows nothing about the inputs, so it **cannot beat round-to-nearest on held-out
  data** in expectation: RTN is the per-element optimum of every data-free MSE, and moving codes to
  shrink the error inside a rank-``k`` subspace only pushes it into the complement. It exists so that
  the reference's ``LearnedRoundingConverter`` runs; cq's recipes use it only when asked.

Measured (README, ``benchmarks/bench_learned_round.py``, 512×1024, held-out tokens): at INT8 it finds
nothing to improve on LDLQ's codes (it keeps them; 6–11 s per layer for 200 iterations), and from
round-to-nearest it recovers ~1 % of the error where LDLQ recovers ~41 %. It is never worse than its
start and is not offered as better; :func:`~cq.transforms.quip_refine.greedy_cd` is the cheaper refinement.

Optimisers (the reference's names): ``"adamw"`` / ``"radam"`` are :mod:`torch.optim`'s on ``V``;
``"original"`` is sign-gradient descent (AutoRound's SignSGD: ``V ← V − lr·sign(∇)``), the
optimiser that did best at INT8 in cq's measurements (algorithms.md §8.4). LR schedules:
``"constant"``, ``"exponential"`` (``lr·γ^t``, floor ``lr_min``), ``"plateau"`` (× ``lr_factor``
after ``lr_patience`` evaluations without improvement of the hard loss, then ``lr_cooldown``
evaluations of rest; floor ``lr_min``), ``"adaptive"`` (cq: cosine decay from ``lr`` to ``lr_min``;
the reference's shape-aware heuristic is not reproduced). Early stop: relative hard loss ≤
``early_stop_loss``, LR ≤ ``early_stop_lr``, or ``early_stop_stall`` iterations without a better
hard iterate.
"""

from __future__ import annotations

import math
from typing import Literal

import attrs
import torch

from ..errors import ConfigError
from ..state import LayerState, record
from .quip_refine import keep_better_rows
from .rounding import _need_scale, int8_format
from .scales import expand_scale

__all__ = ["LearnedRoundConfig", "learned_round", "svd_subspace"]

_ZETA, _GAMMA = 1.1, -0.1  # AdaRound's rectified-sigmoid stretch
_OPTIMIZERS = ("original", "adamw", "radam")
_SCHEDULES = ("constant", "exponential", "plateau", "adaptive")
_OBJECTIVES = ("auto", "hessian", "svd")


def _one_of(options):
    def check(instance, attribute, value):
        if value not in options:
            raise ConfigError(f"{attribute.name}={value!r} must be one of {list(options)}")
    return check


def _pos_int(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{attribute.name}={value!r} must be a positive int, e.g. 200")


def _nonneg_int(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{attribute.name}={value!r} must be an int >= 0, e.g. 0")


def _nonneg(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{attribute.name}={value!r} must be a finite number >= 0")


def _pos(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{attribute.name}={value!r} must be a finite number > 0")


def _fraction(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"{attribute.name}={value!r} must be a number in [0, 1]")


def _open_fraction(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"{attribute.name}={value!r} must be a number in (0, 1], e.g. 0.2")


def _lr(instance, attribute, value):
    if value is not None:
        _pos(instance, attribute, value)


@attrs.frozen
class LearnedRoundConfig:
    """How :func:`learned_round` optimises the rounding (see the module docstring for each field).

    ``lr=None`` means ``4 / num_iter`` (about four logit units of total movement for the Adam
    family and for SignSGD alike). ``init``: ``"residual"`` (AdaRound's: ``h`` = the fractional part
    of ``W/s``, so the relaxed weight starts at ``W``), ``"start"`` (``h`` on the start code's side,
    ``init_margin`` from ½), ``"auto"``: ``"start"`` when the state has codes (GPTQ/LDLQ), else
    ``"residual"``. ``reg_lambda``,
    ``beta_start``, ``beta_end``, ``warmup``: AdaRound's regulariser and its annealing (fraction of
    iterations without it). ``eval_every``: iterations between exact scorings of the hard codes.

    Example:
        >>> LearnedRoundConfig(num_iter=100).effective_lr
        0.04
    """

    optimizer: Literal["original", "adamw", "radam"] = attrs.field(default="original", validator=_one_of(_OPTIMIZERS))
    num_iter: int = attrs.field(default=200, validator=_nonneg_int)
    lr: float | None = attrs.field(default=None, validator=_lr)
    lr_schedule: str = attrs.field(default="adaptive", validator=_one_of(_SCHEDULES))
    lr_gamma: float = attrs.field(default=0.99, validator=_open_fraction)
    lr_patience: int = attrs.field(default=9, validator=_nonneg_int)
    lr_factor: float = attrs.field(default=0.92, validator=_open_fraction)
    lr_min: float = attrs.field(default=1e-10, validator=_nonneg)
    lr_cooldown: int = attrs.field(default=6, validator=_nonneg_int)
    lr_threshold: float = attrs.field(default=0.0, validator=_nonneg)
    lr_threshold_mode: str = attrs.field(default="rel", validator=_one_of(("rel", "abs")))
    early_stop_loss: float = attrs.field(default=0.0, validator=_nonneg)
    early_stop_lr: float = attrs.field(default=0.0, validator=_nonneg)
    early_stop_stall: int = attrs.field(default=1000, validator=_pos_int)
    objective: str = attrs.field(default="auto", validator=_one_of(_OBJECTIVES))
    top_p: float = attrs.field(default=0.2, validator=_open_fraction)
    min_k: int = attrs.field(default=1, validator=_pos_int)
    max_k: int = attrs.field(default=16, validator=_pos_int)
    full_matrix: bool = False
    reg_lambda: float = attrs.field(default=0.01, validator=_nonneg)
    beta_start: float = attrs.field(default=20.0, validator=_pos)
    beta_end: float = attrs.field(default=2.0, validator=_pos)
    warmup: float = attrs.field(default=0.2, validator=_fraction)
    init: str = attrs.field(default="auto", validator=_one_of(("auto", "start", "residual")))
    init_margin: float = attrs.field(default=0.3, validator=_fraction)
    eval_every: int = attrs.field(default=10, validator=_pos_int)
    seed: int = 0

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else 4.0 / max(self.num_iter, 1)


def svd_subspace(w: torch.Tensor, cfg: LearnedRoundConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_k [N, k], V_k [K, k])``: the top-``k`` singular vectors of ``w`` (the reference's rank rule).

    ``k = min(max_k, max(min_k, ⌊top_p·r⌋), r)`` with ``r = min(N, K)``; randomized low-rank SVD
    (seeded) unless ``full_matrix``.

    Example:
        >>> u, v = svd_subspace(torch.randn(6, 4), LearnedRoundConfig(top_p=0.5, max_k=16))
        >>> tuple(u.shape), tuple(v.shape)
        ((6, 2), (4, 2))
    """
    n, k = w.shape
    r = min(n, k)
    rank = min(cfg.max_k, max(cfg.min_k, int(math.floor(cfg.top_p * r))), r)
    w64 = w.to(torch.float64)
    if cfg.full_matrix or rank + 10 >= r:
        u, _, vh = torch.linalg.svd(w64, full_matrices=False)
        return u[:, :rank], vh[:rank].t()
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(cfg.seed)
        u, _, v = torch.svd_lowrank(w64, q=min(rank + 10, r), niter=4)
    finally:
        torch.random.set_rng_state(state)
    return u[:, :rank], v[:, :rank]


class _Schedule:
    """The LR at each iteration; ``plateau`` reacts to the hard loss reported at evaluations."""

    def __init__(self, cfg: LearnedRoundConfig):
        self.cfg = cfg
        self.lr = cfg.effective_lr
        self.best = math.inf
        self.bad = 0
        self.cool = 0

    def at(self, it: int) -> float:
        c = self.cfg
        if c.lr_schedule == "exponential":
            return max(c.effective_lr * c.lr_gamma ** it, c.lr_min)
        if c.lr_schedule == "adaptive":
            t = it / max(c.num_iter - 1, 1)
            return c.lr_min + (c.effective_lr - c.lr_min) * 0.5 * (1 + math.cos(math.pi * t))
        return self.lr  # constant, plateau

    def report(self, loss: float) -> None:
        c = self.cfg
        if c.lr_schedule != "plateau":
            return
        margin = c.lr_threshold * self.best if c.lr_threshold_mode == "rel" else c.lr_threshold
        if loss < self.best - margin:
            self.best, self.bad = loss, 0
        elif self.cool > 0:
            self.cool -= 1
        else:
            self.bad += 1
            if self.bad > c.lr_patience:
                self.lr = max(self.lr * c.lr_factor, c.lr_min)
                self.bad, self.cool = 0, c.lr_cooldown


def _objective(state: LayerState, cfg: LearnedRoundConfig, dtype):
    """``apply(E) -> A(E)`` with loss ``⟨E, A(E)⟩`` for the chosen objective, and its name."""
    kind = cfg.objective
    if kind == "auto":
        kind = "hessian" if state.hessian is not None else "svd"
    if kind == "hessian":
        if state.hessian is None:
            raise ConfigError(f"{state.name}: learned_round objective='hessian' needs calibration data (a Hessian); "
                              "pass a calibration file or use objective='svd' (data-free, no better than RTN)")
        h = state.hessian.to(dtype)
        return (lambda e: e @ h), kind
    u, v = svd_subspace(state.weight, cfg)
    u, v = u.to(dtype), v.to(dtype)
    return (lambda e: u @ ((u.t() @ e @ v) @ v.t())), kind


def learned_round(state: LayerState, *, cfg: LearnedRoundConfig = LearnedRoundConfig()) -> LayerState:
    """Optimise the rounding of ``state.weight`` on its objective, starting from ``state.codes`` (or RTN).

    Needs scales (any granularity). Records metrics ``learned_round_rel_before`` / ``_rel_after``
    (relative objective, √ of the loss ratio), ``learned_round_rows_changed``, ``learned_round_iters``
    and, for the Hessian objective, sets ``rel_out_h``.

    Example:
        >>> from cq.synthetic import outlier_layer
        >>> from cq.transforms import absmax_scale, round_to_nearest
        >>> w, _, h = outlier_layer(8, 32, 256, seed=0)
        >>> s = round_to_nearest(absmax_scale(LayerState.from_weight("fc", w, hessian=h)))
        >>> m = learned_round(s, cfg=LearnedRoundConfig(num_iter=100)).metrics
        >>> m["learned_round_rel_after"] <= m["learned_round_rel_before"]
        True

    References:
        Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020
        (arXiv:2004.10568); Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent"
        (AutoRound, arXiv:2309.05516).
    """
    _need_scale(state, "learned_round")
    n, k = state.shape
    dtype = torch.float32
    w = state.weight.to(dtype)
    s = expand_scale(state.scale, state.granularity, (n, k)).to(dtype).expand(n, k)
    init = cfg.init
    if state.codes is None:
        init = "residual" if init == "auto" else init
        start = torch.clamp(torch.round(w / s), -127, 127)
        state = record(state, "learned_round_start", None, codes=start.to(torch.int8),
                       format=int8_format(state.granularity), note="learned_round started from round-to-nearest")
    q0 = state.codes.to(dtype)
    apply, kind = _objective(state, cfg, dtype)
    if cfg.num_iter == 0:
        return keep_better_rows(state, state.codes, stage_name="learned_round", cfg=cfg,
                                extra={"learned_round_iters": 0.0})
    # Candidates: the start code and its neighbour towards W/s (inside ±127).
    toward = torch.sign(w / s - q0)
    toward = torch.where(toward == 0, torch.ones_like(toward), toward)
    toward = torch.where(q0 + toward > 127, -torch.ones_like(toward), toward)
    toward = torch.where(q0 + toward < -127, torch.ones_like(toward), toward)
    lo = torch.minimum(q0, q0 + toward)
    if init == "residual":  # AdaRound's: the relaxed weight starts at W itself
        h0 = (w / s - lo).clamp(0.01, 0.99)
    else:  # on the start code's side, init_margin from ½
        h0 = torch.where(q0 > lo, 0.5 + cfg.init_margin, 0.5 - cfg.init_margin).clamp(1e-3, 1 - 1e-3)
    v = torch.log((h0 - _GAMMA) / (_ZETA - h0)).requires_grad_(True)  # inverse rectified sigmoid
    opt = None
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW([v], lr=cfg.effective_lr)
    elif cfg.optimizer == "radam":
        opt = torch.optim.RAdam([v], lr=cfg.effective_lr)
    sched = _Schedule(cfg)

    def hard_losses(q):
        e = w - s * q
        return (e * apply(e)).sum(1).to(torch.float64)

    start_rows = hard_losses(q0)
    l0 = float(start_rows.sum())
    sig = float((w * apply(w)).sum())
    if l0 <= 0 or not math.isfinite(l0):
        return keep_better_rows(state, state.codes, stage_name="learned_round", cfg=cfg,
                                extra={"learned_round_iters": 0.0})
    per_row = kind == "hessian"  # rows decouple only for tr(E H Eᵀ)
    best_q = q0.clone()
    best_rows = start_rows.clone()
    best_total = l0
    warm = int(cfg.warmup * cfg.num_iter)
    since_best = 0
    it = 0
    for it in range(cfg.num_iter):
        lr = sched.at(it)
        if lr <= cfg.early_stop_lr:
            break
        with torch.no_grad():
            sv = torch.sigmoid(v)
            hh = (sv * (_ZETA - _GAMMA) + _GAMMA).clamp(0, 1)
            e = w - s * (lo + hh)
            ae = apply(e)
            # d/dh of ⟨E, A E⟩ / l0 = −2 s ⊙ A(E) / l0 (A symmetric)
            grad_h = -2.0 * s * ae / l0
            if it >= warm and cfg.reg_lambda > 0:
                t = (it - warm) / max(cfg.num_iter - warm, 1)
                beta = cfg.beta_end + 0.5 * (cfg.beta_start - cfg.beta_end) * (1 + math.cos(math.pi * t))
                d = 2 * hh - 1
                grad_h = grad_h - cfg.reg_lambda / (n * k) * beta * d.abs().pow(beta - 1) * torch.sign(d) * 2
            live = (hh > 0) & (hh < 1)
            grad_v = grad_h * (_ZETA - _GAMMA) * sv * (1 - sv) * live
            if opt is None:
                v.sub_(lr * torch.sign(grad_v))
            else:
                for group in opt.param_groups:
                    group["lr"] = lr
                v.grad = grad_v
                opt.step()
        if (it + 1) % cfg.eval_every == 0 or it + 1 == cfg.num_iter:
            with torch.no_grad():
                q = lo + (torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA >= 0.5).to(dtype)
                rows = hard_losses(q)
                total = float(rows.sum())
                improved = False
                if per_row:
                    better = rows < best_rows
                    if bool(better.any()):
                        improved = True
                        best_q[better] = q[better]
                        best_rows = torch.where(better, rows, best_rows)
                    best_total = float(best_rows.sum())
                elif total < best_total:
                    improved = True
                    best_q, best_total = q.clone(), total
                sched.report(total)
                since_best = 0 if improved else since_best + cfg.eval_every
                if sig > 0 and best_total / sig <= cfg.early_stop_loss:
                    break
                if since_best >= cfg.early_stop_stall:
                    break
    if kind == "svd":  # rows are coupled: keep_better_rows judges by H = I, so decide on the whole here
        e0, e1 = w - s * q0, w - s * best_q
        if float((e1 * apply(e1)).sum(dtype=torch.float64)) > float((e0 * apply(e0)).sum(dtype=torch.float64)):
            best_q = q0
        codes = best_q.to(torch.int8)
        before = math.sqrt(l0 / sig) if sig > 0 else 0.0
        after = math.sqrt(min(best_total, l0) / sig) if sig > 0 else 0.0
        return record(state, "learned_round", cfg, codes=codes, metrics={
            "learned_round_rel_before": before, "learned_round_rel_after": after,
            "learned_round_rows_changed": float((codes != state.codes).any(1).sum()),
            "learned_round_iters": float(it + 1)}, note="learned_round: data-free SVD-subspace objective "
                                                        "(cannot beat round-to-nearest on held-out inputs)")
    return keep_better_rows(state, best_q, stage_name="learned_round", cfg=cfg,
                            extra={"learned_round_iters": float(it + 1)})


def learned_round_pipeline(granularity=None, cfg: LearnedRoundConfig = LearnedRoundConfig(), *,
                           start: str = "ldlq", ldlq_cfg=None):
    """check_finite → absmax_scale → ``start`` (``"ldlq"``, ``"gptq"`` or ``"rtn"``) → learned_round.

    Without a Hessian, LDLQ/GPTQ equal round-to-nearest (with a note) and ``objective="auto"``
    uses the data-free SVD objective.

    Example:
        >>> learned_round_pipeline().names
        ('check_finite', 'scale', 'ldlq', 'learned_round')
    """
    from ..pipeline import pipeline, stage
    from ..state import PerRow
    from .checks import check_finite
    from .gptq import GPTQConfig, gptq_update
    from .ldlq import LDLQConfig, ldlq
    from .rounding import round_to_nearest
    from .scales import ScaleConfig, absmax_scale

    if start not in ("ldlq", "gptq", "rtn"):
        raise ConfigError(f"start={start!r} must be 'ldlq', 'gptq' or 'rtn'")
    first = {"ldlq": lambda: stage(ldlq, ldlq_cfg or LDLQConfig(actorder=True), name="ldlq"),
             "gptq": lambda: stage(gptq_update, ldlq_cfg or GPTQConfig(actorder=True), name="gptq"),
             "rtn": lambda: stage(round_to_nearest, name="rtn")}[start]()
    return pipeline(check_finite, stage(absmax_scale, ScaleConfig(granularity or PerRow()), name="scale"), first,
                    stage(learned_round, cfg))
