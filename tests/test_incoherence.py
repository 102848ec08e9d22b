"""Tests for cq.transforms.incoherence: the two-sided transform, its exact inverse, and the state stages."""

from __future__ import annotations

import pytest
import torch

from cq.transforms.rounding import reconstruct

from cq.errors import ConfigError, CqError
from cq.state import LayerState
from cq.transforms import absmax_scale, round_to_nearest
from cq.transforms.convrot import convrot
from cq.transforms.incoherence import (
    Incoherence,
    IncoherenceConfig,
    incoherence,
    make_incoherence,
    rescale_factors,
    undo_incoherence,
)

F64 = torch.float64


def _problem(n, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=F64)
    x = torch.randn(3 * k + 8, k, generator=g, dtype=F64) * torch.exp(torch.randn(k, generator=g, dtype=F64))
    h = (2.0 / x.shape[0]) * x.T @ x
    return w.to(dtype), h.to(dtype)


def _trace(w, h):
    w, h = w.to(F64), h.to(F64)
    return float(torch.trace(w @ h @ w.T))


@pytest.mark.parametrize("seed", ["0", -1, 1.5, None, True])
def test_config_validates_the_seed(seed):
    with pytest.raises(ConfigError, match="seed="):
        IncoherenceConfig(seed=seed)


def test_config_validates_flags():
    with pytest.raises(ConfigError, match="rescale=1 must be True or False"):
        IncoherenceConfig(rescale=1)


@pytest.mark.parametrize("n, k", [(16, 32), (12, 20), (43, 86), (1, 7), (30, 300)])
@pytest.mark.parametrize("use_hadamard", [True, False])
@pytest.mark.parametrize("rescale, permute", [(True, True), (False, False), (True, False)])
def test_forward_and_inverse_are_exact_and_keep_the_proxy_loss(n, k, use_hadamard, rescale, permute):
    w, h = _problem(n, k, seed=n + k, dtype=F64)
    cfg = IncoherenceConfig(seed=3, use_hadamard=use_hadamard, rescale=rescale, permute=permute)
    inc = make_incoherence(n, k, cfg, d=rescale_factors(w, h) if rescale else None)
    w2, h2 = inc.forward_weight(w), inc.forward_hessian(h)
    assert torch.allclose(inc.inverse_weight(w2), w, atol=1e-10)
    assert torch.allclose(inc.inverse_hessian(h2), h, rtol=1e-9, atol=1e-9)
    assert _trace(w2, h2) == pytest.approx(_trace(w, h), rel=1e-9)
    if not rescale:
        assert float(w2.norm()) == pytest.approx(float(w.norm()), rel=1e-12)
        assert float(torch.trace(h2)) == pytest.approx(float(torch.trace(h)), rel=1e-12)


def test_the_transform_is_u_w_vt_with_orthogonal_u_and_v():
    w, _ = _problem(12, 20, dtype=F64)
    inc = make_incoherence(12, 20, IncoherenceConfig(seed=1, rescale=False, permute=False))
    u, v = inc.u.matrix().T, inc.v.matrix().T
    assert torch.allclose(inc.forward_weight(w), u @ w @ v.T, atol=1e-12)
    assert torch.allclose(u @ u.T, torch.eye(12, dtype=F64), atol=1e-12)
    assert torch.allclose(v @ v.T, torch.eye(20, dtype=F64), atol=1e-12)


def test_an_error_made_in_the_transformed_basis_keeps_its_proxy_loss():
    w, h = _problem(24, 48, seed=2, dtype=F64)
    inc = make_incoherence(24, 48, IncoherenceConfig(seed=4), d=rescale_factors(w, h))
    e2 = torch.randn(24, 48, dtype=F64, generator=torch.Generator().manual_seed(9)) * 1e-3
    w2 = inc.forward_weight(w)
    e = w - inc.inverse_weight(w2 - e2)
    assert _trace(e, h) == pytest.approx(_trace(e2, inc.forward_hessian(h)), rel=1e-8)


def test_rescale_factors_follow_quips_formula_and_clamp():
    w = torch.tensor([[1.0, 0.0, 1e-6]])
    h = torch.diag(torch.tensor([16.0, 1.0, 1e6]))
    d = rescale_factors(w, h)
    assert d.tolist()[0] == pytest.approx(2.0)
    assert d.tolist()[1:] == [10.0, 10.0]  # zero column and a huge ratio hit the upper clamp


def test_incoherence_stage_records_the_transform_and_keeps_the_original():
    w, h = _problem(32, 64, seed=5)
    s = LayerState.from_weight("blk.fc", w, hessian=h)
    w0, h0 = w.clone(), h.clone()
    r = incoherence(s, cfg=IncoherenceConfig(seed=7))
    assert torch.equal(s.weight, w0) and torch.equal(s.hessian, h0)
    inc = r.basis
    assert isinstance(inc, Incoherence) and inc.shape == (32, 64) and inc.perm is not None and inc.d is not None
    assert r.original is w and r.basis is inc and r.stage_names() == ("incoherence",)
    assert r.weight.dtype == torch.float32 and r.hessian.dtype == torch.float32
    assert torch.allclose(reconstruct(r), w, atol=1e-5)
    assert _trace(r.weight, r.hessian) == pytest.approx(_trace(w, h), rel=1e-5)


def test_incoherence_is_deterministic_from_the_seed():
    w, h = _problem(16, 48)
    s = LayerState.from_weight("fc", w, hessian=h)
    a = incoherence(s, cfg=IncoherenceConfig(seed=11)).weight
    b = incoherence(s, cfg=IncoherenceConfig(seed=11)).weight
    c = incoherence(s, cfg=IncoherenceConfig(seed=12)).weight
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_incoherence_spreads_outlier_weights():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.01
    w[3, 17] = 5.0
    r = incoherence(LayerState.from_weight("fc", w))
    ratio_before = float(w.abs().max() / w.pow(2).mean().sqrt())
    ratio_after = float(r.weight.abs().max() / r.weight.pow(2).mean().sqrt())
    assert ratio_after < ratio_before / 10


def test_without_hessian_the_rescaling_is_skipped_with_a_note():
    r = incoherence(LayerState.from_weight("fc", torch.randn(8, 16)))
    assert r.hessian is None and r.basis.d is None
    assert r.notes == ("incoherence: no Hessian, diagonal rescaling skipped",)


def test_random_orthogonal_path_reconstructs_well():
    # The reference undid its permutation after the inverse rotation on this path: SQNR -3 dB.
    w, h = _problem(48, 96, seed=8)
    s = incoherence(LayerState.from_weight("fc", w, hessian=h), cfg=IncoherenceConfig(use_hadamard=False))
    q = round_to_nearest(absmax_scale(s))
    rel = float((reconstruct(q) - w).norm() / w.norm())
    assert rel < 0.02


def test_undo_incoherence_returns_to_the_original_basis():
    w, h = _problem(16, 32, seed=9)
    q = round_to_nearest(absmax_scale(incoherence(LayerState.from_weight("fc", w, hessian=h))))
    back = undo_incoherence(q)
    assert "incoherence" not in back.meta
    assert back.codes is None and back.scale is None and back.format is None
    assert torch.allclose(back.weight, reconstruct(q))
    assert torch.allclose(back.hessian, h, rtol=1e-4, atol=1e-4)
    assert back.stage_names()[-1] == "undo_incoherence"
    with pytest.raises(CqError, match="needs a state from the incoherence stage"):
        undo_incoherence(back)


def test_incoherence_refuses_quantized_or_rotated_states():
    s = LayerState.from_weight("fc", torch.randn(4, 32))
    with pytest.raises(CqError, match="before quantization"):
        incoherence(round_to_nearest(absmax_scale(s)))
    with pytest.raises(CqError, match="already rotated"):
        incoherence(convrot(s))
    with pytest.raises(CqError, match="already rotated"):
        incoherence(incoherence(s))
    with pytest.raises(CqError, match="already rotated"):
        convrot(incoherence(s))


def test_transform_shape_mismatch_is_an_error():
    inc = make_incoherence(4, 8)
    with pytest.raises(CqError, match=r"for \[4, 8\] weights, got \[4, 9\]"):
        inc.forward_weight(torch.zeros(4, 9))
