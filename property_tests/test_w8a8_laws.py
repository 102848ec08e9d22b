"""Laws of scale search, Hessian shrinkage and the W8A8 objective: never worse than absmax on the
same objective, diagonal kept, zero activation noise = the plain objective."""

import pytest

pytest.importorskip("hypothesis")

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cq import LayerState, PerRow, PerTensor
from cq.calibrate import activation_stats
from cq.transforms import ScaleConfig, absmax_scale, round_to_nearest
from cq.transforms.hessian_shrink import HessianShrinkConfig, shrink_hessian
from cq.transforms.ldlq import LDLQConfig, ldlq
from cq.transforms.scale_search import ScaleSearchConfig, row_losses, scale_search
from cq.transforms.w8a8_round import w8a8_objective


def _problem(seed, n, k, t, wmag, outlier):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g, dtype=torch.float64) @ torch.randn(k, k, generator=g, dtype=torch.float64)
    if outlier:
        x[:, seed % k] *= 30
    w = (torch.randn(n, k, generator=g, dtype=torch.float64) ** 3 * wmag).to(torch.float32)
    return w, (2.0 / t * x.T @ x).to(torch.float32), x.to(torch.float32)


def _loss(state, h):
    w_hat = state.codes.to(torch.float32) * state.scale.to(torch.float32).reshape(-1, 1)
    return row_losses(state.weight, w_hat, h)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 8), k=st.integers(1, 12), t=st.integers(1, 40),
       wmag=st.sampled_from([1e-20, 0.02, 1e4]), outlier=st.booleans(), use_h=st.booleans(),
       ldlq_rounder=st.booleans(), tensor=st.booleans())
@example(seed=0, n=1, k=1, t=1, wmag=0.02, outlier=False, use_h=True, ldlq_rounder=True, tensor=False)
@example(seed=3, n=4, k=12, t=2, wmag=1e-20, outlier=True, use_h=True, ldlq_rounder=True, tensor=True)
def test_scale_search_never_loses_to_absmax_rtn(seed, n, k, t, wmag, outlier, use_h, ldlq_rounder, tensor):
    w, h, _ = _problem(seed, n, 4 * k, t, wmag, outlier)
    s = absmax_scale(LayerState.from_weight("fc", w, hessian=h if use_h else None),
                     cfg=ScaleConfig(PerTensor() if tensor else PerRow()))
    out = scale_search(s, cfg=ScaleSearchConfig(rounder=LDLQConfig() if ldlq_rounder else None))
    hh = h if use_h else None
    got, rtn = _loss(out, hh), _loss(round_to_nearest(s), hh)
    if tensor:
        assert float(got.sum()) <= float(rtn.sum())
    else:
        assert bool((got <= rtn).all())
    assert bool(torch.isfinite(out.scale).all()) and bool((out.scale > 0).all())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 10), t=st.integers(1, 40), beta=st.floats(0, 1))
@example(seed=1, k=1, t=1, beta=1.0)
def test_shrink_keeps_the_diagonal_and_stays_psd(seed, k, t, beta):
    _, h, _ = _problem(seed, 1, 4 * k, t, 0.02, True)
    s = LayerState.from_weight("fc", torch.ones(1, 4 * k), hessian=h.double())
    out = shrink_hessian(s, cfg=HessianShrinkConfig(beta)).hessian
    assert torch.equal(out.diagonal(), h.double().diagonal())
    # Weyl: λmin((1−β)H + β·diag H) ≥ (1−β)·λmin(H) + β·min(diag H); float64 eigvalsh is accurate to
    # ~K·eps64·‖H‖, allowed as 1e-12·max|H|.
    h64 = h.double()
    bound = (1 - beta) * float(torch.linalg.eigvalsh(h64).min()) + beta * float(h64.diagonal().min())
    assert float(torch.linalg.eigvalsh(out).min()) >= bound - 1e-12 * float(h64.abs().max())


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 6), t=st.integers(8, 64))
@example(seed=0, k=1, t=8)
def test_zero_activation_noise_is_the_plain_objective(seed, k, t):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-100, 101, (t, 4 * k), generator=g).to(torch.float32)
    x[:, 0] = 127.0  # every token's absmax: the int8 round trip is exact
    st_ = activation_stats(x)
    w = torch.randn(3, 4 * k, generator=g, dtype=torch.float64)
    target, hq = w8a8_objective(w, st_.hessian, st_)
    scale = float(st_.hessian.abs().max())
    torch.testing.assert_close(hq, st_.hessian.double(), rtol=0, atol=0)
    # C − H̃ = 0 exactly, so the correction t − w is exactly zero, whatever the rank of H.
    assert torch.equal(target, w) and scale > 0
