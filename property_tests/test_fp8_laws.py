"""Laws of cq's FP8 (float8_e4m3fn) quantizer: representable codes, the e4m3 spacing bound, idempotence,
agreement with an independent float64 nearest-even oracle on the e4m3 grid."""

import pytest

pytest.importorskip("hypothesis")

import torch
from hypothesis import example, given
from hypothesis import strategies as st

from cq import LayerState
from cq.transforms import reconstruct
from cq.transforms.fp8 import E4M3_MAX, e4m3_spacing, fp8_pipeline, quantize_e4m3


def e4m3_grid() -> torch.Tensor:
    """Every non-negative finite e4m3fn value, ascending, from the format's definition (float64):
    subnormals m·2⁻⁹ (m < 8), normals (1 + m/8)·2^(e−7) for e = 1..15, without S.1111.111 (NaN)."""
    vals = [m * 2.0 ** -9 for m in range(8)]
    vals += [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8) if not (e == 15 and m == 7)]
    return torch.tensor(vals, dtype=torch.float64)


GRID = e4m3_grid()


def oracle(y: torch.Tensor) -> torch.Tensor:
    """Nearest e4m3fn value to ``y`` (float64), ties to the even code (an even index in GRID), saturating."""
    a = y.to(torch.float64).abs().clamp(max=E4M3_MAX)
    hi = torch.searchsorted(GRID, a).clamp(max=len(GRID) - 1)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - GRID[lo], GRID[hi] - a
    pick = torch.where(d_lo < d_hi, lo, torch.where(d_hi < d_lo, hi, torch.where(lo % 2 == 0, lo, hi)))
    return torch.copysign(GRID[pick], y.to(torch.float64))


@st.composite
def weights(draw):
    n = draw(st.integers(1, 32))
    k = draw(st.integers(1, 32))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(n, k, generator=g) * draw(st.sampled_from([1e-30, 1e-6, 0.02, 1.0, 1e4]))
    if draw(st.booleans()):  # a few large outliers
        idx = torch.randint(0, n * k, (max(1, n * k // 50),), generator=g)
        w.view(-1)[idx] *= 300
    if draw(st.booleans()):
        w[draw(st.integers(0, n - 1))] = 0
    return w


def _fp8(w):
    return fp8_pipeline()(LayerState.from_weight("fc", w))


@given(weights())
@example(torch.zeros(2, 3))
@example(torch.tensor([[448.0, 1.0625, 1.1875, -0.0009765625]]))  # ties at 1.0625/1.1875 and 2^-10 (scale 1)
@example(torch.full((2, 4), 3.0e38))
def test_codes_representable_and_scale_positive(w):
    s = _fp8(w)
    c = s.codes.to(torch.float64)
    assert s.codes.dtype == torch.float8_e4m3fn and s.codes.shape == w.shape
    assert torch.isfinite(c).all() and float(c.abs().max()) <= E4M3_MAX
    assert s.scale.shape == () and s.scale.dtype == torch.float32 and float(s.scale) > 0
    assert torch.isin(c.abs(), GRID).all()


@given(weights())
@example(torch.tensor([[448.0, 1.0625, 1.1875, -0.0009765625]]))
def test_error_within_half_e4m3_spacing(w):
    s = _fp8(w)
    scale = float(s.scale)
    y = w.to(torch.float64) / scale
    q = s.codes.to(torch.float64)
    # half the spacing at the larger of |w/s| and |q| (a value may round up across a power of two),
    # in weight units; plus float32 rounding of w/s and of q·s (2⁻²⁴ relative each)
    half = torch.maximum(e4m3_spacing(y), e4m3_spacing(q)) / 2 * scale
    err = (w.to(torch.float64) - reconstruct(s).to(torch.float64)).abs()
    assert torch.all(err <= half * (1 + 1e-6) + w.to(torch.float64).abs() * 2.0 ** -22)


@given(weights())
def test_idempotent(w):
    s = _fp8(w)
    again = quantize_e4m3(s.codes.to(torch.float32) * s.scale, s.scale)
    assert torch.equal(again.view(torch.uint8), s.codes.view(torch.uint8)) or torch.equal(
        again.to(torch.float32), s.codes.to(torch.float32))  # ±0 may differ in sign only
    # re-quantizing the dequantized weight finds the same scale: its absmax is 448·s and, for s = fl(a/448),
    # fl(fl(448·s)/448) == s (checked on 2·10⁷ random float32 a), so the values are reproduced exactly
    s2 = _fp8(reconstruct(s))
    assert torch.equal(s2.codes.to(torch.float32) * s2.scale, s.codes.to(torch.float32) * s.scale)


@given(st.lists(st.floats(-1000, 1000, allow_nan=False, width=32), min_size=1, max_size=64))
@example([1.0625, 1.1875, 0.0009765625, 0.0029296875, 464.0, 480.0, -1e9 / 1e7])
def test_matches_float64_nearest_even_oracle(vals):
    y = torch.tensor(vals, dtype=torch.float32)
    got = quantize_e4m3(y, 1.0).to(torch.float64)
    assert torch.equal(got.abs(), oracle(y).abs())
    assert torch.all((got == 0) | (torch.sign(got) == torch.sign(y.to(torch.float64))))
