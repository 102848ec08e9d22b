"""Laws of the LoRA merge (cq.lora, cq.transforms.lora): identity, linearity, inputs untouched."""

import pytest

pytest.importorskip("hypothesis")

import torch  # noqa: E402
from hypothesis import example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cq.lora import merge_lora_into_weight, merge_multiple_loras  # noqa: E402
from cq.state import LayerState  # noqa: E402
from cq.transforms.lora import MergeLoraConfig, merge_lora  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@st.composite
def lora_problems(draw, *, dtypes=st.sampled_from(DTYPES)):
    """``(W, A, B, alpha, rank)`` drawn as sizes + a seed, materialized with a seeded generator."""
    n = draw(st.integers(1, 24))
    k = draw(st.integers(1, 24))
    r = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    w_scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    dtype = draw(dtypes)
    alpha = draw(st.floats(0.25, 64.0))
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * w_scale).to(dtype)
    a = torch.randn(r, k, generator=g) * 0.2
    b = torch.randn(n, r, generator=g) * 0.2
    return w, a, b, alpha, r


@given(lora_problems(), st.floats(-4.0, 4.0))
@example((torch.tensor([[65504.0]], dtype=torch.float16), torch.ones(1, 1), torch.zeros(1, 1), 1.0, 1), 1.0)
def test_zero_lora_is_the_identity(problem, scale):
    w, a, _, alpha, r = problem
    b0 = torch.zeros(w.shape[0], r)
    merged = merge_lora_into_weight(w, a, b0, alpha, r, scale)
    assert merged.dtype == w.dtype and torch.equal(merged, w)
    assert torch.equal(merge_multiple_loras(w, [{"lora_A": a, "lora_B": b0, "alpha": alpha, "rank": r}] * 2), w)
    state = merge_lora(LayerState.from_weight("fc", w), cfg=MergeLoraConfig([(a, b0, alpha, r, scale)]))
    assert torch.equal(state.weight, w.to(state.weight.dtype))


@given(lora_problems(dtypes=st.just(torch.float64)), st.floats(-3.0, 3.0), st.floats(-3.0, 3.0))
def test_merge_is_linear_in_scale(problem, s1, s2):
    w, a, b, alpha, r = problem
    d1 = merge_lora_into_weight(w, a, b, alpha, r, s1) - w
    d2 = merge_lora_into_weight(w, a, b, alpha, r, s2) - w
    d12 = merge_lora_into_weight(w, a, b, alpha, r, s1 + s2) - w
    # float64 throughout: the only error is rounding W + Δ, a few ulps of |W| + |Δ|
    tol = 8 * torch.finfo(torch.float64).eps * (w.abs() + d1.abs() + d2.abs() + d12.abs() + 1e-300)
    assert bool(((d12 - d1 - d2).abs() <= tol).all())


@given(lora_problems(), st.floats(-2.0, 2.0), st.booleans())
def test_inputs_are_never_modified(problem, scale, dampen):
    w, a, b, alpha, r = problem
    before = [t.clone() for t in (w, a, b)]
    ptrs = [t.data_ptr() for t in (w, a, b)]
    out1 = merge_lora_into_weight(w, a, b, alpha, r, scale)
    out2 = merge_multiple_loras(w, [{"lora_A": a, "lora_B": b, "alpha": alpha, "rank": r, "scale": scale}] * 2,
                                dampen=dampen)
    state = LayerState.from_weight("fc", w)
    out3 = merge_lora(state, cfg=MergeLoraConfig([(a, b, alpha, r, scale)], dampen=dampen))
    for t, ref, p in zip((w, a, b), before, ptrs):
        assert torch.equal(t, ref) and t.data_ptr() == p
    assert state.weight is w and state.original is w and state.history == ()
    for out in (out1, out2, out3.weight):
        assert out.data_ptr() != w.data_ptr()


@given(lora_problems(dtypes=st.sampled_from([torch.float32, torch.bfloat16])), st.floats(-2.0, 2.0))
def test_transform_equals_the_function_before_the_final_rounding(problem, scale):
    w, a, b, alpha, r = problem
    state = merge_lora(LayerState.from_weight("fc", w), cfg=MergeLoraConfig([(a, b, alpha, r, scale)]))
    assert state.weight.dtype == torch.float32
    assert torch.equal(state.weight.to(w.dtype), merge_lora_into_weight(w, a, b, alpha, r, scale))


# ---------------------------------------------------------------------------------------------
# The ComfyUI patch model (cq.lora.patches) and key map (cq.lora.keymap)

from cq.errors import InputError  # noqa: E402
from cq.lora import LoraPatch, apply_patch, comfy_key_map  # noqa: E402
from cq.lora.keymap import swap_scale_shift  # noqa: E402
from cq.model import DictView  # noqa: E402


def _patch(kind, n, k, r, seed, zero=False):
    g = torch.Generator().manual_seed(seed)

    def t(*s):
        x = torch.randn(*s, generator=g)
        return x * 0 if zero else x

    if kind == "lora":
        return LoraPatch("lora", {"up": t(n, r), "down": torch.randn(r, k, generator=g)}, alpha=float(r + 1))
    if kind == "loha":
        return LoraPatch("loha", {"w1a": t(n, r), "w1b": torch.randn(r, k, generator=g),
                                  "w2a": torch.randn(n, r, generator=g), "w2b": torch.randn(r, k, generator=g)}, 2.0)
    if kind == "lokr":
        return LoraPatch("lokr", {"w1": t(1, 1), "w2a": torch.randn(n, r, generator=g),
                                  "w2b": torch.randn(r, k, generator=g)}, alpha=3.0)
    return LoraPatch("diff", {"diff": t(n, k)})


KIND = st.sampled_from(["lora", "loha", "lokr", "diff"])


@given(KIND, st.integers(1, 12), st.integers(1, 12), st.integers(1, 4), st.integers(0, 2**31 - 1),
       st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), st.floats(-3, 3))
@example("lokr", 1, 1, 1, 0, torch.float16, 1.0)
def test_a_zero_patch_is_the_exact_identity(kind, n, k, r, seed, dtype, strength):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    out = apply_patch(w, _patch(kind, n, k, r, seed, zero=True), strength)
    assert out.dtype == torch.float32 and torch.equal(out, w.float())


@given(KIND, st.integers(1, 6), st.integers(1, 8), st.integers(0, 5), st.integers(0, 5), st.integers(0, 2**31 - 1))
@example("lora", 2, 3, 0, 0, 0)
def test_a_slice_patch_edits_only_its_rows_and_leaves_its_input_alone(kind, n, k, before, after, seed):
    w = torch.randn(before + n + after, k, generator=torch.Generator().manual_seed(seed))
    w0 = w.clone()
    p = _patch(kind, n, k, 2, seed)
    out = apply_patch(w, p, 0.7, (0, before, n))
    assert torch.equal(w, w0)
    assert torch.equal(out[:before], w[:before]) and torch.equal(out[before + n:], w[before + n:])
    assert torch.allclose(out[before:before + n], apply_patch(w[before:before + n], p, 0.7))


@given(KIND, st.integers(1, 6), st.integers(1, 6), st.integers(1, 3), st.integers(1, 7), st.integers(1, 7))
@example("lora", 2, 3, 1, 3, 2)  # the transposed shape: a reshape would accept it, the check must not
def test_the_cheap_shape_check_agrees_with_computing_the_delta(kind, n, k, r, n2, k2):
    p = _patch(kind, n, k, r, seed=1)
    try:
        p.raw_delta((n2, k2))
        computed = True
    except InputError:
        computed = False
    try:
        p.check((n2, k2))
        checked = True
    except InputError:
        checked = False
    assert checked == computed == ((n2, k2) == (n, k))


@given(st.integers(1, 8).map(lambda x: 2 * x))
def test_swap_scale_shift_is_an_involution(rows):
    x = torch.arange(float(rows * 3)).reshape(rows, 3)
    assert torch.equal(swap_scale_shift(swap_scale_shift(x)), x) and not torch.equal(swap_scale_shift(x), x)


@given(st.integers(1, 6), st.integers(0, 3), st.integers(0, 3), st.sampled_from(["", "diffusion_model.",
                                                                                   "model.diffusion_model."]))
@example(3, 1, 1, "")
def test_flux_diffusers_slices_tile_the_fused_weights(h, doubles, singles, prefix):
    keys = {prefix + "img_in.weight": torch.zeros(h, 2)}
    for i in range(doubles):
        keys[prefix + f"double_blocks.{i}.img_attn.qkv.weight"] = torch.zeros(3 * h, 1)
        keys[prefix + f"double_blocks.{i}.txt_attn.qkv.weight"] = torch.zeros(3 * h, 1)
    for i in range(singles):
        keys[prefix + f"single_blocks.{i}.linear1.weight"] = torch.zeros(7 * h, 1)
    m = comfy_key_map(DictView(keys))
    assert all(t.key in keys for t in m.targets.values())
    for i in range(doubles):
        for fused, names in ((f"double_blocks.{i}.img_attn.qkv.weight", ("to_q", "to_k", "to_v")),
                             (f"double_blocks.{i}.txt_attn.qkv.weight", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            rows = [m[f"transformer.transformer_blocks.{i}.attn.{q}"].offset for q in names]
            assert all(m[f"transformer.transformer_blocks.{i}.attn.{q}"].key == prefix + fused for q in names)
            assert rows == [(0, 0, h), (0, h, h), (0, 2 * h, h)]
    for i in range(singles):
        src = f"transformer.single_transformer_blocks.{i}"
        rows = [m[f"{src}.attn.{q}"].offset for q in ("to_q", "to_k", "to_v")] + [m[f"{src}.proj_mlp"].offset]
        assert rows == [(0, 0, h), (0, h, h), (0, 2 * h, h), (0, 3 * h, 4 * h)]  # together: every row of linear1
