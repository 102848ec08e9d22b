"""Tests for cq.transforms.scales, rounding and metrics against float64 references."""

import math

import pytest
import torch

from cq import CqError, LayerState, NonFiniteWeightError, PerBlock, PerGroup, PerRow, PerTensor
from cq.transforms import (MetricsConfig, ScaleConfig, absmax_scale, check_finite, dequantize, fp16_cast, measure,
                           reconstruct, rel_output_error, round_to_nearest, sqnr_db, w8a8_output_error)
from cq.transforms.scales import SCALE_FLOOR


def _w(shape=(64, 96), seed=0, std=0.02):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * std


def _rtn(w, gran):
    return round_to_nearest(absmax_scale(LayerState.from_weight("fc", w), cfg=ScaleConfig(gran)))


@pytest.mark.parametrize("gran,shape", [(PerTensor(), ()), (PerRow(), (64, 1)), (PerBlock(32), (2, 3)),
                                        (PerGroup(16), (64, 6, 1))])
def test_scale_shapes_and_codes_match_float64_reference(gran, shape):
    w = _w()
    s = _rtn(w, gran)
    assert tuple(s.scale.shape) == shape and s.scale.dtype == torch.float32
    # float64 reference of the same rounding
    from cq.transforms.scales import expand_scale
    ref = torch.round(w.double() / expand_scale(s.scale, s.granularity, s.shape).double()).clamp(-127, 127)
    assert torch.equal(s.codes.double(), ref)
    assert int(s.codes.abs().max()) == 127


def test_block_fallback_to_rows_with_note():
    s = _rtn(_w((48, 40)), PerBlock(32))
    assert s.granularity == PerRow() and tuple(s.scale.shape) == (48, 1)
    assert any("per-row" in n for n in s.notes)


def test_per_row_beats_per_tensor_on_uneven_rows():
    w = _w() * torch.logspace(-2, 0, 64).unsqueeze(1)
    assert sqnr_db(w, reconstruct(_rtn(w, PerRow()))) > sqnr_db(w, reconstruct(_rtn(w, PerTensor()))) + 10


def test_zero_rows_get_positive_finite_scale_and_zero_codes():
    w = _w()
    w[3] = 0
    s = _rtn(w, PerRow())
    assert float(s.scale[3]) == pytest.approx(SCALE_FLOOR, rel=1e-6)
    assert torch.all(s.codes[3] == 0)
    assert torch.isfinite(s.scale).all() and (s.scale > 0).all()


def test_half_to_even_ties():
    w = torch.tensor([[0.5, 1.5, 2.5, -0.5, 127.0]])
    s = round_to_nearest(absmax_scale(LayerState.from_weight("fc", w), cfg=ScaleConfig(PerTensor())))
    assert s.codes.tolist() == [[0, 2, 2, 0, 127]]


def test_round_without_scale_names_fix():
    with pytest.raises(CqError, match="absmax_scale"):
        round_to_nearest(LayerState.from_weight("fc", _w()))


def test_dequantize_and_fp16():
    s = _rtn(_w(), PerRow())
    d = dequantize(s)
    assert d.codes is None and torch.equal(d.weight, reconstruct(s))
    f = fp16_cast(LayerState.from_weight("fc", _w()))
    assert f.weight.dtype == torch.float16 and f.format == "fp16"


def test_check_finite_names_layer():
    w = _w()
    w[1, 2] = float("inf")
    with pytest.raises(NonFiniteWeightError, match=r"fc: weight has 0 NaN and 1 Inf values \(first at \[1, 2\]\)"):
        check_finite(LayerState.from_weight("fc", w))


def test_rel_output_error_hessian_equals_inputs():
    w, g = _w(), torch.Generator().manual_seed(1)
    x = torch.randn(500, 96, generator=g)
    w_hat = reconstruct(_rtn(w, PerRow()))
    h = 2 / 500 * x.double().t() @ x.double()
    e = w.double() - w_hat.double()
    oracle = float((x.double() @ e.t()).norm() / (x.double() @ w.double().t()).norm())  # float64
    assert rel_output_error(w, w_hat, x=x) == pytest.approx(oracle, rel=1e-5)
    assert rel_output_error(w, w_hat, hessian=h) == pytest.approx(oracle, rel=1e-5)


def test_w8a8_matches_float64_emulation():
    w = _w()
    x = torch.randn(32, 96, generator=torch.Generator().manual_seed(2))
    s = _rtn(w, PerRow())
    # float64 emulation of ComfyUI's forward
    sx = (x.double().abs().amax(1, keepdim=True) / 127)
    qx = torch.round(x.double() / sx).clamp(-128, 127)
    y = (qx @ s.codes.double().t()) * sx * s.scale.double().t()
    ref = x.double() @ w.double().t()
    expect = float((y - ref).norm() / ref.norm())
    assert w8a8_output_error(s, x) == pytest.approx(expect, rel=1e-5)
    assert 0.002 < expect < 0.05  # W8A8 on Gaussian data: about 1 % (comfyui-format.md §1.4)


def test_measure_records_metrics():
    w = _w()
    x = torch.randn(16, 96, generator=torch.Generator().manual_seed(3))
    m = measure(_rtn(w, PerRow()), cfg=MetricsConfig(x=x)).metrics
    assert set(m) == {"mse", "sqnr_db", "max_error", "rel_out_x", "w8a8"}
    # per-row INT8 on Gaussian rows: about 41 dB weight SQNR (algorithms.md §9.1; fewer columns here)
    assert 36 < m["sqnr_db"] < 46
    assert math.isinf(sqnr_db(w, w))


@pytest.mark.parametrize("gran", [PerRow(), PerTensor()])
def test_measure_matches_float64_oracles_across_row_blocks(gran):
    w = _w((1100, 80), seed=7)  # 1100 rows: three row blocks of measure()'s chunked path
    x = torch.randn(24, 80, generator=torch.Generator().manual_seed(8))
    s = _rtn(w, gran)
    m = measure(s, cfg=MetricsConfig(x=x)).metrics
    e = w.double() - reconstruct(s).double()
    assert m["sqnr_db"] == pytest.approx(10 * math.log10(float((w.double() ** 2).sum() / (e ** 2).sum())), abs=1e-4)
    assert m["max_error"] == pytest.approx(float(e.abs().max()), rel=1e-6)
    ref = x.double() @ w.double().t()
    assert m["rel_out_x"] == pytest.approx(float((x.double() @ e.t()).norm() / ref.norm()), rel=1e-5)
    assert m["w8a8"] == pytest.approx(w8a8_output_error(s, x), rel=1e-6)
