"""Issue 8, items 2, 4 and 5: figures that are the runtime's, Hessians judged, numbers that cannot lie.

Each test names the bad-input kind it covers (the report's table counts them).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from cq.cli import main
from cq.errors import InputError
from cq.io import write_safetensors
from cq.kernels.reference import quantize_activations_ref
from cq.report import ConversionReport, LayerReport
from cq.state import LayerState
from cq.transforms import absmax_scale, fp16_cast, round_to_nearest, w8a8_output_error
from cq.transforms.convrot import ConvRot, ConvRotConfig, convrot, runtime_rotate
from cq.transforms.hessian import hessian_problem
from cq.transforms.hessian_check import HessianCheckConfig, check_hessian
from tests.float_bounds import U32, gamma, gamma_prob, rel_error_interval

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# -- item 2: ConvRot activations rotated the runtime's way ----------------------------------------


@pytest.mark.parametrize("g", [16, 64, 256])
def test_convrot_activations_are_bit_identical_to_comfy_kitchens_rotation(g):
    # The same float32 ops on the same inputs give the same bits on any CPU; the Kronecker path
    # (ConvRot.rotate) is ~1e-6 away and flipped activation codes at ties (issue 8.2).
    int8_utils = pytest.importorskip("comfy_kitchen.tensor.int8_utils")
    x = torch.randn(32, 2 * g, generator=_gen(g))
    ck = int8_utils._rotate_activation(x, int8_utils._build_hadamard(g, dtype=torch.float32), g)
    assert torch.equal(ConvRot(g).activations(x), ck)
    assert torch.equal(runtime_rotate(x, g), ck)


def test_runtime_rotate_is_the_rotation_within_float32_rounding():
    # |x·R computed two ways| <= G·eps·Σ|x_i||R_ij| per entry (standard dot-product bound), R = ±1/√G
    x = torch.randn(8, 512, generator=_gen(1))
    exact = x.to(F64) @ ConvRot(256).matrix(512)
    bound = 256 * torch.finfo(torch.float32).eps * (x.abs().to(F64) @ ConvRot(256).matrix(512).abs())
    assert bool(((runtime_rotate(x, 256).to(F64) - exact).abs() <= bound).all())


# -- item 5: the W8A8 metric on degenerate shapes ---------------------------------------------------


def _w8a8_oracle_interval(s, x):
    """Float64 model of the runtime (per-token int8 activations times the codes, rescaled) and the
    interval cq's float32 metric must fall in around it (tests.float_bounds.rel_error_interval).

    The metric's float32 pieces: ``y`` from exact int32 accumulators and three epilogue roundings
    (``γ₃·|y|``); ``ref = x·Wᵀ``, a K-term float32 product (``γ_K·|x||W|``, any order); ``y − ref``
    one more rounding. The activation codes are the same on both sides (the same quantizer on the
    same machine), so no flips enter.
    """
    xr = s.basis.activations(x) if s.basis is not None else x
    qx, sx = quantize_activations_ref(xr)
    y = (qx.to(F64) @ s.codes.to(F64).t()) * sx.to(F64) * s.scale.to(F64).reshape(1, -1)
    w = s.original if s.original is not None else s.weight
    ref = x.to(F64) @ w.to(F64).t()
    e_y = gamma(3) * y.abs()
    e_ref = gamma(x.shape[-1]) * (x.to(F64).abs() @ w.to(F64).abs().t())
    d = y - ref
    e_d = e_y + e_ref + U32 * (d.abs() + e_y + e_ref)
    return float(d.norm() / ref.norm()), rel_error_interval(d, e_d, ref, e_ref)


@pytest.mark.parametrize("n, k, t", [(64, 1, 32), (64, 1, 1), (1, 64, 32), (64, 64, 1), (1, 1, 1), (3, 2, 5),
                                     (2, 1, 7)])
def test_w8a8_metric_is_right_for_degenerate_shapes(n, k, t):
    # K = 1 used to give 66576.98: CPU torch._int_mm misreads a [1, N] operand with strides (1, 1).
    # Bound: the float32 rounding of each piece of the metric, carried through its two norms
    # (_w8a8_oracle_interval); the 66576.98 bug, or any wrong scale, lands far outside.
    s = round_to_nearest(absmax_scale(LayerState.from_weight("fc", torch.randn(n, k, generator=_gen(n * k + t)))))
    x = torch.randn(t, k, generator=_gen(t))
    m = w8a8_output_error(s, x)
    oracle, (lo, hi) = _w8a8_oracle_interval(s, x)
    assert lo <= m <= hi, (m, oracle, lo, hi)


# -- item 5: fp16 range, report counting, nothing to quantize ----------------------------------------


def test_fp16_cast_beyond_range_names_the_tensor_and_its_max():
    w = torch.randn(4, 8, generator=_gen(2))
    w[1, 3] = 1.0e5
    with pytest.raises(InputError, match=r"blocks.0.fc: max \|weight\| = 100000 is beyond float16's range"):
        fp16_cast(LayerState.from_weight("blocks.0.fc", w))
    assert fp16_cast(LayerState.from_weight("ok", torch.full((2, 2), 65504.0))).weight.dtype == torch.float16


def test_cli_fp16_beyond_range_is_one_line_not_a_math_domain_error(tmp_path, capsys):
    p = tmp_path / "m.safetensors"
    write_safetensors(p, {"fc.weight": torch.randn(16, 32, generator=_gen(3)) * 1e6})
    rc = main(["-i", str(p), "-o", str(tmp_path / "o.safetensors"), "--fp16", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "beyond float16's range" in err and "domain" not in err
    assert not (tmp_path / "o.safetensors").exists()


def test_fp16_layers_are_not_quantized_nor_in_the_mean_sqnr():
    layers = (LayerReport(name="a", action="quantize", format="int8_tensorwise", metrics={"sqnr_db": 40.0}),
              LayerReport(name="b", action="quantize", format="fp16", metrics={"sqnr_db": 80.0}))
    r = ConversionReport(input_file="i", output_file="o", layers=layers)
    assert [x.name for x in r.quantized] == ["a"] and [x.name for x in r.fp16] == ["b"]
    assert r.mean_sqnr_db == 40.0 and r.to_dict()["quantized"] == 1 and r.to_dict()["fp16"] == 1
    assert "1 layers quantized, 1 stored as fp16" in r.table()


def test_report_shows_no_nan_mean_and_no_meaningless_predictions():
    empty = ConversionReport(input_file="i", output_file="o", layers=())
    assert "nan" not in empty.table() and "mean SQNR -" in empty.table()
    bad = LayerReport(name="a", action="quantize", format="int8_tensorwise",
                      metrics={"sqnr_db": 30.0, "predicted_rel_out": math.inf, "rel_out_h": math.nan})
    row = ConversionReport(input_file="i", output_file="o", layers=(bad,)).table().splitlines()[2]
    assert "inf" not in row and "nan" not in row and row.split()[-3:] == ["-", "-", "-"]


def test_input_with_nothing_to_quantize_says_so_in_one_line(tmp_path, capsys):
    p = tmp_path / "m.safetensors"
    write_safetensors(p, {"fc.bias": torch.randn(16), "norm.weight": torch.randn(16)})
    rc = main(["-i", str(p), "-o", str(tmp_path / "o.safetensors"), "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.count("\n") == 1 and "nothing to quantize" in out and "nan" not in out + err
    assert not (tmp_path / "o.safetensors").exists()


# -- item 4: Hessians judged before use ----------------------------------------------------------


def _gram(k, t, seed, outliers=0):
    x = torch.randn(t, k, generator=_gen(seed))
    x[:, :outliers] *= 1000.0  # outlier channels: diagonal entries 1e6 times the others
    return 2.0 / t * (x.T @ x)


@pytest.mark.parametrize("kind, reason", [
    ("nan", "non-finite"), ("inf", "non-finite"), ("zero", "all zeros"),
    ("negative_definite", "negative-definite"), ("negative_diagonal", "indefinite: 1 of 32"),
    ("indefinite_positive_diagonal", "indefinite: not positive semi-definite"),
    ("dead_input_with_off_diagonal", "indefinite: input 0"),
])
def test_bad_hessians_are_named(kind, reason):
    h = _gram(32, 256, 0)
    if kind == "nan":
        h[3, 4] = math.nan
    elif kind == "inf":
        h[0, 0] = math.inf
    elif kind == "zero":
        h = torch.zeros(32, 32)
    elif kind == "negative_definite":
        h = -h
    elif kind == "negative_diagonal":
        h[5, 5] = -1.0
    elif kind == "indefinite_positive_diagonal":  # |H01| > √(H00·H11): impossible for a Gram matrix
        h[0, 1] = h[1, 0] = 10 * float((h[0, 0] * h[1, 1]).sqrt())
    else:
        h[0, 0] = 0.0
    assert reason in hessian_problem(h, 32)


@pytest.mark.parametrize("kind", ["gram", "rank_deficient", "outlier_channels", "dead_inputs", "float64"])
def test_genuine_hessians_pass(kind):
    h = {"gram": _gram(64, 512, 1), "rank_deficient": _gram(64, 8, 2), "outlier_channels": _gram(64, 512, 3, 3),
         "float64": _gram(64, 512, 4).to(F64)}.get(kind)
    if kind == "dead_inputs":
        h = _gram(64, 512, 5)
        h[:, :4] = 0
        h[:4, :] = 0
    assert hessian_problem(h, 64) is None


def test_check_hessian_notes_the_reason_and_falls_back_or_stops_when_strict():
    s = LayerState.from_weight("blocks.3.fc", torch.randn(8, 32, generator=_gen(6)), hessian=torch.zeros(32, 32))
    out = check_hessian(s)
    assert out.hessian is None and out.notes[-1].startswith("Hessian is all zeros")
    with pytest.raises(InputError, match="^blocks.3.fc: Hessian is all zeros"):
        check_hessian(s, cfg=HessianCheckConfig(strict=True))
    good = LayerState.from_weight("ok", torch.randn(8, 32), hessian=_gram(32, 256, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_hessian(good) is good


def test_gptq_on_a_rejected_hessian_reports_no_prediction():
    from cq.transforms import gptq_update

    s = absmax_scale(LayerState.from_weight("fc", torch.randn(8, 32, generator=_gen(8)), hessian=-_gram(32, 256, 8)))
    out = gptq_update(s)
    assert torch.equal(out.codes, round_to_nearest(s).codes)
    assert not any(k.startswith("predicted") for k in out.metrics) and "negative-definite" in out.notes[-1]


def test_convrot_w8a8_metric_is_the_runtime_figure_on_this_machine():
    # With the runtime's rotation the metric equals comfy-kitchen's forward error exactly here
    # (same ops, same inputs); the cross-machine bound lives in test_convrot.py.
    import torch.nn.functional as F

    tensor_mod = pytest.importorskip("comfy_kitchen.tensor")
    w = torch.randn(48, 512, generator=_gen(5)) * 0.02
    s = round_to_nearest(absmax_scale(convrot(LayerState.from_weight("fc", w), cfg=ConvRotConfig(groupsize=256))))
    layout = tensor_mod.get_layout_class("TensorWiseINT8Layout")
    params = layout.Params(scale=s.scale, orig_dtype=torch.float32, orig_shape=tuple(s.shape),
                           **dict(s.basis.comfy_fields()))
    qt = tensor_mod.QuantizedTensor(s.codes, "TensorWiseINT8Layout", params)
    x = torch.randn(32, 512, generator=_gen(6))
    y = F.linear(x, qt).float().to(F64)
    ref = x.to(F64) @ w.to(F64).T
    # Same activation codes on both sides (the same float32 rotation on the same machine); what
    # remains is float32 rounding inside the metric: its y (three epilogue roundings, vs comfy-kitchen's
    # own three: 2·γ₄·|y|), its ref = x·Wᵀ (K = 512 terms: probabilistic γ̃₅₁₂(λ=8)·|x||W|, the worst
    # case γ₅₁₂ being 3x looser), y − ref and the two norms (tests.float_bounds.rel_error_interval).
    m = w8a8_output_error(s, x)
    e_y = 2 * gamma(4) * y.abs()
    e_ref = gamma_prob(512) * (x.to(F64).abs() @ w.to(F64).abs().T)
    d = y - ref
    lo, hi = rel_error_interval(d, e_y + e_ref + U32 * (d.abs() + e_y + e_ref), ref, e_ref)
    assert lo <= m <= hi, (m, lo, hi)
