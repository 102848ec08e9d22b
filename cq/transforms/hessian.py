"""Hessian pieces shared by GPTQ, LDLQ and QuIP: dead columns, damping, robust Cholesky, LDL factors.

Notation: ``H`` is ``[K, K]`` (``2/T · XᵀX``), ``W`` is ``[N, K]``, ``J`` is the exchange matrix
(``J·H·J`` = ``H.flip(0, 1)``). Both GPTQ and LDLQ process columns left to right, so the factor they
need is the Cholesky factor of the *reversed* Hessian, ``J H J = C Cᵀ`` (``C`` lower). From it:

* GPTQ's ``Hinv`` (the upper Cholesky factor of ``H⁻¹``) is ``U = J C⁻¹ J`` (one triangular solve,
  no ``cholesky_inverse``, which is erratic with 2 MKL threads);
* LDLQ's feedback is ``H = Mᵀ D M`` with ``M = J (C·diag(1/C_jj))ᵀ J`` unit lower and
  ``D = J diag(C)² J``, so ``D_ii = 1/U_ii²`` (the uniform-error prediction uses ``tr(D)``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math

import attrs
import torch

from ..errors import ConfigError, InputError
from ..kernels import Backend, quantize_int8, select
from ..state import LayerState, PerRow, PerTensor, record
from .rounding import _need_scale, int8_format
from .scales import expand_scale

__all__ = [
    "DampingConfig",
    "PreparedHessian",
    "CholeskyResult",
    "hessian_problem",
    "prepare_hessian",
    "robust_cholesky",
    "inverse_cholesky_upper",
    "ldl_from_reversed_cholesky",
    "ldl_diagonal",
    "actorder_permutation",
    "predicted_rel_out",
    "quadratic_forms",
    "working_dtype",
]


def _nonneg_float(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{attribute.name}={value!r} must be a finite number >= 0, e.g. 0.01")


def _nonneg_int(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{attribute.name}={value!r} must be an int >= 0, e.g. 6")


def _growth(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 1:
        raise ConfigError(f"growth={value!r} must be a finite number > 1 (the damping multiplier per retry), e.g. 10")


def _dead(instance, attribute, value):
    if value not in ("round", "zero"):
        raise ConfigError(f"dead_columns={value!r} must be 'round' (keep the weights, round to nearest) "
                          "or 'zero' (the GPTQ reference: zero the weight columns)")


@attrs.frozen
class DampingConfig:
    """How a Hessian is conditioned before it is factored.

    ``percdamp``: damping added to the diagonal, relative to the mean of the live diagonal
    (``percdamp · mean(diag H)``; 0.01 as in the GPTQ reference).
    ``max_tries``: how many times the damping is multiplied by ``growth`` when the Cholesky
    factorization fails before giving up (the caller then rounds to nearest with a note).
    ``dead_columns``: what to do with inputs that never activated (``diag H == 0``):
    ``"round"`` (cq's default) keeps those weights and rounds them to nearest, since calibration
    data that never exercised an input says nothing about it; ``"zero"`` zeros them like the
    GPTQ reference. Either way the proxy loss is the same (those columns never reach ``X·Wᵀ``).

    Example:
        >>> DampingConfig(percdamp=0.05).max_tries
        6
    """

    percdamp: float = attrs.field(default=0.01, validator=_nonneg_float)
    max_tries: int = attrs.field(default=6, validator=_nonneg_int)
    growth: float = attrs.field(default=10.0, validator=_growth)
    dead_columns: str = attrs.field(default="round", validator=_dead)


@attrs.frozen(eq=False)
class PreparedHessian:
    """A Hessian ready to factor: dead columns decoupled (``H_dd = 1``), damping added."""

    hessian: torch.Tensor  # float64 [K, K], dead rows/cols zeroed, H_dd = 1, + damp·I
    weight: torch.Tensor  # [N, K], dead columns zeroed when DampingConfig.dead_columns == "zero"
    dead: torch.Tensor  # bool [K]
    damp: float  # absolute amount added to the diagonal
    base: float  # mean of the live diagonal (damping is relative to it)
    notes: tuple[str, ...] = ()


@attrs.frozen(eq=False)
class CholeskyResult:
    """Outcome of :func:`robust_cholesky`: ``lower`` is ``None`` when every try failed."""

    lower: torch.Tensor | None  # L with H + (damp - damp_in)·I = L Lᵀ
    damp: float  # total absolute damping on the diagonal after the retries
    tries: int  # factorizations attempted
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.lower is not None


def working_dtype(precision: str, k: int, n: int = 0) -> torch.dtype:
    """The dtype GPTQ/LDLQ compute in for an ``[n, k]`` weight.

    ``"auto"`` is float64 while the work is small (``(n + k)·k² ≤ 2³³`` flops, e.g. every layer
    of a BERT-base-sized model) and float32 above. Float64 makes GPTQ and LDLQ agree code for code;
    at 4096² a float64 Cholesky + triangular inverse takes 3.7 s vs 1.8 s in float32 (2 cores),
    and float32 with 1 % damping is accurate enough (the reference runs in float32; GPTQ and LDLQ
    then differ in ~2e-4 of the codes through float ties, with equal loss).

    Example:
        >>> working_dtype("auto", 384, 1536), working_dtype("auto", 4096, 4096)
        (torch.float64, torch.float32)
    """
    if precision == "auto":
        return torch.float64 if (n + k) * k * k <= 2 ** 33 else torch.float32
    if precision == "float64":
        return torch.float64
    if precision == "float32":
        return torch.float32
    raise ConfigError(f"precision={precision!r} must be 'auto', 'float32' or 'float64'")


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite, in one read and without a ``[K, K]`` bool temporary.

    A NaN or ±Inf entry makes any sum of the entries non-finite, in any order of the additions
    (Inf + finite = Inf, Inf − Inf = NaN, NaN absorbs): a finite sum proves every entry finite.
    A non-finite sum of finite entries (overflow) falls back to the elementwise test. 4096²
    float32: 2-8 ms against 70-130 ms for ``isfinite(t).all()`` (or a float64-accumulated sum).
    """
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


#: The damping :func:`hessian_problem` allows for by default (relative to the mean live diagonal).
CHECK_PERCDAMP = 0.01


def _definiteness_problem(h: torch.Tensor, diag: torch.Tensor, percdamp: float, factor: bool = True) -> str | None:
    """Why ``h`` is not positive semi-definite beyond rounding, judged on the damped matrix scaled
    to unit diagonal (a Cholesky factorization, ``K³/3`` flops), or ``None``. ``factor=False``
    runs only the dead-input test (``O(K)`` when no input is dead)."""
    k = h.shape[0]
    dead = diag == 0
    if bool(dead.any()):
        # In a PSD matrix a zero diagonal entry forces its whole row and column to zero.
        stray = h[dead].abs().amax(dim=1) > 0
        if bool(stray.any()):
            j = int(dead.nonzero()[stray.nonzero()[0, 0], 0])
            return (f"Hessian is indefinite: input {j} has H[{j},{j}] = 0 but non-zero off-diagonal entries "
                    "(impossible for 2/T·XᵀX)")
    if not factor:
        return None
    # float64 up to K = 2048 (exact enough for any Gram matrix); float32 above, where a float64
    # factorization would double the cost of the check (the allowance below covers float32).
    work = torch.float64 if k <= 2048 else torch.float32
    if bool(dead.any()):
        live = (~dead).nonzero().reshape(-1)
        sub = h.index_select(0, live).index_select(1, live).to(work)
    else:
        sub = h.to(work, copy=True)
    n = sub.shape[0]
    d = sub.diagonal().clone()
    damp = (percdamp if percdamp > 0 else 1e-6) * float(d.mean())
    sub.diagonal().add_(damp)
    inv_sqrt = (d + damp).rsqrt()
    scaled = sub.mul_(inv_sqrt[:, None]).mul_(inv_sqrt[None, :])  # D^-1/2 (H + damp·I) D^-1/2: unit diagonal
    # Allowance for rounding in H itself (a float32 XᵀX: each scaled entry off by ~eps) and in the
    # factorization: K·eps on the unit diagonal. A genuine Gram matrix passes with room to spare;
    # an indefinite one fails by its negative eigenvalue's size relative to the diagonal.
    eps = torch.finfo(h.dtype if h.dtype in (torch.float32, torch.float64) else torch.float32).eps
    scaled.diagonal().add_(n * max(eps, torch.finfo(work).eps))
    _, info = torch.linalg.cholesky_ex(scaled)
    if int(info) == 0:
        return None
    detail = ""
    if n <= 1024:  # the eigenvalue says by how much, at a cost worth paying only here
        lam = float(torch.linalg.eigvalsh(scaled.to(torch.float64)).min())
        detail = f" (smallest eigenvalue {lam:.3g} relative to the diagonal)"
    return (f"Hessian is indefinite: not positive semi-definite even with damping "
            f"{percdamp:g} × mean diag{detail}; a Hessian 2/T·XᵀX never is")


def hessian_problem(h: torch.Tensor, k: int, *, name: str = "layer", percdamp: float = CHECK_PERCDAMP,
                    definite: bool = True) -> str | None:
    """Why ``h`` cannot serve as the Hessian of a layer with ``k`` inputs, or ``None`` if it can.

    A Hessian ``2/T·XᵀX`` is finite, symmetric positive semi-definite and (with any calibration
    data reaching the layer) non-zero. Rejected, each with its reason: non-finite entries; all
    zeros; negative diagonal entries (negative-definite when all are, else indefinite); and an
    indefinite matrix, found by a Cholesky factorization of ``H + percdamp·mean(diag H)·I`` scaled
    to unit diagonal (so the test does not depend on the Hessian's units). Shape problems raise
    :class:`~cq.errors.InputError` (a caller bug); the rest are returned so that a transform can
    fall back to round-to-nearest with a warning, or stop when asked to be strict.
    ``definite=False`` skips the factorization (``K³/3`` flops; the dead-input test stays): for a
    caller that factors the damped Hessian anyway and judges it only when that fails
    (:func:`feedback_round`).

    Example:
        >>> hessian_problem(torch.eye(3), 3) is None
        True
        >>> hessian_problem(torch.full((2, 2), float("nan")), 2)
        'Hessian has 4 non-finite entries'
        >>> hessian_problem(torch.tensor([[1.0, 3.0], [3.0, 1.0]]), 2)[:21]
        'Hessian is indefinite'
    """
    if not isinstance(h, torch.Tensor) or h.ndim != 2 or tuple(h.shape) != (k, k):
        shape = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
        raise InputError(f"{name}: Hessian must be [{k}, {k}] (in_features squared) to match the weight, "
                         f"got {shape}; pass the Hessian captured for this layer")
    if not h.is_floating_point():
        raise InputError(f"{name}: Hessian must be a float tensor, got {h.dtype}")
    if not _all_finite(h):
        return f"Hessian has {int((~torch.isfinite(h)).sum())} non-finite entries"
    if k == 0:
        return None
    diag = h.diagonal()
    # A non-zero diagonal entry settles it without a pass over the K² entries.
    if not bool((diag != 0).any()) and not bool((h != 0).any()):
        return "Hessian is all zeros (no calibration input reached this layer)"
    neg = diag < 0
    n_neg = int(neg.sum())
    if n_neg == k:
        return "Hessian is negative-definite (every diagonal entry is < 0; a Hessian 2/T·XᵀX has none)"
    if n_neg:
        return (f"Hessian is indefinite: {n_neg} of {k} diagonal entries are < 0 (min {float(diag.min()):.3g}); "
                "a Hessian 2/T·XᵀX has none")
    return _definiteness_problem(h, diag, percdamp, factor=definite)


def prepare_hessian(h: torch.Tensor, w: torch.Tensor, cfg: DampingConfig = DampingConfig(), *,
                    name: str = "layer", dtype: torch.dtype = torch.float64,
                    check_definite: bool = True) -> PreparedHessian:
    """Decouple dead inputs and add ``percdamp · mean(live diag)`` to the diagonal.

    Dead inputs (``diag H == 0``: never activated) get ``H_dd = 1`` and zero off-diagonal
    entries, so GPTQ/LDLQ round them independently; their weights are kept (``"round"``) or
    zeroed (``"zero"``) per ``cfg.dead_columns``. The result is a fresh ``dtype`` copy; neither
    input is modified. Factorizations read one triangle only, so a slightly asymmetric ``h``
    (float rounding in ``XᵀX``) needs no symmetrization. ``check_definite=False``: the caller
    factors the result and judges definiteness only if that fails (see :func:`hessian_problem`).

    Raises:
        InputError: wrong shape, or non-finite entries (see :func:`hessian_problem`).

    Example:
        >>> p = prepare_hessian(torch.diag(torch.tensor([2.0, 0.0])), torch.ones(1, 2))
        >>> p.hessian.diagonal().tolist(), p.dead.tolist(), p.damp
        ([2.02, 1.02], [False, True], 0.02)
    """
    k = w.shape[-1]
    why = hessian_problem(h, k, name=name, definite=check_definite)
    if why:
        raise InputError(f"{name}: {why}; recapture the calibration data for this layer")
    dead, base, damp, weight, notes = _dead_and_damping(h, w, cfg, dtype)
    h64 = h.detach().to(dtype=dtype, copy=True)
    _decouple_and_damp(h64, dead, damp)
    return PreparedHessian(hessian=h64, weight=weight, dead=dead, damp=damp, base=base, notes=notes)


def _dead_and_damping(h: torch.Tensor, w: torch.Tensor, cfg: DampingConfig,
                      dtype: torch.dtype) -> tuple[torch.Tensor, float, float, torch.Tensor, tuple[str, ...]]:
    """``(dead, base, damp, weight, notes)`` of :func:`prepare_hessian`, from ``diag H`` alone.

    ``base`` is the float64 mean of the live diagonal *as cast to* ``dtype`` (the matrix the
    solver factors), summed in index order: the same bits whichever layout the matrix is built in.
    """
    diag = h.detach().diagonal().to(dtype)
    dead = diag == 0
    notes = []
    n_dead = int(dead.sum())
    live = diag[~dead]
    base = float(live.to(torch.float64).abs().mean()) if live.numel() else 1.0
    if not math.isfinite(base) or base <= 0:
        base = 1.0
    weight = w
    if n_dead:
        if cfg.dead_columns == "zero":
            weight = w.clone()
            weight[:, dead] = 0
            notes.append(f"{n_dead} dead input column(s) (never activated): weights zeroed")
        else:
            notes.append(f"{n_dead} dead input column(s) (never activated): rounded to nearest")
    return dead, base, cfg.percdamp * base, weight, tuple(notes)


def _decouple_and_damp(hm: torch.Tensor, dead: torch.Tensor, damp: float) -> None:
    """In place: dead rows/columns of ``hm`` zeroed with ``H_dd = 1``, then ``damp`` on the diagonal.

    Both commute with a symmetric permutation (``dead`` given in ``hm``'s own index order).
    """
    if bool(dead.any()):
        hm[dead, :] = 0
        hm[:, dead] = 0
        hm[dead, dead] = 1.0
    if damp:
        hm.diagonal().add_(damp)


def robust_cholesky(h: torch.Tensor, cfg: DampingConfig = DampingConfig(), *, damp: float = 0.0,
                    base: float | None = None) -> CholeskyResult:
    """Lower Cholesky factor of ``h``, adding damping ×``cfg.growth`` on failure, at most ``cfg.max_tries`` times.

    ``damp`` is the damping ``h`` already carries and ``base`` the scale it is relative to (default:
    the mean of ``|diag h|``). A failed factorization (``cholesky_ex`` info > 0), a non-finite
    factor or a pivot too small to trust (``C_ii² ≤ K·eps·base``: numerically singular) raises the damping to ``max(damp · growth, percdamp · base)`` (or ``1e-6 · base`` when
    ``percdamp`` is 0). After the last try ``lower`` is ``None``; the caller falls back to
    round-to-nearest. Never raises on non-positive-definite, singular, zero or NaN input.

    Example:
        >>> r = robust_cholesky(torch.tensor([[1.0, 3.0], [3.0, 1.0]], dtype=torch.float64))
        >>> r.ok, r.tries, r.damp  # eigenvalues 4 and -2: damping 0, 0.01, 0.1, 1 fail, 10 works
        (True, 5, 10.0)
    """
    if base is None:
        base = float(h.diagonal().abs().mean()) if h.numel() else 1.0
    if not math.isfinite(base) or base <= 0:
        base = 1.0
    notes = []
    if not _all_finite(h):
        return CholeskyResult(lower=None, damp=damp, tries=0,
                              notes=("Hessian has non-finite entries; cannot factor it",))
    total = damp
    tiny = h.shape[0] * torch.finfo(h.dtype).eps * base
    eye_diag = None
    for attempt in range(cfg.max_tries + 1):
        extra = total - damp
        if extra:
            if eye_diag is None:
                eye_diag = torch.ones(h.shape[0], dtype=h.dtype, device=h.device)
            ht = h + torch.diag(eye_diag * extra)
        else:
            ht = h
        lower, info = torch.linalg.cholesky_ex(ht)
        if int(info) == 0 and float(lower.diagonal().min()) ** 2 > tiny and _all_finite(lower):
            if attempt:
                notes.append(f"Cholesky failed {attempt}x; succeeded with damping {total / base:.3g} × mean diag")
            return CholeskyResult(lower=lower, damp=total, tries=attempt + 1, notes=tuple(notes))
        start = cfg.percdamp * base if cfg.percdamp else 1e-6 * base
        total = max(total * cfg.growth, start)
    notes.append(f"Cholesky failed after {cfg.max_tries + 1} tries (last damping {total / base:.3g} × mean diag); "
                 "the Hessian is not positive definite")
    return CholeskyResult(lower=None, damp=total, tries=cfg.max_tries + 1, notes=tuple(notes))


def inverse_cholesky_upper(lower_rev: torch.Tensor) -> torch.Tensor:
    """GPTQ's ``Hinv``: the upper factor ``U`` of ``H⁻¹ = UᵀU``, from ``C`` with ``J H J = C Cᵀ``.

    ``U = J C⁻¹ J`` costs one triangular solve (``K³/3`` flops with the Cholesky), against three
    factorizations for the textbook ``cholesky(cholesky_inverse(cholesky(H)), upper=True)``.

    Example:
        >>> h = torch.tensor([[4.0, 2.0], [2.0, 3.0]], dtype=torch.float64)
        >>> u = inverse_cholesky_upper(torch.linalg.cholesky(h.flip(0, 1)))
        >>> torch.allclose(u.t() @ u, torch.linalg.inv(h)), bool(u.tril(-1).eq(0).all())
        (True, True)
    """
    k = lower_rev.shape[0]
    eye = torch.eye(k, dtype=lower_rev.dtype, device=lower_rev.device)
    inv = torch.linalg.solve_triangular(lower_rev, eye, upper=False)
    return inv.flip(0, 1)


def ldl_from_reversed_cholesky(lower_rev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, d)`` with ``H = Mᵀ diag(d) M``, ``M`` unit lower, from ``C`` with ``J H J = C Cᵀ``.

    LDLQ rounds column ``k`` after adding ``Σ_{j<k} M_kj · (w_j − ŵ_j)``; then
    ``(W − Ŵ)·Mᵀ`` is the matrix of per-column rounding errors and the proxy loss is
    ``Σ_k d_k ‖η_k‖²``.

    Example:
        >>> h = torch.tensor([[4.0, 2.0], [2.0, 3.0]], dtype=torch.float64)
        >>> m, d = ldl_from_reversed_cholesky(torch.linalg.cholesky(h.flip(0, 1)))
        >>> torch.allclose(m.t() @ torch.diag(d) @ m, h), m.diagonal().tolist()
        (True, [1.0, 1.0])
    """
    c_diag = lower_rev.diagonal()
    unit = lower_rev / c_diag.unsqueeze(0)
    m = unit.flip(0, 1).t().contiguous()
    d = (c_diag * c_diag).flip(0)
    return m, d


def ldl_diagonal(h: torch.Tensor) -> torch.Tensor:
    """``D`` of ``H = Mᵀ D M`` (unit lower ``M``): ``D_ii = 1/U_ii²`` for GPTQ's ``Hinv = U``.

    ``h`` must be positive definite (damp it first). ``tr(D) ≤ tr(H)``: the uniform-error
    prediction of GPTQ/LDLQ is ``Σ_r Δ_r²/12 · tr(D)`` against ``Σ_r Δ_r²/12 · tr(H)`` for RTN.

    Example:
        >>> [round(v, 6) for v in ldl_diagonal(torch.tensor([[4.0, 2.0], [2.0, 3.0]], dtype=torch.float64)).tolist()]
        [2.666667, 3.0]
    """
    lower, info = torch.linalg.cholesky_ex(h.flip(0, 1))
    if int(info):
        raise InputError(f"ldl_diagonal needs a positive definite matrix; the factorization failed at "
                         f"pivot {int(info)}; damp it first (prepare_hessian / robust_cholesky)")
    return (lower.diagonal() ** 2).flip(0)


def actorder_permutation(h: torch.Tensor) -> torch.Tensor:
    """GPTQ's act-order: columns by decreasing ``diag(H)`` (stable, so ties keep their order).

    Example:
        >>> actorder_permutation(torch.diag(torch.tensor([1.0, 3.0, 1.0, 2.0]))).tolist()
        [1, 3, 0, 2]
    """
    return torch.argsort(h.diagonal(), descending=True, stable=True)


def quadratic_forms(mats: list[torch.Tensor], h: torch.Tensor | None) -> list[float]:
    """``[tr(A H Aᵀ) for A in mats]`` with one stacked GEMM (``h=None`` means ``H = I``).

    Small problems run in float64; above ~2 GFLOP the GEMM runs in float32 (relative error
    ~1e-6, far below what the metrics resolve) and only the reductions in float64: at 4096² a
    float64 GEMM takes ~3× longer.
    """
    if not mats:
        return []
    if h is None:
        return [float((a.detach().to(torch.float64) ** 2).sum()) for a in mats]
    n_rows = sum(a.shape[0] for a in mats)
    k = h.shape[0]
    dtype = torch.float64 if n_rows * k * k <= 2 ** 31 else torch.float32
    stacked = torch.cat([a.detach().to(torch.float64 if dtype == torch.float64 else a.dtype) for a in mats], dim=0)
    hh = h.detach()
    a_unit = h_unit = 1.0
    if dtype == torch.float32:  # normalize so that the float32 GEMM cannot overflow; undone in float64
        a_max, h_max = float(stacked.abs().max()), float(hh.abs().max())
        a_unit = a_max if a_max > 0 and math.isfinite(a_max) else 1.0
        h_unit = h_max if h_max > 0 and math.isfinite(h_max) else 1.0
        stacked = stacked.to(torch.float32) / a_unit
        hh = hh.to(torch.float32) / h_unit
    else:
        hh = hh.to(torch.float64)
    if dtype == torch.float32:
        sums = _symmetric_row_forms(stacked, hh)
    else:
        sums = (stacked @ hh).mul_(stacked).sum(dim=1)
    out, start = [], 0
    for a in mats:
        out.append(float(sums[start:start + a.shape[0]].sum()) * (a_unit * a_unit * h_unit))
        start += a.shape[0]
    return out


#: Columns per panel in :func:`_symmetric_row_forms`.
_FORM_PANEL = 512


def _symmetric_row_forms(a: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``[a_i H a_iᵀ]`` per row (float64) from the lower triangle of a symmetric ``H`` only.

    ``aHaᵀ = 2·a·tril(H)·aᵀ − Σ_k a_k² H_kk``; the lower-triangle product is a panel at a time
    (``a[:, j:] @ tril(H)[j:, j:j+p]``), half the flops of ``a @ H``: 1.1 s saved per metrics
    call at 4096² (3 stacked weights). Only the symmetric part of ``H`` enters a quadratic form,
    so a float-rounding asymmetry of ``H`` changes nothing beyond its own size.
    """
    k = h.shape[0]
    acc = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
    for j0 in range(0, k, _FORM_PANEL):
        j1 = min(j0 + _FORM_PANEL, k)
        panel = h[j0:, j0:j1].clone()
        panel[: j1 - j0].tril_()
        acc += (a[:, j0:] @ panel).mul_(a[:, j0:j1]).sum(dim=1, dtype=torch.float64)
    diag = (a * a).mul_(h.diagonal()).sum(dim=1, dtype=torch.float64)
    return acc.mul_(2).sub_(diag)


def predicted_rel_out(scale: torch.Tensor, d: torch.Tensor, w: torch.Tensor | None = None,
                      h: torch.Tensor | None = None, *, signal: float | None = None) -> float:
    """Uniform-error prediction ``√(Σ_{r,k} Δ_rk²/12 · d_k / tr(W H Wᵀ))``.

    ``scale``: the quantization step, ``()`` / ``[N, 1]`` / full ``[N, K]``; ``d``: ``[K]``, the
    LDL diagonal of the damped Hessian for GPTQ/LDLQ (``diag H`` for RTN). The denominator is
    ``signal`` if given, else computed from ``w`` and ``h``. See algorithms.md §9.2.

    Example:
        >>> w = torch.tensor([[1.27, -0.5]]); s = torch.tensor([[0.01]])
        >>> round(predicted_rel_out(s, torch.ones(2), w, torch.eye(2)), 6)
        0.002991
    """
    if signal is None:
        if w is None or h is None:
            raise ValueError("predicted_rel_out needs signal= or both w and h")
        signal = quadratic_forms([w], h)[0]
    s2 = scale.detach().to(torch.float64) ** 2
    d64 = d.detach().to(torch.float64)
    if s2.ndim == 0:
        if w is None:
            raise ValueError("predicted_rel_out with one tensor-wide scale needs w (for the row count)")
        noise = float(s2.reshape(())) * float(d64.sum()) * w.shape[0]
    elif s2.shape[-1] == 1:
        noise = float(s2.sum()) * float(d64.sum())
    else:
        noise = float((s2 @ d64).sum())
    return _rel(noise / 12.0, signal)


def _rel(noise: float, signal: float) -> float:
    """``√(noise/signal)`` as in :func:`~cq.transforms.metrics.rel_output_error`, total for any sign.

    A non-PSD "Hessian" can make both quadratic forms negative; the result is then 0 (no error
    energy) or ``inf`` (error with no signal), never a math domain error.
    """
    if signal <= 0 or not math.isfinite(signal):
        return 0.0 if noise <= 0 else math.inf
    return math.sqrt(max(noise, 0.0) / signal)


# ---------------------------------------------------------------------------------------------
# The column loop and the driver shared by GPTQ (``gptq.py``) and LDLQ (``ldlq.py``).

#: Columns per inner sub-block: rank-1 updates touch only the sub-block, then one GEMM updates the
#: rest of the outer block. Same arithmetic as the one-level loop, ~8× less memory traffic per
#: column (the one-level loop streams N × block_size floats per column).
INNER_BLOCK = 16


@contextlib.contextmanager
def one_thread(t: torch.Tensor | None = None):
    """Run the block on one CPU thread (no-op for tensors on other devices), restoring the count after.

    Why: MKL's multi-threaded Cholesky (``potrf``) sums in a thread-count-dependent order; its
    last-bit differences (~1e-6 relative in float32) pass through LDLQ/GPTQ's error feedback and
    change thousands of codes. Single-threaded, the factor is a function of its input alone, so
    the codes are the same bytes for 1, 2 or N threads (the GEMMs and triangular solves of the
    feedback loop are, measured: they split rows/columns, never a sum). The factorization is a
    small part of GPTQ's time (4096²: 0.4 s on one thread).

    Example:
        >>> with one_thread():
        ...     torch.get_num_threads()
        1
    """
    threads = torch.get_num_threads()
    single = threads > 1 and (t is None or t.device.type == "cpu")
    if single:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if single:
            torch.set_num_threads(threads)


def feedback_columns(wt: torch.Tensor, s32: torch.Tensor, coef: torch.Tensor, *, block_size: int,
                     inner: int = INNER_BLOCK, divide: torch.Tensor | None = None,
                     targets: torch.Tensor | None = None, backend: Backend | str = Backend.AUTO) -> torch.Tensor:
    """Round the rows of ``wt`` ([K, N]: column ``k`` of the weight is row ``k``) left to right.

    Row ``i`` is rounded to ``q_i = clamp(round(wt_i / s_i), ±127)`` (float32 division, as
    :func:`~cq.kernels.quantize_int8` does), then every later row gets ``wt_j -= coef[i, j] · err_i``
    (only the strict upper triangle of ``coef`` is read), where ``err_i`` is

    * GPTQ: ``(wt_i − ŵ_i) / divide_i`` with ``coef = Hinv = U``, ``divide = diag(U)``;
    * LDLQ: ``targets_i − ŵ_i`` (the true error) with ``coef = −Mᵀ``.

    Updates are lazy: rank-1 inside sub-blocks of ``inner`` rows, one GEMM per sub-block for the
    rest of the ``block_size`` block, one GEMM per block for all later rows. ``wt`` is updated in
    place (pass a private copy); ``s32`` is ``[1, N]`` (one scale per weight row) or ``[K, N]``.
    Returns the int8 codes ``[K, N]``. Each row is rounded by the ``quantize_int8`` kernel that
    ``backend`` selects (chosen once per call: the torch reference on the CPU, Triton on CUDA).
    """
    k, n = wt.shape
    round_row = select("quantize_int8", backend, (wt[:1], s32[:1])).fn
    dtype = wt.dtype
    codes = torch.empty((k, n), dtype=torch.int8, device=wt.device)
    per_column = s32.shape[0] > 1
    # Row views made once (unbind: one call) instead of a Python slice per use; w_hat = q·s in one
    # op into a reused buffer (an int8 × float product promotes exactly as q.to(dtype)·s does);
    # a block's codes written by one stack. Same arithmetic, same bits as the plain loop.
    rows = wt.unbind(0)
    goals = targets.unbind(0) if targets is not None else None
    s_rows = s32.unbind(0)
    sw_rows = s32.to(dtype).unbind(0)
    w_hat = torch.empty(n, dtype=dtype, device=wt.device)
    err = torch.empty((min(block_size, k), n), dtype=dtype, device=wt.device)
    err_rows = err.unbind(0)
    threads = torch.get_num_threads()
    # The per-column work is thousands of tiny ops. Run it on one thread: on the shared 2-core
    # machine each 2-thread parallel region waited for a descheduled worker (2048 x 4096: 0.5 s
    # single-threaded vs 2.3-16 s with 2 threads, CPU time = wall time). Only the per-block GEMMs,
    # which carry almost all the flops, use every thread.
    single = wt.device.type == "cpu" and threads > 1
    try:
        for i1 in range(0, k, block_size):
            i2 = min(i1 + block_size, k)
            if single:
                torch.set_num_threads(1)
            qs = []
            for j1 in range(i1, i2, inner):
                j2 = min(j1 + inner, i2)
                for i in range(j1, j2):
                    row = i if per_column else 0
                    w = rows[i]
                    q = round_row(w, s_rows[row])
                    qs.append(q)
                    torch.mul(q, sw_rows[row], out=w_hat)
                    e = err_rows[i - i1]
                    if goals is not None:
                        torch.sub(goals[i], w_hat, out=e)
                    else:
                        torch.sub(w, w_hat, out=e)
                        e.div_(divide[i])
                    if i + 1 < j2:
                        wt[i + 1:j2].addr_(coef[i, i + 1:j2], e, alpha=-1)
                if j2 < i2:
                    wt[j2:i2].addmm_(coef[j1:j2, j2:i2].t(), err[j1 - i1:j2 - i1], alpha=-1)
            torch.stack(qs, out=codes[i1:i2])
            if single:
                torch.set_num_threads(threads)
            if i2 < k:
                wt[i2:].addmm_(coef[i1:i2, i2:].t(), err[:i2 - i1], alpha=-1)
    finally:
        if single:
            torch.set_num_threads(threads)
    return codes


#: Above this many multiply-adds (``N·K²``) the metrics' error matrices are float32, and the
#: achieved loss comes from the solver's own fed-back values (:func:`_fed_back_loss`).
EXACT_LOSS_WORK = 2 ** 31

#: The fed-back loss decides "never worse than RTN" only when it beats RTN by more than this
#: fraction; closer calls take the exact quadratic form (a near tie decided on exact losses).
FED_BACK_MARGIN = 0.05


def _fed_back_loss(wt: torch.Tensor, codes_t: torch.Tensor, s32: torch.Tensor, d: torch.Tensor,
                   e: torch.Tensor, live: torch.Tensor, damp: float) -> float:
    """``tr(E H Eᵀ)`` of the undamped ``H`` from what LDLQ/GPTQ already computed (``O(N·K)``).

    With ``H + damp·I = Mᵀ D M`` on the live inputs (the factored matrix), the fed-back value of
    column ``i`` when it was rounded is ``w_i + Σ_{j<i} M_ij e_j``, so ``η = wt − Ŵᵀ = M Eᵀ`` and
    ``Σ_i d_i ‖η_i‖² = tr(E (H + damp·I) Eᵀ)`` (dead inputs: ``d_i = 0`` here, and ``H`` is zero
    on them). Hence ``tr(E H Eᵀ) = Σ_i d_i ‖η_i‖² − damp · ‖E_live‖²``: no ``[N, K] × [K, K]``
    product (0.6 s at 4096², a third of the metrics). ``wt`` [K, N] is the solver's in-place
    result, ``codes_t``, ``s32``, ``d`` in the solver's column order, ``e`` = ``W − Ŵ`` [N, K]
    and ``live`` [K] in the weight's order. Exact in exact arithmetic; in float32 off by the
    solver's own rounding (tests/test_gptq_speed.py states the bound).
    """
    acc = torch.zeros((), dtype=torch.float64, device=wt.device)
    step = 512
    for r0 in range(0, wt.shape[0], step):
        r1 = min(r0 + step, wt.shape[0])
        w_hat = codes_t[r0:r1].to(torch.float32).mul_(s32[r0:r1] if s32.shape[0] > 1 else s32)
        eta = torch.sub(wt[r0:r1], w_hat, out=w_hat)
        acc += (eta.square_().sum(dim=1, dtype=torch.float64) * d[r0:r1]).sum()
    e_cols = e.square().sum(dim=0, dtype=torch.float64)
    return float(acc) - damp * float(e_cols[live.to(e_cols.device)].sum())


def feedback_round(state: LayerState, cfg, *, stage: str, solve, fed_back: bool = False) -> LayerState:
    """Shared body of :func:`~cq.transforms.gptq.gptq_update` and :func:`~cq.transforms.ldlq.ldlq`.

    ``cfg`` carries ``damping, actorder, block_size, lazy_batch, precision, never_worse_than_rtn,
    metrics, backend``. ``solve(wt, s32, lower_rev, block_size, inner, *, backend)`` rounds the permuted,
    transposed weight given the Cholesky factor of the reversed damped Hessian and returns codes
    ``[K, N]``. Handles H = None (identity: exactly RTN), non-finite H and failed factorizations
    (RTN with a warning note), act-order, dead columns and the metrics. ``fed_back``: ``solve``
    leaves in ``wt`` each column's fed-back value as it was rounded (GPTQ, LDLQ), which gives the
    achieved loss of big layers without a ``K²`` product (:func:`_fed_back_loss`).
    """
    _need_scale(state, stage)
    name = state.name
    n, k = state.shape
    weight = state.weight
    s_exp = expand_scale(state.scale, state.granularity, (n, k)).to(torch.float32)
    rtn_codes = []
    rtn_job = []  # a background job that makes rtn_codes and the RTN quadratic forms (big layers)

    def rtn_of() -> torch.Tensor:
        # Round-to-nearest codes, made only when a fallback or the metrics need them (a full
        # extra pass over the weight: 0.16 s of a 1.3 s GPTQ at 2048², metrics off).
        if rtn_job:
            rtn_job[0].result()
        if not rtn_codes:
            rtn_codes.append(quantize_int8(weight, s_exp, backend=cfg.backend))
        return rtn_codes[0]
    fmt = int8_format(state.granularity)
    h = state.hessian
    grouped = not isinstance(state.granularity, (PerTensor, PerRow))
    notes: list[str] = []

    def finish(codes, extra_metrics):
        return record(state, stage, cfg, metrics=extra_metrics, notes=tuple(notes), codes=codes, format=fmt)

    def rtn_metrics(hh):
        if not cfg.metrics:
            return {}
        sig, loss = quadratic_forms([weight, weight - rtn_of().to(torch.float32) * s_exp], hh)
        rel = _rel(loss, sig)
        diag = torch.ones(k, dtype=torch.float64, device=weight.device) if hh is None else hh.diagonal()
        pred = predicted_rel_out(state.scale if not grouped else s_exp, diag, weight, signal=sig)
        return {"rel_out_h": rel, "rel_out_rtn_h": rel, "predicted_rel_out_rtn": pred}

    if h is None:
        notes.append(f"no calibration: H = I, {stage} equals round-to-nearest")
        m = rtn_metrics(None)
        if m:
            m["predicted_rel_out"] = m["predicted_rel_out_rtn"]
        return finish(rtn_of(), m)
    dtype = working_dtype(cfg.precision, k, n)
    # Judged without its own factorization: the damped Hessian is factored once below, and only a
    # failed first try pays for hessian_problem's definiteness test (a second Cholesky, 0.3 s at
    # K = 4096). A first try that succeeds with damping ≤ the test's proves H + damp·I positive
    # definite, which the test accepts (it factors that matrix, damped at least as much, scaled to
    # unit diagonal, with a rounding allowance on top). More damping than the test's proves less.
    why = hessian_problem(h, k, name=name, definite=False)
    if why:
        notes.append(f"warning: {why}; rounded to nearest instead of {stage}")
        return finish(rtn_of(), {})
    if (cfg.metrics and fed_back and dtype == torch.float32 and n * k * k > EXACT_LOSS_WORK
            and weight.device.type == "cpu" and torch.get_num_threads() > 1):
        # The signal and RTN loss (two thirds of the metrics' flops) do not depend on the solve: run
        # them beside it, on the core that the one-thread Cholesky and column loop leave idle.
        # Elementwise ops and GEMMs give the same bits on any thread count, so the values do not
        # depend on the overlap; codes are never touched by the job.
        def rtn_forms() -> list[float]:
            rtn_codes.append(quantize_int8(weight, s_exp, backend=cfg.backend))
            e_rtn = weight.to(torch.float32) - (rtn_codes[0].to(torch.float32) * s_exp)
            return quadratic_forms([weight, e_rtn], h)

        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        rtn_job.append(pool.submit(rtn_forms))
        pool.shutdown(wait=False)
    dead, base, damp, weight_p, prep_notes = _dead_and_damping(h, weight, cfg.damping, dtype)
    notes.extend(prep_notes)
    perm = actorder_permutation(h) if cfg.actorder else None
    # J·P·H·Pᵀ·J built in one gather (a flip, or the reversed permutation), cast, then decoupled and
    # damped in that order: the same entries as damping first and permuting after.
    if perm is None:
        h_rev = h.detach().flip(0, 1)
        dead_rev = dead.flip(0)
    else:
        rev = perm.flip(0)
        h_rev = h.detach().index_select(0, rev).index_select(1, rev)
        dead_rev = dead[rev]
    h_rev = h_rev.to(dtype)
    _decouple_and_damp(h_rev, dead_rev, damp)
    # Bring the mean diagonal near 1 by a power of two: exact (codes are bit-identical for any
    # 2^j·H) and it keeps Hinv's entries and the scaled errors away from float32 over/underflow.
    unit = 2.0 ** -round(math.log2(base))
    h_rev.mul_(unit)
    with one_thread(h_rev):
        first = robust_cholesky(h_rev, attrs.evolve(cfg.damping, max_tries=0), damp=damp * unit, base=base * unit)
        if first.ok and cfg.damping.percdamp <= CHECK_PERCDAMP:
            chol = first
        else:  # rare: judge the Hessian (as prepare_hessian does), then factor with the retries
            why = hessian_problem(h, k, name=name)
            if why:
                notes.append(f"warning: {why}; rounded to nearest instead of {stage}")
                return finish(rtn_of(), {})
            chol = first if first.ok else robust_cholesky(h_rev, cfg.damping, damp=damp * unit, base=base * unit)
    del h_rev
    notes.extend(chol.notes)
    if not chol.ok:
        notes.append(f"warning: {stage} fell back to round-to-nearest (the Hessian could not be factored)")
        return finish(rtn_of(), {**rtn_metrics(h), "damp": chol.damp / (base * unit)})
    wt = weight_p.to(dtype).t()
    if grouped:
        s32 = s_exp.t()
    else:
        s32 = state.scale.to(torch.float32).reshape(-1).expand(n).reshape(1, n)
    if perm is not None:
        wt = wt[perm]
        if grouped:
            s32 = s32[perm]
    wt = wt.contiguous()
    s32 = s32.contiguous()
    block = cfg.block_size if cfg.lazy_batch else k
    inner = INNER_BLOCK if cfg.lazy_batch else k
    codes_t = solve(wt, s32, chol.lower, block, inner, backend=cfg.backend)
    codes_solver = codes_t
    if perm is not None:
        unperm = torch.empty_like(codes_t)
        unperm[perm] = codes_t
        codes_t = unperm
    codes = codes_t.t().contiguous()
    extra = {"damp": chol.damp / (base * unit), "cholesky_tries": chol.tries}
    if cfg.metrics:
        # The loss of the layer as stored: codes dequantized in float32 (as the runtime does). Small
        # problems subtract in float64, so that a near-tie between GPTQ/LDLQ and RTN (a singular H) is
        # decided on the true losses, not on float32 rounding of the errors.
        ed = torch.float64 if n * k * k <= EXACT_LOSS_WORK else torch.float32
        e = weight.to(ed) - (codes.to(torch.float32) * s_exp).to(ed)
        d = (chol.lower.diagonal().to(torch.float64) ** 2).flip(0) / unit
        dead_p = dead if perm is None else dead[perm]
        d = torch.where(dead_p.to(d.device), torch.zeros_like(d), d)
        if fed_back and ed == torch.float32 and dtype == torch.float32:
            if rtn_job:
                sig, loss_rtn = rtn_job[0].result()
            else:
                e_rtn = weight.to(ed) - (rtn_of().to(torch.float32) * s_exp).to(ed)
                sig, loss_rtn = quadratic_forms([weight, e_rtn], h)
            loss = _fed_back_loss(wt, codes_solver, s32, d, e, ~dead, chol.damp / unit)
            if cfg.never_worse_than_rtn and loss > (1 - FED_BACK_MARGIN) * loss_rtn:
                loss = quadratic_forms([e], h)[0]  # a near tie: decided on the exact form
        else:
            e_rtn = weight.to(ed) - (rtn_of().to(torch.float32) * s_exp).to(ed)
            sig, loss, loss_rtn = quadratic_forms([weight, e, e_rtn], h)
        scale_p = state.scale if not grouped else (s_exp if perm is None else s_exp[:, perm])
        rel, rel_rtn = _rel(loss, sig), _rel(loss_rtn, sig)
        extra.update({
            "rel_out_h": rel,
            "rel_out_rtn_h": rel_rtn,
            "predicted_rel_out": predicted_rel_out(scale_p, d, weight, signal=sig),
            "predicted_rel_out_rtn": predicted_rel_out(state.scale if not grouped else s_exp, h.diagonal(),
                                                       weight, signal=sig),
        })
        if cfg.never_worse_than_rtn and loss > loss_rtn:
            notes.append(f"{stage} did not beat round-to-nearest on this Hessian "
                         f"({rel:.4g} vs {rel_rtn:.4g}); kept round-to-nearest")
            codes = rtn_of()
            extra["rel_out_h"] = rel_rtn
    return finish(codes, extra)
