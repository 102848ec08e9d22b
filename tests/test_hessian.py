"""Tests for cq.transforms.hessian: damping, dead columns, robust Cholesky, LDL pieces, predictions."""

import math

import pytest
import torch

from cq.errors import ConfigError, InputError
from cq.transforms.hessian import (
    DampingConfig,
    actorder_permutation,
    hessian_problem,
    inverse_cholesky_upper,
    ldl_diagonal,
    ldl_from_reversed_cholesky,
    predicted_rel_out,
    prepare_hessian,
    quadratic_forms,
    robust_cholesky,
    working_dtype,
)


def spd(k, seed, t=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t or 4 * k, k, generator=g, dtype=dtype) @ torch.randn(k, k, generator=g, dtype=dtype)
    return 2.0 / x.shape[0] * x.T @ x


@pytest.mark.parametrize("kwargs", [dict(percdamp=-0.1), dict(percdamp=float("nan")), dict(max_tries=-1),
                                    dict(max_tries=1.5), dict(growth=1.0), dict(growth=float("inf")),
                                    dict(dead_columns="drop")])
def test_damping_config_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        DampingConfig(**kwargs)


def test_prepare_hessian_damps_relative_to_live_diagonal_and_keeps_inputs():
    h = spd(6, 0)
    h[2, :] = 0
    h[:, 2] = 0
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    h0, w0 = h.clone(), w.clone()
    p = prepare_hessian(h, w, DampingConfig(percdamp=0.05))
    live = torch.tensor([i != 2 for i in range(6)])
    base = float(h.diagonal()[live].mean())
    assert p.dead.tolist() == [False, False, True, False, False, False]
    assert math.isclose(p.base, base) and math.isclose(p.damp, 0.05 * base)
    expected = h.clone()
    expected[2, 2] = 1.0
    expected += 0.05 * base * torch.eye(6, dtype=torch.float64)
    assert torch.allclose(p.hessian, expected)
    assert torch.equal(p.weight, w)  # "round": weights kept
    assert torch.equal(h, h0) and torch.equal(w, w0)
    assert any("dead" in n for n in p.notes)


def test_prepare_hessian_zero_mode_zeros_dead_weight_columns_on_a_copy():
    h = torch.diag(torch.tensor([1.0, 0.0, 2.0]))
    w = torch.ones(2, 3)
    p = prepare_hessian(h, w, DampingConfig(dead_columns="zero"))
    assert p.weight[:, 1].eq(0).all() and p.weight[:, [0, 2]].eq(1).all()
    assert w.eq(1).all()


def test_prepare_hessian_rejects_wrong_shape_and_non_finite():
    with pytest.raises(InputError, match="must be \\[3, 3\\]"):
        prepare_hessian(torch.eye(4), torch.ones(2, 3), name="blk.fc")
    bad = torch.eye(3)
    bad[0, 1] = float("inf")
    assert hessian_problem(bad, 3) == "Hessian has 1 non-finite entries"
    with pytest.raises(InputError, match="blk.fc: Hessian has 1 non-finite"):
        prepare_hessian(bad, torch.ones(2, 3), name="blk.fc")


def test_robust_cholesky_first_try_on_positive_definite():
    h = spd(8, 2)
    r = robust_cholesky(h)
    assert r.ok and r.tries == 1 and r.notes == ()
    assert torch.allclose(r.lower @ r.lower.T, h)


@pytest.mark.parametrize("case", ["indefinite", "singular", "rank_deficient", "zero", "negative"])
def test_robust_cholesky_recovers_by_damping(case):
    k = 10
    if case == "indefinite":
        h = spd(k, 3) - 2.0 * torch.eye(k, dtype=torch.float64) * spd(k, 3).diagonal().mean()
    elif case == "singular":
        h = torch.ones(k, k, dtype=torch.float64)
    elif case == "rank_deficient":
        h = spd(k, 4, t=3)
    elif case == "zero":
        h = torch.zeros(k, k, dtype=torch.float64)
    else:
        h = -spd(k, 5)
    r = robust_cholesky(h)
    assert r.ok, r.notes
    assert r.tries > 1 and r.damp > 0 and "Cholesky failed" in r.notes[0]
    extra = r.damp * torch.eye(k, dtype=torch.float64)
    assert torch.allclose(r.lower @ r.lower.T, h + extra, atol=1e-9 * max(1.0, r.damp))


def test_robust_cholesky_gives_up_without_raising():
    h = -spd(6, 6)
    r = robust_cholesky(h, DampingConfig(max_tries=1))
    assert not r.ok and r.tries == 2 and "failed after 2 tries" in r.notes[-1]
    nan = torch.full((3, 3), float("nan"), dtype=torch.float64)
    r = robust_cholesky(nan)
    assert not r.ok and r.tries == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_inverse_cholesky_upper_matches_textbook(seed):
    h = spd(32, seed) + 0.01 * torch.eye(32, dtype=torch.float64)
    textbook = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    u = inverse_cholesky_upper(torch.linalg.cholesky(h.flip(0, 1)))
    assert torch.allclose(u, textbook, rtol=1e-9, atol=1e-9 * float(textbook.abs().max()))


def test_ldl_pieces_reconstruct_h_and_match_gptq_diagonal():
    h = spd(24, 7) + 0.01 * torch.eye(24, dtype=torch.float64)
    c = torch.linalg.cholesky(h.flip(0, 1))
    m, d = ldl_from_reversed_cholesky(c)
    assert torch.allclose(m.T @ torch.diag(d) @ m, h)
    assert torch.equal(m.diagonal(), torch.ones(24, dtype=torch.float64)) and m.triu(1).eq(0).all()
    u = inverse_cholesky_upper(c)
    assert torch.allclose(d, 1.0 / u.diagonal() ** 2)
    assert torch.allclose(ldl_diagonal(h), d)
    assert float(d.sum()) <= float(h.diagonal().sum())
    with pytest.raises(InputError, match="positive definite"):
        ldl_diagonal(-h)


def test_actorder_permutation_is_stable_descending():
    h = torch.diag(torch.tensor([2.0, 5.0, 2.0, 0.0, 5.0]))
    assert actorder_permutation(h).tolist() == [1, 4, 0, 2, 3]


def test_quadratic_forms_match_float64_reference_in_both_paths():
    g = torch.Generator().manual_seed(8)
    h = spd(16, 8).to(torch.float32)
    a, b = torch.randn(5, 16, generator=g), torch.randn(3, 16, generator=g)
    ref = [float(torch.trace(m.double() @ h.double() @ m.double().T)) for m in (a, b)]
    got = quadratic_forms([a, b], h)
    assert all(math.isclose(x, y, rel_tol=1e-9) for x, y in zip(got, ref))
    assert quadratic_forms([a], None)[0] == pytest.approx(float((a.double() ** 2).sum()), rel=1e-12)
    # the float32 GEMM path (large problems) stays within 1e-5 relative
    big = torch.randn(512, 1024, generator=g)
    hb = spd(1024, 9, t=1100).to(torch.float32)
    ref_big = float(((big.double() @ hb.double()) * big.double()).sum())
    assert quadratic_forms([big, big, big, big], hb)[0] == pytest.approx(ref_big, rel=1e-5)


def test_predicted_rel_out_formula_for_each_scale_layout():
    g = torch.Generator().manual_seed(10)
    w = torch.randn(4, 6, generator=g)
    h = spd(6, 10)
    d = torch.rand(6, generator=g, dtype=torch.float64)
    sig = float(torch.trace(w.double() @ h @ w.double().T))
    rows = torch.rand(4, 1, generator=g) + 0.1
    full = torch.rand(4, 6, generator=g) + 0.1
    one = torch.tensor(0.3)
    for scale, noise in ((rows, float((rows.double() ** 2).sum() * d.sum())),
                         (full, float((full.double() ** 2 * d).sum())),
                         (one, 0.09 * 4 * float(d.sum()))):
        expected = math.sqrt(noise / 12 / sig)
        assert predicted_rel_out(scale, d, w, h) == pytest.approx(expected, rel=1e-6)
        assert predicted_rel_out(scale, d, w, signal=sig) == pytest.approx(expected, rel=1e-6)


def test_working_dtype():
    assert working_dtype("float32", 8) is torch.float32
    assert working_dtype("float64", 8192, 8192) is torch.float64
    assert working_dtype("auto", 4096, 4096) is torch.float32
    with pytest.raises(ConfigError):
        working_dtype("half", 8)
