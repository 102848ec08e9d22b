"""The report's importance-sampled output and W8A8 errors (cq.transforms.metrics._sampled_output_metrics)
against a float64 evaluation of the same estimator, and the shared per-width report inputs.

Bound (worst case, any summation order / BLAS / thread count; see tests/float_bounds.py): the code
forms ``e = fl(w − fl(c·s))`` and float32 dot products, so per element

    |fl(x·e) − x·e| ≤ γ_K·Σ|x||ê| + u(1+u)·Σ|x||c·s| + u·Σ|x||e|          (D_err)
    |fl(x·w) − x·w| ≤ γ_K·Σ|x||w|                                         (D_ref)
    |ŷ − y|        ≤ γ_3·|y|   (int32 → float32, ·s_x, ·s_w; the int8 product itself is exact)

and the weighted root-sum-squares move by at most their weighted norms (triangle inequality), plus
a few roundings in squaring and weighting (γ_4). The estimator's own sampling error is a separate
matter (tests/test_runner.py: within 10 % of the exact figure).
"""

from __future__ import annotations

import math

import pytest
import torch

from cq.kernels.reference import quantize_activations_ref
from cq.recipes import metrics_inputs
from cq.state import LayerState
from cq.transforms import MetricsConfig, measure
from cq.transforms import metrics as M
from cq.transforms.fused import fused_rtn

from float_bounds import U32, abs_product, gamma

F64 = torch.float64


def _layer(n: int, k: int, dtype: torch.dtype, seed: int) -> LayerState:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02 * torch.randn(n, 1, generator=g).exp()  # uneven row norms
    w[::37] *= 6  # rows that carry most of the error: the sampler must weight them right
    return fused_rtn(LayerState.from_weight(f"blocks.{seed}.fc", w.to(dtype)))


def _wnorm(t: torch.Tensor, wt: torch.Tensor) -> float:
    return math.sqrt(float((t.square() * wt).sum()))


def _exact_and_bound(state: LayerState, x: torch.Tensor, m: int | None):
    """The estimator in float64 on the same rows (``m=None``: every row, weight 1), and the
    worst-case gap of the float32 code."""
    if m is None:
        idx, wt = torch.arange(state.shape[0]), torch.ones(state.shape[0], dtype=F64)
    else:
        idx, wt = M._importance_sample(state, m)
    w = state.weight.index_select(0, idx).to(F64)
    c = state.codes.index_select(0, idx).to(F64)
    s = state.scale.index_select(0, idx).to(F64)
    cs = c * s
    e = w - cs
    x64 = x.to(F64)
    ref, err = x64 @ w.t(), x64 @ e.t()
    qx, sx = quantize_activations_ref(x)  # the runtime's activation codes: part of the definition
    y = (qx.to(F64) @ c.t()) * sx.to(F64) * s.reshape(1, -1)
    k = x.shape[1]
    d_ref = gamma(k) * abs_product(x, w)
    d_err = gamma(k) * abs_product(x, e.abs() + U32 * cs.abs()) + U32 * (1 + U32) * abs_product(x, cs) \
        + U32 * abs_product(x, e)
    d_y = gamma(3) * y.abs() + d_ref
    sig = _wnorm(ref, wt)
    exact = {"rel_out_x": _wnorm(err, wt) / sig, "w8a8": _wnorm(y - ref, wt) / sig}
    rel_sig = _wnorm(d_ref, wt) / sig + gamma(4)
    bound = {"rel_out_x": _wnorm(d_err, wt) / _wnorm(err, wt) + rel_sig + gamma(4),
             "w8a8": _wnorm(d_y, wt) / _wnorm(y - ref, wt) + rel_sig + gamma(4)}
    return exact, bound


@pytest.mark.parametrize("n,k,dtype,m", [(2100, 96, torch.bfloat16, 512), (1500, 200, torch.float32, 300),
                                         (900, 64, torch.float16, 128), (700, 33, torch.bfloat16, 129)])
def test_sampled_report_equals_its_float64_evaluation_within_the_rounding_bound(n, k, dtype, m):
    state = _layer(n, k, dtype, seed=n)
    x = torch.randn(64, k, generator=torch.Generator().manual_seed(k))
    got = M._sampled_output_metrics(state, state.weight, x, m, "auto")
    exact, bound = _exact_and_bound(state, x, m)
    assert got["output_rows"] == m
    for key in ("rel_out_x", "w8a8"):
        assert abs(got[key] / exact[key] - 1) <= bound[key], (key, got[key], exact[key], bound[key])
        # worst case ≤ 4e-4 (rel_out_x), ≤ 1.2e-2 (w8a8: γ_K·Σ|x||w| against the small y − ref);
        # measured ≤ 1e-6 for both
        assert bound[key] < 0.02


def test_sampled_report_is_the_same_on_one_and_two_threads_and_when_repeated():
    state = _layer(2100, 128, torch.bfloat16, seed=3)
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = M._sampled_output_metrics(state, state.weight, x, 512, "auto")
        torch.set_num_threads(2)
        two = M._sampled_output_metrics(state, state.weight, x, 512, "auto")
        again = M._sampled_output_metrics(state, state.weight, x, 512, "auto")
    finally:
        torch.set_num_threads(threads)
    assert one == two == again
    assert torch.get_num_threads() == threads


def test_measure_takes_the_sampled_path_for_big_fused_layers_and_keeps_weight_metrics_exact():
    state = _layer(2100, 64, torch.bfloat16, seed=5)
    x = metrics_inputs(state, 64, 0)
    m = measure(state, cfg=MetricsConfig(x=x, sample_rows=512)).metrics
    assert m["output_rows"] == 512
    keys = ("mse", "sqnr_db", "max_error")
    assert {k: m[k] for k in keys} == {k: state.metrics[k] for k in keys}


def test_report_inputs_without_a_hessian_are_one_gaussian_draw_per_width_and_seed():
    a = LayerState.from_weight("blocks.0.attn.q", torch.randn(8, 48))
    b = LayerState.from_weight("blocks.7.mlp.fc1", torch.randn(3, 48))
    x = metrics_inputs(a, 16, 5)
    assert x is metrics_inputs(b, 16, 5)  # shared: drawn (and its int8 codes formed) once per width
    g = torch.Generator().manual_seed((5 * 1_000_003 + 7_919 * 48) % 2**63)
    assert torch.equal(x, torch.randn(16, 48, generator=g))  # a documented function of (seed, K)
    assert not torch.equal(x, metrics_inputs(a, 16, 6))
    assert metrics_inputs(LayerState.from_weight("c", torch.randn(2, 40)), 16, 5).shape == (16, 40)
    assert metrics_inputs(a, 0, 5) is None


def test_report_inputs_with_a_hessian_stay_per_layer():
    h = torch.eye(16, dtype=F64) * 2
    a = metrics_inputs(LayerState.from_weight("a", torch.randn(4, 16), hessian=h), 8, 0)
    b = metrics_inputs(LayerState.from_weight("b", torch.randn(4, 16), hessian=h), 8, 0)
    assert not torch.equal(a, b) and torch.isfinite(a).all()


def test_cached_token_codes_follow_in_place_edits_of_the_inputs():
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    q1, s1 = M._token_codes(x)
    assert M._token_codes(x)[0] is q1  # cached
    x.mul_(3.0)
    q2, s2 = M._token_codes(x)
    ref_q, ref_s = quantize_activations_ref(x)
    assert torch.equal(q2, ref_q) and torch.equal(s2, ref_s)


def test_measure_without_inputs_reuses_the_fused_weight_metrics():
    """No second sweep over the weight when the fused stage already formed the exact sums."""
    state = _layer(300, 40, torch.bfloat16, seed=7)
    got = measure(state).metrics
    assert got == {k: state.metrics[k] for k in ("mse", "sqnr_db", "max_error")}
    w = state.weight.to(F64)
    e = w - state.codes.to(F64) * state.scale.to(F64)
    # the kernel forms e = fl(w − fl(c·s)) in float32: off by ≤ u·(|c·s| + |e|) ≤ 2u·max|w| per element
    tol = 2 * U32 * float(w.abs().max())
    assert abs(got["max_error"] - float(e.abs().max())) <= tol
    assert abs(math.sqrt(got["mse"]) - float(e.square().mean().sqrt())) <= tol


@pytest.mark.parametrize("n,k,dtype", [(300, 40, torch.bfloat16), (1200, 96, torch.float32), (64, 1, torch.float16)])
def test_output_errors_of_small_fused_layers_are_exact_over_every_row(n, k, dtype):
    """Layers of ≤ 4·sample_rows rows: every row, the same chunked float32 products, float64 sums."""
    state = _layer(n, k, dtype, seed=n + k)
    x = torch.randn(64, k, generator=torch.Generator().manual_seed(k))
    got = measure(state, cfg=MetricsConfig(x=x, sample_rows=512)).metrics
    assert "output_rows" not in got
    exact, bound = _exact_and_bound(state, x, None)
    for key in ("rel_out_x", "w8a8"):
        assert abs(got[key] / exact[key] - 1) <= bound[key], (key, got[key], exact[key], bound[key])
