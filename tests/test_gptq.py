"""Tests for cq.transforms.gptq (gptq_update) cq.converters.gptq (GPTQInt8Converter) and cq.recipes.gptq_pipeline."""

import math
import warnings

import pytest
import torch

from cq.converters.gptq import GPTQInt8Converter
from cq.recipes import gptq_pipeline
from cq.errors import ConfigError, CqError, InputError
from cq.state import LayerState, PerBlock, PerGroup, PerRow, PerTensor
from cq.transforms import ScaleConfig, absmax_scale, rel_output_error, round_to_nearest
from cq.transforms.rounding import working_dequantized
from cq.transforms.gptq import GPTQConfig, gptq_update
from cq.transforms.hessian import DampingConfig


def problem(n, k, t, seed, *, outliers=True):
    """(W, H, X): llm-like-ish W and correlated inputs X with outlier channels (algorithms.md §8)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    x = torch.randn(t, k, generator=g, dtype=torch.float64) @ (q * torch.arange(1, k + 1) ** -0.5).T
    x = x * torch.exp(0.5 * torch.randn(k, generator=g, dtype=torch.float64))
    if outliers:
        x[:, torch.randperm(k, generator=g)[: max(1, k // 100)]] *= 20
    w = torch.randn(n, k, generator=g) * torch.exp(0.25 * torch.randn(n, 1, generator=g))
    h = (2.0 / t) * x.T @ x
    return w, h.to(torch.float32), x.to(torch.float32)


def proxy(state):
    return rel_output_error(state.weight, working_dequantized(state), hessian=state.hessian)


def scaled(w, h, granularity=PerRow()):
    return absmax_scale(LayerState.from_weight("blk.fc", w, hessian=h), cfg=ScaleConfig(granularity))


@pytest.mark.parametrize("granularity", [PerRow(), PerTensor(), PerGroup(8), PerBlock(8)])
@pytest.mark.parametrize("actorder", [False, True])
def test_identity_hessian_without_damping_equals_rtn_code_for_code(granularity, actorder):
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    s = scaled(w, torch.eye(32), granularity)
    cfg = GPTQConfig(damping=DampingConfig(percdamp=0.0), actorder=actorder, block_size=8)
    assert torch.equal(gptq_update(s, cfg=cfg).codes, round_to_nearest(s).codes)


def test_no_hessian_is_rtn_with_a_note():
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    s = scaled(w, None)
    out = gptq_update(s)
    assert torch.equal(out.codes, round_to_nearest(s).codes)
    assert out.notes == ("no calibration: H = I, gptq_update equals round-to-nearest",)
    m = out.metrics
    assert m["rel_out_h"] == m["rel_out_rtn_h"] == pytest.approx(
        rel_output_error(w, working_dequantized(out), hessian=torch.eye(16)), rel=1e-9)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("granularity", [PerRow(), PerTensor(), PerGroup(16)])
def test_proxy_loss_never_above_rtn_on_random_problems(seed, granularity):
    w, h, _ = problem(24, 64, 256, seed)
    s = scaled(w, h, granularity)
    raw = gptq_update(s, cfg=GPTQConfig(never_worse_than_rtn=False, block_size=16))
    assert proxy(raw) <= proxy(round_to_nearest(s))
    assert raw.notes == ()


def test_achieved_loss_within_15_percent_of_uniform_error_prediction():
    w, h, _ = problem(256, 512, 4096, 11)
    out = gptq_update(scaled(w, h))
    m = out.metrics
    assert m["rel_out_h"] == pytest.approx(proxy(out), rel=1e-6)
    assert abs(m["rel_out_h"] / m["predicted_rel_out"] - 1) <= 0.15
    assert abs(m["rel_out_rtn_h"] / m["predicted_rel_out_rtn"] - 1) <= 0.15
    assert m["rel_out_h"] < 0.75 * m["rel_out_rtn_h"]
    assert m["damp"] == pytest.approx(0.01) and m["cholesky_tries"] == 1


def test_actorder_improves_or_keeps_loss_on_outlier_columns():
    for seed in range(3):
        w, h, _ = problem(64, 128, 1024, 20 + seed)
        s = scaled(w, h)
        plain = proxy(gptq_update(s, cfg=GPTQConfig(never_worse_than_rtn=False)))
        ordered = proxy(gptq_update(s, cfg=GPTQConfig(actorder=True, never_worse_than_rtn=False)))
        assert ordered <= plain * 1.001


def test_actorder_equals_gptq_on_the_permuted_problem():
    w, h, _ = problem(16, 48, 256, 3)
    perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    ordered = gptq_update(scaled(w, h), cfg=GPTQConfig(actorder=True, metrics=False))
    manual = gptq_update(scaled(w[:, perm], h[perm][:, perm]), cfg=GPTQConfig(metrics=False))
    assert torch.equal(ordered.codes[:, perm], manual.codes)


@pytest.mark.parametrize("granularity", [PerGroup(16), PerBlock(16)])
def test_static_groups_keep_scales_with_actorder(granularity):
    w, h, _ = problem(32, 64, 512, 4)
    s = scaled(w, h, granularity)
    out = gptq_update(s, cfg=GPTQConfig(actorder=True, never_worse_than_rtn=False))
    assert out.scale is s.scale and out.format == "int8_blockwise"
    assert proxy(out) < proxy(round_to_nearest(s))


def test_lazy_and_textbook_loops_agree():
    w, h, _ = problem(32, 96, 512, 5)
    s = scaled(w, h)
    lazy = gptq_update(s, cfg=GPTQConfig(block_size=32))
    plain = gptq_update(s, cfg=GPTQConfig(lazy_batch=False))
    odd = gptq_update(s, cfg=GPTQConfig(block_size=7))
    assert torch.equal(lazy.codes, plain.codes) and torch.equal(lazy.codes, odd.codes)


def test_float32_path_close_to_float64():
    w, h, _ = problem(64, 128, 1024, 6)
    s = scaled(w, h)
    f64 = gptq_update(s, cfg=GPTQConfig(precision="float64"))
    f32 = gptq_update(s, cfg=GPTQConfig(precision="float32"))
    assert (f64.codes != f32.codes).float().mean() < 0.01
    assert f32.metrics["rel_out_h"] == pytest.approx(f64.metrics["rel_out_h"], rel=0.01)


def test_inputs_never_modified_and_contract_kept():
    w, h, _ = problem(16, 32, 128, 7)
    h[:, 3] = 0
    h[3, :] = 0
    s = scaled(w, h)
    before = (s.weight.clone(), s.hessian.clone(), s.scale.clone())
    out = gptq_update(s, cfg=GPTQConfig(actorder=True, damping=DampingConfig(dead_columns="zero")))
    assert torch.equal(s.weight, before[0]) and torch.equal(s.hessian, before[1]) and torch.equal(s.scale, before[2])
    assert out.weight is s.weight and out.hessian is s.hessian
    assert out.codes.dtype == torch.int8 and out.codes.abs().max() <= 127
    assert out.codes[:, 3].eq(0).all()
    assert out.format == "int8_tensorwise" and out.stage_names()[-1] == "gptq_update"
    again = gptq_update(s, cfg=GPTQConfig(actorder=True, damping=DampingConfig(dead_columns="zero")))
    assert torch.equal(out.codes, again.codes)


def test_dead_columns_round_to_nearest_by_default():
    w, h, _ = problem(16, 32, 128, 8)
    h[:, [2, 9]] = 0
    h[[2, 9], :] = 0
    s = scaled(w, h)
    out = gptq_update(s)
    rtn = round_to_nearest(s).codes
    assert torch.equal(out.codes[:, [2, 9]], rtn[:, [2, 9]])
    assert any("2 dead input column(s)" in n for n in out.notes)


@pytest.mark.parametrize("case", ["indefinite", "singular", "rank_deficient", "zero", "nan", "inf"])
def test_bad_hessians_never_crash(case):
    w, h, x = problem(16, 32, 128, 9)
    if case == "indefinite":
        h = h - 3 * h.diagonal().mean() * torch.eye(32)
    elif case == "singular":
        h = torch.ones(32, 32)
    elif case == "rank_deficient":
        h = 2 / 4 * x[:4].T @ x[:4]
    elif case == "zero":
        h = torch.zeros(32, 32)
    elif case == "nan":
        h = h.clone()
        h[1, 2] = float("nan")
    else:
        h = h.clone()
        h[0, 0] = float("inf")
    s = scaled(w, h)
    out = gptq_update(s, cfg=GPTQConfig(damping=DampingConfig(percdamp=0.0)))
    assert out.codes.dtype == torch.int8 and out.codes.abs().max() <= 127
    if case in ("nan", "inf"):
        assert torch.equal(out.codes, round_to_nearest(s).codes)
        assert out.notes[-1].startswith("warning: Hessian has 1 non-finite entries")
    elif case == "zero":  # every input dead: nothing to trade off, round to nearest
        assert torch.equal(out.codes, round_to_nearest(s).codes)
    else:
        assert proxy(out) <= proxy(round_to_nearest(s)) * (1 + 1e-6)


def test_negative_definite_hessian_falls_back_to_rtn_with_warning_note():
    # issue 8.4: judged before use (it used to be damped until it factored, with meaningless metrics)
    w, h, _ = problem(8, 16, 64, 10)
    s = scaled(w, -h)
    out = gptq_update(s, cfg=GPTQConfig(damping=DampingConfig(max_tries=0)))
    assert torch.equal(out.codes, round_to_nearest(s).codes)
    assert out.notes[-1].startswith("warning: Hessian is negative-definite")
    assert "predicted_rel_out" not in out.metrics


def test_wrong_hessian_shape_and_missing_scale_raise():
    w = torch.randn(4, 8)
    with pytest.raises(InputError, match="blk.fc: Hessian must be \\[8, 8\\]"):
        gptq_update(scaled(w, torch.eye(4)))
    with pytest.raises(CqError, match="needs scales"):
        gptq_update(LayerState.from_weight("blk.fc", w, hessian=torch.eye(8)))


@pytest.mark.parametrize("kwargs", [dict(block_size=0), dict(static_groups=False), dict(precision="half"),
                                    dict(damping=0.01), dict(backend="cuda-magic")])
def test_config_validation(kwargs):
    with pytest.raises(ConfigError):
        GPTQConfig(**kwargs)


def test_bf16_weight_is_accepted():
    w, h, _ = problem(8, 32, 128, 12)
    out = gptq_update(scaled(w.to(torch.bfloat16), h))
    assert out.metrics["rel_out_h"] <= out.metrics["rel_out_rtn_h"]


# --- converter and pipeline -------------------------------------------------------------------


def test_converter_returns_reference_triple_and_matches_the_transform():
    w, h, _ = problem(16, 64, 256, 13)
    q, scale, deq = GPTQInt8Converter().convert(w, H=h * 1000)  # any positive multiple of XᵀX
    assert q.dtype == torch.int8 and tuple(scale.shape) == (16, 1) and deq.dtype == torch.float32
    assert torch.equal(deq, q.float() * scale)
    assert torch.equal(q, gptq_update(scaled(w, h)).codes)
    q_t, s_t, _ = GPTQInt8Converter(scaling="tensor").convert(w, H=h)
    assert s_t.shape == () and q_t.abs().max() == 127
    q_none, _, _ = GPTQInt8Converter().convert(w)
    assert torch.equal(q_none, round_to_nearest(scaled(w, None)).codes)


def test_converter_options_and_warnings():
    with pytest.warns(UserWarning, match="no Triton GPTQ kernel"):
        GPTQInt8Converter(use_triton=True)
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="CUDA is not available"):
            conv = GPTQInt8Converter(device="cuda")
        assert conv.device.type == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conv = GPTQInt8Converter(64, 0.05, "cpu", True, False, False, True, True, scaling="group")
    assert conv.config.block_size == 64 and conv.config.actorder and not conv.config.lazy_batch
    assert conv.config.damping.percdamp == 0.05 and conv.granularity == PerGroup(64)
    with pytest.raises(ConfigError, match="scaling="):
        GPTQInt8Converter(scaling="axiswise")
    with pytest.raises(InputError):
        GPTQInt8Converter().convert(torch.randn(3, 4, 5))
    state = GPTQInt8Converter().convert_state(torch.randn(4, 8), torch.eye(8), name="x.fc")
    assert state.name == "x.fc" and "rel_out_h" in state.metrics


def test_gptq_pipeline_with_metrics_inputs_records_w8a8():
    w, h, x = problem(16, 32, 256, 14)
    pipe = gptq_pipeline(granularity=PerRow(), gptq=GPTQConfig(actorder=True), metrics_x=x[:64])
    assert pipe.names[-1] == "measure"
    out = pipe(LayerState.from_weight("blk.fc", w, hessian=h))
    m = out.metrics
    assert {"rel_out_h", "rel_out_rtn_h", "predicted_rel_out", "w8a8", "rel_out_x"} <= set(m)
    assert math.isfinite(m["w8a8"]) and m["rel_out_h"] < m["rel_out_rtn_h"]
