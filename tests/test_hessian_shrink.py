"""shrink_hessian: the convex combination, its placement before rotations, and its config."""

import pytest
import torch

from cq.errors import ConfigError, CqError
from cq.state import LayerState
from cq.transforms.convrot import convrot
from cq.transforms.hessian_shrink import HessianShrinkConfig, shrink_hessian


def test_shrink_is_the_convex_combination_with_the_diagonal():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=g, dtype=torch.float64)
    h = 2 / 40 * x.T @ x
    out = shrink_hessian(LayerState.from_weight("fc", torch.ones(2, 16), hessian=h), cfg=HessianShrinkConfig(0.3))
    torch.testing.assert_close(out.hessian, 0.7 * h + 0.3 * torch.diag(h.diagonal()), rtol=1e-15, atol=0)
    assert out.stage_names() == ("shrink_hessian",)


def test_edge_values_and_no_hessian():
    h = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    s = LayerState.from_weight("fc", torch.ones(1, 2), hessian=h)
    assert torch.equal(shrink_hessian(s, cfg=HessianShrinkConfig(0.0)).hessian, h)
    assert torch.equal(shrink_hessian(s, cfg=HessianShrinkConfig(1.0)).hessian, torch.diag(h.diagonal()))
    bare = LayerState.from_weight("fc", torch.ones(1, 2))
    assert shrink_hessian(bare) is bare
    assert torch.equal(s.hessian, h)  # the input state is untouched


def test_errors():
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        HessianShrinkConfig(1.5)
    s = convrot(LayerState.from_weight("fc", torch.ones(2, 16), hessian=torch.eye(16)))
    with pytest.raises(CqError, match="before the rotation"):
        shrink_hessian(s)


@pytest.mark.parametrize("samples, beta", [(None, 0.3), (16, 0.3), (224, 0.05), (10 ** 6, 0.0)])
def test_auto_shrinks_less_as_the_calibration_grows(samples, beta):
    # β = min(0.3, 0.7·K/T): K = 16 inputs; T unknown → 0.3
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 16, generator=g, dtype=torch.float64)
    h = x.T @ x / 32
    meta = {} if samples is None else {"calibration": {"samples": samples}}
    out = shrink_hessian(LayerState.from_weight("fc", torch.ones(2, 16), hessian=h, meta=meta))
    b = round(min(0.3, 0.7 * 16 / samples), 4) if samples else 0.3
    assert out.metrics["hessian_shrink"] == b == pytest.approx(beta, abs=1e-6)
    torch.testing.assert_close(out.hessian, (1 - b) * h + b * torch.diag(h.diagonal()), rtol=1e-15, atol=0)


def test_the_cli_takes_auto_or_a_number():
    from cq.options import build_config

    base = dict(input_file="a.safetensors", output_file="b.safetensors", optimizer="quip")
    assert build_config({**base, "hessian_shrink": "auto"})[2].recipe.quip.hessian_shrink == "auto"
    assert build_config({**base, "hessian_shrink": "0.2"})[2].recipe.quip.hessian_shrink == 0.2
    with pytest.raises(ConfigError, match="'auto' or a number"):
        build_config({**base, "hessian_shrink": "lots"})
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        build_config({**base, "hessian_shrink": 2.0})
