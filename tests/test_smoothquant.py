"""Tests for cq.transforms.smoothquant: exact folds through whole blocks, structure detection, refusals."""

import pytest
import torch
import torch.nn.functional as F

from cq.calibrate import HessianStats
from cq.errors import ConfigError
from cq.model import DictView
from cq.transforms.smoothquant import SmoothQuantConfig, find_folds, fold_factors, smoothing_error, smoothquant

from flux_tiny import calibration_stats, forward, make_state_dict, random_inputs, w8a8_linear

H = 32


@pytest.fixture(scope="module")
def flux():
    sd = make_state_dict(H, 2, double=1, single=1, seed=0)
    stats = calibration_stats(sd, [random_inputs(H, seed=s) for s in range(3)])
    return sd, stats


def apply_all(edits, sd):
    return {k: edits.apply(k, v) for k, v in sd.items()}


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_flux_folds_are_found_with_the_documented_structure(flux):
    sd, _ = flux
    folds, skipped = find_folds(DictView(sd))
    kinds = sorted((f.kind, f.consumers) for f in folds)
    assert ("v_to_o", ("double_blocks.0.img_attn.proj", "double_blocks.0.txt_attn.proj")) in kinds
    assert ("v_to_o", ("single_blocks.0.linear2",)) in kinds
    assert ("modulation", ("final_layer.linear",)) in kinds
    assert sum(k == "modulation" for k, _ in kinds) == 4 + 1 + 1
    assert skipped == []
    vo = next(f for f in folds if f.consumers == ("single_blocks.0.linear2",))
    assert not vo.normalize and vo.width == H and {(e.start, e.stop) for e in vo.producers} == {(2 * H, 3 * H)}


@pytest.mark.parametrize("alpha", [0.3, 0.9])
def test_smoothed_float_model_equals_the_original(flux, alpha):
    # Bound: each fold is one division and one multiplication per weight (float64 here), so the
    # smoothed model differs from the original by float rounding only: ~1e-15 relative.
    sd, stats = flux
    edits = smoothquant(DictView(sd), cfg=SmoothQuantConfig(calibration=stats, alpha=alpha))
    assert edits.report["smoothquant"]["folded"]
    sd2 = apply_all(edits, sd)
    changed = [k for k in sd if not torch.equal(sd[k], sd2[k])]
    assert changed
    for seed in (10, 11):
        img, txt, vec = random_inputs(H, seed=seed, img_tokens=12, txt_tokens=5)
        assert rel(forward(sd2, img, txt, vec), forward(sd, img, txt, vec)) < 1e-12


def test_float32_fold_error_is_float_rounding(flux):
    # In float32 (what the runner applies edits in) the same check holds to ~1e-6: a few ulps per
    # element through three blocks whose activations have ±16 outlier channels.
    sd, stats = flux
    sd32 = {k: v.float() for k, v in sd.items()}
    edits = smoothquant(DictView(sd32), cfg=SmoothQuantConfig(calibration=stats))
    sd2 = apply_all(edits, sd32)
    img, txt, vec = random_inputs(H, seed=12, dtype=torch.float32)
    assert rel(forward(sd2, img, txt, vec), forward(sd32, img, txt, vec)) < 2e-5


@pytest.mark.parametrize("groupsize", [None, "auto"])
def test_search_lowers_the_whole_model_w8a8_error_on_held_out_inputs(flux, groupsize):
    sd, stats = flux
    edits = smoothquant(DictView(sd), cfg=SmoothQuantConfig(calibration=stats, convrot_groupsize=groupsize))
    for f in edits.report["smoothquant"]["folded"]:
        assert f["w8a8_rel_after"] < f["w8a8_rel_before"]
    sd2 = apply_all(edits, sd)
    lin = w8a8_linear(groupsize=None if groupsize is None else 16)  # "auto" for the folds' K = 32, 160
    assert held_out_w8a8_error(sd, sd2, lin) < 0.95 * held_out_w8a8_error(sd, sd, lin)


def held_out_w8a8_error(reference, model, linear, seeds=(20, 21)):
    """Whole-model relative output error of ``model`` run with ``linear`` against the float ``reference``."""
    num = den = 0.0
    for seed in seeds:
        img, txt, vec = random_inputs(H, seed=seed)
        y = forward(reference, img, txt, vec)
        num += float(((forward(model, img, txt, vec, linear=linear) - y) ** 2).sum())
        den += float((y ** 2).sum())
    return (num / den) ** 0.5


def test_warning_names_lora_mismatch_and_nothing_extra_is_written(flux):
    sd, stats = flux
    edits = smoothquant(DictView(sd), cfg=SmoothQuantConfig(calibration=stats))
    assert any("LoRA" in w for w in edits.warnings)
    assert set(edits.stages) <= set(sd)


def bert_like(k=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = "encoder.layer.0"
    sd = {f"{p}.attention.self.query.weight": torch.randn(k, k, generator=g),
          f"{p}.attention.self.key.weight": torch.randn(k, k, generator=g),
          f"{p}.attention.self.value.weight": torch.randn(k, k, generator=g),
          f"{p}.attention.self.value.bias": torch.randn(k, generator=g),
          f"{p}.attention.output.dense.weight": torch.randn(k, k, generator=g),
          f"{p}.attention.output.LayerNorm.weight": torch.ones(k),
          f"{p}.attention.output.LayerNorm.bias": torch.zeros(k),
          f"{p}.intermediate.dense.weight": torch.randn(4 * k, k, generator=g)}
    return {key: v.double() for key, v in sd.items()}


def test_post_ln_bert_gets_only_v_to_o_and_it_is_exact():
    sd = bert_like()
    folds, _ = find_folds(DictView(sd))
    assert [f.kind for f in folds] == ["v_to_o"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, 16, dtype=torch.float64)
    p = "encoder.layer.0.attention"

    def attn(m, x):
        q, k = x @ m[f"{p}.self.query.weight"].T, x @ m[f"{p}.self.key.weight"].T
        v = F.linear(x, m[f"{p}.self.value.weight"], m[f"{p}.self.value.bias"])
        return (torch.softmax(q @ k.T / 4, -1) @ v) @ m[f"{p}.output.dense.weight"].T

    a = torch.softmax((x @ sd[f"{p}.self.query.weight"].T) @ (x @ sd[f"{p}.self.key.weight"].T).T / 4, -1)
    o_in = a @ F.linear(x, sd[f"{p}.self.value.weight"], sd[f"{p}.self.value.bias"])
    o_in = o_in * torch.logspace(-1, 1, 16, dtype=torch.float64)  # make the search find something to fix
    st = {f"{p}.output.dense": HessianStats(hessian=2 / 64 * o_in.T @ o_in, input_absmax=o_in.abs().amax(0),
                                            input_mean=o_in.mean(0), samples=64)}
    edits = smoothquant(DictView(sd), cfg=SmoothQuantConfig(calibration=st, alpha=0.5, min_gain=0.0))
    folded, skipped = edits.report["smoothquant"]["folded"], edits.report["smoothquant"]["skipped"]
    assert len(folded) + len(skipped) == 1
    sd2 = apply_all(edits, sd)
    assert rel(attn(sd2, x), attn(sd, x)) < 1e-12
    assert f"{p}.output.LayerNorm.weight" not in edits.stages


def test_gqa_and_missing_statistics_are_skipped_and_listed():
    g = torch.Generator().manual_seed(2)
    sd = {"m.layers.0.self_attn.v_proj.weight": torch.randn(8, 16, generator=g),
          "m.layers.0.self_attn.o_proj.weight": torch.randn(16, 16, generator=g),
          "m.layers.0.mlp.gate_proj.weight": torch.randn(32, 16, generator=g),
          "m.layers.0.mlp.up_proj.weight": torch.randn(32, 16, generator=g),
          "m.layers.0.mlp.down_proj.weight": torch.randn(16, 32, generator=g)}
    folds, skipped = find_folds(DictView(sd))
    assert [f.kind for f in folds] == ["gated_mlp"]
    assert "grouped-query" in skipped[0]["reason"]
    edits = smoothquant(DictView(sd), cfg=SmoothQuantConfig(calibration={}))
    reasons = [s["reason"] for s in edits.report["smoothquant"]["skipped"]]
    assert any("no calibration statistics" in r for r in reasons)
    assert not edits.stages and not edits.warnings


def test_gated_mlp_and_pre_norm_folds_are_exact():
    g = torch.Generator().manual_seed(3)
    k, f = 16, 32
    sd = {"m.layers.0.post_attention_layernorm.weight": 1 + torch.rand(k, generator=g),
          "m.layers.0.mlp.gate_proj.weight": torch.randn(f, k, generator=g),
          "m.layers.0.mlp.up_proj.weight": torch.randn(f, k, generator=g),
          "m.layers.0.mlp.down_proj.weight": torch.randn(k, f, generator=g)}
    sd = {key: v.double() for key, v in sd.items()}

    def mlp(m, x, record=None):
        n = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6) * m["m.layers.0.post_attention_layernorm.weight"]
        hdn = F.silu(n @ m["m.layers.0.mlp.gate_proj.weight"].T) * (n @ m["m.layers.0.mlp.up_proj.weight"].T)
        if record is not None:
            record.update({"m.layers.0.mlp.gate_proj": n, "m.layers.0.mlp.up_proj": n, "m.layers.0.mlp.down_proj": hdn})
        return hdn @ m["m.layers.0.mlp.down_proj.weight"].T

    x = torch.randn(128, k, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, k, dtype=torch.float64)
    rec = {}
    mlp(sd, x, rec)
    st = {n: HessianStats(hessian=2 / 128 * v.T @ v, input_absmax=v.abs().amax(0), input_mean=v.mean(0), samples=128)
          for n, v in rec.items()}
    edits = smoothquant(DictView(sd), cfg=SmoothQuantConfig(calibration=st, min_gain=0.0))
    assert sorted(r["kind"] for r in edits.report["smoothquant"]["folded"]) in (["gated_mlp", "norm"], ["gated_mlp"],
                                                                             ["norm"])
    sd2 = apply_all(edits, sd)
    y = torch.randn(32, k, generator=g, dtype=torch.float64)
    assert rel(mlp(sd2, y), mlp(sd, y)) < 1e-12


def test_factors_and_errors():
    s = fold_factors(torch.tensor([16.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 1.0]), 0.5, normalize=True)
    assert s.tolist() == [1.0, 0.25, 0.25]  # dead channel: factor 1 before normalising
    x, w = torch.randn(32, 16), torch.randn(8, 16)
    e1, sig = smoothing_error(x, w, None)
    e2, _ = smoothing_error(x, w, torch.ones(16, dtype=torch.float64))
    assert e1 == pytest.approx(e2) and e1 < 1e-3 * sig


def test_config_errors():
    with pytest.raises(ConfigError, match="needs calibration data"):
        smoothquant(DictView({}), cfg=SmoothQuantConfig())
    with pytest.raises(ConfigError, match="alphas"):
        SmoothQuantConfig(alphas=(1.5,))
    with pytest.raises(ConfigError, match="power of 4"):
        SmoothQuantConfig(convrot_groupsize=32)
    assert SmoothQuantConfig(convrot_groupsize="auto").convrot_groupsize == "auto"
    with pytest.raises(ConfigError, match="kinds"):
        SmoothQuantConfig(kinds=("layernorm",))
    with pytest.raises(ConfigError, match="Calibration"):
        SmoothQuantConfig(calibration=3)


def test_shared_modulation_is_skipped_and_listed():
    sd = {"double_stream_modulation_img.lin.weight": torch.zeros(6 * 8, 8),
          "double_blocks.0.img_attn.qkv.weight": torch.zeros(24, 8)}
    folds, skipped = find_folds(DictView(sd))
    assert folds == [] and "shared across blocks" in skipped[0]["reason"]


def test_consumer_hessian_attached_before_the_edit_follows_the_smoothed_inputs(flux):
    # The consumer's inputs are x/s, so H = 2/T·XᵀX becomes diag(1/s)·H·diag(1/s): the proxy loss
    # tr(W H Wᵀ) of any weight error is the same before and after (float64: to rounding).
    sd, stats = flux
    edits = smoothquant(DictView(sd), cfg=SmoothQuantConfig(calibration=stats))
    key = "single_blocks.0.linear1.weight"
    from cq.state import LayerState
    st = LayerState.from_weight(key, sd[key], hessian=stats["single_blocks.0.linear1"].hessian.double())
    out = edits.apply_state(st, key)
    before = float(torch.trace(st.weight @ st.hessian @ st.weight.T))
    after = float(torch.trace(out.weight @ out.hessian @ out.weight.T))
    assert after == pytest.approx(before, rel=1e-12)
    assert not torch.equal(out.hessian, st.hessian)


def test_modulation_without_bias_is_not_folded_but_v_to_o_still_is(flux):
    sd, _ = flux
    sd = {k: v for k, v in sd.items() if k != "single_blocks.0.modulation.lin.bias"}
    folds, skipped = find_folds(DictView(sd))
    assert not any(f.consumers == ("single_blocks.0.linear1",) for f in folds)
    assert any(f.consumers == ("single_blocks.0.linear2",) for f in folds)
    assert any("no bias" in s["reason"] for s in skipped)


def test_wide_consumers_use_the_diagonal_and_a_row_subset_and_still_fold_exactly(flux):
    sd, stats = flux
    edits = smoothquant(DictView(sd), cfg=SmoothQuantConfig(calibration=stats, max_covariance_k=16, max_rows=8))
    assert edits.report["smoothquant"]["folded"]
    sd2 = apply_all(edits, sd)
    img, txt, vec = random_inputs(H, seed=13)
    assert rel(forward(sd2, img, txt, vec), forward(sd, img, txt, vec)) < 1e-12


def test_consumer_w8a8_statistics_are_dropped_with_a_note(flux):
    sd, stats = flux
    edits = smoothquant(DictView(sd), cfg=SmoothQuantConfig(calibration=stats))
    from cq.state import LayerState
    key = "final_layer.linear.weight"
    st = LayerState.from_weight(key, sd[key], meta={"w8a8_stats": {0: object()}, "other": 1})
    out = edits.apply_state(st, key)
    assert "w8a8_stats" not in out.meta and out.meta["other"] == 1
    assert any("recapture calibration" in n for n in out.notes)


def test_consumer_input_statistics_follow_the_smoothed_inputs(flux):
    # y = x·Wᵀ + b must keep its mean: mean(x/s)·(W·diag(s))ᵀ = mean(x)·Wᵀ (float64 rounding).
    sd, stats = flux
    edits = smoothquant(DictView(sd), cfg=SmoothQuantConfig(calibration=stats))
    from cq.state import LayerState
    key, stem = "double_blocks.0.img_mlp.0.weight", "double_blocks.0.img_mlp.0"  # a consumer only
    mean = stats[stem].input_mean.double()
    st = LayerState.from_weight(key, sd[key], meta={"calibration": {"input_mean": mean,
                                                                     "input_absmax": stats[stem].input_absmax}})
    out = edits.apply_state(st, key)
    new_mean = out.meta["calibration"]["input_mean"].double()
    assert torch.allclose(new_mean @ out.weight.T, mean @ sd[key].T, rtol=1e-6, atol=1e-6)
    assert not torch.equal(new_mean.float(), mean.float())


# -- Flux-2: shared bias-free modulations, SiLU-gated MLPs -------------------------------------------


@pytest.fixture(scope="module")
def flux2():
    sd = make_state_dict(H, 2, double=1, single=1, seed=3, flux2=True)
    stats = calibration_stats(sd, [random_inputs(H, seed=s) for s in range(3)])
    return sd, stats


def test_flux2_folds_are_the_attention_and_gated_mlp_ones(flux2):
    sd, _ = flux2
    folds, skipped = find_folds(DictView(sd))
    got = {(f.kind, f.consumers, f.col_start, f.width, tuple((e.key, e.start, e.stop) for e in f.producers))
           for f in folds}
    m = 3 * H
    assert got == {
        ("v_to_o", ("double_blocks.0.img_attn.proj", "double_blocks.0.txt_attn.proj"), 0, H,
         (("double_blocks.0.img_attn.qkv.weight", 2 * H, 3 * H), ("double_blocks.0.txt_attn.qkv.weight", 2 * H, 3 * H))),
        ("gated_mlp", ("double_blocks.0.img_mlp.2",), 0, m, (("double_blocks.0.img_mlp.0.weight", m, 2 * m),)),
        ("gated_mlp", ("double_blocks.0.txt_mlp.2",), 0, m, (("double_blocks.0.txt_mlp.0.weight", m, 2 * m),)),
        ("v_to_o", ("single_blocks.0.linear2",), 0, H, (("single_blocks.0.linear1.weight", 2 * H, 3 * H),)),
        ("gated_mlp", ("single_blocks.0.linear2",), H, m,
         (("single_blocks.0.linear1.weight", 3 * H + m, 3 * H + 2 * m),)),
    }
    reasons = {tuple(s["layers"]): s["reason"] for s in skipped}
    for mod in ("double_stream_modulation_img.lin", "double_stream_modulation_txt.lin", "single_stream_modulation.lin"):
        assert "without a bias" in reasons[(mod,)]
    assert "no bias" in reasons[("final_layer.adaLN_modulation.1",)]


@pytest.mark.parametrize("alpha", [0.3, 0.9])
def test_flux2_smoothed_float_model_equals_the_original(flux2, alpha):
    # Same bound as for Flux-1: one division and one multiplication per weight in float64. The gated
    # fold is exact because only the *value* half is divided: silu(gate) · (value / s) = (silu(gate) · value) / s.
    sd, stats = flux2
    edits = smoothquant(DictView(sd), cfg=SmoothQuantConfig(calibration=stats, alpha=alpha))
    kinds = {f["kind"] for f in edits.report["smoothquant"]["folded"]}
    assert "gated_mlp" in kinds
    sd2 = apply_all(edits, sd)
    assert not torch.equal(sd2["double_blocks.0.img_mlp.2.weight"], sd["double_blocks.0.img_mlp.2.weight"])
    for seed in (10, 11):
        img, txt, vec = random_inputs(H, seed=seed, img_tokens=12, txt_tokens=5)
        assert rel(forward(sd2, img, txt, vec), forward(sd, img, txt, vec)) < 1e-12


def test_a_fold_into_the_gate_half_would_not_be_exact(flux2):
    # The regression the layout check guards: dividing the *gate* rows is not a fold (silu is not linear).
    sd, _ = flux2
    m = 3 * H
    s = torch.linspace(0.5, 2.0, m, dtype=torch.float64)
    bad = dict(sd)
    bad["double_blocks.0.img_mlp.0.weight"] = sd["double_blocks.0.img_mlp.0.weight"].clone()
    bad["double_blocks.0.img_mlp.0.weight"][:m] /= s[:, None]
    bad["double_blocks.0.img_mlp.2.weight"] = sd["double_blocks.0.img_mlp.2.weight"] * s
    img, txt, vec = random_inputs(H, seed=10)
    assert rel(forward(bad, img, txt, vec), forward(sd, img, txt, vec)) > 1e-3


def test_flux2_search_lowers_the_whole_model_w8a8_error_on_held_out_inputs(flux2):
    sd, stats = flux2
    edits = smoothquant(DictView(sd), cfg=SmoothQuantConfig(calibration=stats, convrot_groupsize=None))
    assert edits.report["smoothquant"]["folded"]
    sd2 = apply_all(edits, sd)
    assert held_out_w8a8_error(sd, sd2, w8a8_linear()) < 0.95 * held_out_w8a8_error(sd, sd, w8a8_linear())


def test_yak_style_gated_mlps_are_skipped_and_listed(flux2):
    sd, _ = flux2
    sd = dict(sd)
    sd["double_blocks.0.img_mlp.gate_proj.weight"] = torch.zeros(3 * H, H, dtype=torch.float64)
    folds, skipped = find_folds(DictView(sd))
    assert not any(f.kind == "gated_mlp" for f in folds)
    assert any("yak_mlp" in s["reason"] for s in skipped)
    assert any(f.kind == "v_to_o" for f in folds)  # the attention folds do not depend on the MLP layout
