"""``quantize_rows``: every backend equals the unfused recipe (absmax_scale + quantize_int8) bit for bit,
and its error sums equal a float64 recomputation.

Sum tolerance: the per-row sums add K float32 squares (the torch path: ``vector_norm`` then squared)
or float64 ones (numba) in a blocked or reassociated order, and each error term ``w − ŵ`` is exact
(Sterbenz: ``ŵ`` is 0 or within a factor 2 of ``w``). Any order of K nonnegative terms is within
``γ_{K+2}`` relative (:func:`tests.float_bounds.sum_sq_rel`; 1.8e-5 at K = 300), which is the
tolerance; the float64 recomputation's own error (≤ K·2⁻⁵³) is negligible next to it.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from cq.errors import UnsupportedBackendError
from cq.kernels import implementations, quantize_int8_ref, quantize_rows, row_metrics
from cq.state import PerRow
from cq.transforms.metrics import weight_metrics
from cq.transforms.scales import compute_scale
from tests.float_bounds import db_gap, sum_sq_rel

IMPLS = [pytest.param(impl, id=impl.name) for impl in implementations("quantize_rows")]
SHAPES = [(1, 1), (3, 5), (17, 33), (300, 130)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _f64_sums(w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor):
    w64 = w.double()
    e = w64 - (codes.float() * scale).double()  # ŵ is float32(code · scale), as ComfyUI dequantizes
    return (w64 ** 2).sum(1), (e ** 2).sum(1), e.abs().amax(1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_matches_unfused_recipe(impl, dtype, shape, layout, awkward, skip_unless_supported):
    seed = zlib.crc32(f"{shape}{dtype}{layout}".encode())
    w = awkward(shape, dtype=dtype, seed=seed, layout=layout, extreme=False)
    skip_unless_supported(impl, w)
    before = w.clone()
    r = impl.fn(w)
    assert torch.equal(w, before)  # inputs are never written
    scale = compute_scale(w, PerRow())
    assert r.codes.dtype == torch.int8 and r.scale.dtype == torch.float32
    assert torch.equal(r.scale, scale)
    assert torch.equal(r.codes, quantize_int8_ref(w, scale))
    sq_w, sq_e, mx = _f64_sums(w, r.codes, r.scale)
    rel = sum_sq_rel(shape[1])  # see the module docstring; abs covers the all-zero row
    assert r.sq_w.tolist() == pytest.approx(sq_w.tolist(), rel=rel, abs=1e-30)
    assert r.sq_err.tolist() == pytest.approx(sq_e.tolist(), rel=rel, abs=1e-30)
    # the error of each element is one float32 subtraction of float32 values: exact maxima agree
    assert torch.equal(r.max_err, mx)


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_round_half_even(impl, ties, skip_unless_supported):
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(1))
    w[:, 0] = 127 * 2.0 ** -6  # pins the row scale to 2^-6 (exact), so ties are exact half-steps
    w = ties(w, torch.tensor(2.0 ** -6), seed=2, lo=-127, hi=126)
    w[:, 0] = 127 * 2.0 ** -6
    skip_unless_supported(impl, w)
    assert torch.equal(impl.fn(w).codes, quantize_int8_ref(w, compute_scale(w, PerRow())))


@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_rows_give_non_finite_scales(impl, skip_unless_supported):
    w = torch.randn(4, 8, dtype=torch.bfloat16)
    w[1, 3] = float("nan")
    w[2, 5] = float("inf")
    skip_unless_supported(impl, w)
    s = impl.fn(w).scale.flatten()
    assert torch.isnan(s[1]) and torch.isinf(s[2]) and torch.isfinite(s[[0, 3]]).all()


def test_row_metrics_equal_weight_metrics():
    w = torch.randn(33, 70, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    r = quantize_rows(w)
    m = row_metrics(r, w.numel())
    ref = weight_metrics(w.float(), r.codes.float() * r.scale)
    # weight_metrics: one float32 vector_norm over all N·K squares (≤ γ_{NK+2}); row_metrics: per-row
    # sums (≤ γ_{K+2}) added in float64. SQNR moves by ≤ 10/ln10 times the two relative errors.
    rel = sum_sq_rel(w.numel()) + sum_sq_rel(w.shape[1])  # 2310 + 70 terms: 1.4e-4
    assert m["mse"] == pytest.approx(ref["mse"], rel=rel)
    assert m["sqnr_db"] == pytest.approx(ref["sqnr_db"], abs=db_gap(rel, rel))
    assert m["max_error"] == ref["max_error"]


def test_zero_weight_and_empty_rows():
    r = quantize_rows(torch.zeros(3, 4, dtype=torch.bfloat16))
    assert r.codes.eq(0).all() and r.scale.eq(torch.tensor(1e-30)).all()
    assert row_metrics(r, 12) == {"mse": 0.0, "sqnr_db": float("inf"), "max_error": 0.0}
    e = quantize_rows(torch.zeros(2, 0))
    assert e.codes.shape == (2, 0) and e.scale.shape == (2, 1)


def test_explicit_backend_lists_reasons():
    import importlib.util

    why = "float64" if importlib.util.find_spec("numba") else "not installed"
    with pytest.raises(UnsupportedBackendError, match=why):
        quantize_rows(torch.ones(2, 2, dtype=torch.float64), backend="numba")
    with pytest.raises(UnsupportedBackendError, match="2-D"):
        quantize_rows(torch.ones(2, 2, 2), backend="torch")


@pytest.mark.parametrize("impl", IMPLS)
def test_same_bytes_for_any_thread_count(impl, skip_unless_supported):
    w = torch.randn(700, 96, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    skip_unless_supported(impl, w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = impl.fn(w)
        torch.set_num_threads(3)
        three = impl.fn(w)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, three):
        assert torch.equal(a, b)
