"""quadratic_forms' float32 path (lower-triangle panels) against a float64 oracle."""

from __future__ import annotations

import pytest
import torch

import cq.transforms.hessian as hessian
from cq.transforms.hessian import _symmetric_row_forms, quadratic_forms


@pytest.mark.parametrize("k", [1, 7, 600, 1100])
def test_row_forms_equal_the_full_product(k, monkeypatch):
    monkeypatch.setattr(hessian, "_FORM_PANEL", 256)  # several panels, a ragged last one
    g = torch.Generator().manual_seed(k)
    a = torch.randn(40, k, generator=g)
    x = torch.randn(2 * k + 3, k, generator=g)
    h = x.t() @ x / x.shape[0]  # float32 rounding leaves it very slightly asymmetric, as real Hessians
    want = ((a.double() @ h.double()) * a.double()).sum(1)
    got = _symmetric_row_forms(a, h)
    # float32 products of K terms: ≤ ~K·2⁻²⁴ relative to Σ|a_i||H||a_j| (≈ the form here, H is PSD
    # and well conditioned), plus the asymmetry of h (same order): 1e-4 is a safe bound for K ≤ 1100
    assert torch.allclose(got, want, rtol=1e-4, atol=0)


def test_float32_path_is_taken_for_big_problems_and_agrees():
    g = torch.Generator().manual_seed(0)
    k = 1100
    a = torch.randn(1800, k, generator=g)  # 1800·k² > 2³¹: the float32 branch
    x = torch.randn(1200, k, generator=g)
    h = x.t() @ x / 1200
    (got,) = quadratic_forms([a], h)
    want = float(((a.double() @ h.double()) * a.double()).sum())
    assert got == pytest.approx(want, rel=1e-5)
