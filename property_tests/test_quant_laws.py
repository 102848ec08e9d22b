"""Laws of cq's scale + round-to-nearest transforms (bound, range, idempotence, determinism, shapes)."""

import pytest

pytest.importorskip("hypothesis")

import torch
from hypothesis import example, given
from hypothesis import strategies as st

from cq import LayerState, PerBlock, PerGroup, PerRow, PerTensor
from cq.transforms import ScaleConfig, absmax_scale, reconstruct, round_to_nearest
from cq.transforms.scales import expand_scale


@st.composite
def weights(draw):
    """A [N, K] float32 weight from (shape, seed, scale, outliers, zero rows), materialized with a seeded generator."""
    n = draw(st.integers(1, 48))
    k = draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**31 - 1))
    std = draw(st.sampled_from([1e-30, 1e-6, 0.02, 1.0, 1e4]))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * std
    if draw(st.booleans()):  # a few huge outliers
        idx = torch.randint(0, n * k, (max(1, n * k // 100),), generator=g)
        w.view(-1)[idx] *= 1000
    if draw(st.booleans()):  # an all-zero row
        w[draw(st.integers(0, n - 1))] = 0
    return w


granularities = st.sampled_from([PerTensor(), PerRow(), PerBlock(4), PerGroup(8)])


def _rtn(w, gran):
    return round_to_nearest(absmax_scale(LayerState.from_weight("fc", w), cfg=ScaleConfig(gran)))


@given(weights(), granularities)
@example(torch.zeros(3, 5), PerRow())
@example(torch.tensor([[0.5, -1.5, 2.5]]), PerTensor())
@example(torch.full((4, 8), 3.0e38), PerRow())  # near float32 max: absmax/127 must stay finite
def test_error_within_half_step(w, gran):
    s = _rtn(w, gran)
    step = expand_scale(s.scale, s.granularity, s.shape).double()
    err = (w.double() - reconstruct(s).double()).abs()
    # half a step, plus float32 rounding of the product codes·scale (|w| ulps)
    assert torch.all(err <= step / 2 * (1 + 1e-6) + w.double().abs() * 2**-23)


@given(weights(), granularities)
def test_codes_in_range_and_scales_positive_finite(w, gran):
    s = _rtn(w, gran)
    assert s.codes.dtype == torch.int8 and s.codes.shape == w.shape
    assert int(s.codes.min()) >= -127 and int(s.codes.max()) <= 127
    assert torch.isfinite(s.scale).all() and (s.scale > 0).all()
    n, k = w.shape
    assert tuple(s.scale.shape) == s.granularity.scale_shape(n, k)


@given(weights(), granularities)
def test_requantizing_dequantized_weights_is_idempotent(w, gran):
    s = _rtn(w, gran)
    again = round_to_nearest(absmax_scale(LayerState.from_weight("fc", reconstruct(s)), cfg=ScaleConfig(gran)))
    assert torch.equal(again.codes, s.codes)


@given(weights(), granularities)
def test_deterministic_and_input_untouched(w, gran):
    before = w.clone()
    a, b = _rtn(w, gran), _rtn(w, gran)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
    assert torch.equal(w, before)
