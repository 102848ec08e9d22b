"""Per-row scale search: never worse than absmax on its objective, rows picked independently, errors."""

from __future__ import annotations

import attrs
import pytest
import torch

from cq.errors import ConfigError
from cq.state import LayerState, PerGroup, PerRow, PerTensor
from cq.transforms import ScaleConfig, absmax_scale, round_to_nearest
from cq.transforms.gptq import GPTQConfig
from cq.transforms.ldlq import LDLQConfig, ldlq
from cq.transforms.scale_search import ScaleSearchConfig, row_losses, scale_search

F64 = torch.float64


def _layer(n=12, k=48, t=256, seed=0, hessian=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g) * torch.exp(torch.randn(k, generator=g))
    w = torch.randn(n, k, generator=g) ** 3 * 0.02  # heavy-tailed rows
    return LayerState.from_weight("fc", w, hessian=(2 / t * x.T @ x) if hessian else None)


def _loss(state, h):
    w_hat = state.codes.to(torch.float32) * state.scale.to(torch.float32).reshape(-1, 1)
    return row_losses(state.weight, w_hat, h)


def test_row_losses_match_a_float64_oracle():
    s = round_to_nearest(absmax_scale(_layer()))
    w_hat = s.codes.to(F64) * s.scale.to(F64)
    e = s.weight.to(F64) - w_hat
    expect = ((e @ s.hessian.to(F64)) * e).sum(1)
    # float32 product of ~1e-4-sized errors: relative error ≤ K·2^-24 ≈ 3e-6 per row.
    torch.testing.assert_close(row_losses(s.weight, w_hat, s.hessian), expect, rtol=1e-5, atol=0)
    torch.testing.assert_close(row_losses(s.weight, w_hat, None), (e * e).sum(1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("rounder", [None, LDLQConfig(), GPTQConfig()])
def test_never_worse_than_absmax_per_row(rounder):
    s = absmax_scale(_layer(seed=1))
    out = scale_search(s, cfg=ScaleSearchConfig(rounder=rounder))
    rtn = _loss(round_to_nearest(s), s.hessian)
    got = _loss(out, s.hessian)
    assert bool((got <= rtn).all())
    assert out.metrics["scale_search_gain"] <= 1.0
    if rounder is not None:
        plain = _loss(ldlq(s) if isinstance(rounder, LDLQConfig) else out, s.hessian)
        assert float(got.sum()) <= float(plain.sum()) * (1 + 1e-9)


def test_each_row_is_the_best_candidate():
    s = absmax_scale(_layer(seed=2))
    grid = (1.0, 0.95, 0.9)
    out = scale_search(s, cfg=ScaleSearchConfig(grid=grid))
    per_alpha = torch.stack([_loss(round_to_nearest(attrs.evolve(s, scale=s.scale * a)), s.hessian) for a in grid])
    torch.testing.assert_close(_loss(out, s.hessian), per_alpha.min(0).values, rtol=1e-6, atol=0)
    alphas = (out.scale / s.scale).flatten()
    assert all(min(abs(float(a) - g) for g in grid) < 1e-6 for a in alphas)


def test_without_data_the_objective_is_weight_mse():
    s = absmax_scale(_layer(seed=3, hessian=False))
    out = scale_search(s)
    assert bool((_loss(out, None) <= _loss(round_to_nearest(s), None)).all())
    with pytest.raises(ConfigError, match="needs a calibration Hessian"):
        scale_search(s, cfg=ScaleSearchConfig(objective="hessian"))


def test_per_tensor_scale_gets_one_factor():
    s = absmax_scale(_layer(seed=4), cfg=ScaleConfig(PerTensor()))
    out = scale_search(s)
    assert out.scale.shape == s.scale.shape
    assert float(_loss(out, s.hessian).sum()) <= float(_loss(round_to_nearest(s), s.hessian).sum())


def test_errors_are_clear():
    with pytest.raises(ConfigError, match="contains 1.0"):
        ScaleSearchConfig(grid=(0.9, 0.8))
    with pytest.raises(ConfigError, match="objective"):
        ScaleSearchConfig(objective="loss")
    with pytest.raises(ConfigError, match="rounder"):
        ScaleSearchConfig(rounder="ldlq")
    with pytest.raises(ConfigError, match="per-row and per-tensor"):
        scale_search(absmax_scale(_layer(), cfg=ScaleConfig(PerGroup(16))))
    with pytest.raises(Exception, match="scale"):
        scale_search(_layer())  # no scale yet
