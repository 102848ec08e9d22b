"""Bias correction from calibration means: exact on the mean, W8A8 term, refusals without a bias or data."""

from __future__ import annotations

import attrs
import pytest
import torch

from cq.calibrate import activation_stats
from cq.errors import ConfigError
from cq.kernels import int8_linear
from cq.state import LayerState
from cq.transforms import absmax_scale, reconstruct, round_to_nearest
from cq.transforms.bias_correction import BiasCorrectionConfig, bias_correction
from cq.transforms.convrot import convrot
from tests.float_bounds import U32, gamma

F64 = torch.float64


def _residual_bound(q, out, x, y32=None, err_mean=None):
    """Elementwise bound on ``|mean_t y_t − mean_t (x_t·Wᵀ + b)|`` after bias correction, from the
    float32 roundings that remain (the correction is exact in exact arithmetic).

    With the input mean ``μ`` a float32 mean over T tokens (``|μ − x̄| ≤ γ_T·mean|x|``), the weight-only
    residual is ``(W − Ŵ)(μ − x̄)`` plus the bias's float32 rounding (``u·|b'|``). The W8A8 path adds,
    with ``Ŵ_w`` the working-basis codes·scale and ``R`` the ConvRot (|R_ij| = 1/√G):
    the float32 un-rotation inside ``Ŵ = reconstruct`` (``γ_G·|Ŵ_w||Rᵀ|·|x̄|``), the float32 rotation
    of each token (``γ_G·|Ŵ_w|·mean|x||R|``), the float32 mean activation error (``u·|Ŵ_w||ē|``) and
    the int8 epilogue of each token (``γ₄·(|y − b'| + |b'|)``, see tests/kernels/test_int8_linear.py).
    The activation codes are the same as in the statistics (the runtime's rotation, same machine), so
    no flips enter. Plus the float64 evaluation of both sides (``γ_{K+T}`` at 2⁻⁵³).
    """
    t, k = x.shape
    x64 = x.to(F64)
    xbar_abs = x64.abs().mean(0)
    w = (q.original if q.original is not None else q.weight).to(F64)
    w_hat = reconstruct(q).to(F64)
    b_new = out.bias.to(F64).abs()
    bound = gamma(t) * ((w - w_hat).abs() @ xbar_abs) + U32 * b_new
    bound = bound + gamma(k + t + 2, 2.0 ** -53) * (x64.abs() @ (w.abs() + w_hat.abs()).T + 2 * b_new).mean(0)
    if y32 is None:
        return bound
    g = q.basis.groupsize
    r_abs = q.basis.matrix(k).abs()
    ww = (q.codes.to(F64) * q.scale.to(F64)).abs()
    bound = bound + gamma(g) * (ww @ (x64.mean(0).abs() @ r_abs) + ww @ (x64.abs() @ r_abs).mean(0))
    bound = bound + U32 * (ww @ err_mean.to(F64).abs())
    return bound + gamma(4) * ((y32.to(F64) - out.bias.to(F64)).abs() + b_new).mean(0)


def _layer(seed=0, n=8, k=64, t=1024, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g) + 2.0 * torch.rand(k, generator=g)  # non-zero channel means
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g) * 0.1 if bias else None
    meta = {"calibration": {"input_mean": x.mean(0)}}
    return LayerState.from_weight("fc", w, bias=b, hessian=2 / t * x.T @ x, meta=meta), x


def test_weight_only_mean_error_is_removed_exactly():
    s, x = _layer()
    q = round_to_nearest(absmax_scale(s))
    out = bias_correction(q, cfg=BiasCorrectionConfig(w8a8=False))
    x64 = x.to(F64)
    ref = (x64 @ s.weight.to(F64).T + s.bias.to(F64)).mean(0)
    got = (x64 @ reconstruct(out).to(F64).T + out.bias.to(F64)).mean(0)
    before = (x64 @ reconstruct(q).to(F64).T + s.bias.to(F64)).mean(0)
    # The bias is stored in float32 and μ is a float32 mean: _residual_bound (~1e-6 here, against
    # an uncorrected mean error of ~6e-3)
    bound = _residual_bound(q, out, x)
    assert bool(((got - ref).abs() <= bound).all())
    assert bool(((before - ref).abs() > 100 * bound).any())  # there was something to correct
    assert out.weight is q.weight and torch.equal(out.codes, q.codes)


def test_w8a8_mean_error_is_removed_on_the_calibration_tokens():
    s, x = _layer(seed=1)
    s = absmax_scale(convrot(s))
    s = attrs.evolve(s, meta={**s.meta, "w8a8_stats": {64: activation_stats(x, groupsize=64)}})
    q = round_to_nearest(s)
    out = bias_correction(q)
    ref = (x.to(F64) @ s.original.to(F64).T + s.bias.to(F64)).mean(0)
    xr = q.basis.activations(x)  # the runtime's rotation, as the statistics used: the same codes
    y = int8_linear(xr, out.codes, out.scale, out.bias)
    got = y.to(F64).mean(0)
    before = int8_linear(xr, q.codes, q.scale, q.bias).to(F64).mean(0)
    bound = _residual_bound(q, out, x, y, s.meta["w8a8_stats"][64].err_mean)
    assert bool(((got - ref).abs() <= bound).all())
    assert bool(((before - ref).abs() > 10 * bound).any())


def test_no_bias_means_no_new_tensor():
    s, _ = _layer(bias=False)
    q = round_to_nearest(absmax_scale(s))
    out = bias_correction(q)
    assert out.bias is None and any("no bias" in n for n in out.notes)


def test_without_calibration_means_it_refuses_with_a_note():
    s, _ = _layer()
    bare = LayerState.from_weight("fc", s.weight, bias=s.bias)
    q = round_to_nearest(absmax_scale(bare))
    out = bias_correction(q)
    assert out.bias is q.bias and any("without data would be noise" in n for n in out.notes)


def test_before_rounding_is_an_error():
    s, _ = _layer()
    with pytest.raises(ConfigError, match="after rounding"):
        bias_correction(absmax_scale(s))
    with pytest.raises(ConfigError, match="True or False"):
        BiasCorrectionConfig(w8a8="yes")


@pytest.mark.slow  # ~4 s, mostly importing comfy-kitchen
def test_written_file_carries_the_corrected_bias_through_comfy_kitchen(tmp_path):
    pytest.importorskip("comfy_kitchen")
    import torch.nn.functional as F

    from cq.io import layer_tensors, write_safetensors
    from cq.io.comfy_kitchen_check import load_comfy_layers

    s, x = _layer(seed=3, n=16, k=64, t=2048)
    s = attrs.evolve(absmax_scale(convrot(s)), meta={**s.meta, "w8a8_stats": {64: activation_stats(x, groupsize=64)}})
    q = round_to_nearest(s)
    out = bias_correction(q)
    paths = {}
    for label, st in (("plain", q), ("corrected", out)):
        paths[label] = tmp_path / f"{label}.safetensors"
        write_safetensors(paths[label], layer_tensors(st))
    ref = (x.to(F64) @ s.original.to(F64).T + s.bias.to(F64)).mean(0)
    err, ys = {}, {}
    for label, path in paths.items():
        qt, bias, _ = load_comfy_layers(path, compute_dtype=torch.float32)["fc"]
        with torch.no_grad():
            y = F.linear(x, qt, bias)  # ComfyUI's int8 forward: ConvRot, per-token int8, int8 GEMM
        err[label] = (y.to(F64).mean(0) - ref).abs()
        ys[label] = y
    # The runtime rotates activations with the same float32 ops as the statistics (bit-identical on
    # one machine: tests/test_safety_numbers.py), so its codes are cq's; its epilogue rounds in its own
    # order, which γ₄ covers: the bound of the float32 path above holds for comfy-kitchen's forward.
    bound = _residual_bound(q, out, x, ys["corrected"], s.meta["w8a8_stats"][64].err_mean)
    assert bool((err["corrected"] <= bound).all())
    assert bool((err["plain"] > 10 * bound).any())
