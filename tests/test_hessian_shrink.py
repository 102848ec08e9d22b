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
