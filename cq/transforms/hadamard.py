"""Hadamard matrices of any size and fast orthogonal transforms built from Kronecker factors.

Every transform here is an orthogonal ``n × n`` matrix ``M = diag(s) · (F₁ ⊗ F₂ ⊗ … ⊗ F_m)`` with
small dense factors ``F_i`` and an optional ±1 sign vector ``s``. ``x · M`` is applied one factor at a
time as a GEMM over a reshaped view (``x.view(…, f_i, …)``), i.e. ``n · Σ f_i`` multiply-adds per row
instead of ``n²`` for a dense matrix or ``log₂ n`` Python-level passes for a butterfly. On 2 CPU cores an
8192×4096 fp32 matrix takes ≈ 0.14 s with ``H₄₀₉₆ = H₆₄ ⊗ H₆₄`` (``benchmarks/bench_hadamard.py``).

How a size ``n`` is covered (:func:`transform_plan`):

1. ``n = 2^k``: the natural-order Sylvester Hadamard, split into Kronecker factors of at most 128
   (``S_{2^a} ⊗ S_{2^b} = S_{2^{a+b}}`` exactly, so the matrix *is* the Sylvester matrix).
2. ``n = p · 2^k`` with ``p`` a Paley order (``p = q + 1`` for a prime ``q ≡ 3 mod 4``, Paley I, e.g.
   12, 20, 44, 60, 108; or ``p = 2(q + 1)`` for a prime ``q ≡ 1 mod 4``, Paley II, e.g. 12, 28, 36),
   ``p ≤ 256``: ``H_p ⊗ S_{2^k}``, a true Hadamard matrix. This covers 3072 = 12·256, 5120 = 20·256,
   13824 = 108·128, 15360 = 60·256.
3. Anything else (an odd part that no Paley order up to 256 absorbs, e.g. 11008 = 43·256, or odd
   ``n``): the largest Hadamard divisor as above, Kronecker with seeded Haar-random orthogonal factors
   for the remaining odd part (its prime factors grouped into factors of at most 256; a prime above
   256 gets one dense factor of its own size). The result is orthogonal to float precision and still
   mixes every coordinate with every other (unlike a block-diagonal fallback), at a cost of
   ``n · Σ f_i`` per row. No zero padding is ever needed.

Randomness always comes from an explicitly seeded ``torch.Generator`` (never the global RNG).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import attrs
import torch

from ..errors import ConfigError

__all__ = [
    "PALEY_MAX",
    "hessian_dtype",
    "sylvester_hadamard",
    "paley_hadamard",
    "paley_orders",
    "regular_hadamard",
    "hadamard_matrix",
    "is_hadamard_order",
    "random_orthogonal",
    "kron_apply",
    "KroneckerOrthogonal",
    "transform_plan",
    "orthogonal_transform",
    "hadamard_transform",
    "randomized_hadamard_transform",
]

#: Largest Paley factor used (the factor is applied densely, so its size is its per-element cost).
PALEY_MAX = 256
#: Largest factor a power of two is split into (two 64-factors beat one 4096 GEMM by 10×).
_SYLVESTER_MAX = 128
#: Random orthogonal factors group the odd part's primes up to this size.
_RANDOM_MAX = 256


#: Hessians up to this size are rotated in float64; larger ones in float32 (a [16384]² float64
#: copy is 2 GiB, and LDLQ factors anything above K = 1024 in float32 anyway).
_HESSIAN_F64_MAX = 4096


def hessian_dtype(k: int) -> torch.dtype:
    """The dtype a ``[k, k]`` Hessian is rotated in: float64 up to k = 4096, float32 above.

    Example:
        >>> hessian_dtype(1024), hessian_dtype(8192)
        (torch.float64, torch.float32)
    """
    return torch.float64 if k <= _HESSIAN_F64_MAX else torch.float32


# ---------------------------------------------------------------------------------------------
# Small integer helpers


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    i = 3
    while i * i <= q:
        if q % i == 0:
            return False
        i += 2
    return True


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def _v2(n: int) -> int:
    return (n & -n).bit_length() - 1


# ---------------------------------------------------------------------------------------------
# Hadamard constructions (all built here from their definitions; no tables)


@functools.lru_cache(maxsize=64)
def _sylvester_int(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def sylvester_hadamard(n: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthonormal natural-order Sylvester Hadamard ``S_n`` (``n`` a power of two; symmetric).

    ``S_{2n} = [[S_n, S_n], [S_n, -S_n]] / √2``; this is the matrix the reference's FWHT applies.

    Example:
        >>> (sylvester_hadamard(4) * 2).tolist()
        [[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 1.0, -1.0], [1.0, 1.0, -1.0, -1.0], [1.0, -1.0, -1.0, 1.0]]
    """
    if not isinstance(n, int) or n < 1 or n & (n - 1):
        raise ConfigError(f"sylvester_hadamard needs a power of two n >= 1, got {n!r}; "
                          "use hadamard_matrix(n) for other orders")
    return (_sylvester_int(n) / math.sqrt(n)).to(dtype)


def _legendre(q: int) -> list[int]:
    squares = {(i * i) % q for i in range(1, q)}
    return [0] + [1 if a in squares else -1 for a in range(1, q)]


def _jacobsthal(q: int) -> torch.Tensor:
    chi = torch.tensor(_legendre(q), dtype=torch.float64)
    idx = (torch.arange(q).reshape(1, q) - torch.arange(q).reshape(q, 1)) % q
    return chi[idx]  # Q[i, j] = χ(j − i)


def _paley_construction(n: int) -> tuple[str, int] | None:
    if n % 4 or n < 4:
        return None
    if _is_prime(n - 1) and (n - 1) % 4 == 3:
        return "I", n - 1
    if n % 2 == 0 and _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        return "II", n // 2 - 1
    return None


@functools.lru_cache(maxsize=64)
def _paley_int(n: int) -> torch.Tensor:
    kind, q = _paley_construction(n)
    jac = _jacobsthal(q)
    ones = torch.ones(q, dtype=torch.float64)
    if kind == "I":  # q ≡ 3 (mod 4): Q is skew; H = I + [[0, 1ᵀ], [-1, Q]]
        s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        s[0, 1:] = ones
        s[1:, 0] = -ones
        s[1:, 1:] = jac
        return torch.eye(q + 1, dtype=torch.float64) + s
    # q ≡ 1 (mod 4): C = [[0, 1ᵀ], [1, Q]] is a symmetric conference matrix;
    # H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]].
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = ones
    c[1:, 0] = ones
    c[1:, 1:] = jac
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def paley_orders(limit: int = PALEY_MAX) -> tuple[int, ...]:
    """Orders ``≤ limit`` this module builds with a Paley construction (prime ``q`` only).

    Example:
        >>> paley_orders(40)
        (4, 8, 12, 20, 24, 28, 32, 36)
    """
    return tuple(n for n in range(4, limit + 1, 4) if _paley_construction(n) is not None)


def paley_hadamard(n: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthonormal Paley Hadamard matrix of order ``n`` (see :func:`paley_orders`).

    Paley I: ``n = q + 1`` with ``q ≡ 3 (mod 4)`` prime; Paley II: ``n = 2(q + 1)`` with
    ``q ≡ 1 (mod 4)`` prime.

    Example:
        >>> h = paley_hadamard(12)
        >>> bool(torch.allclose(h @ h.T, torch.eye(12, dtype=h.dtype), atol=1e-12))
        True
    """
    if not isinstance(n, int) or _paley_construction(n) is None:
        raise ConfigError(f"no Paley construction (prime q) of order {n!r}; orders up to 64 are "
                          f"{list(paley_orders(64))}; use hadamard_matrix(n) for n = p·2^k")
    return (_paley_int(n) / math.sqrt(n)).to(dtype)


_H4_REGULAR = ((1, 1, 1, -1), (1, 1, -1, 1), (1, -1, 1, 1), (-1, 1, 1, 1))


def _is_power_of_4(g: int) -> bool:
    return isinstance(g, int) and not isinstance(g, bool) and g >= 4 and g & (g - 1) == 0 and _v2(g) % 2 == 0


@functools.lru_cache(maxsize=16)
def _regular_int(g: int) -> torch.Tensor:
    h4 = torch.tensor(_H4_REGULAR, dtype=torch.float64)
    h = h4
    while h.shape[0] < g:
        h = torch.kron(h, h4)
    return h


def regular_hadamard(g: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """comfy-kitchen's ConvRot matrix: the ``g``-th Kronecker power of its regular 4×4 ``H4``, / √g.

    ``H4 = [[1,1,1,-1],[1,1,-1,1],[1,-1,1,1],[-1,1,1,1]]`` is symmetric, so the result is symmetric
    and its own inverse. ``g`` must be a power of 4 (4, 16, 64, 256, …).

    Example:
        >>> h = regular_hadamard(16)
        >>> bool(torch.equal(h, h.T)), bool(torch.allclose(h @ h, torch.eye(16, dtype=h.dtype)))
        (True, True)
    """
    if not _is_power_of_4(g):
        raise ConfigError(f"the ConvRot (regular) Hadamard needs a power of 4 (4, 16, 64, 256, ...), got {g!r}")
    return (_regular_int(g) / math.sqrt(g)).to(dtype)


def regular_hadamard_factors(g: int) -> tuple[torch.Tensor, ...]:
    """``regular_hadamard(g)`` as Kronecker factors of at most 64 (exact, since it is a Kronecker power)."""
    if not _is_power_of_4(g):
        raise ConfigError(f"the ConvRot (regular) Hadamard needs a power of 4 (4, 16, 64, 256, ...), got {g!r}")
    parts = _balanced_split(_v2(g) // 2, 3)
    return tuple(regular_hadamard(4 ** p) for p in parts)


# ---------------------------------------------------------------------------------------------
# Random orthogonal factors


def random_orthogonal(n: int, *, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A Haar-random orthogonal ``n × n`` matrix: QR of a seeded Gaussian with the signs of R fixed.

    Example:
        >>> q = random_orthogonal(5, generator=torch.Generator().manual_seed(0))
        >>> bool(torch.allclose(q @ q.T, torch.eye(5, dtype=q.dtype), atol=1e-12))
        True
    """
    g = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    # Without the sign fix QR's output is not Haar-distributed (biased towards the identity).
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1.0
    return (q * d).to(dtype)


# ---------------------------------------------------------------------------------------------
# Plans: which factors cover a size n


def _balanced_split(k: int, max_k: int) -> list[int]:
    if k == 0:
        return []
    m = -(-k // max_k)
    base, extra = divmod(k, m)
    return [base + 1] * extra + [base] * (m - extra)


def _group_primes(primes: Sequence[int], limit: int) -> list[int]:
    groups: list[int] = []
    for p in sorted(primes, reverse=True):
        for i, g in enumerate(groups):
            if g * p <= limit:
                groups[i] = g * p
                break
        else:
            groups.append(p)
    return groups


@attrs.frozen
class Plan:
    """How :func:`orthogonal_transform` covers a size: factor kinds and sizes, in Kronecker order."""

    n: int
    factors: tuple[tuple[str, int], ...]  # ("paley"|"sylvester"|"random", size)

    @property
    def is_hadamard(self) -> bool:
        """True when the unsigned transform is a Hadamard matrix (no random factor)."""
        return all(kind != "random" for kind, _ in self.factors)

    @property
    def is_sylvester(self) -> bool:
        """True when the unsigned transform is exactly the natural-order Sylvester matrix ``S_n``."""
        return all(kind == "sylvester" for kind, _ in self.factors)


def transform_plan(n: int, *, use_hadamard: bool = True) -> Plan:
    """Decompose ``n`` into Kronecker factors (see the module docstring).

    Example:
        >>> transform_plan(3072).factors
        (('paley', 12), ('sylvester', 16), ('sylvester', 16))
        >>> transform_plan(4096).factors
        (('sylvester', 64), ('sylvester', 64))
        >>> transform_plan(86).factors
        (('sylvester', 2), ('random', 43))
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"transform size must be a positive int, got {n!r}")
    if not use_hadamard:
        return Plan(n, tuple(("random", f) for f in _group_primes(_prime_factors(n), _RANDOM_MAX)) or (("random", 1),))
    e = _v2(n)
    odd = n >> e
    paley, t = 1, 0
    for d in sorted((d for d in range(1, odd + 1, 2) if odd % d == 0), reverse=True):
        if d == 1:
            break
        found = [tt for tt in range(2, e + 1) if (d << tt) <= PALEY_MAX and _paley_construction(d << tt)]
        if found:
            paley, t = d << found[0], found[0]
            break
    rest_odd = odd // (paley >> t) if paley > 1 else odd
    factors: list[tuple[str, int]] = []
    if paley > 1:
        factors.append(("paley", paley))
    factors += [("sylvester", 2 ** k) for k in _balanced_split(e - t, _v2(_SYLVESTER_MAX))]
    factors += [("random", f) for f in _group_primes(_prime_factors(rest_odd), _RANDOM_MAX)]
    if not factors:  # n == 1
        factors = [("sylvester", 1)]
    return Plan(n, tuple(factors))


def is_hadamard_order(n: int) -> bool:
    """Whether :func:`hadamard_matrix` can build a Hadamard matrix of order ``n`` (Paley × 2^k).

    Example:
        >>> [n for n in (1, 2, 12, 20, 40, 43, 86, 3072) if is_hadamard_order(n)]
        [1, 2, 12, 20, 40, 3072]
    """
    return transform_plan(n).is_hadamard


def hadamard_matrix(n: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """An orthonormal Hadamard matrix of order ``n`` (``n = 1, 2`` or Paley order × 2^k), dense.

    Example:
        >>> h = hadamard_matrix(20) * math.sqrt(20)
        >>> bool(torch.equal(h.abs(), torch.ones(20, 20, dtype=h.dtype)))
        True
    """
    plan = transform_plan(n)
    if not plan.is_hadamard:
        raise ConfigError(f"no Hadamard matrix of order {n} is built here (orders are 1, 2 and p·2^k with p in "
                          f"{list(paley_orders(64))}...); use orthogonal_transform(n) for a Hadamard-based "
                          "orthogonal transform of any size")
    return orthogonal_transform(n, random_signs=False).matrix(dtype)


# ---------------------------------------------------------------------------------------------
# Fast application


def kron_apply(x: torch.Tensor, factors: Sequence[torch.Tensor], *, transpose: bool = False) -> torch.Tensor:
    """``x · (F₁ ⊗ … ⊗ F_m)`` (or ``x · (F₁ ⊗ … ⊗ F_m)ᵀ``) along the last dim, one GEMM per factor.

    The last dim of ``x`` must equal ``∏ f_i``. Computed in ``x``'s dtype (float32 or float64);
    ``x`` is never modified.

    Example:
        >>> a, b = torch.randn(3, 3, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
        >>> x = torch.randn(5, 12, dtype=torch.float64)
        >>> bool(torch.allclose(kron_apply(x, [a, b]), x @ torch.kron(a, b)))
        True
    """
    shape = x.shape
    n = shape[-1]
    sizes = [int(f.shape[0]) for f in factors]
    if math.prod(sizes) != n:
        raise ConfigError(f"kron_apply: factor sizes {sizes} multiply to {math.prod(sizes)}, but x has {n} columns")
    y = x.reshape(-1, n)
    rows = y.shape[0]
    before = 1
    for f_mat, f in zip(factors, sizes):
        after = n // (before * f)
        m = f_mat.to(dtype=y.dtype, device=y.device)
        if transpose:
            m = m.t()
        if f == 1:
            y = y * m.reshape(())
        elif after == 1:
            y = (y.reshape(-1, f) @ m).reshape(rows, n)
        else:
            # out[p, k, s] = Σ_i m[i, k] · y[p, i, s]: one broadcast batched GEMM, no transposed copy.
            y = torch.matmul(m.t(), y.reshape(rows * before, f, after)).reshape(rows, n)
        before *= f
    return y.reshape(shape)


def _tensor_repr(t: torch.Tensor | None) -> str:
    return "None" if t is None else f"Tensor{list(t.shape)}"


@attrs.frozen(eq=False)
class KroneckerOrthogonal:
    """The orthogonal matrix ``M = diag(signs) · (F₁ ⊗ … ⊗ F_m)`` and its fast application.

    ``apply(x) = x · M`` and ``apply_t(x) = x · Mᵀ`` act on the last dim; ``apply_t(apply(x)) == x``.
    Factors are float64 orthonormal matrices; ``kinds`` says what each one is ("sylvester", "paley",
    "random", "regular").

    Example:
        >>> t = orthogonal_transform(12, seed=3)
        >>> x = torch.randn(2, 12, dtype=torch.float64)
        >>> bool(torch.allclose(t.apply_t(t.apply(x)), x)), bool(torch.allclose(t.apply(x), x @ t.matrix()))
        (True, True)
    """

    factors: tuple[torch.Tensor, ...] = attrs.field(converter=tuple, repr=lambda fs: str([int(f.shape[0]) for f in fs]))
    signs: torch.Tensor | None = attrs.field(default=None, repr=_tensor_repr)
    kinds: tuple[str, ...] = attrs.field(default=(), converter=tuple)

    @property
    def n(self) -> int:
        return math.prod(int(f.shape[0]) for f in self.factors)

    @property
    def is_sylvester(self) -> bool:
        """True when the unsigned part is exactly the natural-order Sylvester Hadamard ``S_n``."""
        return bool(self.kinds) and all(k == "sylvester" for k in self.kinds)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x · M`` along the last dim."""
        if self.signs is not None:
            x = x * self.signs.to(dtype=x.dtype, device=x.device)
        return kron_apply(x, self.factors)

    def apply_t(self, x: torch.Tensor) -> torch.Tensor:
        """``x · Mᵀ`` along the last dim (the inverse of :meth:`apply`)."""
        y = kron_apply(x, self.factors, transpose=True)
        if self.signs is not None:
            y = y * self.signs.to(dtype=y.dtype, device=y.device)
        return y

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``M`` as a dense ``n × n`` matrix."""
        return self.apply(torch.eye(self.n, dtype=torch.float64)).to(dtype)


def _factor_matrix(kind: str, size: int, generator: torch.Generator | None) -> torch.Tensor:
    if kind == "sylvester":
        return sylvester_hadamard(size)
    if kind == "paley":
        return paley_hadamard(size)
    return random_orthogonal(size, generator=generator)


def orthogonal_transform(n: int, *, seed: int = 0, use_hadamard: bool = True, random_signs: bool = True,
                         generator: torch.Generator | None = None) -> KroneckerOrthogonal:
    """A fast orthogonal transform of size ``n`` following :func:`transform_plan`.

    ``random_signs``: multiply by a seeded ±1 diagonal first (the *randomized* Hadamard transform of
    QuIP#). ``use_hadamard=False``: Kronecker products of seeded Haar-random orthogonal factors (QuIP's
    original incoherence transform). Draws come from ``generator`` when given (so several transforms
    can share one stream), else from a fresh generator seeded with ``seed``: first the signs, then the
    random factors in order.

    Example:
        >>> t = orthogonal_transform(20, seed=1)
        >>> t.kinds, int(t.signs.abs().sum())
        (('paley',), 20)
    """
    plan = transform_plan(n, use_hadamard=use_hadamard)
    gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    signs = None
    if random_signs:
        signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64).to(torch.float64) * 2.0 - 1.0
    factors = tuple(_factor_matrix(kind, size, gen) for kind, size in plan.factors)
    return KroneckerOrthogonal(factors=factors, signs=signs, kinds=tuple(k for k, _ in plan.factors))


def hadamard_transform(x: torch.Tensor, *, seed: int = 0, inverse: bool = False) -> torch.Tensor:
    """``x · M`` for the (unrandomized) transform of size ``x.shape[-1]``, orthonormal.

    For Hadamard orders (:func:`is_hadamard_order`) this is the Hadamard transform and ``seed`` is
    unused; for other sizes the plan's random factors are drawn from ``seed``.
    ``inverse=True`` applies ``Mᵀ``. For a power of two it equals the natural-order FWHT divided by √n.

    Example:
        >>> hadamard_transform(torch.tensor([[1.0, 0.0, 0.0, 0.0]])).tolist()
        [[0.5, 0.5, 0.5, 0.5]]
    """
    t = orthogonal_transform(x.shape[-1], seed=seed, random_signs=False)
    return t.apply_t(x) if inverse else t.apply(x)


def randomized_hadamard_transform(x: torch.Tensor, *, seed: int, inverse: bool = False) -> torch.Tensor:
    """``x · diag(s) · H`` with seeded ±1 signs ``s`` (``inverse=True``: ``x · Hᵀ · diag(s)``).

    Example:
        >>> x = torch.randn(3, 40, dtype=torch.float64)
        >>> y = randomized_hadamard_transform(x, seed=7)
        >>> bool(torch.allclose(randomized_hadamard_transform(y, seed=7, inverse=True), x))
        True
    """
    t = orthogonal_transform(x.shape[-1], seed=seed)
    return t.apply_t(x) if inverse else t.apply(x)
