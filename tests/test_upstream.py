"""Sequential calibration (cq.sequential) and the GPTAQ-style upstream correction (cq.transforms.upstream)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from cq.calibrate import capture
from cq.config import ConvertConfig
from cq.convert import convert_file
from cq.errors import ConfigError, CqError, InputError
from cq.io.calibration import layer_data, load_calibration, save_calibration
from cq.recipes import GPTQ, QuIP, recipe_pipeline
from cq.sequential import capture_sequential
from cq.state import LayerState
from cq.transforms import reconstruct
from cq.transforms.attach import LayerData, attach_data
from cq.transforms.convrot import convrot
from cq.transforms.hessian_check import check_hessian
from cq.transforms.quip import QuIPConfig
from cq.transforms.upstream import UpstreamConfig, upstream_correct


def _pair(seed, t, k, noise=0.05):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g, dtype=torch.float64)
    xq = x + noise * torch.randn(t, k, generator=g, dtype=torch.float64) + noise * (x @ torch.randn(
        k, k, generator=g, dtype=torch.float64)) / k ** 0.5
    return x, xq


def _stats(x, xq):
    t = x.shape[0]
    return (2.0 / t) * xq.T @ xq, (2.0 / t) * (x - xq).T @ xq


# -- the transform ----------------------------------------------------------------------------------


def test_full_strength_without_ridge_is_the_least_squares_fit_to_the_float_output():
    x, xq = _pair(0, 400, 24)
    w = torch.randn(16, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    h, d = _stats(x, xq)
    s = LayerState.from_weight("fc", w.float(), hessian=h.float(), meta={"upstream": d.float()})
    out = upstream_correct(s, cfg=UpstreamConfig(strength=1.0, ridge=0.0))
    ref = torch.linalg.lstsq(xq, x @ w.T).solution.T  # float64 argmin ‖X Wᵀ − X̃ W'ᵀ‖
    # float32 inputs (rel. 6e-8) through a solve with κ(H) < 10 (asserted), result rounded to float32
    assert float(torch.linalg.cond(h)) < 10
    assert float((out.weight.double() - ref).abs().max() / ref.abs().max()) < 1e-5
    assert torch.equal(out.original, s.original)  # the report still compares against W


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), strength=st.floats(0.0, 1.0), ridge=st.floats(0.0, 2.0))
@example(seed=0, strength=1.0, ridge=0.0)
@example(seed=3, strength=0.5, ridge=0.1)
def test_the_correction_never_increases_the_error_against_the_float_output(seed, strength, ridge):
    # f(W + s·p) ≤ f(W) for s ∈ [0, 1] because p = W·D·(H + rI)⁻¹ is a descent direction whose
    # curvature term is bounded by (H + rI)⁻¹ H (H + rI)⁻¹ ⪯ (H + rI)⁻¹.
    x, xq = _pair(seed, 200, 12, noise=0.2)
    w = torch.randn(6, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    h, d = _stats(x, xq)
    s = LayerState.from_weight("fc", w, hessian=h, meta={"upstream": d})
    out = upstream_correct(s, cfg=UpstreamConfig(strength=strength, ridge=ridge))

    def err(v):
        return float(((x @ w.T - xq @ v.T) ** 2).sum())

    assert err(out.weight) <= err(w) * (1 + 1e-12)


def test_nothing_to_correct_passes_the_state_through():
    s = LayerState.from_weight("fc", torch.randn(3, 4), hessian=torch.eye(4))
    assert upstream_correct(s) is s  # no cross term: a file captured without capture_sequential
    s2 = LayerState.from_weight("fc", torch.randn(3, 4), hessian=torch.eye(4), meta={"upstream": torch.ones(4, 4)})
    assert upstream_correct(s2, cfg=UpstreamConfig(strength=0.0)) is s2


def test_bad_cross_terms_and_orders_are_refused():
    s = LayerState.from_weight("fc", torch.randn(3, 4), hessian=torch.eye(4), meta={"upstream": torch.ones(3, 3)})
    with pytest.raises(InputError, match=r"\[3, 3\].*\[4, 4\]"):
        upstream_correct(s)
    r = convrot(LayerState.from_weight("fc", torch.randn(3, 16), hessian=torch.eye(16),
                                       meta={"upstream": torch.ones(16, 16)}))
    with pytest.raises(CqError, match="before the rotation"):
        upstream_correct(r)
    with pytest.raises(ConfigError, match="strength"):
        UpstreamConfig(strength=1.5)
    with pytest.raises(ConfigError, match="ridge"):
        UpstreamConfig(ridge=-1)


def test_dead_inputs_keep_their_weights():
    x, xq = _pair(5, 300, 8)
    x[:, 3] = 0
    xq[:, 3] = 0
    w = torch.randn(4, 8, dtype=torch.float64)
    h, d = _stats(x, xq)
    out = upstream_correct(LayerState.from_weight("fc", w, hessian=h, meta={"upstream": d}))
    assert torch.isfinite(out.weight).all() and torch.equal(out.weight[:, 3], w[:, 3])


# -- the sequential capture -------------------------------------------------------------------------


class Attn(torch.nn.Module):
    """Two Linears reading one input (like q/k/v), a third on their product, a mask-aware input."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(8, 8)
        self.v = torch.nn.Linear(8, 8)
        self.o = torch.nn.Linear(8, 6)

    def forward(self, x, attention_mask=None):
        h = torch.tanh(self.q(x)) * self.v(x)
        return self.o(h)


def _items(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(2, 5, dtype=torch.long)
        mask[1, 3:] = 0  # two padding positions in the second sequence
        out.append({"x": torch.randn(2, 5, 8, generator=g), "attention_mask": mask})
    return out


def test_sequential_statistics_equal_a_manual_run_of_the_partly_quantized_model():
    torch.manual_seed(0)
    model = Attn().eval()
    before = copy.deepcopy(model.state_dict())
    items = _items()
    stats = capture_sequential(model, items, quantize=GPTQ(), token_mask="attention_mask")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model untouched
    # q and v read the same input: one group, nothing upstream, the plain capture's Hessian
    plain = capture(model, [{"x": it["x"][it["attention_mask"].bool()]} for it in items])
    for name in ("q", "v"):
        assert float(stats[name].upstream.abs().max()) == 0.0
        torch.testing.assert_close(stats[name].hessian, plain[name].hessian, rtol=1e-6, atol=1e-6)
        assert stats[name].samples == 4 * 8  # padding rows left out
    # o: rebuild by hand — quantize q and v with their statistics, run both models, pair the rows
    work = copy.deepcopy(model)
    body = recipe_pipeline(GPTQ())
    for name in ("q", "v"):
        lin = getattr(work, name)
        st0 = stats[name]
        data = LayerData(hessian=st0.hessian, upstream=st0.upstream,
                         stats={"input_absmax": st0.input_absmax, "input_mean": st0.input_mean,
                                "samples": st0.samples})
        q = body(check_hessian(attach_data(LayerState.from_weight(name, lin.weight.detach().clone(),
                                                                  bias=lin.bias.detach().clone()), cfg=data)))
        with torch.no_grad():
            lin.weight.copy_(reconstruct(q))
    xs, xqs = [], []
    for it in items:
        m = it["attention_mask"].bool()
        with torch.no_grad():
            xs.append((torch.tanh(model.q(it["x"])) * model.v(it["x"]))[m].double())
            xqs.append((torch.tanh(work.q(it["x"])) * work.v(it["x"]))[m].double())
    x, xq = torch.cat(xs), torch.cat(xqs)
    h, d = _stats(x, xq)
    assert float(d.abs().max()) > 0  # the quantized prefix changed o's inputs
    # float64 sums of bit-identical float32 rows (only the summation order differs, ~1e-16 relative),
    # stored as float32: at most half an ulp, 2^-24 relative
    torch.testing.assert_close(stats["o"].hessian.double(), h, rtol=2 ** -23, atol=1e-12)
    torch.testing.assert_close(stats["o"].upstream.double(), d, rtol=2 ** -23, atol=1e-12)


def test_capture_sequential_refuses_what_it_cannot_use():
    model = Attn().eval()
    with pytest.raises(InputError, match="no calibration inputs"):
        capture_sequential(model, [], quantize=QuIP())
    with pytest.raises(ConfigError, match="quantize"):
        capture_sequential(model, _items(1), quantize=42)
    with pytest.raises(InputError, match="token_mask"):
        capture_sequential(model, [(torch.randn(2, 5, 8),)], quantize=GPTQ(), token_mask="attention_mask")
    with pytest.raises(ConfigError, match="max_tokens"):
        capture_sequential(model, _items(1), quantize=GPTQ(), max_tokens=0)


def test_the_correction_lowers_the_whole_model_error_on_held_out_inputs():
    # A 4-layer MLP whose layers are wide enough that rounding errors accumulate: GPTQ on the
    # sequential file (upstream correction on) against the same recipe without the correction.
    torch.manual_seed(1)
    dims = (32, 64, 64, 64, 16)
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers[:-1]).eval()
    with torch.no_grad():
        for m in model:
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(4.0)  # larger weights: bigger int8 steps, a measurable upstream error
    calib = [torch.randn(256, 32) for _ in range(8)]
    held = torch.randn(2048, 32)
    stats = capture_sequential(model, calib, quantize=GPTQ())

    def error(strength):
        q = copy.deepcopy(model)
        body = recipe_pipeline(GPTQ(upstream_strength=strength))
        for name, lin in q.named_children():
            if not isinstance(lin, torch.nn.Linear):
                continue
            st0 = stats[name]
            data = LayerData(hessian=st0.hessian, upstream=st0.upstream, stats={"samples": st0.samples})
            out = body(attach_data(LayerState.from_weight(name, lin.weight.detach().clone()), cfg=data))
            with torch.no_grad():
                lin.weight.copy_(reconstruct(out))
        with torch.no_grad():
            ref = model(held)
            return float((q(held) - ref).norm() / ref.norm())

    assert error(0.5) < 0.97 * error(0.0)  # measured 0.85: a margin, not a knife edge


# -- the file and the runner -------------------------------------------------------------------------


def _model_and_calibration(tmp_path):
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)).eval()
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.weight.mul_(3.0)
    src = tmp_path / "m.safetensors"
    save_file({f"blocks.{i}.weight": model[i].weight.detach().clone().contiguous() for i in (0, 2)}
              | {f"blocks.{i}.bias": model[i].bias.detach().clone().contiguous() for i in (0, 2)}, str(src))
    stats = capture_sequential(model, [torch.randn(128, 64) for _ in range(4)], quantize=QuIP(), name_map="blocks.")
    return model, src, stats


def test_a_sequential_file_round_trips_and_drives_the_conversion(tmp_path):
    from safetensors import safe_open

    _, src, stats = _model_and_calibration(tmp_path)
    seq = save_calibration(tmp_path / "seq.safetensors", stats)
    plain = save_calibration(tmp_path / "plain.safetensors",
                             {k: type(v)(v.hessian, v.input_absmax, v.input_mean, v.samples) for k, v in stats.items()})
    cal = load_calibration(seq)
    assert torch.equal(cal.upstream("blocks.2", k=64), stats["blocks.2"].upstream)
    assert layer_data(cal, "blocks.2", 64).upstream is not None
    assert load_calibration(plain).upstream("blocks.2") is None  # older files: the published algorithms

    outs = {}
    for name, calib in (("seq", seq), ("plain", plain)):
        dst = tmp_path / f"{name}.out.safetensors"
        convert_file(str(src), str(dst), ConvertConfig(recipe=QuIP(), calibration_path=str(calib)))
        with safe_open(str(dst), framework="pt") as f:
            outs[name] = f.get_tensor("blocks.2.weight")
    assert not torch.equal(outs["seq"], outs["plain"])  # the cross term changed the second layer's codes
    dst = tmp_path / "off.out.safetensors"
    convert_file(str(src), str(dst), ConvertConfig(recipe=QuIP(QuIPConfig(upstream_strength=0.0)),
                                                   calibration_path=str(seq)))
    with safe_open(str(dst), framework="pt") as f:
        off = f.get_tensor("blocks.2.weight")
    # strength 0 on the sequential file = the plain file's Hessian path: identical codes
    assert torch.equal(off, outs["plain"])


def test_a_damaged_cross_term_is_refused_with_its_name(tmp_path):
    _, _, stats = _model_and_calibration(tmp_path)
    p = save_calibration(tmp_path / "c.safetensors", stats)
    from safetensors.torch import load_file

    t = load_file(str(p))
    t["blocks.2.upstream"] = torch.ones(3, 3)
    bad = tmp_path / "bad.safetensors"
    save_file(t, str(bad), metadata={"format": "cq-calibration-1", "samples": "512"})
    with pytest.raises(InputError, match=r"blocks\.2\.upstream must be \[64, 64\]"):
        load_calibration(bad)
    t["blocks.2.upstream"] = torch.full((64, 64), float("nan"))
    save_file(t, str(bad), metadata={"format": "cq-calibration-1", "samples": "512"})
    with pytest.raises(InputError, match="finite"):
        load_calibration(bad).upstream("blocks.2", k=64)


def test_upstream_strength_is_an_option_of_gptq_and_quip_only():
    from cq.options import build_config

    _, _, cfg = build_config(dict(input_file="a.safetensors", output_file="b.safetensors", optimizer="gptq",
                                  upstream_strength=0.25, calibration_data_path="c.safetensors"))
    assert cfg.recipe.upstream_strength == 0.25
    _, _, cfg = build_config(dict(input_file="a.safetensors", output_file="b.safetensors", optimizer="quip",
                                  upstream_strength=0.0))
    assert cfg.recipe.quip.upstream_strength == 0.0
    with pytest.raises(ConfigError, match="upstream_strength"):
        build_config(dict(input_file="a.safetensors", output_file="b.safetensors", upstream_strength=0.5))


def test_plain_capture_leaves_padding_out_too():
    torch.manual_seed(3)
    model = Attn().eval()
    items = _items(3, seed=5)
    masked = capture(model, items, token_mask="attention_mask")
    by_hand = capture(model, [{"x": it["x"][it["attention_mask"].bool()]} for it in items])
    for name in ("q", "v"):
        assert masked[name].samples == by_hand[name].samples == 3 * 8
        torch.testing.assert_close(masked[name].hessian, by_hand[name].hessian, rtol=1e-6, atol=1e-6)
    assert capture(model, items)["q"].samples == 3 * 10  # without the mask every position counts
    with pytest.raises(InputError, match="token_mask"):
        capture(model, [(torch.randn(2, 5, 8),)], token_mask="attention_mask")


class Loop(torch.nn.Module):
    """Three Linears; an item's ``"reps"`` says how often the middle block runs (structure varies by input)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)
        self.c = torch.nn.Linear(8, 4)

    def forward(self, x, reps=1):
        h = torch.tanh(self.a(x))
        for _ in range(int(reps)):
            h = torch.tanh(self.b(h)) + h
        return self.c(h)


def _same_stats(s1, s2):
    assert sorted(s1) == sorted(s2)
    for k in s1:
        assert s1[k].samples == s2[k].samples, k
        assert torch.equal(s1[k].hessian, s2[k].hessian), k
        assert torch.equal(s1[k].upstream, s2[k].upstream), k


@pytest.mark.parametrize("reps", [(1, 1, 1), (1, 3, 2), (3, 1, 2)])
def test_early_exit_gives_the_statistics_of_whole_passes(reps):
    # The first item's call sequence plans the stops; items that call the Linears in another order
    # (more or fewer repetitions of b) must still be captured whole, bit for bit.
    torch.manual_seed(1)
    model = Loop().eval()
    g = torch.Generator().manual_seed(2)
    items = [{"x": torch.randn(6, 8, generator=g), "reps": r} for r in reps]
    fast = capture_sequential(model, items, quantize=GPTQ())
    whole = capture_sequential(model, items, quantize=GPTQ(), early_exit=False)
    _same_stats(fast, whole)
    assert fast["b"].samples == 6 * sum(reps)


def test_early_exit_skips_the_later_layers_and_survives_a_forward_that_catches_exceptions():
    torch.manual_seed(3)
    model = Loop().eval()
    seen = []
    model.c.register_forward_hook(lambda mod, args, out: seen.append(1))  # c actually ran

    def forward(m, item):
        try:
            m(**item)
        except Exception:  # a user's catch-all must not swallow the early exit
            raise AssertionError("the early exit reached the user's except Exception")

    items = [{"x": torch.randn(5, 8)} for _ in range(3)]
    fast = capture_sequential(model, items, quantize=GPTQ(), forward=forward)
    # plan pass + 2 passes × 3 items for c's own group; a's and b's groups stop before c
    assert len(seen) == 1 + 2 * 3
    seen.clear()
    whole = capture_sequential(model, items, quantize=GPTQ(), forward=forward, early_exit=False)
    assert len(seen) == 1 + 3 * 2 * 3
    _same_stats(fast, whole)
    with pytest.raises(ConfigError, match="early_exit"):
        capture_sequential(model, items, quantize=GPTQ(), early_exit="yes")
