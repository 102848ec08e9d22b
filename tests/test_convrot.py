"""Tests for cq.transforms.convrot: the ConvRot rotation, the transform, and comfy-kitchen parity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cq.errors import ConfigError, CqError
from cq.kernels import int8_linear
from cq.state import Basis, LayerState
from cq.transforms import absmax_scale, reconstruct, round_to_nearest, w8a8_output_error
from cq.transforms.convrot import ConvRot, ConvRotConfig, convrot, convrot_groupsizes, rotate_hessian

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer(n=48, k=512, seed=0, hessian=True):
    g = _gen(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    h = None
    if hessian:
        x = torch.randn(4 * k, k, generator=g) * torch.exp(torch.randn(k, generator=g))
        h = (2.0 / x.shape[0]) * (x.T @ x)
    return LayerState.from_weight("blk.fc", w, hessian=h)


@pytest.mark.parametrize("g", [16, 64, 256, 1024])
def test_convrot_is_an_input_rotation_with_comfy_fields(g):
    r = ConvRot(g)
    assert isinstance(r, Basis)
    assert dict(r.comfy_fields()) == {"convrot": True, "convrot_groupsize": g}
    x = torch.randn(3, 2 * g, generator=_gen(g), dtype=F64)
    m = r.matrix(2 * g)
    assert torch.allclose(r.rotate(x), x @ m, atol=1e-12)
    assert torch.allclose(r.unrotate(x), x @ m.T, atol=1e-12)
    assert torch.allclose(r.unrotate(r.rotate(x)), x, atol=1e-12)
    assert torch.allclose(m @ m.T, torch.eye(2 * g, dtype=F64), atol=1e-12)


@pytest.mark.parametrize("g", [4, 8, 32, 0, -16, 256.0, True, "256"])
def test_convrot_groupsize_must_be_a_power_of_four_from_16(g):
    with pytest.raises(ConfigError, match="power of 4"):
        ConvRot(g)
    with pytest.raises(ConfigError, match="power of 4"):
        ConvRotConfig(groupsize=g)


def test_groupsizes_for_a_width_and_for_features_lists_them():
    assert convrot_groupsizes(3072) == (16, 64, 256, 1024)
    assert convrot_groupsizes(320) == (16, 64)
    assert convrot_groupsizes(24) == ()
    with pytest.raises(ConfigError, match=r"fc: ConvRot groupsize=256 does not divide in_features=320; "
                                          r"valid choices for K=320 are \[16, 64\]"):
        ConvRot.for_features(320, 256, layer="fc")


def _rotation_bound(x: torch.Tensor, g: int) -> torch.Tensor:
    """Bound on |a - b| for two float32 evaluations of ``x·R`` (any summation order, any CPU).

    Each entry of ``x·R`` is a G-term dot product with ``|R_ij| = 1/√G``; a float32 evaluation in any
    order is within ``G·eps/2 · Σ|x_i||R_ij|`` of the exact value (the standard γ_G bound), so two of
    them differ by at most ``G·eps · Σ_group |x_i| / √G = √G·eps · Σ_group |x_i|``.
    """
    sums = x.abs().to(F64).reshape(*x.shape[:-1], -1, g).sum(-1, keepdim=True)
    return (g ** 0.5 * torch.finfo(torch.float32).eps * sums).expand(*x.shape[:-1], -1, g).reshape(x.shape)


@pytest.mark.parametrize("g", [16, 64, 256])
def test_rotation_matches_comfy_kitchens_weight_rotation(g):
    quant = pytest.importorskip("comfy_kitchen.backends.eager.quantization")
    w = torch.randn(32, 1024, generator=_gen(g))
    ck = quant.rotate_int8_convrot_weight(w, g)
    ours = ConvRot(g).rotate(w)  # Kronecker factors vs comfy-kitchen's dense matmul
    assert bool(((ours.to(F64) - ck.to(F64)).abs() <= _rotation_bound(w, g)).all())
    assert ours.dtype == torch.float32


def test_rotation_of_low_precision_inputs_is_float32_and_input_untouched():
    x = torch.randn(4, 64, generator=_gen(1)).to(torch.bfloat16)
    x0 = x.clone()
    y = ConvRot(16).rotate(x)
    assert y.dtype == torch.float32 and torch.equal(x, x0)
    with pytest.raises(ConfigError, match="does not divide the last dim 48"):
        ConvRot(64).rotate(torch.zeros(2, 48))


def test_convrot_transform_rotates_weight_and_hessian_consistently():
    s = _layer()
    w0, h0 = s.weight.clone(), s.hessian.clone()
    r = convrot(s, cfg=ConvRotConfig(groupsize=64))
    assert torch.equal(s.weight, w0) and torch.equal(s.hessian, h0)  # inputs never modified
    assert r.basis == ConvRot(64) and r.original is s.weight
    m = r.basis.matrix(512)
    assert torch.allclose(r.weight.to(F64), w0.to(F64) @ m, atol=1e-6)
    assert torch.allclose(r.hessian.to(F64), m.T @ h0.to(F64) @ m, rtol=1e-5, atol=1e-4)
    tr0 = float(torch.trace(w0.to(F64) @ h0.to(F64) @ w0.to(F64).T))
    tr1 = float(torch.trace(r.weight.to(F64) @ r.hessian.to(F64) @ r.weight.to(F64).T))
    assert tr1 == pytest.approx(tr0, rel=1e-5)
    assert r.stage_names() == ("convrot",)


def test_rotate_hessian_keeps_dtype_and_symmetry():
    h = torch.randn(64, 64, generator=_gen(3), dtype=F64)
    h = h @ h.T
    out = rotate_hessian(h.to(torch.float32), ConvRot(16))
    assert out.dtype == torch.float32 and torch.equal(out, out.T)


@pytest.mark.parametrize("k, expected", [(512, 256), (320, 64), (3 * 16, 16), (768, 256)])
def test_auto_groupsize_picks_the_largest_of_256_64_16(k, expected):
    r = convrot(LayerState.from_weight("fc", torch.randn(4, k, generator=_gen(k))))
    assert r.basis == ConvRot(expected)
    assert ConvRotConfig().groupsize == "auto"


def test_auto_leaves_a_layer_whose_width_is_not_a_multiple_of_16_unrotated_with_a_note():
    s = LayerState.from_weight("fc", torch.randn(4, 24, generator=_gen(0)))
    r = convrot(s)
    assert r.basis is None and r.weight is s.weight
    assert r.notes == ("ConvRot skipped: in_features=24 is not a multiple of 16; layer left unrotated",)


def test_explicit_groupsize_that_does_not_divide_k_is_a_config_error_naming_the_layer():
    with pytest.raises(ConfigError, match=r"blk.fc: .*valid choices for K=320 are \[16, 64\]"):
        convrot(LayerState.from_weight("blk.fc", torch.randn(4, 320)), cfg=ConvRotConfig(groupsize=256))


def test_convrot_refuses_quantized_or_already_rotated_states():
    s = convrot(_layer(hessian=False))
    with pytest.raises(CqError, match="already rotated"):
        convrot(s)
    q = round_to_nearest(absmax_scale(_layer(hessian=False)))
    with pytest.raises(CqError, match="before quantization"):
        convrot(q)


def test_reconstruct_maps_back_to_the_original_basis_within_int8_rounding():
    s = round_to_nearest(absmax_scale(convrot(_layer(hessian=False))))
    w = s.original
    rel = float((reconstruct(s) - w).norm() / w.norm())
    assert rel < 0.012  # per-row INT8 on Gaussian weights: ~0.0076 (comfyui-format.md §3.2)


def _quantized_tensor(state):
    tensor_mod = pytest.importorskip("comfy_kitchen.tensor")
    layout = tensor_mod.get_layout_class("TensorWiseINT8Layout")
    params = layout.Params(scale=state.scale, orig_dtype=torch.float32, orig_shape=tuple(state.shape),
                           **dict(state.basis.comfy_fields()))
    return tensor_mod.QuantizedTensor(state.codes, "TensorWiseINT8Layout", params)


@pytest.mark.parametrize("g", [16, 64, 256])
def test_comfy_kitchen_dequantizes_convrot_layers_to_the_original_basis(g):
    s = round_to_nearest(absmax_scale(convrot(_layer(hessian=False, seed=g), cfg=ConvRotConfig(groupsize=g))))
    qt = _quantized_tensor(s)
    dq = qt.dequantize().float()
    # the same codes·scale rotated back by two float32 implementations: the γ_G bound above
    wq = s.codes.float() * s.scale
    assert bool(((dq.to(F64) - reconstruct(s).to(F64)).abs() <= _rotation_bound(wq, g)).all())
    w = s.original
    assert float((dq - w).norm() / w.norm()) < 0.012


def test_comfy_kitchen_forward_matches_cqs_w8a8_model():
    """cq's W8A8 model is comfy-kitchen's forward, up to activation codes flipped at rounding ties.

    cq rotates activations with the runtime's own dense per-group float32 product
    (``ConvRot.activations``), but another CPU's BLAS may sum in another order and move a rotated
    value by ~1e-6; a value that close to a rounding tie then gets the neighbouring int8 code. One
    flipped code of token t at feature j moves ``y[t, n]`` by ``s_x[t]·s_w[n]·|q_w[n, j]|`` <=
    ``127·s_x[t]·s_w[n]``. The bound allows FLIPS = 2 flips per token (ties within 1e-6 among 512
    features: expected count ~1e-3) plus 4 float32 ulps of |y| for the rescale; it holds on any
    x86 CPU, and is 0 flips on this one. The metric then differs from the runtime's by at most
    ``‖bound‖ / ‖ref‖`` (triangle inequality) plus its own float32 accumulation (1e-5 relative).
    """
    from cq.kernels.reference import quantize_activations_ref

    flips = 2
    s = round_to_nearest(absmax_scale(convrot(_layer(hessian=False, seed=5))))
    qt = _quantized_tensor(s)
    x = torch.randn(32, 512, generator=_gen(6))
    y_ck = F.linear(x, qt).float()
    xr = s.basis.activations(x)
    y_cq = int8_linear(xr, s.codes, s.scale)
    _, sx = quantize_activations_ref(xr)
    bound = flips * 127 * sx * s.scale.reshape(1, -1) + 4 * torch.finfo(torch.float32).eps * y_cq.abs()
    assert bool((y_ck - y_cq).abs().le(bound).all())
    ref = x.to(F64) @ s.original.to(F64).T
    err_ck = float((y_ck.to(F64) - ref).norm() / ref.norm())
    metric = w8a8_output_error(s, x)
    assert abs(err_ck - metric) <= float(bound.to(F64).norm() / ref.norm()) + 1e-5 * err_ck
