"""Tests for cq.transforms.quip_refine: LDLQ re-passes, greedy CD, Frobenius rescale, the QuIP converter options."""

import pytest
import torch

from cq.converters.quip import QuIPInt8Converter
from cq.errors import ConfigError, CqError
from cq.state import LayerState, PerGroup, PerRow, PerTensor
from cq.synthetic import outlier_layer
from cq.transforms import ScaleConfig, absmax_scale, round_to_nearest
from cq.transforms.ldlq import LDLQConfig, ldlq
from cq.transforms.quip import quip_pipeline
from cq.transforms.quip_refine import (GreedyCDConfig, QuIPRefineConfig, RepassConfig, ScaleMultiplyConfig,
                                       frobenius_rescale, greedy_cd, ldlq_repass, row_losses, scale_multiply,
                                       with_refinements)
from cq.transforms.scales import expand_scale


def layer(seed=0, n=24, k=64, t=512, granularity=PerRow()):
    w, _, h = outlier_layer(n, k, t, seed=seed)
    return absmax_scale(LayerState.from_weight("blk.fc", w, hessian=h), cfg=ScaleConfig(granularity))


def loss64(state):
    s = expand_scale(state.scale, state.granularity, state.shape)
    return row_losses(state.weight, s, state.codes, state.hessian)


def brute_force_coordinate_optimum(state, row, col):
    """The best code for one coordinate with the others fixed, by trying all 255 values (float64)."""
    s = expand_scale(state.scale, state.granularity, state.shape).to(torch.float64)
    w, h = state.weight.to(torch.float64), state.hessian.to(torch.float64)
    q = state.codes.to(torch.float64).clone()
    best = None
    for c in range(-127, 128):
        q[row, col] = c
        e = w[row] - s[row] * q[row]
        val = float(e @ h @ e)
        if best is None or val < best[0]:
            best = (val, c)
    return best[1]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("granularity", [PerRow(), PerTensor(), PerGroup(16)])
def test_every_stage_is_never_worse_row_by_row(seed, granularity):
    for start in (round_to_nearest(layer(seed, granularity=granularity)),
                  ldlq(layer(seed, granularity=granularity), cfg=LDLQConfig(actorder=True))):
        before = loss64(start)
        for out in (ldlq_repass(start, cfg=RepassConfig(passes=2, block_size=16)),
                    greedy_cd(start, cfg=GreedyCDConfig(50))):
            assert torch.all(loss64(out) <= before)
            assert out.codes.dtype == torch.int8 and int(out.codes.abs().max()) <= 127


def test_repass_from_rtn_recovers_most_of_ldlq_and_reaches_coordinate_optima():
    start = round_to_nearest(layer(1))
    out = ldlq_repass(start, cfg=RepassConfig(passes=20, block_size=8))
    m = out.metrics
    assert m["ldlq_repass_rel_after"] < 0.9 * m["ldlq_repass_rel_before"]
    if m["ldlq_repass_passes"] < 20:  # converged: every coordinate is at its exact 1-D optimum
        for r, c in [(0, 0), (3, 17), (23, 63)]:
            assert brute_force_coordinate_optimum(out, r, c) == int(out.codes[r, c])


def test_repass_blocked_equals_unblocked():
    # The lazy block update is the same Gauss–Seidel sweep as one rank-1 update per column.
    start = round_to_nearest(layer(2))
    a = ldlq_repass(start, cfg=RepassConfig(passes=1, block_size=1))
    b = ldlq_repass(start, cfg=RepassConfig(passes=1, block_size=64))
    assert torch.equal(a.codes, b.codes)


def test_greedy_cd_matches_a_brute_force_single_move():
    start = round_to_nearest(layer(3, n=4, k=16, t=128))
    out = greedy_cd(start, cfg=GreedyCDConfig(1))
    s = expand_scale(start.scale, start.granularity, start.shape).to(torch.float64)
    for r in range(4):
        base = float(loss64(start)[r])
        best = base
        for j in range(16):
            for d in (-1, 1):
                q = start.codes.to(torch.float64).clone()
                q[r, j] += d
                e = start.weight[r].to(torch.float64) - s[r] * q[r]
                best = min(best, float(e @ start.hessian.to(torch.float64) @ e))
        assert float(loss64(out)[r]) == pytest.approx(best, rel=1e-9, abs=1e-18)


def test_frobenius_rescale_is_the_least_squares_scale():
    start = ldlq(layer(4))
    out = frobenius_rescale(start)
    h = start.hessian.to(torch.float64)
    for r in range(3):
        q, w = start.codes[r].to(torch.float64), start.weight[r].to(torch.float64)
        grid = torch.linspace(0.9, 1.1, 201, dtype=torch.float64) * float(out.scale[r])
        losses = [float((w - g * q) @ h @ (w - g * q)) for g in grid]
        assert min(losses) >= float(loss64(out)[r]) * (1 - 1e-9)
    assert torch.all(loss64(out) <= loss64(start))


def test_no_hessian_leaves_codes_and_says_so():
    s = round_to_nearest(absmax_scale(LayerState.from_weight("fc", torch.randn(4, 8))))
    out = greedy_cd(s)
    assert torch.equal(out.codes, s.codes)
    assert "no calibration" in out.notes[-1]


def test_bad_inputs_are_clear_errors():
    with pytest.raises(CqError, match="after a rounding stage"):
        greedy_cd(layer(0))
    with pytest.raises(CqError, match="before the rounding stage"):
        scale_multiply(round_to_nearest(layer(0)))
    with pytest.raises(ConfigError, match="frobenius_rho"):
        QuIPRefineConfig(frobenius_rho=0.0)
    with pytest.raises(ConfigError, match="per-row or tensor"):
        frobenius_rescale(round_to_nearest(layer(0, granularity=PerGroup(16))))
    with pytest.raises(ConfigError, match="no 'ldlq' stage"):
        with_refinements(quip_pipeline().without("ldlq"), QuIPRefineConfig(greedy_cd=True))


def test_scale_multiply_clips_then_ldlq_compensates():
    s = layer(5)
    out = ldlq(scale_multiply(s, cfg=ScaleMultiplyConfig(0.9)))
    assert int(out.codes.abs().max()) == 127
    assert torch.allclose(out.scale, s.scale * 0.9)


def test_quip_converter_options_build_stages_and_never_worsen_the_objective():
    w, x, h = outlier_layer(16, 64, 512, seed=6)
    plain = QuIPInt8Converter(device="cpu", output="convrot")
    plain.convert(w, H=h)
    c = QuIPInt8Converter(device="cpu", output="convrot", ldlq_iterations=3, use_greedy_coordinate_descent=True,
                          greedy_cd_iterations=20, frobenius_rho=1.0)
    assert c.pipeline.names[-2:] == ("ldlq_repass", "greedy_cd")
    c.convert(w, H=h)
    assert c.last_state.metrics["rel_out_h"] <= plain.last_state.metrics["rel_out_h"]
    c2 = QuIPInt8Converter(device="cpu", output="requant", frobenius_rho=0.97, use_learned_rounding=True)
    assert "scale_multiply" in c2.pipeline.names and "frobenius_rescale" in c2.pipeline.names
    r = c2.convert(w, H=h)
    assert r.q.dtype == torch.int8 and torch.isfinite(r.dequantized).all()
