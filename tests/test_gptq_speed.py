"""GPTQ/LDLQ speed work (issue 10, item 3) changes no result: one factorization, the fed-back loss, the loop.

* A healthy layer is factored once (no separate definiteness Cholesky); a bad Hessian is still
  judged and rounded to nearest, also when extra damping would hide it.
* Big layers' achieved loss ``tr(E H Eᵀ)`` comes from the solver's fed-back values
  (``Σ d_i ‖η_i‖² − damp·‖E‖²``, :func:`cq.transforms.hessian._fed_back_loss`) instead of an
  ``[N, K] × [K, K]`` product. Bound, checked against a float64 evaluation of the stored codes:
  relative error of ``rel_out_h`` ≤ 1e-4. Where it comes from: every quantity is an IEEE float32
  result (``η`` is the solver's own float32 sum of ≤ K feedback terms, ``d`` the float32 Cholesky
  pivots), so the error is ~√K·u·(‖W‖/‖E‖) ≈ 16·6e-8·100 ≈ 1e-4 in the worst growth seen; measured
  ≤ 4e-7 from 64×256 to 4096² (llm-like W, outlier channels). No BLAS-order dependence beyond that.
* The per-column loop gives the same bits as the plain loop it replaced.
"""

from __future__ import annotations

import math

import pytest
import torch

import cq.transforms.hessian as hessian
from cq.kernels import quantize_int8
from cq.state import LayerState, PerGroup, PerRow
from cq.transforms import ScaleConfig, absmax_scale, round_to_nearest
from cq.transforms.gptq import GPTQConfig, gptq_update
from cq.transforms.hessian import DampingConfig, _all_finite, feedback_columns, quadratic_forms
from cq.transforms.ldlq import LDLQConfig, ldlq
from cq.transforms.scales import expand_scale


def _problem(n, k, seed, dead=0):
    """llm-like-ish W [n, k] and H = 2/T·XᵀX (correlated X, outlier channels), ``dead`` zero inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * k, k, generator=g, dtype=torch.float64) @ torch.randn(k, k, generator=g, dtype=torch.float64)
    x[:, torch.randperm(k, generator=g)[:3]] *= 20
    x[:, :dead] = 0
    h = (2.0 / (2 * k)) * x.T @ x
    w = torch.randn(n, k, generator=g) * torch.exp(0.25 * torch.randn(n, 1, generator=g))
    return w, h.to(torch.float32)


def _exact_rel(state, codes):
    """rel-out of the stored codes on the undamped H, float64 throughout (the oracle)."""
    s = expand_scale(state.scale, state.granularity, tuple(state.shape)).to(torch.float32)
    e = state.weight.double() - (codes.to(torch.float32) * s).double()
    w, h = state.weight.double(), state.hessian.double()
    return math.sqrt(float(((e @ h) * e).sum()) / float(((w @ h) * w).sum()))


@pytest.mark.parametrize("method", ["gptq", "ldlq"])
@pytest.mark.parametrize("actorder", [False, True])
@pytest.mark.parametrize("granularity,dead,dead_mode", [(PerRow(), 0, "round"), (PerGroup(32), 5, "round"),
                                                         (PerRow(), 5, "zero")])
def test_fed_back_loss_matches_float64_quadratic_form(monkeypatch, method, actorder, granularity, dead, dead_mode):
    monkeypatch.setattr(hessian, "EXACT_LOSS_WORK", 0)  # small layer, big-layer path
    used = []
    real = hessian._fed_back_loss
    monkeypatch.setattr(hessian, "_fed_back_loss", lambda *a: used.append(1) or real(*a))
    w, h = _problem(48, 256, seed=7 + dead)
    state = absmax_scale(LayerState.from_weight("fc", w, hessian=h), cfg=ScaleConfig(granularity))
    damping = DampingConfig(dead_columns=dead_mode)
    if method == "gptq":
        out = gptq_update(state, cfg=GPTQConfig(actorder=actorder, precision="float32", damping=damping))
    else:
        out = ldlq(state, cfg=LDLQConfig(actorder=actorder, precision="float32", damping=damping))
    m = out.metrics
    assert used, "the fed-back loss was not used"
    assert m["rel_out_h"] ** 2 < (1 - hessian.FED_BACK_MARGIN) * m["rel_out_rtn_h"] ** 2  # not a near tie
    exact = _exact_rel(state, out.codes)
    assert abs(m["rel_out_h"] / exact - 1) <= 1e-4


def test_near_tie_is_decided_on_the_exact_quadratic_form(monkeypatch):
    monkeypatch.setattr(hessian, "EXACT_LOSS_WORK", 0)
    monkeypatch.setattr(hessian, "FED_BACK_MARGIN", 1.0)  # every call is "near": the exact form decides
    w, h = _problem(32, 128, seed=3)
    state = absmax_scale(LayerState.from_weight("fc", w, hessian=h), cfg=ScaleConfig(PerRow()))
    out = ldlq(state, cfg=LDLQConfig(precision="float32"))
    e = w - out.codes.to(torch.float32) * state.scale
    e_rtn = w - round_to_nearest(state).codes.to(torch.float32) * state.scale
    sig = quadratic_forms([w, e_rtn], h)[0]
    assert out.metrics["rel_out_h"] == math.sqrt(quadratic_forms([e], h)[0] / sig)


@pytest.mark.parametrize("stage", [gptq_update, ldlq])
def test_a_healthy_layer_is_factored_once(monkeypatch, stage):
    calls = []
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    w, h = _problem(16, 64, seed=1)
    out = stage(absmax_scale(LayerState.from_weight("fc", w, hessian=h)))
    assert len(calls) == 1
    assert out.metrics["cholesky_tries"] == 1


def _indefinite(k, index, value, g):
    """A symmetric float32 ``[k, k]`` with eigenvalues 1 except ``value`` (negative) at ``index``, random eigenvectors."""
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    lam = torch.ones(k, dtype=torch.float64)
    lam[index] = value
    return ((q * lam) @ q.T).to(torch.float32)


@pytest.mark.parametrize("percdamp", [0.01, 0.2])
def test_an_indefinite_hessian_is_still_judged_and_rounded_to_nearest(percdamp):
    # Eigenvalue −0.05 (mean diagonal ~0.93): percdamp 0.2 factors it at the first try, yet it is no
    # Gram matrix, so it must be rejected as before (the test damps with 0.01 only).
    g = torch.Generator().manual_seed(0)
    h = _indefinite(16, 5, -0.05, g)
    state = absmax_scale(LayerState.from_weight("fc", torch.randn(8, 16, generator=g), hessian=h))
    out = gptq_update(state, cfg=GPTQConfig(damping=DampingConfig(percdamp=percdamp)))
    assert any("indefinite" in n and n.startswith("warning:") for n in out.notes)
    assert torch.equal(out.codes, round_to_nearest(state).codes)


@pytest.mark.parametrize("t", [
    torch.full((4, 4), 3e38),  # finite entries whose float32 sum overflows
    torch.tensor([1.0, float("nan")]),
    torch.tensor([float("inf"), -float("inf")]),  # the sum is NaN, not ±Inf
    torch.tensor([1e308, 1e308], dtype=torch.float64),
    torch.tensor([60000.0, 60000.0], dtype=torch.float16),
    torch.randn(5, 5, dtype=torch.bfloat16),
])
def test_all_finite_agrees_with_the_elementwise_test(t):
    assert _all_finite(t) == bool(torch.isfinite(t).all())


def _plain_loop(wt, s32, coef, block_size, inner, divide=None, targets=None):
    """The loop feedback_columns had before (slices per use, codes row by row): the bit oracle."""
    k, n = wt.shape
    codes = torch.empty((k, n), dtype=torch.int8)
    per_column = s32.shape[0] > 1
    sw = s32.to(wt.dtype)
    err = torch.empty((min(block_size, k), n), dtype=wt.dtype)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        for j1 in range(i1, i2, inner):
            j2 = min(j1 + inner, i2)
            for i in range(j1, j2):
                row = i if per_column else 0
                q = quantize_int8(wt[i], s32[row])
                codes[i].copy_(q)
                w_hat = q.to(wt.dtype).mul_(sw[row])
                e = err[i - i1]
                if targets is not None:
                    torch.sub(targets[i], w_hat, out=e)
                else:
                    torch.sub(wt[i], w_hat, out=e)
                    e.div_(divide[i])
                if i + 1 < j2:
                    wt[i + 1:j2].addr_(coef[i, i + 1:j2], e, alpha=-1)
            if j2 < i2:
                wt[j2:i2].addmm_(coef[j1:j2, j2:i2].t(), err[j1 - i1:j2 - i1], alpha=-1)
        if i2 < k:
            wt[i2:].addmm_(coef[i1:i2, i2:].t(), err[:i2 - i1], alpha=-1)
    return codes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("form", ["ldlq", "gptq"])
@pytest.mark.parametrize("per_column", [False, True])
def test_feedback_columns_gives_the_plain_loops_bits(dtype, form, per_column):
    g = torch.Generator().manual_seed(11)
    k, n = 37, 19
    wt = torch.randn(k, n, generator=g, dtype=torch.float64).to(dtype)
    coef = (0.3 * torch.randn(k, k, generator=g, dtype=torch.float64)).to(dtype).triu(1)
    s32 = (0.02 + 0.01 * torch.rand(k if per_column else 1, n, generator=g))
    kw = {"targets": wt.clone()} if form == "ldlq" else {"divide": (1 + torch.rand(k, generator=g)).to(dtype)}
    a, b = wt.clone(), wt.clone()
    got = feedback_columns(a, s32, coef, block_size=8, inner=4, **kw)
    want = _plain_loop(b, s32, coef, 8, 4, **kw)
    assert torch.equal(got, want) and torch.equal(a, b)


def test_check_without_factorization_leaves_the_verdict_to_the_solver():
    from cq.errors import ConfigError
    from cq.transforms import HessianCheckConfig, check_hessian

    g = torch.Generator().manual_seed(2)
    bad = _indefinite(12, 3, -0.5, g)
    state = absmax_scale(LayerState.from_weight("fc", torch.randn(6, 12, generator=g), hessian=bad))
    assert check_hessian(state).hessian is None  # the full check drops it
    passed = check_hessian(state, cfg=HessianCheckConfig(definite=False))
    assert passed.hessian is bad
    out = gptq_update(passed)  # ... and the solver judges it: RTN, with the reason
    assert torch.equal(out.codes, round_to_nearest(state).codes)
    assert any(n.startswith("warning: Hessian is indefinite") for n in out.notes)
    stray = torch.eye(12)
    stray[0, 0] = 0
    stray[0, 1] = stray[1, 0] = 0.5  # a dead input with off-diagonal entries: still caught without factoring
    dropped = check_hessian(LayerState.from_weight("fc", torch.randn(6, 12), hessian=stray),
                            cfg=HessianCheckConfig(definite=False))
    assert dropped.hessian is None
    with pytest.raises(ConfigError, match="strict"):
        HessianCheckConfig(strict=True, definite=False)


def test_rtn_forms_beside_the_solve_give_the_same_result(monkeypatch):
    # With > 1 thread the signal and RTN loss of a big layer run in a background job during the
    # one-thread factorization; codes and every metric must equal the one-thread (inline) run.
    monkeypatch.setattr(hessian, "EXACT_LOSS_WORK", 0)
    w, h = _problem(40, 192, seed=5, dead=2)
    state = absmax_scale(LayerState.from_weight("fc", w, hessian=h), cfg=ScaleConfig(PerGroup(64)))
    threads = torch.get_num_threads()
    runs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            runs.append(ldlq(state, cfg=LDLQConfig(precision="float32", actorder=True)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(runs[0].codes, runs[1].codes)
    assert runs[0].metrics == runs[1].metrics
