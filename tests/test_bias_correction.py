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

F64 = torch.float64


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
    # The bias is stored in float32: |error| ≤ 2^-24 · |b| plus the float32 mean (~1e-7 relative).
    assert float((got - ref).abs().max()) < 1e-6
    assert float((before - ref).abs().max()) > 1e-4  # there was something to correct
    assert out.weight is q.weight and torch.equal(out.codes, q.codes)


def test_w8a8_mean_error_is_removed_on_the_calibration_tokens():
    s, x = _layer(seed=1)
    s = absmax_scale(convrot(s))
    s = attrs.evolve(s, meta={**s.meta, "w8a8_stats": {64: activation_stats(x, groupsize=64)}})
    q = round_to_nearest(s)
    out = bias_correction(q)
    ref = (x.to(F64) @ s.original.to(F64).T + s.bias.to(F64)).mean(0)
    xr = q.basis.rotate(x)
    got = int8_linear(xr, out.codes, out.scale, out.bias).to(F64).mean(0)
    before = int8_linear(xr, q.codes, q.scale, q.bias).to(F64).mean(0)
    # int8 GEMM exact, per-token float32 rescale (~1e-7 relative of |y| ≈ 1): residual < 1e-5.
    assert float((got - ref).abs().max()) < 1e-5 < float((before - ref).abs().max())


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
    err = {}
    for label, path in paths.items():
        qt, bias, _ = load_comfy_layers(path, compute_dtype=torch.float32)["fc"]
        with torch.no_grad():
            y = F.linear(x, qt, bias)  # ComfyUI's int8 forward: ConvRot, per-token int8, int8 GEMM
        err[label] = float((y.to(F64).mean(0) - ref).abs().max())
    # The runtime's kernel matches cq's activation path up to float32 rescaling (~1e-6 of |y|).
    assert err["corrected"] < 1e-5 and err["corrected"] < 0.1 * err["plain"]
