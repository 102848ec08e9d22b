"""FP8 (float8_e4m3fn) output: the quantizer against a float64 oracle, the runtime activation path against
comfy-kitchen, and written files loaded through comfy-kitchen as ComfyUI 0.29 does."""

from __future__ import annotations

import math

import pytest
import torch

from cq.errors import ConfigError, CqError
from cq.io import SafetensorsWriter, comfy_quant_entry, layer_tensors, quantization_metadata, validate_comfy_file
from cq.io.comfy import QUANT_METADATA_KEY
from cq.io.comfy_fp8 import fp8_comfy_quant_entry, fp8_layer_tensors
from cq.state import LayerState, PerRow
from cq.transforms import MetricsConfig, ScaleConfig, absmax_scale, reconstruct, round_to_nearest
from cq.transforms.fp8 import (E4M3_MAX, Fp8Config, Fp8MetricsConfig, fp8_linear,
                               fp8_measure_stage, fp8_output_error, fp8_pipeline, fp8_round, fp8_scale, measure_fp8,
                               quantize_e4m3)

from property_tests.test_fp8_laws import GRID, oracle  # the float64 definition of the e4m3 grid
from tests.float_bounds import UBF16, matmul_gap


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_every_grid_point_midpoint_and_neighbour_matches_oracle():
    pts = torch.cat([GRID, -GRID])
    mids = (GRID[1:] + GRID[:-1]) / 2  # exact ties in float64, and exactly representable in float32
    near = torch.cat([mids * (1 + 2.0 ** -20), mids * (1 - 2.0 ** -20), torch.tensor([449.0, 464.0, 1e30, 2.0 ** -10])])
    y = torch.cat([pts, mids, -mids, near, -near]).to(torch.float32)
    got = quantize_e4m3(y, 1.0).to(torch.float64)
    assert torch.equal(got.abs(), oracle(y).abs())


def test_pipeline_per_tensor_scale_and_quality():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 0.02
    s = fp8_pipeline()(LayerState.from_weight("fc", w))
    assert s.format == "float8_e4m3fn" and s.scale.shape == () and s.stage_names() == ("fp8_scale", "fp8_round")
    assert float(s.codes.to(torch.float32).abs().max()) == E4M3_MAX  # the absmax element maps to ±448
    m = measure_fp8(s, cfg=MetricsConfig(x=torch.randn(32, 96))).metrics
    # e4m3 has 3 mantissa bits: relative error ≈ 2^-4/√3·(uniform) → about 30-32 dB on Gaussian weights
    assert 28 < m["sqnr_db"] < 35
    assert m["rel_out_x"] < 0.04 and m["rel_out_x"] < m["w8a8"] < 0.08


def test_full_precision_matrix_mult_metric_is_the_weight_only_error():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 64, generator=g) * 0.02
    x = torch.randn(64, 64, generator=g)
    s = fp8_pipeline()(LayerState.from_weight("fc", w))
    fp32 = measure_fp8(s, cfg=Fp8MetricsConfig(x=x, full_precision_matrix_mult=True, compute_dtype=torch.float32))
    # in float32 the dequantize + matmul path is the weight-only error up to float32 rounding
    assert math.isclose(fp32.metrics["w8a8"], fp32.metrics["rel_out_x"], rel_tol=1e-4)
    act = measure_fp8(s, cfg=Fp8MetricsConfig(x=x))
    assert act.metrics["w8a8"] > 1.2 * act.metrics["rel_out_x"]  # fp8 activations add their own error
    staged = fp8_measure_stage(s, tokens=16, seed=0)(s)
    assert staged.stage_names()[-1] == "measure_fp8" and "w8a8" in staged.metrics


def test_fp8_is_worse_than_per_row_int8_on_gaussian_weights():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    f = fp8_pipeline()(LayerState.from_weight("fc", w))
    i = round_to_nearest(absmax_scale(LayerState.from_weight("fc", w), cfg=ScaleConfig(PerRow())))
    assert _rel(reconstruct(f), w) > _rel(reconstruct(i), w)


def test_config_and_order_errors():
    with pytest.raises(ConfigError, match="float8_e5m2"):
        Fp8Config(format="float8_e5m2")
    with pytest.raises(CqError, match="fp8_scale"):
        fp8_round(LayerState.from_weight("fc", torch.ones(2, 2)))
    with pytest.raises(CqError, match="FP8 state"):
        measure_fp8(LayerState.from_weight("fc", torch.ones(2, 2)))


def test_input_scale_from_calibration_and_warning_without():
    w = torch.randn(8, 16)
    s = fp8_pipeline(Fp8Config(input_scale=True))(
        LayerState.from_weight("fc", w, meta={"input_absmax": torch.full((16,), 2.0).index_fill(0, torch.tensor([3]), 8.96)}))
    assert math.isclose(float(s.meta["input_scale"]), 8.96 / 448, rel_tol=1e-6)
    assert "fc.input_scale" in fp8_layer_tensors(s)
    s2 = fp8_pipeline(Fp8Config(input_scale=True))(LayerState.from_weight("fc", w))
    assert "input_scale" not in s2.meta and "fc.input_scale" not in fp8_layer_tensors(s2)
    assert any("no calibration absmax" in n and "dynamic" in n for n in s2.notes)


def test_static_input_scale_saturates_outliers():
    # an activation beyond the calibration absmax saturates at 448·s_x (e4m3fn has no inf); 1.0/0.01 = 100
    # is a tie between the e4m3 values 96 and 104 and goes to the even 96; outputs are rounded to bf16
    c = quantize_e4m3(torch.eye(4), 1.0)
    y = fp8_linear(torch.tensor([[100.0, 1.0, 0.0, 0.0]]), c, torch.tensor(1.0), input_scale=torch.tensor(0.01))
    want = torch.tensor([[448 * 0.01, 96 * 0.01, 0.0, 0.0]]).to(torch.bfloat16).float()
    assert torch.equal(y, want)


def test_unit_activation_scale_of_older_comfyui():
    c = quantize_e4m3(torch.eye(2), 1.0)
    x = torch.tensor([[1000.0, 0.3]])  # unscaled: 1000 saturates at 448, 0.3 rounds to 0.3125 (spacing 2^-5)
    assert fp8_linear(x, c, torch.tensor(1.0), missing_input_scale="one").tolist() == [[448.0, 0.3125]]
    with pytest.raises(ConfigError, match="missing_input_scale"):
        fp8_linear(x, c, torch.tensor(1.0), missing_input_scale="dynamic")


ck = pytest.importorskip("comfy_kitchen")


@pytest.mark.parametrize("static", [False, True])
def test_fp8_linear_matches_comfy_kitchen(static):
    from comfy_kitchen.tensor import QuantizedTensor, get_layout_class

    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 64, generator=g) * 0.05
    x = (torch.randn(16, 64, generator=g) * 3).to(torch.bfloat16)
    s = fp8_pipeline()(LayerState.from_weight("fc", w))
    in_scale = torch.tensor(float(x.float().abs().max()) * 1.5 / 448) if static else None
    qt = QuantizedTensor(s.codes, "TensorCoreFP8Layout", get_layout_class("TensorCoreFP8Layout").Params(
        scale=s.scale, orig_dtype=torch.bfloat16, orig_shape=(48, 64)))
    with torch.no_grad():
        y_ck = torch.nn.functional.linear(QuantizedTensor.from_float(x, "TensorCoreFP8Layout", scale=in_scale), qt)
    y = fp8_linear(x, s.codes, s.scale, input_scale=in_scale)
    assert torch.all((y_ck.double() - y.double()).abs() <= _fp8_forward_gap(x, s, in_scale, y, y_ck))


def _fp8_forward_gap(x, s, in_scale, y, y_ck, bias=None):
    """Elementwise bound on ``|y_ck − y|`` for two evaluations of ComfyUI's FP8 forward from the same
    fp8 operands (``bf16(acc · s_x · s_w [+ b])``).

    Products of two e4m3 values are exact in float32 (4-bit significands), so each float32
    accumulation of K of them, any order or blocking, plus the two scale products is within
    ``γ_{K+2}·Σ|x̂||ŵ|`` of the exact value: the pair differs by twice that. ``|x̂| ≤ (1 + 2⁻⁴)(1 + 2⁻⁶)|x|
    + 2⁻¹⁰·s_x`` (e4m3: 3 mantissa bits, subnormal half-spacing 2⁻¹⁰; the bf16 reciprocal and product
    before it) bounds the activations without re-quantizing them; the weight codes are known. Each output is then one bf16 rounding of its
    float32 value, ≤ 2⁻⁸/(1 − 2⁻⁸) of the rounded result; a bias (cast to bf16 as ComfyUI does,
    added before or after that rounding) adds at most one more rounding of ``|b|``. A wrong
    activation or weight scale, or a rounding flip of a whole code, moves outputs by ≫ this.
    """
    xf = x.float()
    # dynamic s_x: amax/448 evaluated in bf16 by both sides, within (1 + 2⁻⁷) of this float32 value
    s_x = in_scale if in_scale is not None else x.abs().amax().float() / 448 * (1 + 2 ** -7)
    # e4m3 of x·bf16(1/s_x) rounded in bf16: (1 + 2⁻⁸)² < 1 + 2⁻⁶ on top of e4m3's 1 + 2⁻⁴
    x_hat = xf.abs() * ((1 + 2 ** -4) * (1 + 2 ** -6)) + 2 ** -10 * float(s_x)
    w_hat = s.codes.float() * s.scale.float()
    acc_gap = matmul_gap(x_hat, w_hat, extra_roundings=2)
    r = UBF16 / (1 - UBF16)
    gap = acc_gap + r * (y.double().abs() + y_ck.double().abs())
    if bias is not None:
        gap = gap + 2 * r * bias.double().abs()
    return gap


def _write(path, states, fpmm=()):
    entries = {}
    with SafetensorsWriter(path, metadata=None) as wr:
        for s in states:  # layer_tensors dispatches FP8 states to cq.io.comfy_fp8
            tensors = layer_tensors(s, full_precision_matrix_mult=s.name in fpmm)
            if s.format != "fp16":
                entries[s.name] = comfy_quant_entry(s, full_precision_matrix_mult=s.name in fpmm)
            for k, t in tensors.items():
                wr.add(k, t)
    return entries


def test_comfy_writer_dispatches_fp8_states():
    s = fp8_pipeline()(LayerState.from_weight("fc", torch.randn(4, 8)))
    assert comfy_quant_entry(s) == fp8_comfy_quant_entry(s) == {"format": "float8_e4m3fn"}
    assert layer_tensors(s).keys() == fp8_layer_tensors(s).keys()
    with pytest.raises(CqError, match="only in ComfyUI's layout"):
        layer_tensors(s, comfy=False)


def test_mixed_file_loads_through_comfy_kitchen(tmp_path):
    from cq.io.comfy_kitchen_check import check_with_comfy_kitchen

    g = torch.Generator().manual_seed(7)
    ws = {n: torch.randn(64, 128, generator=g) * 0.02 for n in ("m.fp8", "m.fp8_static", "m.fp8_fpmm", "m.int8", "m.hp")}
    calib = {"input_absmax": torch.full((128,), 4.0)}
    states = [
        fp8_pipeline()(LayerState.from_weight("m.fp8", ws["m.fp8"], bias=torch.randn(64, generator=g) * 0.01)),
        fp8_pipeline(Fp8Config(input_scale=True))(LayerState.from_weight("m.fp8_static", ws["m.fp8_static"], meta=calib)),
        fp8_pipeline()(LayerState.from_weight("m.fp8_fpmm", ws["m.fp8_fpmm"])),
        round_to_nearest(absmax_scale(LayerState.from_weight("m.int8", ws["m.int8"]), cfg=ScaleConfig(PerRow()))),
    ]
    path = tmp_path / "mixed.safetensors"
    entries = _write(path, states, fpmm=("m.fp8_fpmm",))
    assert validate_comfy_file(path) == []
    report = check_with_comfy_kitchen(path, {f"{k}.weight": v for k, v in ws.items()}, tokens=32, seed=5)
    assert set(report) == set(entries) == {"m.fp8", "m.fp8_static", "m.fp8_fpmm", "m.int8"}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        file_bias = {s.name: f.get_tensor(f"{s.name}.bias") for s in states[:3] if f"{s.name}.bias" in f.keys()}
    for s in states[:3]:
        r = report[s.name]
        w = ws[s.name]
        assert r["format"] == "float8_e4m3fn" and r["finite"] and r["scale_shape"] == ()
        # comfy-kitchen dequantizes to bf16 as bf16(code · bf16(s)): two bf16 roundings (2⁻⁸ each; the
        # codes are exact in bf16) against our float32 code·s (2⁻²⁴). By the triangle inequality the
        # relative errors differ by ≤ ‖ŵ_ck − ŵ‖/‖W‖ ≤ (2⁻⁷ + 2⁻¹⁶ + 2⁻²⁴)·‖ŵ‖/‖W‖. A wrong or
        # missing scale moves dequant_rel_err by ~1.
        w_hat = reconstruct(s)
        ours = _rel(w_hat, w)
        tol = (2 ** -7 + 2 ** -16 + 2 ** -24) * float(w_hat.double().norm() / w.double().norm())
        assert abs(r["dequant_rel_err"] - ours) <= tol, (s.name, r["dequant_rel_err"], ours, tol)
        x = torch.randn(32, 128, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
        if s.name == "m.fp8_fpmm":
            assert r["forward_rel_err"] < 0.04  # quality, not parity: weight-only (dequantize + bf16 matmul)
            continue
        # ours: ‖y − x·Wᵀ‖/‖x·Wᵀ‖ without bias; the check's: ‖y_ck − (x·Wᵀ + b)‖/‖x·Wᵀ + b‖ with y_ck
        # within E of y + b elementwise (_fp8_forward_gap; |y_ck| ≤ |y| + |b| + E solved for E). So
        # |forward_rel_err − ‖y − x·Wᵀ‖/‖x·Wᵀ + b‖| ≤ ‖E‖/‖x·Wᵀ + b‖ (triangle inequality).
        in_scale = s.meta.get("input_scale")
        b = file_bias.get(s.name)
        y = fp8_linear(x, s.codes, s.scale, input_scale=in_scale)
        ref = x.double() @ w.double().t()
        ref_b = ref if b is None else ref + b.double()
        yb = y.double().abs() if b is None else y.double().abs() + b.double().abs()
        r_bf = UBF16 / (1 - UBF16)
        e = _fp8_forward_gap(x, s, in_scale, y, yb, bias=b) / (1 - r_bf)
        ours = fp8_output_error(s, x) * float(ref.norm() / ref_b.norm())
        tol = float(e.norm() / ref_b.norm())
        assert abs(r["forward_rel_err"] - ours) <= tol, (s.name, r["forward_rel_err"], ours, tol)
    assert report["m.int8"]["format"] == "int8_tensorwise"


def test_validator_flags_bad_input_scale(tmp_path):
    s = fp8_pipeline()(LayerState.from_weight("fc", torch.randn(4, 8)))
    tensors = fp8_layer_tensors(s)
    tensors["fc.input_scale"] = torch.tensor([1.0, 2.0])
    with SafetensorsWriter(tmp_path / "bad.safetensors", metadata={
            QUANT_METADATA_KEY: quantization_metadata({"fc": {"format": "float8_e4m3fn"}})}) as wr:
        for k, t in tensors.items():
            wr.add(k, t)
    assert any("input_scale" in p for p in validate_comfy_file(tmp_path / "bad.safetensors"))


def test_fp8_recipe_is_registered_and_writes_comfy_fp8():
    from cq.recipes import FP8
    from cq.recipes import recipe_info, recipe_pipeline

    s = recipe_pipeline(FP8(input_scale=True))(
        LayerState.from_weight("fc", torch.randn(8, 16), meta={"input_absmax": torch.full((16,), 3.0)}))
    assert recipe_info(FP8()).quantized and s.format == "float8_e4m3fn"
    assert set(layer_tensors(s)) == {"fc.weight", "fc.weight_scale", "fc.comfy_quant", "fc.input_scale"}
    with pytest.raises(ConfigError):
        FP8(input_scale="yes")
