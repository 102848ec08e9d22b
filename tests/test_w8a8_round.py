"""W8A8-aware rounding: activation-path statistics, the objective, the transform, capture(w8a8=...)."""

from __future__ import annotations

import pytest
import torch

from cq.calibrate import (activation_finalize, activation_init, activation_stats, activation_update, capture,
                          w8a8_groupsize)
from cq.errors import ConfigError, InputError
from cq.state import LayerState, PerGroup, PerRow
from cq.transforms import ScaleConfig, absmax_scale
from cq.transforms.convrot import ConvRot, convrot
from cq.transforms.ldlq import LDLQConfig, ldlq
from cq.transforms.scale_search import ScaleSearchConfig
from cq.transforms.w8a8_round import W8A8RoundConfig, stats_for_state, w8a8_objective, w8a8_round

from tests.float_bounds import U32, gamma

F64 = torch.float64


def _data(n=8, k=64, t=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g) * torch.exp(torch.randn(k, generator=g))
    w = torch.randn(n, k, generator=g) * 0.02
    return w, x


def _oracle(x, groupsize):
    """The runtime's activation path written out in float64 from the comfy-kitchen recipe."""
    xw = x.to(torch.float32)
    if groupsize:
        # the runtime's dense per-group float32 rotation, the call the statistics make (one chunk of
        # T ≤ 4096 tokens: the same shape), so the activation codes are the same on any CPU; the
        # Kronecker ConvRot.rotate can differ by ~1e-6 and flip a code at a rounding tie
        xw = ConvRot(groupsize).activations(xw)
    s = (xw.abs().amax(-1, keepdim=True) / 127.0).clamp(min=1e-30)
    xq = (torch.round(xw / s).clamp(-128, 127) * s).to(F64)
    return xw.to(F64), xq


@pytest.mark.parametrize("groupsize", [0, 16, 64])
def test_activation_stats_match_a_float64_oracle(groupsize):
    _, x = _data(seed=groupsize)
    st = activation_stats(x, groupsize=groupsize)
    xw, xq = _oracle(x, groupsize)
    t = x.shape[0]
    e = xq - xw
    # Same codes, same float32 inputs: the statistics are float64 sums over T tokens (any order:
    # γ_T at 2⁻⁵³ of the sum of |terms|, twice for the two orders) stored in float32 (one rounding, 2⁻²⁴
    # relative). A wrong 2/T, a missing rotation or float32 accumulation is far outside.
    def close(got, want, abs_terms):
        bound = (U32 + 2.0 ** -50) * want.abs() + 2 * gamma(t + 2, 2.0 ** -53) * abs_terms
        assert bool(((got.to(F64) - want).abs() <= bound).all())

    close(st.hessian, 2 / t * xq.T @ xq, 2 / t * xq.abs().T @ xq.abs())
    close(st.cross, 2 / t * xq.T @ xw, 2 / t * xq.abs().T @ xw.abs())
    close(st.err_sq, 2 / t * (e * e).sum(0), 2 / t * (e * e).sum(0))
    close(st.err_mean, e.mean(0), e.abs().mean(0))
    assert st.samples == t and st.groupsize == groupsize


def test_activation_fold_is_order_free_and_pure():
    # Integer-valued tokens: each rotated value is a 16-term sum of ±x_i/4, exact in float32 in any
    # order, so chunks of 100 and 412 rotate to the same bits as one of 512 on any BLAS (no activation
    # code can flip at a tie). The float64 sums then differ by ≤ γ_T at 2⁻⁵³ and each is rounded to
    # float32 once: within 2·2⁻²⁴ relative (rtol 1e-6) plus a tiny absolute term.
    _, x = _data()
    x = torch.round(x * 16)
    acc0 = activation_init(64, 16)
    a = activation_finalize(activation_update(activation_update(acc0, x[:100]), x[100:]))
    b = activation_stats(x, groupsize=16)
    assert acc0.count == 0 and float(acc0.sum_qq.abs().sum()) == 0  # the accumulator is a value
    torch.testing.assert_close(a.hessian, b.hessian, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.err_sq, b.err_sq, rtol=1e-6, atol=1e-12)


def test_activation_init_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="does not divide"):
        activation_init(48, 64)
    with pytest.raises(ConfigError, match="positive int"):
        activation_init(0)
    with pytest.raises(ConfigError, match="ConvRot group size"):
        w8a8_groupsize(64, 3)
    assert w8a8_groupsize(512, "auto") == 256 and w8a8_groupsize(64, 256) is None


def test_exact_activations_give_the_plain_objective():
    # Integer tokens whose absmax is 127: the per-token int8 round trip is exact, E = 0.
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-100, 100, (256, 32), generator=g).to(torch.float32)
    x[:, 0] = 127.0
    st = activation_stats(x, groupsize=0)
    assert float(st.err_sq.abs().max()) == 0.0
    w = torch.randn(4, 32, generator=g, dtype=F64)
    h = st.hessian  # with E = 0, X̃ᵀX̃ = X̃ᵀX = XᵀX bit for bit
    target, hq = w8a8_objective(w, h, st, mix=1.0)
    # solve(H, H·w) in float64: error ≤ cond(H)·eps64 ≈ 1e3 · 1e-16.
    torch.testing.assert_close(target, w, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(hq, h.to(F64), rtol=0, atol=0)


def test_full_target_is_the_least_squares_solution():
    # mix=1, ridge=0: X̃ᵀ(X̃ t − X w) = 0 for every row (the normal equations), checked in float64.
    w, x = _data(k=32, t=1024, seed=3)
    w = w.to(F64)
    st = activation_stats(x, groupsize=16)
    xw, xq = _oracle(x, 16)
    ww = ConvRot(16).rotate(w)
    h = 2 / x.shape[0] * xw.T @ xw
    target, _ = w8a8_objective(ww, h, st, mix=1.0)
    grad = xq.T @ (xq @ target.T - xw @ ww.T)
    scale = (xq.T @ (xw @ ww.T)).abs().max()
    # Inputs are float32 statistics (relative 6e-8) solved in float64 with 1e-8 jitter: the
    # residual is ~1e-6 of the right-hand side.
    assert float(grad.abs().max() / scale) < 1e-4


def test_noise_model_is_the_wiener_shrinkage():
    w, x = _data(k=32, t=2048, seed=4)
    st = activation_stats(x, groupsize=0)
    h = 2 / x.shape[0] * x.to(F64).T @ x.to(F64)
    target, hq = w8a8_objective(w, h, st)
    d = float(st.err_sq.to(F64).mean())
    expect = w.to(F64) @ h @ torch.linalg.inv(h + d * torch.eye(32, dtype=F64))
    torch.testing.assert_close(target, expect, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(hq, h + d * torch.eye(32, dtype=F64))
    assert float(target.norm()) < float(w.norm())  # shrinks


def _state(seed=0, k=64):
    w, x = _data(k=k, seed=seed)
    h = 2 / x.shape[0] * x.T @ x
    meta = {"w8a8_stats": {0: activation_stats(x, groupsize=0), 64: activation_stats(x, groupsize=64)}}
    return LayerState.from_weight("fc", w, hessian=h, meta=meta), x


def test_w8a8_round_keeps_weight_and_hessian_and_reports_both_errors():
    s, _ = _state()
    s = absmax_scale(convrot(s), cfg=ScaleConfig(PerRow()))
    out = w8a8_round(s)
    assert out.weight is s.weight and out.hessian is s.hessian and out.scale is s.scale
    assert out.codes.dtype == torch.int8 and out.stage_names()[-1] == "w8a8_round"
    assert {"rel_out_h", "rel_out_w8a8_obj"} <= set(out.metrics)
    assert stats_for_state(s).groupsize == 64


def test_w8a8_round_with_zero_noise_equals_ldlq():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-100, 100, (256, 32), generator=g).to(torch.float32)
    x[:, 0] = 127.0
    w = torch.randn(6, 32, generator=g) * 0.02
    s = absmax_scale(LayerState.from_weight("fc", w, hessian=2 / 256 * x.T @ x,
                                            meta={"w8a8_stats": {0: activation_stats(x)}}))
    assert torch.equal(w8a8_round(s).codes, ldlq(s).codes)


def test_without_statistics_it_is_plain_ldlq_with_a_note():
    s, _ = _state()
    s = absmax_scale(LayerState.from_weight("fc", s.weight, hessian=s.hessian))
    out = w8a8_round(s)
    assert torch.equal(out.codes, ldlq(s).codes)
    assert any("no W8A8 statistics" in n for n in out.notes)


def test_scale_search_inside_w8a8_round_never_loses_on_its_objective():
    s, _ = _state(seed=5)
    s = absmax_scale(convrot(s))
    plain = w8a8_round(s)
    searched = w8a8_round(s, cfg=W8A8RoundConfig(scale_search=ScaleSearchConfig(grid=(1.0, 0.97, 0.9))))
    assert searched.metrics["rel_out_w8a8_obj"] <= plain.metrics["rel_out_w8a8_obj"] * (1 + 1e-9)


def test_config_and_state_errors():
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        W8A8RoundConfig(mix=2)
    with pytest.raises(ConfigError, match=">= 0"):
        W8A8RoundConfig(ridge=-1)
    with pytest.raises(ConfigError, match="ScaleSearchConfig"):
        W8A8RoundConfig(scale_search="yes")
    s, _ = _state()
    with pytest.raises(ConfigError, match="per-row"):
        w8a8_round(absmax_scale(s, cfg=ScaleConfig(PerGroup(16))))
    bad = LayerState.from_weight("fc", torch.randn(2, 32), hessian=torch.eye(32),
                                 meta={"w8a8_stats": {0: activation_stats(torch.randn(8, 16))}})
    with pytest.raises(InputError, match="different layer"):
        w8a8_round(absmax_scale(bad))


def test_capture_gathers_w8a8_statistics_per_basis():
    g = torch.Generator().manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 8)).eval()
    # integer-valued inputs: the 64-group rotation sums ±x_i/8 exactly in float32, so the hooked
    # batches (20 and 12 tokens) and the direct call (32) quantize the same values on any BLAS
    inputs = [torch.round(torch.randn(20, 64, generator=g) * 16), torch.round(torch.randn(12, 64, generator=g) * 16)]
    stats = capture(model, inputs, w8a8=("none", "auto"))
    assert sorted(stats["0"].w8a8) == [0, 64] and sorted(stats["2"].w8a8) == [0, 16]
    direct = activation_stats(torch.cat(inputs), groupsize=64)
    torch.testing.assert_close(stats["0"].w8a8[64].hessian, direct.hessian, rtol=1e-6, atol=1e-7)
    assert stats["0"].w8a8[64].samples == 32
    assert capture(model, inputs)["0"].w8a8 == {}  # off by default: old files stay as they were
    with pytest.raises(ConfigError, match="w8a8 basis"):
        capture(model, inputs, w8a8=("sideways",))


def test_calibration_file_round_trips_the_w8a8_diagonals(tmp_path):
    from cq.io.calibration import attach_calibration, load_calibration, save_calibration

    g = torch.Generator().manual_seed(8)
    model = torch.nn.Sequential(torch.nn.Linear(64, 8)).eval()
    stats = capture(model, [torch.randn(40, 64, generator=g)], w8a8=("none", "auto"), name_map="blocks.")
    old = capture(model, [torch.randn(40, 64, generator=g)], name_map="blocks.")
    path = save_calibration(tmp_path / "c.safetensors", stats)
    cal = load_calibration(path)
    loaded = cal.w8a8_stats("blocks.0")
    assert sorted(loaded) == [0, 64] and loaded[64].hessian is None and loaded[64].samples == 40
    for gs in (0, 64):
        for field in ("err_sq", "err_x", "err_mean"):
            assert torch.equal(getattr(loaded[gs], field), getattr(stats["blocks.0"].w8a8[gs], field))
    s = attach_calibration(LayerState.from_weight("blocks.0", model[0].weight.detach()), cal)
    assert sorted(s.meta["w8a8_stats"]) == [0, 64]
    with pytest.raises(ConfigError, match="mix=1"):
        w8a8_objective(s.weight, s.hessian, loaded[0], mix=1.0)
    # A file without the statistics (the format before them) loads as before: plain LDLQ then.
    plain = load_calibration(save_calibration(tmp_path / "old.safetensors", old))
    s_old = attach_calibration(LayerState.from_weight("blocks.0", model[0].weight.detach()), plain)
    assert "w8a8_stats" not in s_old.meta and plain.w8a8_stats("blocks.0") == {}
