"""Tests for cq.transforms.hadamard: constructions, plans, fast application, randomization."""

from __future__ import annotations

import math

import pytest
import torch

from cq.errors import ConfigError
from cq.transforms.hadamard import (
    KroneckerOrthogonal,
    hadamard_matrix,
    hadamard_transform,
    is_hadamard_order,
    kron_apply,
    orthogonal_transform,
    paley_hadamard,
    paley_orders,
    random_orthogonal,
    randomized_hadamard_transform,
    regular_hadamard,
    regular_hadamard_factors,
    sylvester_hadamard,
    transform_plan,
)
from tests.float_bounds import gamma, gamma_prob

F64 = torch.float64


def _fwht_butterfly(x: torch.Tensor) -> torch.Tensor:
    """Textbook natural-order FWHT, (a, b) -> (a + b, a - b), divided by sqrt(n)."""
    y = x.clone()
    n = y.shape[-1]
    h = 1
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack([a + b, a - b], dim=2).reshape(-1, n)
        h *= 2
    return y.reshape(x.shape) / math.sqrt(n)


def _is_orthonormal(m: torch.Tensor, tol: float = 1e-12) -> bool:
    eye = torch.eye(m.shape[0], dtype=m.dtype)
    return bool((m @ m.T - eye).abs().max() < tol) and bool((m.T @ m - eye).abs().max() < tol)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 64, 256])
def test_sylvester_is_symmetric_orthonormal_and_matches_the_butterfly(n):
    h = sylvester_hadamard(n)
    assert torch.equal(h, h.T)
    assert _is_orthonormal(h)
    assert torch.equal((h * math.sqrt(n)).abs(), torch.ones(n, n, dtype=F64))
    x = torch.randn(5, n, dtype=F64, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(x @ h, _fwht_butterfly(x), atol=1e-12)


@pytest.mark.parametrize("n", [0, 3, 12, -4, 2.0])
def test_sylvester_rejects_non_powers_of_two(n):
    with pytest.raises(ConfigError, match="power of two"):
        sylvester_hadamard(n)


def test_paley_orders_are_hadamard_matrices():
    orders = paley_orders(256)
    assert {12, 20, 28, 36, 44, 60, 108} <= set(orders)
    for n in orders:
        h = paley_hadamard(n) * math.sqrt(n)
        hi = torch.round(h)
        assert torch.allclose(h, hi, atol=1e-9), n
        assert torch.equal(hi.abs(), torch.ones(n, n, dtype=F64)), n
        assert torch.equal(hi @ hi.T, n * torch.eye(n, dtype=F64)), n


def test_paley_rejects_orders_without_a_prime_construction():
    with pytest.raises(ConfigError, match=r"no Paley construction \(prime q\) of order 52"):
        paley_hadamard(52)


@pytest.mark.parametrize("n", [12, 24, 48, 96, 20, 40, 80, 160, 3072 // 16, 5120 // 16, 108 * 2, 60 * 4])
def test_hadamard_matrix_for_known_orders_times_powers_of_two(n):
    h = hadamard_matrix(n)
    hi = torch.round(h * math.sqrt(n))
    assert torch.equal(hi.abs(), torch.ones(n, n, dtype=F64))
    assert torch.equal(hi @ hi.T, n * torch.eye(n, dtype=F64))
    assert is_hadamard_order(n)


def test_hadamard_matrix_for_a_power_of_two_is_sylvester():
    assert torch.equal(hadamard_matrix(4096 // 16), sylvester_hadamard(256))
    assert torch.allclose(hadamard_matrix(1024), sylvester_hadamard(1024), atol=1e-15)


@pytest.mark.parametrize("n", [3, 6, 43, 86, 300])
def test_hadamard_matrix_refuses_other_orders_but_transforms_work(n):
    assert not is_hadamard_order(n)
    with pytest.raises(ConfigError, match=f"order {n}"):
        hadamard_matrix(n)
    assert _is_orthonormal(orthogonal_transform(n, seed=1).matrix(), 1e-12)


@pytest.mark.parametrize("n, factors", [
    (1, (("sylvester", 1),)),
    (4096, (("sylvester", 64), ("sylvester", 64))),
    (3072, (("paley", 12), ("sylvester", 16), ("sylvester", 16))),
    (5120, (("paley", 20), ("sylvester", 16), ("sylvester", 16))),
    (13824, (("paley", 108), ("sylvester", 128))),
    (15360, (("paley", 60), ("sylvester", 16), ("sylvester", 16))),
    (11008, (("sylvester", 16), ("sylvester", 16), ("random", 43))),
    (50257, (("random", 1733), ("random", 29))),
])
def test_transform_plan_covers_real_layer_widths(n, factors):
    plan = transform_plan(n)
    assert plan.factors == factors
    assert math.prod(size for _, size in plan.factors) == n


def test_transform_plan_without_hadamard_uses_random_factors_only():
    plan = transform_plan(1024, use_hadamard=False)
    assert all(kind == "random" for kind, _ in plan.factors)
    assert math.prod(s for _, s in plan.factors) == 1024


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_transform_plan_rejects_bad_sizes(n):
    with pytest.raises(ConfigError, match="positive int"):
        transform_plan(n)


def test_kron_apply_matches_dense_kronecker_products_and_leaves_input_alone():
    g = torch.Generator().manual_seed(0)
    fs = [torch.randn(s, s, generator=g, dtype=F64) for s in (3, 4, 5)]
    x = torch.randn(7, 60, generator=g, dtype=F64)
    x0 = x.clone()
    dense = torch.kron(torch.kron(fs[0], fs[1]), fs[2])
    assert torch.allclose(kron_apply(x, fs), x @ dense, atol=1e-10)
    assert torch.allclose(kron_apply(x, fs, transpose=True), x @ dense.T, atol=1e-10)
    assert torch.equal(x, x0)
    with pytest.raises(ConfigError, match="multiply to 60, but x has 20 columns"):
        kron_apply(x[:, :20], fs)


def test_kron_apply_works_on_float32_and_batched_leading_dims():
    t = orthogonal_transform(96, seed=2)
    x = torch.randn(2, 3, 96, generator=torch.Generator().manual_seed(1))
    y = t.apply(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    ref = x.to(F64) @ t.matrix()
    # 96 = 12 ⊗ 8: two float32 GEMMs (12 and 8 terms) with factors rounded to float32 (one more
    # rounding each), signs exact: worst case γ_{13+9}·|x|·|M| elementwise (γ of chained products adds).
    # A missing sign vector, factor or transpose moves y by O(|y|) ≈ 1: far outside 1.3e-6·Σ|x||M|.
    n_eff = sum(f.shape[0] + 1 for f in t.factors)
    assert bool(((y.to(F64) - ref).abs() <= gamma(n_eff) * (x.to(F64).abs() @ t.matrix().abs())).all())


@pytest.mark.parametrize("n", [1, 2, 7, 12, 20, 43, 64, 96, 100, 255, 256, 300])
@pytest.mark.parametrize("use_hadamard", [True, False])
def test_orthogonal_transforms_are_orthonormal_for_any_size(n, use_hadamard):
    t = orthogonal_transform(n, seed=n, use_hadamard=use_hadamard)
    m = t.matrix()
    assert _is_orthonormal(m, 1e-12)
    x = torch.randn(3, n, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(t.apply_t(t.apply(x)), x, atol=1e-12)
    assert torch.allclose(t.apply(x), x @ m, atol=1e-12)
    assert torch.allclose(t.apply_t(x), x @ m.T, atol=1e-12)


def test_randomized_transform_is_deterministic_from_the_seed_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = orthogonal_transform(300, seed=5).matrix()
    b = orthogonal_transform(300, seed=5).matrix()
    c = orthogonal_transform(300, seed=6).matrix()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_randomized_hadamard_signs_are_plus_minus_one_and_the_matrix_is_signed_hadamard():
    t = orthogonal_transform(48, seed=3)
    assert set(t.signs.tolist()) == {-1.0, 1.0}
    assert torch.allclose(t.matrix(), torch.diag(t.signs) @ hadamard_matrix(48), atol=1e-14)


def test_hadamard_transform_functions():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 20, generator=g, dtype=F64)
    assert torch.allclose(hadamard_transform(x), x @ hadamard_matrix(20), atol=1e-12)
    assert torch.allclose(hadamard_transform(hadamard_transform(x), inverse=True), x, atol=1e-12)
    y = randomized_hadamard_transform(x, seed=9)
    assert torch.allclose(torch.linalg.vector_norm(y, dim=1), torch.linalg.vector_norm(x, dim=1), atol=1e-12)
    assert torch.allclose(randomized_hadamard_transform(y, seed=9, inverse=True), x, atol=1e-12)
    assert not torch.allclose(randomized_hadamard_transform(x, seed=10), y)


def test_hadamard_spreads_an_outlier_coordinate():
    x = torch.zeros(1, 4096, dtype=F64)
    x[0, 17] = 1.0
    y = randomized_hadamard_transform(x, seed=0)
    assert torch.allclose(y.abs(), torch.full_like(y, 1 / 64))


def test_random_orthogonal_is_haar_like_and_seeded():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    q1, q2 = random_orthogonal(30, generator=g1), random_orthogonal(30, generator=g2)
    assert torch.equal(q1, q2) and _is_orthonormal(q1)
    # The sign fix makes diag(R) positive: the factor is not biased towards the identity.
    assert abs(float(torch.diagonal(q1).mean())) < 0.3


def test_kronecker_orthogonal_reports_its_structure():
    t = orthogonal_transform(1024, seed=0)
    assert isinstance(t, KroneckerOrthogonal) and t.n == 1024 and t.is_sylvester
    assert not orthogonal_transform(12, seed=0).is_sylvester
    assert "[32, 32]" in repr(t)


@pytest.mark.parametrize("g", [4, 16, 64, 256, 1024])
def test_regular_hadamard_equals_comfy_kitchens_matrix(g):
    int8_utils = pytest.importorskip("comfy_kitchen.tensor.int8_utils")
    ck = int8_utils._build_hadamard(g, dtype=F64)
    h = regular_hadamard(g)
    assert torch.allclose(h, ck, atol=1e-15)
    assert torch.equal(h, h.T) and _is_orthonormal(h)
    fs = regular_hadamard_factors(g)
    assert max(f.shape[0] for f in fs) <= 64
    dense = fs[0]
    for f in fs[1:]:
        dense = torch.kron(dense, f)
    assert torch.allclose(dense, h, atol=1e-15)


@pytest.mark.parametrize("g", [2, 8, 32, 128, 0, True])
def test_regular_hadamard_needs_a_power_of_four(g):
    with pytest.raises(ConfigError, match="power of 4"):
        regular_hadamard(g)


def test_float32_application_error_is_tiny_at_real_sizes():
    x = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0))
    t = orthogonal_transform(4096, seed=1)
    y = t.apply(x)
    ref = t.apply(x.to(F64))
    # 4096 = 64 ⊗ 64 (Sylvester, ±1/8 entries: exact in float32): 128 accumulated roundings per output.
    # The worst case γ_128·Σ|x||M| ≈ 4e-4 assumes every rounding error aligned; the probabilistic
    # γ̃_128(λ=8) ≈ 5.4e-6 relative to Σ|x||M| (≈ 51 here) holds in any summation order with
    # probability ≥ 1 − 1e-8 per output (tests.float_bounds.gamma_prob): ~2.8e-4 absolute, against
    # outputs of size ~1 that a wrong factor, sign or bf16 computation would move by ≥ 1e-2.
    abs_m = t.matrix().abs()
    n_eff = sum(f.shape[0] + 1 for f in t.factors)
    e1 = y.to(F64) - ref
    assert bool((e1.abs() <= gamma_prob(n_eff) * (x.to(F64).abs() @ abs_m)).all())
    # Round trip: apply_t(y) − x = (fl(y·Mᵀ) − y·Mᵀ) + e1·Mᵀ exactly (M orthogonal): the forward error
    # carried through Mᵀ plus the back transform's own rounding, bounded as above.
    back = t.apply_t(y).to(F64) - x.to(F64)
    assert bool(((back - e1 @ t.matrix().T).abs() <= gamma_prob(n_eff) * (y.to(F64).abs() @ abs_m.T)).all())
