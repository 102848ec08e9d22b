"""Rounding-error bounds shared by the tests that compare cq with another implementation.

Each bound is a worst case from the floating-point model ``fl(a ∘ b) = (a ∘ b)(1 + δ)``,
``|δ| ≤ u`` (round to nearest), so it holds for any summation order, blocking, thread count or
BLAS build on any x86 CPU; none is tuned to what this machine happens to produce.

- ``u``: unit roundoff, half the spacing of 1.0: float32 2⁻²⁴, bfloat16 2⁻⁸, float16 2⁻¹¹.
- ``γ_n = n·u / (1 − n·u)``: the relative error of a product of ``n`` roundings; an n-term dot
  product evaluated in any order satisfies ``|fl(Σ a_i b_i) − Σ a_i b_i| ≤ γ_n · Σ |a_i||b_i|``
  (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1), so two evaluations differ by at
  most twice that. The bound is relative to ``Σ|a||b|``, not to ``|Σ a b|``: near-cancelling
  outputs get no relative guarantee and the tests never ask for one.
"""

from __future__ import annotations

import torch

F64 = torch.float64
U32 = 2.0 ** -24
UBF16 = 2.0 ** -8


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u`` of a floating dtype: 2⁻²⁴ for float32, 2⁻⁸ for bfloat16."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, u: float = U32) -> float:
    """``γ_n = n·u / (1 − n·u)``: relative bound of ``n`` accumulated roundings.

    Example:
        >>> f"{gamma(300):.2e}", f"{gamma(4, UBF16):.2e}"  # a 300-term float32 sum; four bf16 roundings
        ('1.79e-05', '1.59e-02')
    """
    assert n * u < 1, (n, u)
    return n * u / (1 - n * u)


def abs_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ_k |a[..., k]| |b[n, k]|`` in float64: the scale of a dot product's rounding error."""
    return a.to(F64).abs() @ b.to(F64).abs().transpose(-1, -2)


def matmul_gap(a: torch.Tensor, b: torch.Tensor, extra_roundings: int = 0, u: float = U32) -> torch.Tensor:
    """Elementwise bound on ``|y₁ − y₂|`` for two evaluations of ``a @ bᵀ`` (K terms, any order),
    each followed by ``extra_roundings`` scalings: ``2·γ_{K + extra}·Σ|a||b|``."""
    k = a.shape[-1]
    return 2 * gamma(k + extra_roundings, u) * abs_product(a, b)


def rel_err_gap(diff_bound_norm: float, ref_norm: float) -> float:
    """Triangle inequality: two outputs within ``‖d‖`` of each other have relative errors against the
    same reference that differ by at most ``‖d‖ / ‖ref‖``."""
    return diff_bound_norm / ref_norm


def sum_sq_rel(n: int, u: float = U32) -> float:
    """Relative bound for ``Σ t²`` of ``n`` float32 values as ``vector_norm(t)²`` (or a plain sum of
    squares), in any order: n squarings/additions, the square root and the final squaring: ``γ_{n+2}``.
    (A cascaded sum is usually ~log₂n·u, but the order is the library's choice, so the test may not
    count on it.)"""
    return gamma(n + 2, u)


def db_gap(rel_signal: float, rel_noise: float) -> float:
    """Bound on ``|10·log10(S'/N') − 10·log10(S/N)|`` when ``S'``, ``N'`` are within the given relative
    errors of ``S``, ``N``: ``10/ln 10 · (−ln(1 − ε_S) − ln(1 − ε_N))``."""
    import math

    return 10 / math.log(10) * (-math.log1p(-rel_signal) - math.log1p(-rel_noise))


#: λ of the probabilistic bound below: each dot product fails it with probability ≤ 2n·e^(−λ²/2)
#: ≈ n·2.5e-14 (under the model), so even a million outputs per test leave ~1e-6 chance of a miss.
LAMBDA = 8.0


def gamma_prob(n: int, lam: float = LAMBDA, u: float = U32) -> float:
    """Probabilistic ``γ̃_n(λ) = exp(λ√n·u + n·u²/(1 − u)) − 1`` ≈ ``λ√n·u`` (Higham & Mary, *A New
    Approach to Probabilistic Rounding Error Analysis*, SISC 2019, Thm 2.4): with rounding errors
    modelled as independent and mean-zero, an n-term dot product in any order is within
    ``γ̃_n(λ)·Σ|a||b|`` of the exact value with probability ≥ ``1 − 2n·exp(−λ²(1 − u)²/2)``. Used
    where the worst case ``γ_n`` (errors all aligned) is too loose to catch anything at large n.

    Example:
        >>> round(gamma(4096) / gamma_prob(4096), 1)  # √n/λ = 64/8 times tighter at n = 4096
        8.0
    """
    import math

    return math.expm1(lam * math.sqrt(n) * u + n * u * u / (1 - u))


def group_rotation_gap(x: torch.Tensor, g: int) -> torch.Tensor:
    """Elementwise bound on ``|a − b|`` for two float32 evaluations of ``x·R`` with R block-diagonal of
    G×G blocks, ``|R_ij| = 1/√G`` (ConvRot): ``2·γ_G·Σ_group|x_i|/√G ≈ √G·eps·Σ_group|x_i|`` — the
    bound tests/test_convrot.py derives (``_rotation_bound``), for tests outside that file."""
    sums = x.abs().to(F64).reshape(*x.shape[:-1], -1, g).sum(-1, keepdim=True)
    per = 2 * gamma(g) / g ** 0.5 * sums
    return per.expand(*x.shape[:-1], -1, g).reshape(x.shape)


def norm_gap(numel: int) -> float:
    """Relative error of a float64 ``‖·‖`` of ``numel`` terms (``γ_{n+2}`` at u = 2⁻⁵³): what two
    float64 relative-error computations may differ by when their float32 inputs agree exactly."""
    return gamma(numel + 2, 2.0 ** -53)


def rel_error_interval(d_exact: torch.Tensor, e_d: torch.Tensor, ref_exact: torch.Tensor, e_ref: torch.Tensor,
                       u: float = U32) -> tuple[float, float]:
    """Interval that a float32-computed ``‖d‖ / ‖ref‖`` (``torch.linalg.vector_norm`` of each, any
    reduction order) must fall in, given float64 ``d_exact``/``ref_exact`` and elementwise bounds
    ``e_d``/``e_ref`` on how far the float32 operands are from them.

    Each norm of n entries is within ``γ_{n+2}`` relative of the norm of its float32 operand, which is
    within ``‖e‖`` of the exact norm (triangle inequality); the quotient and float64 conversions add
    2⁻⁵². Example: cq's W8A8 metric against a float64 model of the runtime.
    """
    g = gamma(d_exact.numel() + 2, u)
    nd, ned = float(d_exact.norm()), float(e_d.to(F64).norm())
    nr, ner = float(ref_exact.norm()), float(e_ref.to(F64).norm())
    lo = max(nd - ned, 0.0) * (1 - g) / ((nr + ner) * (1 + g))
    hi = (nd + ned) * (1 + g) / (max(nr - ner, 0.0) * (1 - g)) if nr > ner else float("inf")
    return lo * (1 - 2.0 ** -52), hi * (1 + 2.0 ** -52)
